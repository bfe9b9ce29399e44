"""Which fast path a base model has, and which one a call takes.

``BloomPath`` runs BLOOM's blocks through our own attention and fused embedding
op; ``GenericPath`` runs any family of ``generic.FAMILIES``' own body (BLOOM's
too) with the prompt's K/V as a pre-filled transformers cache, or packed. A
family with neither runs PEFT's code.
"""

from __future__ import annotations

from typing import NamedTuple

from ..eligibility import block_hooks, dropout_active, placement_hooks
from .bloom import BloomPath
from .generic import FAMILIES, GenericPath
from .interface import Path

__all__ = ["BloomPath", "GenericPath", "Path", "Paths", "make_paths"]


class Paths(NamedTuple):
    """A model's fast paths: BLOOM's own (or None) and the generic one (None: no fast path at all)."""

    own: BloomPath | None
    generic: GenericPath | None

    def choose(self) -> tuple[Path, bool]:
        """The path a call takes now, and whether the prompt's pass may be
        shared by the rows (computed once, cached when no gradient flows).
        BLOOM's own path unless the body has hooks, placement hooks, or draws
        dropout; no sharing when dropout must draw per row or hooks must see
        PEFT's single pass over ``cat(prompt, tokens)``."""
        generic = self.generic
        hooked = block_hooks(generic.blocks)
        dropout = dropout_active(generic.model)
        if self.own is not None and not (hooked or dropout or placement_hooks(generic.body)):
            return self.own, True
        return generic, not (hooked or dropout)


def make_paths(base_model, word_embeddings) -> Paths:
    config = getattr(base_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not hasattr(base_model, "base_model_prefix"):
        return Paths(None, None)
    if getattr(config.get_text_config(), "use_bidirectional_attention", False):
        return Paths(None, None)  # the virtual tokens see the real ones: their states differ per row
    generic = GenericPath(base_model, word_embeddings)
    # BLOOM's slow_but_exact tensor-parallel emulation splits its linears: transformers' code only.
    own_bloom_ok = model_type == "bloom" and not (config.pretraining_tp > 1 and config.slow_but_exact)
    return Paths(BloomPath(base_model, generic) if own_bloom_ok else None, generic)
