"""The examples run as documented, on tiny-bloom and the bundled data, shortened."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from processes import cli_env, small_data

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_tutorial_trainer_script_matches_peft_and_checkpoints_peft_adapters(tmp_path, monkeypatch, capsys):
    """The tutorial under transformers.Trainer, once with fastprompt and once
    with PEFT (same script, same seed): the same logged losses, and
    checkpoint-N/ that peft.PeftModel.from_pretrained loads."""
    import torch
    from peft import PeftModel

    import fastprompt

    runs = {}
    for backend in ("fastprompt", "peft"):
        for name, value in {
            "FASTPROMPT_MAX_STEPS": "2",
            "FASTPROMPT_LR": "3e-2",
            "FASTPROMPT_LOGGING_STEPS": "1",
            "FASTPROMPT_SAVE_STEPS": "2",
            "FASTPROMPT_OUTPUT": str(tmp_path / backend),
            "FASTPROMPT_TUTORIAL_BACKEND": backend,
        }.items():
            monkeypatch.setenv(name, value)
        script = runpy.run_path(str(EXAMPLES / "tutorial_trainer.py"), run_name="__main__")  # asserts the loss fell
        out = capsys.readouterr().out
        before, after = map(float, re.search(r"loss on the training data: ([\d.]+) -> ([\d.]+)", out).groups())
        assert after < before
        assert "Assistant: " in out  # the tutorial's generated answer follows its prompt
        runs[backend] = script
    assert isinstance(runs["fastprompt"]["model"], fastprompt.FastPromptModel)
    losses = {
        backend: [entry["loss"] for entry in run["trainer"].state.log_history if "loss" in entry]
        for backend, run in runs.items()
    }
    assert len(losses["fastprompt"]) == 2
    assert losses["fastprompt"] == pytest.approx(losses["peft"], rel=1e-4)
    checkpoint = tmp_path / "fastprompt" / "checkpoint-2"
    reloaded = PeftModel.from_pretrained(fastprompt.load_model("tiny-bloom"), str(checkpoint))
    trained = runs["fastprompt"]["model"].prompt_encoder["default"].embedding.weight
    assert torch.equal(reloaded.prompt_encoder["default"].embedding.weight, trained.detach())


def test_tutorial_cli_script_trains_and_generates(tmp_path):
    out = tmp_path / "chatbot"
    env = dict(
        cli_env(), FASTPROMPT=shlex.join([sys.executable, "-m", "fastprompt.app.cli"]), FASTPROMPT_OUTPUT=str(out)
    )
    done = subprocess.run(
        [
            "bash",
            str(EXAMPLES / "tutorial_cli.sh"),
            "--max-steps",
            "4",
            "--lr",
            "3e-2",
            "--log-every",
            "2",
            "--eval-data",
            str(small_data(tmp_path)),
            "--eval-every",
            "1",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "adapter saved to" in done.stdout
    evals = [
        entry["eval_loss"]
        for entry in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
        if "eval_loss" in entry
    ]
    assert len(evals) == 4 and evals[-1] < evals[0]


def test_sentiment_classification_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sentiment_classification.py", "--epochs", "1", "--output", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "sentiment_classification.py"), run_name="__main__")
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"label-token loss .*: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before
    assert re.search(r"accuracy on 16 held-out reviews: [\d.]+ -> [\d.]+", out)
    assert (tmp_path / "adapter_model.safetensors").is_file()


# Hides bitsandbytes from the import system, as on a default install (it is the optional "8bit" extra).
WITHOUT_BITSANDBYTES = """
import importlib.abc, sys
class NoBitsandbytes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bitsandbytes":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoBitsandbytes())
"""


def test_importing_peft_then_fastprompt_is_silent_on_a_default_install():
    """No import order to keep: without the 8-bit extra nothing imports
    bitsandbytes, whose import-time hub-kernel warning was the reason for one."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_BITSANDBYTES + "import peft, transformers, fastprompt"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_importing_fastprompt_then_peft_is_silent_from_the_repo_root():
    # The repo root puts our kernels/ folder on sys.path as a namespace package named like HF's `kernels`.
    done = subprocess.run(
        [sys.executable, "-c", "import fastprompt, peft, transformers"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
