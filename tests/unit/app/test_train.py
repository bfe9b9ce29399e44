"""The training loop: step semantics, bitwise resume, checkpoints, divergence, interrupts, Trainer."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from models import peft_prompt
from peft import PromptTuningConfig, PromptTuningInit, TaskType

import fastprompt
from fastprompt.app.data import PadCollator, TokenizedData, length_grouped_steps, load_alpaca
from fastprompt.app.train import (
    LOG_FILE,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    evaluate,
    list_checkpoints,
    lr_at,
    train,
    warmup_steps,
)
from fastprompt.loading import demo_data_path

PAD = 3


@pytest.fixture(scope="module")
def base(tiny_bloom_dir):
    return fastprompt.load_model("tiny-bloom")


@pytest.fixture(scope="module")
def data(base):
    return TokenizedData(load_alpaca(demo_data_path(), base.tokenizer).examples[:16])


def fresh_model(base, seed=0, tokens=4):
    torch.manual_seed(seed)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="下面是一段人与机器人的对话。",
        tokenizer_name_or_path="tiny-bloom",
    )
    return fastprompt.get_peft_model(base, config)


def config(tmp_path, name="run", **overrides):
    settings = dict(output=tmp_path / name, batch_size=4, lr=1e-2, warmup_steps=1, progress=False, log_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_linear_schedule_with_warmup():
    assert [lr_at(s, total=6, warmup=2, peak=1.0) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_at(0, total=4, warmup=0, peak=5e-5) == 5e-5


@pytest.mark.parametrize(
    "ours, theirs", [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")]
)
@pytest.mark.parametrize("total, warmup", [(10, 3), (7, 0), (5, 5)])
def test_schedules_are_transformers(ours, theirs, total, warmup):
    """Each optimizer step's lr is the one transformers' scheduler gives it (after 0..total-1 scheduler steps)."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = get_scheduler(theirs, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [lr_at(step, total, warmup, 3e-4, ours) for step in range(total)] == pytest.approx(expected, rel=1e-12)


def test_warmup_ratio_rounds_up_as_trainer(tmp_path):
    from transformers import TrainingArguments

    for ratio, total in [(0.1, 25), (0.25, 8), (0.5, 3)]:
        theirs = TrainingArguments(tmp_path, warmup_steps=ratio, report_to="none").get_warmup_steps(total)
        assert warmup_steps(TrainConfig(tmp_path, warmup_ratio=ratio), total) == theirs
    assert warmup_steps(TrainConfig(tmp_path, warmup_steps=4), 100) == 4
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(tmp_path, warmup_steps=2, warmup_ratio=0.1)


