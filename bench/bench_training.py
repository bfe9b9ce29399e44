"""Training step (forward + backward + AdamW): fastprompt vs PEFT, alternated
round by round (``harness.py``), losses checked equal every round.

Per case, ``extra_info`` gets: the model's label, the data source, median step
times, the speedup (total PEFT time over total fastprompt time, same rounds)
beside the FLOP bound of those same batches (``flop_count.py``), trained
tokens/s, and each contender's peak memory (``peak_memory.py``; not on CPU
with ``FASTPROMPT_BENCH_MEMORY_PROBE=0``).

    python -m pytest bench/bench_training.py --benchmark-json=bench/results/training.json

Prompt tuning by default; ``FASTPROMPT_BENCH_METHOD=p_tuning`` or
``multitask_prompt_tuning`` runs every case with that method instead, fastprompt's
run of it against PEFT's (``training_cases.METHODS``; e.g. ``-k classify``).
bloom-mini by default (the quick run); ``FASTPROMPT_BENCH_MODEL=bloom-1b4-zh``
for the real shape (``make bench-full``), or any model of ``model_shapes.py``;
``FASTPROMPT_BENCH_DEVICE`` / ``_DTYPE`` for GPU runs (``gpu_check.sh``).
"""

from __future__ import annotations

import gc

import flop_count
import harness
import model_shapes
import peak_memory
import pytest
from training_cases import (
    CASES,
    CONTENDERS,
    data_source,
    loss_check,
    make_batches,
    make_contender,
    method_from_env,
    step_shape,
    train_step,
    trained_tokens,
)

SETTING = model_shapes.setting_from_env()
METHOD = method_from_env()
SHAPE = model_shapes.SHAPES[SETTING["model"]]
# Quick run: enough rounds for stable medians. Real shapes: a step takes
# seconds to tens of seconds on a CPU, so a few alternated rounds.
QUICK_ROUNDS = {"tutorial": 16, "chat-batch": 6, "classify": 6, "alpaca-ragged": 6}
ROUNDS = QUICK_ROUNDS if SHAPE.quick else dict.fromkeys(CASES, 3)


@pytest.mark.parametrize("case", list(CASES))
def test_training_step(benchmark, case):
    virtual = CASES[case]["virtual"]
    rounds = harness.rounds(ROUNDS[case])
    bases = model_shapes.build_bases(len(CONTENDERS), **SETTING)
    contenders = {name: make_contender(name, base, virtual, METHOD) for name, base in zip(CONTENDERS, bases)}
    del bases
    batches = make_batches(case, rounds + 1, SHAPE.config.vocab_size, device=SETTING["device"], method=METHOD)
    on_cuda = SETTING["device"].startswith("cuda")

    contest = harness.Alternation(
        # Looked up at call time, so that clearing ``contenders`` frees the models.
        {name: (lambda index, name=name: train_step(*contenders[name], batches[index])) for name in contenders},
        reference="peft",
        check=loss_check(SETTING["dtype"]),
        sync=harness.device_sync(SETTING["device"]),
    )
    contest.run(benchmark, rounds)
    timed = [batches[index] for index in contest.timed_rounds]
    bound = flop_count.training_bound(
        model_shapes.dims(SETTING["model"]), [step_shape(b, virtual) for b in timed], SHAPE.fast_path, METHOD
    )
    tokens = sum(trained_tokens(b) for b in timed)

    if on_cuda:
        memory = {name: peak_memory.cuda_peak_bytes(*pair, batches[0]) for name, pair in contenders.items()}
    elif peak_memory.cpu_probes():
        # Free this process's models first: the probes build their own.
        contenders.clear()
        gc.collect()
        probe = {**SETTING, "method": METHOD}
        memory = {name: peak_memory.measure(case, name, probe, harness.THREADS) for name in CONTENDERS}
    else:
        memory = None

    benchmark.extra_info.update(
        model=model_shapes.setting_label(SETTING),
        method=METHOD,
        data=data_source(case, METHOD),
        **contest.summary("step"),
        flop_bound=bound,
        tokens_per_step=tokens / len(timed),
        **{f"{name}_tokens_per_s": tokens / contest.total(name) for name in CONTENDERS},
    )
    if memory is None:
        benchmark.extra_info.update(memory_method=peak_memory.NOT_MEASURED)
    else:
        benchmark.extra_info.update(
            **{f"{name}_peak_mib": memory[name] / 2**20 for name in CONTENDERS},
            memory_ratio=memory["fastprompt"] / memory["peft"],
            memory_method=peak_memory.CUDA_METHOD if on_cuda else peak_memory.CPU_METHOD,
        )
