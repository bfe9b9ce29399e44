"""Settings of a training run, validated on construction.

Torch-free, so the command line can print these defaults in ``--help``
without importing the heavy libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

LR_SCHEDULERS = ("linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """Defaults are the tutorial's (HF ``TrainingArguments`` defaults with
    batch 1 × accumulation 8): lr 5e-5, linear decay, no warmup, clip 1.0.
    The schedules are transformers' ``linear``, ``cosine`` and
    ``constant_with_warmup``; ``warmup_ratio`` is a fraction of the total
    steps, rounded up, as a fractional ``TrainingArguments.warmup_steps``."""

    output: Path
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # examples per optimizer step, over all ranks
    max_tokens: int = 4096  # padded tokens per forward pass on one rank
    lr: float = 5e-5
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when there is held-out data)
    save_every: int = 500  # 0: checkpoint only when interrupted
    keep_checkpoints: int = 2
    seed: int = 42
    bf16: bool = False  # autocast matmuls to bf16 (GPU)
    resume: str | None = None  # "latest" or a checkpoint directory
    progress: bool = True
    report_to: str = "none"  # also send the log lines to tensorboard or wandb

    def __post_init__(self):
        self.output = Path(self.output)
        positive = ("epochs", "batch_size", "max_tokens", "log_every", "keep_checkpoints")
        non_negative = ("warmup_steps", "eval_every", "save_every", "weight_decay", "max_grad_norm")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
