"""What every fast path implements, and the prefix it hands between its passes.

A path runs a ``PromptBatch`` through a frozen base model and gives PEFT's
numbers: the final hidden states (from which the model computes the loss and
the logits), and generation. ``BloomPath`` runs BLOOM's blocks through our own
attention; ``GenericPath`` runs any supported family's own body. Soft-prompt
methods differ only in how the per-layer prefix is produced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..batch import PromptBatch
from ..prefix_cache import PrefixCache, PrefixSource


class Path(PrefixSource, Protocol):
    """A fast path. ``name`` (the prefix cache's key) is what ``fast_path`` reports."""

    softcap: float | None  # the logits' soft cap, which a label-only loss applies too

    @property
    def lm_head(self) -> torch.nn.Module: ...

    def hidden_states(
        self, batch: PromptBatch, input_ids: torch.Tensor, prefixes: PrefixCache
    ) -> tuple[torch.Tensor, torch.Tensor, str, str | None]:
        """The training / eval pass, planned here: the virtual tokens' final
        hidden states [1 or B, P, H] (one row when every row reads the same
        prompt), the tokens' [B, T, H], the pass that ran ("whole": PEFT's
        single pass over ``cat(prompt, tokens)``, "shared", "packed"), and why
        a shared pass could not run where the batch allowed one (else None)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def generate(self, batch: PromptBatch, args: tuple, kwargs: dict, prefixes: PrefixCache) -> torch.Tensor | None:
        """The sequences, where this path has its own decode loop for the
        request; None: transformers' loop runs it, with
        ``generation_kwargs`` and ``prepare_step_inputs``."""

    def generation_kwargs(self, batch: PromptBatch, args: tuple, kwargs: dict) -> dict:
        """``generate``'s keywords for transformers' loop."""

    def prepare_step_inputs(
        self,
        batch: PromptBatch,
        prefixes: PrefixCache,
        prepare_base: Callable,
        input_ids: torch.Tensor,
        *args,
        **kwargs,
    ) -> dict:
        """``prepare_inputs_for_generation`` for one step of transformers' loop;
        ``prepare_base`` is the base model's own."""
