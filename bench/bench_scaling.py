"""Scaling sweep: the training step of fastprompt and PEFT as the prompt length
P grows (8 to 256, at B 8) and as the batch B grows (1 to 32, at P 20), with
the FLOP bound of each point beside its measured speedup. Every point runs T
64 random tokens with labels on the second half (the chat-batch labelling),
alternated round by round (``harness.py``), losses checked equal.

    python -m pytest bench/bench_scaling.py --benchmark-json=bench/results/scaling.json
    python bench/plot_scaling.py bench/results/scaling.json bench/results/scaling.png

About three minutes on bloom-mini on a quiet 2-core CPU; the model comes from
``FASTPROMPT_BENCH_MODEL`` like every suite's.
"""

from __future__ import annotations

import copy

import flop_count
import harness
import model_shapes
import pytest
from training_cases import CONTENDERS, loss_check, make_contender, random_batches, step_shape, train_step

SETTING = model_shapes.setting_from_env()
SHAPE = model_shapes.SHAPES[SETTING["model"]]
TOKENS = 64
POINTS = [("prompt", prompt, 8) for prompt in (8, 16, 32, 64, 128, 256)]
POINTS += [("batch", 20, batch) for batch in (1, 2, 4, 8, 16, 32)]
ROUNDS = 2 if SHAPE.quick else 1


@pytest.fixture(scope="module")
def pristine_base():
    return model_shapes.build_base(**SETTING)


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p[0]}-P{p[1]}-B{p[2]}")
def test_scaling(benchmark, pristine_base, point):
    sweep, prompt, batch = point
    contenders = {name: make_contender(name, copy.deepcopy(pristine_base), prompt) for name in CONTENDERS}
    rounds = harness.rounds(ROUNDS)
    batches = random_batches(rounds + 1, batch, TOKENS, "second_half", SHAPE.config.vocab_size, SETTING["device"])
    contest = harness.Alternation(
        {name: (lambda index, pair=pair: train_step(*pair, batches[index])) for name, pair in contenders.items()},
        reference="peft",
        check=loss_check(SETTING["dtype"]),
        sync=harness.device_sync(SETTING["device"]),
    )
    contest.run(benchmark, rounds)
    bound = flop_count.training_bound(
        model_shapes.dims(SETTING["model"]),
        [step_shape(batches[i], prompt) for i in contest.timed_rounds],
        SHAPE.fast_path,
    )
    benchmark.extra_info.update(
        model=model_shapes.setting_label(SETTING),
        data="random token ids (seed 0)",
        sweep=sweep,
        prompt=prompt,
        batch=batch,
        tokens=TOKENS,
        **contest.summary("step"),
        flop_bound=bound,
    )
