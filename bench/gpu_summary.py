"""One summary of a GPU check run (``bench/gpu_check.sh``): correctness, then speed.

Reads what the steps left in the output folder — ``env.json`` (device,
versions, copy bandwidth), ``steps.tsv`` (each step's status and time), the
JUnit XML of the test steps and the pytest-benchmark JSON of the speed steps —
and writes ``summary.md`` and ``summary.json`` beside them:

* every step, ok, failed or skipped (with why: the 8-bit steps without
  bitsandbytes), with its time; a skipped step is not a failed one;
* the test steps' counts (passed / failed / skipped / expected failures);
* the fused op's GB/s as a share of the device's copy bandwidth;
* the benchmark tables (``report.py``), and for generation the decode rate
  next to its bandwidth bound: a decode step reads every weight once, so B
  rows cannot make more than B x copy bandwidth / weight bytes tokens/s.

    python bench/gpu_summary.py OUT
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import report
from flop_count import Dims

# Bytes a decode step reads per weight: bitsandbytes keeps linear layers in
# int8 and the (tied) vocabulary matrix in fp16.
WEIGHT_BYTES = {"float32": (4, 4), "bfloat16": (2, 2), "float16": (2, 2), "int8": (1, 2)}


def read_steps(folder: Path) -> list[dict]:
    """``steps.tsv``: name, status (ok | FAILED | skipped), seconds, limit and a
    note (why a step was skipped; empty otherwise)."""
    steps = []
    path = folder / "steps.tsv"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        name, status, seconds, limit, *note = line.split("\t")
        step = {"step": name, "status": status, "seconds": int(seconds), "limit_s": int(limit)}
        if note and note[0]:
            step["note"] = note[0]
        steps.append(step)
    return steps


def read_tests(folder: Path) -> dict:
    """Counts per JUnit file (one per test step)."""
    counts = {}
    for path in sorted(folder.glob("*.xml")):
        root = ElementTree.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for suite in suites:
            for key in total:
                total[key] += int(suite.get(key, 0))
        xfailed = sum(
            1
            for case in root.iter("testcase")
            for skip in case.findall("skipped")
            if (skip.get("type") or "").endswith("xfail")
        )
        counts[path.stem] = {
            "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"],
            "skipped": total["skipped"] - xfailed,
            "xfailed": xfailed,
        }
    return counts


def _benchmark_files(folder: Path) -> list[Path]:
    """The benchmark JSON files the steps wrote (not our own env/summary files)."""
    return sorted(p for p in folder.glob("*.json") if p.name not in ("env.json", "summary.json"))


def _benchmark_rows(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    setting = data.get("machine_info", {}).get("fastprompt_bench", {}).get("setting", {})
    rows = [
        {"case": bench["name"].removeprefix("test_"), **bench.get("extra_info", {})}
        for bench in data.get("benchmarks", [])
    ]
    return setting, rows


def op_bandwidth(folder: Path, copy_gb_s: float) -> list[dict]:
    rows = []
    for path in _benchmark_files(folder):
        _, benchmarks = _benchmark_rows(path)
        for row in benchmarks:
            for key, value in row.items():
                if key.endswith("_GB/s"):
                    rows.append(
                        {
                            "file": path.stem,
                            "case": row["case"],
                            "contender": key.removesuffix("_GB/s"),
                            "GB/s": round(value, 1),
                            "of_copy_bandwidth": round(value / copy_gb_s, 3),
                        }
                    )
    return rows


def _dims(setting: dict) -> Dims | None:
    """The model's sizes as the results file recorded them (``bench/conftest.py``);
    for files without them, from ``model_shapes`` (which imports torch and
    transformers: seconds, so only then)."""
    if "dims" in setting:
        return Dims(**setting["dims"])
    import model_shapes

    return model_shapes.dims(setting["model"]) if setting.get("model") in model_shapes.SHAPES else None


def decode_bounds(folder: Path, copy_gb_s: float) -> list[dict]:
    rows = []
    for path in _benchmark_files(folder):
        setting, benchmarks = _benchmark_rows(path)
        dims = _dims(setting) if setting else None
        if dims is None:
            continue
        linear_bytes, vocab_bytes = WEIGHT_BYTES[setting["dtype"]]
        weight_bytes = dims.layers * dims.layer_weights * linear_bytes + dims.vocab * dims.hidden * vocab_bytes
        for row in benchmarks:
            batch = re.search(r"B(\d+)", row["case"])
            if not batch or "fastprompt_decode_s" not in row:
                continue
            rows_per_step = int(batch.group(1))
            bound = rows_per_step * copy_gb_s * 1e9 / weight_bytes
            entry = {"file": path.stem, "case": row["case"], "bound_tokens_per_s": round(bound, 1)}
            for name, key in (
                ("fastprompt", "fastprompt_decode_s"),
                ("fastprompt_static", "fastprompt_static_decode_s"),
                ("peft_intended", "peft_intended_decode_s"),
            ):
                if key in row:
                    rate = rows_per_step / row[key]
                    entry[f"{name}_tokens_per_s"] = round(rate, 1)
                    entry[f"{name}_of_bound"] = round(rate / bound, 3)
            rows.append(entry)
    return rows


def _markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in keys) + " |" for row in rows]
    return lines


def summarise(folder: Path) -> tuple[dict, str]:
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").exists() else {}
    copy_gb_s = env.get("copy_bandwidth_GB/s") or float("nan")
    steps = read_steps(folder)
    failed = [step["step"] for step in steps if step["status"] not in ("ok", "skipped")]
    skipped = [step["step"] for step in steps if step["status"] == "skipped"]
    summary = {
        "device": env.get("device"),
        "versions": env.get("versions"),
        "copy_bandwidth_GB/s": env.get("copy_bandwidth_GB/s"),
        # No step failed (skipped ones are listed apart: they measured nothing, but broke nothing).
        "all_steps_ok": bool(steps) and not failed,
        "failed_steps": failed,
        "skipped_steps": skipped,
        "steps": steps,
        "tests": read_tests(folder),
        "op_bandwidth": op_bandwidth(folder, copy_gb_s),
        "decode_vs_bandwidth_bound": decode_bounds(folder, copy_gb_s),
    }
    benchmark_files = _benchmark_files(folder)
    text = [
        "# GPU check",
        "",
        f"- device: {summary['device']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in (summary['versions'] or {}).items())}",
        f"- copy bandwidth: {summary['copy_bandwidth_GB/s']} GB/s (read + write of a large device copy)",
        f"- all steps ok: {summary['all_steps_ok']}"
        + "".join(
            f"; {kind}: {', '.join(names)}" for kind, names in (("failed", failed), ("skipped", skipped)) if names
        ),
        "",
        "## Steps",
        *_markdown_table(steps),
        "",
        "## Correctness (test steps)",
        *_markdown_table([{"step": name, **counts} for name, counts in summary["tests"].items()]),
        "",
        "## Fused op bandwidth (share of the copy bandwidth)",
        *_markdown_table(summary["op_bandwidth"]),
        "",
        "## Decode rate against the bandwidth bound",
        *_markdown_table(summary["decode_vs_bandwidth_bound"]),
        "",
        "## Speed vs PEFT",
        "```",
        report.report(benchmark_files) if benchmark_files else "no benchmark results",
        "```",
    ]
    return summary, "\n".join(text) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    summary, text = summarise(args.folder)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (args.folder / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0 if summary["all_steps_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
