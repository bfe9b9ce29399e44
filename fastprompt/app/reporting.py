"""Where training log lines go besides ``train_log.jsonl``: TensorBoard or Weights & Biases, through their libraries.

Both are optional (``pip install 'fastprompt[tensorboard]'`` or ``'fastprompt[wandb]'``); ``check_installed`` is
torch-free and runs before the model loads, so a missing one fails in a second, not after loading. Metric names are
those of transformers' Trainer callbacks (``train/loss``, ``train/learning_rate``, ``train/grad_norm``,
``eval/loss``), so fastprompt and Trainer runs plot side by side. wandb is configured by its own environment
(``WANDB_MODE=offline`` runs without an account or network; ``WANDB_PROJECT``, default ``fastprompt``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

TENSORBOARD_DIR = "runs"


def check_installed(report_to: str) -> None:
    """A ValueError naming the extra to install when ``report_to``'s library is missing."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ValueError(
            f"--report-to {report_to} needs the {report_to} package: pip install 'fastprompt[{report_to}]'"
        )


def metric_name(key: str) -> str:
    """A ``train_log.jsonl`` key as Trainer's callbacks name it."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    return "train/" + {"lr": "learning_rate"}.get(key, key)


class _NoReport:
    def log(self, entry: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, output: Path, start_step: int, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        # A (re)started run drops the events past its first step, as train_log.jsonl drops its lines:
        # a resumed run redoes those steps, a fresh one starts over.
        self.writer = SummaryWriter(log_dir=str(output / TENSORBOARD_DIR), purge_step=start_step + 1)
        if start_step == 0:
            self.writer.add_text("fastprompt/settings", "\n".join(f"    {k}: {v}" for k, v in settings.items()))

    def log(self, entry: dict) -> None:
        for key, value in entry.items():
            if key != "step":
                self.writer.add_scalar(metric_name(key), value, entry["step"])
        self.writer.flush()  # a watching TensorBoard sees each line when train_log.jsonl does

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output: Path, start_step: int, settings: dict):
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "fastprompt"),
                name=output.resolve().name,
                dir=str(output),
                config=dict(settings, resumed_from_step=start_step),
            )
        except wandb.errors.UsageError as err:  # not logged in, most often
            raise ValueError(f"--report-to wandb: {err} (or set WANDB_MODE=offline: no account needed)") from None

    def log(self, entry: dict) -> None:
        self.run.log({metric_name(k): v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def close(self) -> None:
        self.run.finish()


def open_reporter(report_to: str, output: Path, start_step: int, settings: dict):
    """An object with ``log(entry)`` and ``close()`` for ``report_to`` (``none``: one that does nothing).
    ``settings`` (JSON-able) are recorded with the run."""
    check_installed(report_to)
    if report_to == "none":
        return _NoReport()
    output.mkdir(parents=True, exist_ok=True)
    return {"tensorboard": _TensorBoard, "wandb": _Wandb}[report_to](output, start_step, settings)
