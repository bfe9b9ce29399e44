"""`fastprompt demo` (the README's main command, via `make demo`) teaches
tiny-bloom a task it does not do, on held-out data, and prints nothing else
(no warnings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fastprompt.app import demo
from fastprompt.loading import demo_data_path


@pytest.fixture(scope="module")
def demo_run():
    return subprocess.run(
        [sys.executable, "-m", "fastprompt.app.cli", "demo"], capture_output=True, text=True, timeout=600
    )


def number(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the demo's output:\n{text}"
    return [float(value) for value in found.groups()]


def test_demo_exits_cleanly_without_warnings(demo_run):
    assert demo_run.returncode == 0, demo_run.stderr
    assert demo_run.stderr == ""
    assert re.search(r"done in [\d.]+s", demo_run.stdout)


def test_held_out_loss_falls_by_more_than_a_nat(demo_run):
    before, after = number(r"held-out loss: ([\d.]+) -> ([\d.]+)", demo_run.stdout)
    assert before - after >= 1.0


def test_held_out_accuracy_goes_from_chance_to_90_percent(demo_run):
    before, after = number(r"held-out accuracy: ([\d.]+)% -> ([\d.]+)%", demo_run.stdout)
    # 17 or more of 24 right by luck has p < 0.05: below that, the base model
    # is not doing the task.
    assert before < 100 * 17 / (2 * demo.HELD_OUT_PER_LANGUAGE)
    assert after >= 90.0


def test_greedy_answers_after_training_are_the_language(demo_run):
    _, found, rest = demo_run.stdout.partition("2. greedy answers")
    assert found, demo_run.stdout
    lines = rest.splitlines()[1 : 1 + len(demo.LABELS)]
    assert len(lines) == len(demo.LABELS) and all(" -> " in line for line in lines), rest
    for line, label in zip(lines, demo.LABELS.values()):
        assert line.rsplit(" -> ", 1)[1] == repr(label), line


def test_peft_reloads_the_saved_adapter_with_the_same_logits(demo_run):
    (difference,) = number(r"max \|logit diff\| fastprompt vs PEFT = ([\d.e+-]+)", demo_run.stdout)
    assert difference < 1e-3


def test_held_out_sentences_are_never_trained_on():
    sentences = demo.labelled_sentences(json.loads(demo_data_path().read_text(encoding="utf-8")))
    train, held_out = demo.split_by_language(sentences, demo.HELD_OUT_PER_LANGUAGE)
    assert not {s for s, _ in train} & {s for s, _ in held_out}
    assert sorted(train + held_out) == sorted(sentences)
    for language in demo.LABELS:
        assert sum(lang == language for _, lang in held_out) == demo.HELD_OUT_PER_LANGUAGE
