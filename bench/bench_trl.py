"""TRL's SFTTrainer: a fastprompt model vs PEFT's, alternated round by round
(``harness.py``), each step's loss checked equal every round.

A round is one ``trainer.train()`` of ``STEPS`` steps for each contender (the
whole of what a user's run pays: TRL's fused-head call of the model, backward,
AdamW, the Trainer's loop), both trainers built once, on the same data in the
same order, from the same initial prompt. The data is the classify case of
``training_cases.py`` (B 8, P 100, T 32, random ids, the last token
labelled) as a pre-tokenised dataset; TRL's defaults but for precision (no
bf16 autocast: the model runs in the setting's dtype, fp32 by default, so
that the losses compare at its tolerance). ``extra_info`` gets the median
round times, the speedup (total PEFT time over total fastprompt time) and
the path fastprompt's steps took.

    python -m pytest bench/bench_trl.py --benchmark-json=bench/results/trl.json

bloom-mini by default; ``FASTPROMPT_BENCH_MODEL=bloom-tiny`` for a smoke run
in seconds, ``bloom-1b4-zh`` (or any model of ``model_shapes.py``) for a real
shape (``make bench-trl``).
"""

from __future__ import annotations

import harness
import model_shapes
import pytest
import torch
from training_cases import CASES, loss_check, random_batches

trl = pytest.importorskip("trl")

SETTING = model_shapes.setting_from_env()
SHAPE = model_shapes.SHAPES[SETTING["model"]]
CASE = "classify"
STEPS = 4
ROUNDS = 4 if SHAPE.quick else 2
CONTENDERS = ("fastprompt", "peft")


def sft_dataset(vocab_size: int):
    """The case's batches as examples, ``STEPS`` batches' worth: one epoch per round."""
    from datasets import Dataset

    spec = CASES[CASE]
    batches = random_batches(STEPS, spec["batch"], spec["length"], spec["labels"], vocab_size)
    columns = {key: torch.cat([batch[key] for batch in batches]).tolist() for key in ("input_ids", "labels")}
    return Dataset.from_dict(columns)


def make_trainer(name: str, base, dataset, tokenizer, output_dir: str):
    import peft
    from peft import PromptTuningConfig, TaskType

    import fastprompt

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=CASES[CASE]["virtual"])
    factory = {"fastprompt": fastprompt.get_peft_model, "peft": peft.get_peft_model}[name]
    torch.manual_seed(0)
    model = factory(base, config)
    args = trl.SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=CASES[CASE]["batch"],
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=SETTING["device"] == "cpu",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def train_round(trainer) -> list[float]:
    """One ``train()`` of STEPS steps; each step's loss."""
    trainer.state.log_history.clear()
    trainer.train()
    return [record["loss"] for record in trainer.state.log_history if "loss" in record]


def steps_check(dtype: str):
    check = loss_check(dtype)

    def check_steps(reference: list[float], losses: list[float]) -> float:
        assert len(losses) == len(reference) == STEPS, (losses, reference)
        return max(check(want, got) for want, got in zip(reference, losses))

    return check_steps


def test_sft_trainer_round(benchmark, tmp_path):
    from transformers import AutoTokenizer

    from fastprompt.loading import tiny_bloom_path

    # Its pad token only: the ids are the dataset's, drawn below the model's vocabulary.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bloom_path()))
    dataset = sft_dataset(SHAPE.config.vocab_size)
    bases = model_shapes.build_bases(len(CONTENDERS), **SETTING)
    trainers = {
        name: make_trainer(name, base, dataset, tokenizer, str(tmp_path / name))
        for name, base in zip(CONTENDERS, bases)
    }
    del bases
    contest = harness.Alternation(
        {name: (lambda index, trainer=trainers[name]: train_round(trainer)) for name in CONTENDERS},
        reference="peft",
        check=steps_check(SETTING["dtype"]),
        sync=harness.device_sync(SETTING["device"]),
    )
    contest.run(benchmark, harness.rounds(ROUNDS))
    last_call = trainers["fastprompt"].model.last_call
    assert SHAPE.fast_path == (last_call.path is not None), last_call
    spec = CASES[CASE]
    benchmark.extra_info.update(
        model=model_shapes.setting_label(SETTING),
        data=f"random token ids (seed 0), batch {spec['batch']}, {spec['length']} tokens, the last labelled",
        virtual_tokens=spec["virtual"],
        steps_per_round=STEPS,
        trl=trl.__version__,
        gradient_checkpointing=trainers["peft"].args.gradient_checkpointing,
        fastprompt_path=f"{last_call.path} ({last_call.run})",
        **contest.summary("round"),
    )
