"""What in a model keeps a call off a shortcut: hooks that must see PEFT's module calls, and randomness.

Decided from what the modules do, not from their names: a fast path may call
modules differently from PEFT's single pass over ``cat(prompt, tokens)`` only
where nothing can tell the difference.
"""

from __future__ import annotations

import torch


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Forward or forward-pre hooks registered on ``module`` itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_placement_hook(module: torch.nn.Module) -> bool:
    """accelerate's device/offload hook: it replaces ``forward`` and brings the
    weights in only during the module's own call."""
    return hasattr(module, "_hf_hook")


def placement_hooks(body: torch.nn.Module) -> bool:
    """A placement hook anywhere in the body: only the body itself may run its modules."""
    return any(has_placement_hook(m) for m in body.modules())


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
    return any(has_forward_hooks(m) for m in blocks.modules())


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
