"""Quantised bases: a fastprompt training step on the 8-bit and the 4-bit (nf4)
model against the same step on the fp32 model, alternated round by round
(``harness.py``), each loaded by ``fastprompt.load_model`` with its default
compute dtype (``loading.py``: fp32 on a CPU). The issue-22 bound: an 8-bit
step takes at most 1.5x an fp32 step (``int8_over_fp32`` in ``extra_info``;
``{contender}_over_fp32`` for each, the ratio of total times over the same rounds).

    python -m pytest bench/bench_quantized.py --benchmark-json=bench/results/quantized.json

tiny-bloom (the built-in model) by default; ``FASTPROMPT_BENCH_QUANT_MODEL``
names a model of ``model_shapes.py`` for a real shape (random weights, saved
and reloaded as users load it), ``FASTPROMPT_BENCH_QUANT_LAYERS`` keeps its
first that many layers for a CPU run.
"""

from __future__ import annotations

import os
import tempfile

import harness
import model_shapes
import pytest
import torch
from peft import PromptTuningConfig, TaskType
from training_cases import random_batches, train_step

import fastprompt
from fastprompt.loading import tiny_bloom_path

MODEL = os.environ.get("FASTPROMPT_BENCH_QUANT_MODEL", "tiny-bloom")
LAYERS = int(os.environ["FASTPROMPT_BENCH_QUANT_LAYERS"]) if "FASTPROMPT_BENCH_QUANT_LAYERS" in os.environ else None
CONTENDERS = {"fp32": {}, "int8": {"load_in_8bit": True}, "nf4": {"load_in_4bit": True}}
# FASTPROMPT_BENCH_QUANT_DTYPES=bfloat16,float16 adds the 8-bit model computing in those
# dtypes (the measurement behind load_model's CPU default; fp16 takes minutes at real shapes).
for _dtype in filter(None, os.environ.get("FASTPROMPT_BENCH_QUANT_DTYPES", "").split(",")):
    CONTENDERS[f"int8-{_dtype}"] = {"load_in_8bit": True, "dtype": _dtype}
# Batch 4 of 64 tokens, the second half labelled, behind 8 virtual tokens.
BATCH, LENGTH, VIRTUAL = 4, 64, 8
# Relative loss difference from the fp32 model allowed over a run's rounds: the
# quantisation's own error, not a bug. Measured one step on tiny-bloom: int8
# 2.1e-4, nf4 4e-4; bloom-mini int8 2.5e-5. The run records its figure as max_difference.
QUANTISATION_TOLERANCE = 2e-2


def _check(reference: float, loss: float) -> float:
    difference = abs(loss - reference) / abs(reference)
    assert difference <= QUANTISATION_TOLERANCE, f"loss {loss} vs fp32 {reference}: relative {difference:.3g}"
    return difference


def _contender(directory: str, load_kwargs: dict):
    base = fastprompt.load_model(directory, device_map={"": "cpu"}, **load_kwargs)
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(
        base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL)
    )
    model.train()
    return model, torch.optim.AdamW([model.soft_prompt()], lr=1e-3)


@pytest.mark.parametrize("model_name", [MODEL])
def test_quantized_training_step(benchmark, model_name):
    pytest.importorskip("bitsandbytes")
    with tempfile.TemporaryDirectory() as scratch:
        if model_name == "tiny-bloom":
            directory, label = str(tiny_bloom_path()), "tiny-bloom (the built-in model)"
        else:
            directory, label = scratch, model_shapes.label(model_name, LAYERS)
            model_shapes.build_base(model_name, layers=LAYERS).save_pretrained(directory)
        contenders = {name: _contender(directory, kwargs) for name, kwargs in CONTENDERS.items()}
    vocab = contenders["fp32"][0].get_base_model().config.vocab_size
    rounds = harness.rounds(8 if model_name == "tiny-bloom" else 3)
    batches = random_batches(rounds + 1, BATCH, LENGTH, "second_half", vocab)
    contest = harness.Alternation(
        {name: (lambda index, name=name: train_step(*contenders[name], batches[index])) for name in contenders},
        reference="fp32",
        check=_check,
    )
    contest.run(benchmark, rounds)
    benchmark.extra_info.update(
        model=label,
        shape=f"batch {BATCH}, {LENGTH} tokens (second half labelled), {VIRTUAL} virtual tokens",
        compute_dtype={name: str(model.get_base_model().dtype) for name, (model, _) in contenders.items()},
        paths={name: model.last_call.path for name, (model, _) in contenders.items()},
        **contest.summary("step"),
        **{f"{name}_over_fp32": contest.total(name) / contest.total("fp32") for name in CONTENDERS if name != "fp32"},
    )
