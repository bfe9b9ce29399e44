"""Print the fastprompt-vs-PEFT tables from pytest-benchmark JSON files.

    python bench/report.py bench/results/bloom-mini/*.json

Each file's provenance comes first (machine, threads, versions, commit; from
``machine_info`` and ``commit_info``, see ``bench/conftest.py``). Then every
benchmark that recorded ``extra_info`` becomes one row of the table of its
module: its case name, then the ``extra_info`` keys in the order recorded.
The keys that describe a whole run (the model's label, the data source, how
memory was measured) are printed above their table instead of as columns.
Tables with more columns than fit a terminal are printed transposed: one
column per case. A benchmark of several contenders with figures of their own
(``extra_info["contenders"]``: name -> metrics, as the method comparison
records) gets a table of its own below, one row per contender.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

CONTEXT_KEYS = ("model", "method", "data", "device", "memory_method", "published")
CONTENDER_KEY = "contenders"
MAX_COLUMNS = 10


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _aligned(grid: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def provenance(data: dict) -> list[str]:
    machine = data.get("machine_info", {})
    ours = machine.get("fastprompt_bench")
    commit = data.get("commit_info", {})
    commit_line = f"commit: {commit.get('id', '?')[:12]}{' + uncommitted changes' if commit.get('dirty') else ''}"
    if not ours:
        return [
            f"machine: {machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))}, "
            f"python {machine.get('python_version', '?')}",
            commit_line,
        ]
    load = ours.get("load_average_1min_start_end") or ["?", "?"]
    versions = ", ".join(f"{name} {v}" for name, v in ours["versions"].items())
    # Results recorded before the op became the packer name it embed_concat.
    backends = ours.get("pack_embed_backend") or ours.get("embed_concat_backend") or {}
    return [
        f"machine: {ours['cpu_model']}, {ours['logical_cpus']} logical CPUs ({ours['usable_cpus']} usable), "
        f"{ours['torch_threads']} torch threads, GPU: {ours['gpu'] or 'none'}, "
        f"1-min load average {load[0]} at start, {load[1]} at end",
        f"versions: {versions}; pack_embed on CPU: {backends.get('cpu')}",
        commit_line,
    ]


def _context(rows: list[dict]) -> list[str]:
    out = []
    for key in CONTEXT_KEYS:
        cases_by_value = defaultdict(list)
        for row in rows:
            if key in row:
                cases_by_value[row[key]].append(row["case"])
        if len(cases_by_value) == 1:
            out.append(f"{key}: {next(iter(cases_by_value))}")
        elif cases_by_value:
            out.append(
                f"{key}: " + "; ".join(f"{', '.join(cases)}: {value}" for value, cases in cases_by_value.items())
            )
    return out


def table(rows: list[dict]) -> list[str]:
    columns = list(
        dict.fromkeys(key for row in rows for key in row if key not in CONTEXT_KEYS and key != CONTENDER_KEY)
    )
    grid = [columns] + [[_cell(row.get(col, "")) for col in columns] for row in rows]
    if len(columns) > MAX_COLUMNS:
        grid = [list(line) for line in zip(*grid)]
    return _aligned(grid)


def contender_table(row: dict) -> list[str]:
    """One row per contender of ``row["contenders"]``, under the case's name."""
    contenders = row[CONTENDER_KEY]
    columns = list(dict.fromkeys(key for metrics in contenders.values() for key in metrics))
    grid = [["contender", *columns]]
    grid += [[name, *(_cell(metrics.get(col, "")) for col in columns)] for name, metrics in contenders.items()]
    return [f"{row['case']}, per contender:", *_aligned(grid)]


def report(paths: list[Path]) -> str:
    out = []
    shown = None
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{path}: not a pytest-benchmark JSON file ({err})") from None
        rows_by_module = defaultdict(list)
        for bench in data.get("benchmarks", []):
            if bench.get("extra_info"):
                module = bench["fullname"].split("::")[0]
                rows_by_module[module].append({"case": bench["name"].removeprefix("test_"), **bench["extra_info"]})
        if not rows_by_module:
            continue
        lines = provenance(data)
        if lines != shown:
            out.extend(["", *lines])
            shown = lines
        for module, rows in rows_by_module.items():
            out.extend(["", f"== {module}", *_context(rows), *table(rows)])
            for row in rows:
                if CONTENDER_KEY in row:
                    out.extend(["", *contender_table(row)])
    return "\n".join(out).strip("\n") if out else "no benchmark with extra_info found"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(report(args.json_files))


if __name__ == "__main__":
    main()
