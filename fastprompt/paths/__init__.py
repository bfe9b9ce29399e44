"""Which fast path a base model has, and which one a call takes.

``BloomPath`` runs BLOOM's blocks through our own attention and fused embedding
op; ``GenericPath`` runs any family of ``generic.FAMILIES``' own body (BLOOM's
too) with the prompt's K/V as a pre-filled transformers cache, or packed. A
family with neither runs PEFT's code.
"""

from __future__ import annotations

from typing import NamedTuple

from ..eligibility import body_hooks, dropout_active, embedding_hooks, placement_hooks
from .bloom import BloomPath
from .generic import FAMILIES, GenericPath
from .interface import Path

__all__ = ["DRAWS_RANDOM", "BloomPath", "GenericPath", "Path", "Paths", "Route", "make_paths"]


DRAWS_RANDOM = "the model draws random numbers in this mode: they must be drawn as in PEFT's single pass"


class Route(NamedTuple):
    """The path a call takes, whether the prompt's pass may be shared by the
    rows, and why BLOOM's own path or the sharing is off (None: neither is)."""

    path: Path
    shares_prefix: bool
    reason: str | None


class Paths(NamedTuple):
    """A model's fast paths: BLOOM's own (or None) and the generic one (None: no fast path at all)."""

    own: BloomPath | None
    generic: GenericPath | None

    def choose(self, draws_random: bool = False) -> Route:
        """The route of a call with the model as it is now. No sharing when
        hooks in the body must see PEFT's single pass over ``cat(prompt,
        tokens)`` or random draws must happen as in it (dropout, or any draw an
        earlier call saw: ``draws_random``); BLOOM's own path only where
        sharing is allowed, nothing it bypasses is hooked (the input embedding,
        which its fused op reads directly; accelerate's placement hooks
        anywhere) and the modules it re-implements run their own classes'
        forwards."""
        generic = self.generic
        unshared = None
        if body_hooks(generic.body, generic.word_embeddings):
            unshared = "forward hooks in the model's body must see PEFT's single pass"
        elif dropout_active(generic.model):
            unshared = "dropout is active (training mode): it must draw as in PEFT's single pass"
        elif draws_random:
            unshared = DRAWS_RANDOM
        if unshared is not None:
            return Route(generic, False, unshared)
        if self.own is not None and placement_hooks(generic.body):
            return Route(generic, True, "accelerate's placement hooks: only the model's own body may run its modules")
        if self.own is not None and embedding_hooks(generic.word_embeddings):
            return Route(generic, True, "forward hooks on the input embedding, which BLOOM's fused op reads directly")
        if self.own is not None and not self.own.fused_inputs_frozen():
            return Route(
                generic,
                True,
                "a trainable embedding table or embedding LayerNorm, which BLOOM's fused op treats as frozen",
            )
        if self.own is not None and not self.own.runs_as_written():
            return Route(generic, True, "BLOOM's modules have other forwards than those its own path re-implements")
        return Route(self.own or generic, True, None)


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