def test_a_step_is_the_token_mean_over_its_examples_however_it_is_cut(base, data, tmp_path):
    """One optimizer step = AdamW on the mean loss over all label tokens of
    the step's examples (Trainer's num_items_in_batch), with clipping — the
    same whether the examples run together or one micro-batch each."""
    one_batch = fresh_model(base)
    logged = train(
        one_batch, data, config(tmp_path, "together", max_steps=1, warmup_steps=0, max_grad_norm=0.05), pad_token_id=PAD
    ).history
    accumulated = fresh_model(base)
    train(
        accumulated,
        data,
        config(tmp_path, "apart", max_steps=1, warmup_steps=0, max_grad_norm=0.05, max_tokens=1),
        pad_token_id=PAD,
    )

    reference = fresh_model(base)
    indices = length_grouped_steps(data.lengths, 4, seed=42 * 100_003)[0]
    batch = PadCollator(PAD)([data[i] for i in indices])
    reference(**batch).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([peft_prompt(reference)], 0.05)
    optimizer = torch.optim.AdamW([peft_prompt(reference)], lr=1e-2, weight_decay=0.0)
    optimizer.step()

    torch.testing.assert_close(peft_prompt(one_batch), peft_prompt(reference), rtol=0, atol=1e-6)
    # The logged norm is the one before clipping (as Trainer logs it), in the log and its file.
    assert norm > 0.05 and logged[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert json.loads((tmp_path / "together" / LOG_FILE).read_text())["grad_norm"] == logged[0]["grad_norm"]
    # Micro-batches of one row take the model's single-pass path, batches the
    # shared-prefix path: gradients agree to float rounding (~1e-7 relative),
    # which Adam can magnify on near-zero gradient elements to ~1e-6 of this
    # 1e-2 step. 1e-5 is still a thousandth of the step size.
    torch.testing.assert_close(peft_prompt(accumulated), peft_prompt(reference), rtol=0, atol=1e-5)


def test_resume_reaches_the_same_prompt_bit_for_bit(base, data, tmp_path):
    settings = dict(epochs=2, save_every=3, keep_checkpoints=10)  # 8 steps, checkpoints at 3 and 6
    whole = fresh_model(base)
    train(whole, data, config(tmp_path, "whole", **settings), pad_token_id=PAD)

    # A run that stopped after step 3: only that checkpoint exists in its output.
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = fresh_model(base, seed=123)  # a different init: everything must come from the checkpoint
    result = train(resumed, data, config(tmp_path, "resumed", resume="latest", **settings), pad_token_id=PAD)

    assert result.steps == 8
    assert torch.equal(peft_prompt(resumed), peft_prompt(whole))
    final = [
        peft_prompt(fastprompt.FastPromptModel.from_pretrained(base, tmp_path / name)) for name in ("whole", "resumed")
    ]
    assert torch.equal(final[0], final[1])
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert logged == [4, 5, 6, 7, 8]


def test_checkpoints_are_peft_adapters_written_atomically_and_pruned(base, data, tmp_path):
    from peft import PeftModel

    model = fresh_model(base)
    run = config(tmp_path, max_steps=4, save_every=1, keep_checkpoints=2)
    train(model, data, run, pad_token_id=PAD)
    assert [step for step, _ in list_checkpoints(run.output)] == [3, 4]
    assert not [p.name for p in run.output.iterdir() if p.name.startswith(".")]  # no staging left behind
    for loadable in (run.output, run.output / "checkpoint-4"):
        peft_model = PeftModel.from_pretrained(fastprompt.load_model("tiny-bloom"), str(loadable))
        assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, peft_prompt(model))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(base, data, tmp_path):
    model = fresh_model(base)
    real_forward = model.forward
    calls = []

    def forward_turning_nan(**batch):
        out = real_forward(**batch)
        calls.append(1)
        if len(calls) > 3:  # the 4th step (one micro-batch per step here)
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward_turning_nan
    run = config(tmp_path, max_steps=8, save_every=2)
    with pytest.raises(TrainingDiverged, match=r"loss nan .* at step 4.*checkpoint-2"):
        train(model, data, run, pad_token_id=PAD)
    assert [step for step, _ in list_checkpoints(run.output)] == [2]
    assert not (run.output / "adapter_model.safetensors").exists()
    assert torch.isfinite(peft_prompt(model)).all()


