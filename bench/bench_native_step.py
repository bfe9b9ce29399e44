"""A whole bloom-mini training step (chat-batch shape) of fastprompt with the
embedding op on the native backend vs the unfused torch reference.

The op is a small part of a step (one gather + LayerNorm against six
transformer layers and the loss), so this shows what the kernel is worth end
to end, not its op-level speedup (bench_native.py). Same model, same batches,
rounds alternate the backend (forced through FASTPROMPT_EMBED_IMPL, which the
dispatcher reads on every call).

    python -m pytest bench/bench_native_step.py
"""

from __future__ import annotations

import time

import pytest
import torch
from models import bloom_mini
from training_cases import SHAPES, make_batches, make_contender, train_step

from fastprompt.ops import backend_info
from fastprompt.ops.dispatch import IMPL_ENV_VAR

ROUNDS = 6

if not backend_info()["native_available"]:
    pytest.skip("native embed_concat not built (make native)", allow_module_level=True)


def test_training_step_native_vs_torch_embedding(benchmark, monkeypatch):
    torch.set_num_threads(2)
    model, optimizer = make_contender("fastprompt", bloom_mini(), SHAPES["chat-batch"]["virtual"])
    batches = make_batches("chat-batch", ROUNDS + 1, 46145)
    times = {"native": [], "torch": []}
    state = {"round": 0}

    def one_round():
        index = state["round"]
        order = ["native", "torch"] if index % 2 == 0 else ["torch", "native"]
        for impl in order:
            monkeypatch.setenv(IMPL_ENV_VAR, impl)
            start = time.perf_counter()
            train_step(model, optimizer, batches[index])
            times[impl].append(time.perf_counter() - start)
        state["round"] += 1

    one_round()  # warm-up
    for recorded in times.values():
        recorded.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    total = {impl: sum(t) for impl, t in times.items()}
    benchmark.extra_info.update(
        shape="chat-batch",
        native_step_s=total["native"] / ROUNDS,
        torch_step_s=total["torch"] / ROUNDS,
        speedup=total["torch"] / total["native"],
    )
