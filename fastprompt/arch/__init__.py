"""Which fast path a base model gets, and what a call needs to keep it.

Two drivers share one interface (``full``, ``prefix``, ``tokens``, ``logits``, ``packs``):
``bloom.BloomDriver`` runs BLOOM's blocks through our own attention and fused
embedding op, ``generic.GenericDriver`` runs any supported family's own body
with the prompt's K/V as a pre-filled transformers cache. BLOOM takes its own
driver unless the call needs BLOOM's module calls to happen as in PEFT (hooks
on the body, dropout that must draw the same random numbers); families not in
``generic.FAMILIES`` have no fast path and run PEFT's code.
"""

from __future__ import annotations

import torch

from .bloom import BloomDriver
from .generic import FAMILIES, GenericDriver, Prefix

__all__ = ["BloomDriver", "GenericDriver", "Prefix", "block_hooks", "dropout_active", "make_drivers",
           "placement_hooks"]


def make_drivers(base_model, word_embeddings) -> tuple[BloomDriver | None, GenericDriver | None]:
    config = getattr(base_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not hasattr(base_model, "base_model_prefix"):
        return None, None
    if getattr(config.get_text_config(), "use_bidirectional_attention", False):
        return None, None  # the virtual tokens see the real ones: their states differ per row
    generic = GenericDriver(base_model, word_embeddings)
    own_bloom_ok = model_type == "bloom" and not (config.pretraining_tp > 1 and config.slow_but_exact)
    return (BloomDriver(base_model) if own_bloom_ok else None), generic


def placement_hooks(body: torch.nn.Module) -> bool:
    """accelerate's device/offload hooks anywhere in the body: they replace
    ``forward`` and bring weights in only during the module's own call, so
    only the body itself may run its modules."""
    return any(hasattr(m, "_hf_hook") for m in body.modules())


def block_hooks(blocks: torch.nn.Module) -> bool:
    """Forward (pre-)hooks on the blocks or anything inside them (user hooks,
    FSDP2's unshard), or global module hooks: they must see the calls PEFT's
    path makes, one pass over ``cat(prompt, tokens)``. A hook on the
    input-embedding module alone does not count: BLOOM's fused op reads the
    table directly, and the hook PEFT puts there for gradient checkpointing
    (making the embeddings require grad) has nothing to add when the prompt
    already does."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in blocks.modules())


def dropout_active(module: torch.nn.Module) -> bool:
    """Any dropout that draws random numbers in this call: a dropout module
    with p > 0 in training mode, or a float ``*dropout*`` rate > 0 that a
    training-mode module passes to a functional dropout (how transformers'
    attention and BLOOM's residual dropouts are written)."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            if m.p > 0:
                return True
            continue
        for name, value in vars(m).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                return True
    return False