def test_sigterm_writes_a_checkpoint_at_the_step_boundary(base, data, tmp_path):
    model = fresh_model(base)
    real_forward = model.forward
    calls = []

    def forward_then_sigterm(**batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(**batch)

    model.forward = forward_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    run = config(tmp_path, max_steps=8, save_every=0)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(model, data, run, pad_token_id=PAD)
    assert stopped.value.step == 2 and stopped.value.signum == signal.SIGTERM
    assert [step for step, _ in list_checkpoints(run.output)] == [2]
    assert signal.getsignal(signal.SIGTERM) is before

    model.forward = real_forward
    assert train(model, data, config(tmp_path, max_steps=8, resume="latest"), pad_token_id=PAD).steps == 8


def test_runs_do_not_mix(base, data, tmp_path):
    model = fresh_model(base)
    train(model, data, config(tmp_path, max_steps=2, save_every=1), pad_token_id=PAD)
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(fresh_model(base), data, config(tmp_path, max_steps=2), pad_token_id=PAD)
    with pytest.raises(ValueError, match="different run: batch_size 4 there, 2 now"):
        train(fresh_model(base), data, config(tmp_path, max_steps=2, batch_size=2, resume="latest"), pad_token_id=PAD)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(fresh_model(base), data, config(tmp_path, "empty", resume="latest"), pad_token_id=PAD)


def test_eval_loss_is_logged_and_is_the_token_mean(base, data, tmp_path):
    held = TokenizedData(data.examples[:5])
    model = fresh_model(base)
    before = evaluate(model, held, PAD, max_tokens=64)
    with torch.no_grad():
        expected = model(**PadCollator(PAD)(held.examples)).loss.item()
    assert before == pytest.approx(expected, rel=1e-5)
    result = train(model, data, config(tmp_path, max_steps=4, eval_every=2), pad_token_id=PAD, eval_data=held)
    assert [entry["step"] for entry in result.history if "eval_loss" in entry] == [2, 4]


def test_hf_trainer_writes_peft_checkpoints_and_matches_peft(data, tmp_path):
    """The tutorial's workflow under transformers.Trainer: the same losses as
    PEFT's model, checkpoint-N/ and save_model() written as PEFT adapters, and
    evaluate/predict with compute_metrics seeing PEFT's predictions."""
    from peft import PeftModel, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    def accuracy(prediction):
        logits, labels = prediction
        guesses = logits[:, -labels.shape[1] - 1 : -1].argmax(-1)  # each position predicts the next label
        labelled = labels != -100
        return {"accuracy": float((guesses == labels)[labelled].mean())}

    runs = {}
    for kind, make in (("fastprompt", fastprompt.get_peft_model), ("peft", get_peft_model)):
        base = fastprompt.load_model("tiny-bloom")
        torch.manual_seed(0)
        model = make(
            base,
            PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=4,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text="下面是一段人与机器人的对话。",
                tokenizer_name_or_path=fastprompt.loading.resolve_model_path("tiny-bloom"),
            ),
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / kind),
            per_device_train_batch_size=2,
            per_device_eval_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=2,
            save_steps=2,
            logging_steps=1,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            eval_dataset=data.subset(range(8)),
            data_collator=DataCollatorForSeq2Seq(tokenizer=base.tokenizer, padding=True),
            compute_metrics=accuracy,
        )
        trainer.train()
        trainer.save_model(str(tmp_path / kind / "final"))
        runs[kind] = {
            "model": model,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "eval": trainer.evaluate(),
            "predict": trainer.predict(data.subset(range(8))),
        }
    ours, theirs = runs["fastprompt"], runs["peft"]
    assert len(ours["losses"]) == 2
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-4)
    assert ours["eval"]["eval_loss"] == pytest.approx(theirs["eval"]["eval_loss"], rel=1e-4)
    assert ours["eval"]["eval_accuracy"] == theirs["eval"]["eval_accuracy"]
    assert ours["predict"].predictions.shape == theirs["predict"].predictions.shape
    assert abs(ours["predict"].predictions - theirs["predict"].predictions).max() < 1e-3
    for saved in (tmp_path / "fastprompt" / "checkpoint-2", tmp_path / "fastprompt" / "final"):
        reloaded = PeftModel.from_pretrained(fastprompt.load_model("tiny-bloom"), str(saved))
        assert torch.equal(peft_prompt(reloaded), peft_prompt(ours["model"]).detach())


def test_tensorboard_gets_the_log_lines_as_trainer_names_them(base, data, tmp_path):
    """Read back from the event files; a resumed run replaces the events of the steps it redoes, as it does
    the lines of train_log.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    held = TokenizedData(data.examples[:3])
    settings = dict(max_steps=4, eval_every=2, save_every=2, report_to="tensorboard", lr_scheduler="cosine")
    settings.update(warmup_steps=0, warmup_ratio=0.5)
    train(fresh_model(base), data, config(tmp_path, **settings), pad_token_id=PAD, eval_data=held)
    resume = str(tmp_path / "run" / "checkpoint-2")
    resumed = train(
        fresh_model(base), data, config(tmp_path, resume=resume, **settings), pad_token_id=PAD, eval_data=held
    )
    logged = [json.loads(line) for line in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert [entry["step"] for entry in resumed.history] == [3, 4, 4]  # two train lines, one eval line

    events = EventAccumulator(str(tmp_path / "run" / "runs"))
    events.Reload()
    for key, tag in [("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm")]:
        expected = [(entry["step"], entry[key]) for entry in logged if key in entry]
        assert len(expected) == 4
        assert [(event.step, event.value) for event in events.Scalars(tag)] == [
            (step, pytest.approx(value, rel=1e-6)) for step, value in expected
        ]
    assert [event.step for event in events.Scalars("eval/loss")] == [2, 4]
