"""``bench/gpu_check.sh --dry-run``: the GPU call's every step, on CPU with tiny
shapes, ends in a summary that holds what the real run must report; and where
bitsandbytes is missing (the GPU image, unless its wheel is carried) the 8-bit
steps are skipped in one line each, not failed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import method_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "env",
    "kernels",
    "parity",
    "generation",
    "op_bandwidth",
    "training_bf16",
    "training_int8",
    "generation_bf16",
    "generation_int8",
]
NO_BITSANDBYTES = "bitsandbytes is not installed (carry its wheel in .whl/)"


def gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        # Built here, not by the e2e conftest's per-test fixture: the dry run runs in a module-scoped
        # fixture, before that one, and a worker's PYTEST_XDIST_* variables would make its benchmark
        # steps' pytest switch benchmarks off (no op bandwidth rows).
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}, "OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One whole dry run for every test of it."""
    out = tmp_path_factory.mktemp("gpu_check")
    return gpu_check(out), out


def test_dry_run_runs_every_step_and_writes_the_summary(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_steps_ok"] and summary["failed_steps"] == [] and summary["skipped_steps"] == []
    assert [step["step"] for step in summary["steps"]] == STEPS
    assert all(step["status"] == "ok" for step in summary["steps"])
    assert sum(step["limit_s"] for step in summary["steps"]) < 8 * 60 - 20  # the summary step's 10 s too
    assert summary["device"].startswith("CPU") and summary["versions"]["torch"]
    for name in ("kernels", "parity", "generation"):
        assert summary["tests"][name]["passed"] >= 1 and summary["tests"][name]["failed"] == 0, name
    assert summary["op_bandwidth"] and all(row["GB/s"] > 0 for row in summary["op_bandwidth"])
    bounds = summary["decode_vs_bandwidth_bound"]
    assert {row["file"] for row in bounds} == {"generation_bf16", "generation_int8"}
    assert all(0 < row["fastprompt_of_bound"] for row in bounds)
    text = (out / "summary.md").read_text()
    for table in ("bench_training.py", "bench_generation.py", "bench_ops.py", "bench_method_comparison.py"):
        assert table in text
    # PEFT's method comparison rides in the bf16 training step: one row per contender, fastprompt's
    # run of a method just above PEFT's.
    rows = text.split("method_comparison, per contender:")[1].splitlines()[3:]
    contenders = [line.split()[0] for line in rows[: len(method_comparison.CONTENDERS)]]
    assert contenders == list(method_comparison.CONTENDERS)
    assert {"peft_prompt_tuning", "peft_p_tuning", "peft_prefix_tuning", "peft_lora"} <= set(contenders)
    assert {"fastprompt_prompt_tuning", "fastprompt_p_tuning", "fastprompt_prefix_tuning"} <= set(contenders)


def without_bitsandbytes(folder: Path) -> dict:
    """Environment in which bitsandbytes is not installed, for this test only:
    a sitecustomize swaps its site-packages for a folder of links to everything
    else there, before anything imports (the find_spec and importlib.metadata
    lookups of the script, peft and transformers all miss it)."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:  # already missing: the real thing
        return {}
    site = Path(spec.origin).resolve().parents[1]
    links = folder / "site-packages"
    links.mkdir()
    for entry in site.iterdir():
        if entry.name != "bitsandbytes" and not entry.name.startswith("bitsandbytes-"):
            (links / entry.name).symlink_to(entry)
    custom = folder / "sitecustomize"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"sys.path[:] = [{str(links)!r} if os.path.realpath(p) == {str(site)!r} else p for p in sys.path]\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(custom), os.environ.get("PYTHONPATH")]))}


def test_without_bitsandbytes_the_8bit_steps_are_skipped_in_one_line_not_failed(tmp_path):
    # GPU_CHECK_STEPS: the 8-bit steps, and env before them to show that the others still run.
    out = tmp_path / "out"
    done = gpu_check(out, GPU_CHECK_STEPS="env training_int8 generation_int8", **without_bitsandbytes(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    before_summary = done.stdout.split("=== summary")[0]
    for name in ("training_int8", "generation_int8"):
        assert [line for line in before_summary.splitlines() if name in line] == [f"{name}: skipped: {NO_BITSANDBYTES}"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["bitsandbytes"] is None  # the steps' interpreters did not find it either
    assert [(step["step"], step["status"]) for step in summary["steps"]] == [
        ("env", "ok"),
        ("training_int8", "skipped"),
        ("generation_int8", "skipped"),
    ]
    assert all(step.get("note") == NO_BITSANDBYTES for step in summary["steps"][1:])
    assert summary["all_steps_ok"] and summary["failed_steps"] == []
    assert summary["skipped_steps"] == ["training_int8", "generation_int8"]
    assert "- all steps ok: True; skipped: training_int8, generation_int8" in (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(f"all steps passed (skipped: training_int8 generation_int8); results in {out}")
