"""Training step: fastprompt vs PEFT on bloom-mini, both in the same run.

Each benchmark round runs one step of each contender, alternating which goes
first, so machine noise hits both alike; the per-contender median step times,
the ratio of their total times over the same rounds, trained tokens/s and each
contender's peak memory (own process, see
peak_memory.py) land in ``extra_info`` for ``bench/report.py``.

    python -m pytest bench/bench_training.py --benchmark-json=bench/results/training.json

On a GPU (bench/gpu_check.sh) the environment picks the setting:
FASTPROMPT_BENCH_DEVICE=cuda, FASTPROMPT_BENCH_DTYPE=bfloat16|int8,
FASTPROMPT_BENCH_MODEL=bloom-1b4-zh.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import build_base, setting_from_env
from training_cases import SHAPES, make_batches, make_contender, train_step, trained_tokens

ROUNDS = {"tutorial": 16, "chat-batch": 6, "classify": 6}
SETTING = setting_from_env()


def peak_memory(shape: str, contender: str, model, optimizer, batch) -> int:
    """CUDA: in this process (the allocator's peak is exact and resettable).
    CPU: a process of its own, since RSS peaks cannot be reset."""
    if SETTING["device"].startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, batch)
        return torch.cuda.max_memory_allocated() - before
    script = Path(__file__).resolve().parent / "peak_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--shape", shape, "--contender", contender]
        + [f"--{key}={value}" for key, value in SETTING.items()],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_step(benchmark, shape):
    torch.set_num_threads(2)
    spec = SHAPES[shape]
    contenders = {
        name: make_contender(name, build_base(**SETTING), spec["virtual"]) for name in ("fastprompt", "peft")
    }
    rounds = ROUNDS[shape]
    batches = make_batches(shape, rounds + 1, 46145, device=SETTING["device"])
    times = {name: [] for name in contenders}
    losses = {name: [] for name in contenders}
    tokens = []
    state = {"round": 0}

    def one_round():
        index = state["round"]
        batch = batches[index]
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            model, optimizer = contenders[name]
            start = time.perf_counter()
            losses[name].append(train_step(model, optimizer, batch))
            times[name].append(time.perf_counter() - start)
        tokens.append(trained_tokens(batch))
        state["round"] += 1

    one_round()  # warm-up, not recorded
    for name in times:
        times[name].clear()
        losses[name].clear()
    tokens.clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)

    # Same data, same init: the two must be training the same thing.
    tolerance = 1e-4 if SETTING["dtype"] == "float32" else 2e-2
    for ours, theirs in zip(losses["fastprompt"], losses["peft"]):
        assert abs(ours - theirs) <= tolerance * abs(theirs)
    # Rounds differ in work (tutorial samples differ in length): compare the
    # contenders on the total time of the same rounds.
    total = {name: sum(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    memory = {name: peak_memory(shape, name, *contenders[name], batches[0]) for name in contenders}
    benchmark.extra_info.update(
        shape=shape,
        setting=f"{SETTING['model']} {SETTING['dtype']} {SETTING['device']}",
        **{f"{name}_step_s": median[name] for name in median},
        speedup=total["peft"] / total["fastprompt"],
        **{f"{name}_tokens_per_s": sum(tokens) / total[name] for name in total},
        **{f"{name}_peak_mib": memory[name] / 2**20 for name in memory},
        memory_ratio=memory["fastprompt"] / memory["peft"],
        memory_method=(
            "CUDA max_memory_allocated over pre-step, one process per contender"
            if SETTING["device"].startswith("cuda")
            else "CPU: peak sampled RSS over pre-step RSS after a warm-up step, one process per contender"
        ),
    )
