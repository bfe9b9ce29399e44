"""Settings of a training run, validated on construction.

Torch-free, so the command line can print these defaults in ``--help``
without importing the heavy libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    """Defaults are the tutorial's (HF ``TrainingArguments`` defaults with
    batch 1 × accumulation 8): lr 5e-5, linear decay, no warmup, clip 1.0."""

    output: Path
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # examples per optimizer step, over all ranks
    max_tokens: int = 4096  # padded tokens per forward pass on one rank
    lr: float = 5e-5
    warmup_steps: int = 0
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
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
