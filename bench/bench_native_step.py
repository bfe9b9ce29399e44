"""A whole training step (chat-batch case) of fastprompt with the embedding op
on the native backend vs the unfused torch reference, alternated round by
round (``harness.py``), losses checked equal.

The op is a small part of a step (one gather + LayerNorm against every
transformer layer and the loss), so this shows what the kernel is worth end
to end, not its op-level speedup (bench_ops.py). Each contender has its own
copy of the model and optimizer, and forces its backend through
FASTPROMPT_EMBED_IMPL, which the dispatcher reads on every call. The FLOP
count of both is the same.

    python -m pytest bench/bench_native_step.py
"""

from __future__ import annotations

import harness
import model_shapes
import pytest
from training_cases import CASES, data_source, loss_check, make_batches, make_contender, train_step

from fastprompt.ops import backend_info
from fastprompt.ops.dispatch import IMPL_ENV_VAR

SETTING = model_shapes.setting_from_env()
SHAPE = model_shapes.SHAPES[SETTING["model"]]
CASE = "chat-batch"
IMPLS = ("native", "torch")

if not backend_info()["native_available"]:
    pytest.skip("native pack_embed not built (make native)", allow_module_level=True)
if SETTING["device"] != "cpu" or not SHAPE.fast_path:
    pytest.skip("the native op runs on CPU, on fastprompt's fast path only", allow_module_level=True)


def test_training_step_native_vs_torch_embedding(benchmark, monkeypatch):
    bases = model_shapes.build_bases(len(IMPLS), **SETTING)
    contenders = {impl: make_contender("fastprompt", base, CASES[CASE]["virtual"]) for impl, base in zip(IMPLS, bases)}
    rounds = harness.rounds(6 if SHAPE.quick else 2)
    batches = make_batches(CASE, rounds + 1, SHAPE.config.vocab_size)

    def step(impl):
        def run(index):
            monkeypatch.setenv(IMPL_ENV_VAR, impl)
            return train_step(*contenders[impl], batches[index])

        return run

    contest = harness.Alternation(
        {impl: step(impl) for impl in IMPLS}, reference="torch", check=loss_check(SETTING["dtype"])
    )
    contest.run(benchmark, rounds)
    benchmark.extra_info.update(
        model=model_shapes.setting_label(SETTING),
        data=f"{CASE}: {data_source(CASE)}",
        **contest.summary("step"),
    )
