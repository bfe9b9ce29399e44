"""Print the fastprompt-vs-PEFT tables from pytest-benchmark JSON files.

    python bench/report.py bench/results/*.json

Every benchmark that recorded ``extra_info`` becomes one row of the table of
its module: its parameter id, then the ``extra_info`` keys in the order recorded.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def tables(paths: list[Path]) -> str:
    rows_by_module = defaultdict(list)
    machine = None
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{path}: not a pytest-benchmark JSON file ({err})") from None
        machine = machine or data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            if bench.get("extra_info"):
                module = bench["fullname"].split("::")[0]
                rows_by_module[module].append({"case": bench["name"].removeprefix("test_"), **bench["extra_info"]})
    out = []
    if machine:
        out.append(f"machine: {machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))}, "
                   f"python {machine.get('python_version', '?')}")
    for module, rows in rows_by_module.items():
        columns = list(dict.fromkeys(key for row in rows for key in row if not key.endswith("_method")))
        cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
        widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
        out.append(f"\n{module}")
        out.append("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
        out.append("  ".join("-" * w for w in widths))
        out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)
        notes = {v for row in rows for k, v in row.items() if k.endswith("_method")}
        out.extend(f"  ({note})" for note in sorted(notes))
    return "\n".join(out) if rows_by_module else "no benchmark with extra_info found"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(tables(args.json_files))


if __name__ == "__main__":
    main()
