"""``bench/gpu_check.sh --dry-run``: the GPU call's every step, on CPU with tiny
shapes, ends in a summary that holds what the real run must report."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["env", "kernels", "parity", "generation", "op_bandwidth", "training_bf16", "training_int8",
         "generation_bf16", "generation_int8"]


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["all_steps_ok"]
    assert [step["step"] for step in summary["steps"]] == STEPS
    assert sum(step["limit_s"] for step in summary["steps"]) < 8 * 60 - 20  # the summary step's 10 s too
    assert summary["device"].startswith("CPU") and summary["versions"]["torch"]
    for name in ("kernels", "parity", "generation"):
        assert summary["tests"][name]["passed"] >= 1 and summary["tests"][name]["failed"] == 0, name
    assert summary["op_bandwidth"] and all(row["GB/s"] > 0 for row in summary["op_bandwidth"])
    bounds = summary["decode_vs_bandwidth_bound"]
    assert {row["file"] for row in bounds} == {"generation_bf16", "generation_int8"}
    assert all(0 < row["fastprompt_of_bound"] for row in bounds)
    text = (tmp_path / "summary.md").read_text()
    for table in ("bench_training.py", "bench_generation.py", "bench_ops.py"):
        assert table in text
