"""Training step: fastprompt vs PEFT on bloom-mini, both in the same run.

Each benchmark round runs one step of each contender, alternating which goes
first, so machine noise hits both alike; the per-contender medians, their
ratio, trained tokens/s and each contender's peak memory (own process, see
peak_memory.py) land in ``extra_info`` for ``bench/report.py``.

    python -m pytest bench/bench_training.py --benchmark-json=bench/results/training.json
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
from models import bloom_mini
from training_cases import SHAPES, make_batches, make_contender, train_step, trained_tokens

ROUNDS = {"tutorial": 8, "chat-batch": 5, "classify": 5}


def peak_memory(shape: str, contender: str) -> int:
    script = Path(__file__).resolve().parent / "peak_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--shape", shape, "--contender", contender],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_step(benchmark, shape):
    torch.set_num_threads(2)
    spec = SHAPES[shape]
    contenders = {
        name: make_contender(name, bloom_mini(), spec["virtual"]) for name in ("fastprompt", "peft")
    }
    rounds = ROUNDS[shape]
    batches = make_batches(shape, rounds + 1, 46145)
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
    for ours, theirs in zip(losses["fastprompt"], losses["peft"]):
        assert abs(ours - theirs) <= 1e-4 * abs(theirs)
    median = {name: statistics.median(t) for name, t in times.items()}
    memory = {name: peak_memory(shape, name) for name in contenders}
    benchmark.extra_info.update(
        shape=shape,
        **{f"{name}_step_s": median[name] for name in median},
        speedup=median["peft"] / median["fastprompt"],
        **{f"{name}_tokens_per_s": statistics.mean(tokens) / median[name] for name in median},
        **{f"{name}_peak_mib": memory[name] / 2**20 for name in memory},
        memory_ratio=memory["fastprompt"] / memory["peft"],
        memory_method="CPU: peak RSS rise over pre-step RSS, one process per contender",
    )
