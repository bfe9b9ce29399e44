"""What in a model keeps a call off a shortcut: hooks that must see PEFT's module calls, and randomness.

Decided from what the modules do, not from their names: a fast path may call
modules differently from PEFT's single pass over ``cat(prompt, tokens)`` only
where nothing can tell the difference.
"""

from __future__ import annotations

import functools

import torch


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Forward or forward-pre hooks registered on ``module`` itself, or its
    ``forward`` replaced on the instance (a wrapper: what it does is unknown,
    so it must see the calls PEFT makes)."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in module.__dict__


def has_placement_hook(module: torch.nn.Module) -> bool:
    """accelerate's device/offload hook: it replaces ``forward`` and brings the
    weights in only during the module's own call."""
    return hasattr(module, "_hf_hook")


def placement_hooks(body: torch.nn.Module) -> bool:
    """A placement hook anywhere in the body: only the body itself may run its modules."""
    return any(has_placement_hook(m) for m in body.modules())


def global_hooks() -> bool:
    """Forward (pre-)hooks registered for every module."""
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def body_hooks(body: torch.nn.Module, embedding: torch.nn.Module) -> bool:
    """Forward (pre-)hooks on the body or anything in it but the input
    embedding (user hooks, FSDP2's unshard), or global ones: they must see the
    calls PEFT's path makes, one body call over ``cat(prompt, tokens)``. The
    input embedding is left out: every path calls it as PEFT does, once on the
    real tokens."""
    return global_hooks() or any(has_forward_hooks(m) for m in body.modules() if m is not embedding)


@functools.cache
def _requires_grad_hook_code() -> frozenset:
    """The code of the hooks transformers and PEFT put on the input embedding
    so that checkpointed blocks get inputs requiring grad (defined inside the
    functions that register them)."""
    import peft
    from transformers import PreTrainedModel

    owners = [
        PreTrainedModel.enable_input_require_grads,
        getattr(peft.PeftModel, "_prepare_model_for_gradient_checkpointing", None),
        getattr(getattr(peft.utils, "other", None), "prepare_model_for_kbit_training", None),
    ]
    return frozenset(
        const
        for owner in owners
        if owner is not None
        for const in owner.__code__.co_consts
        if isinstance(const, type(owner.__code__)) and const.co_name.startswith("make_inputs_require_grad")
    )


def embedding_hooks(embedding: torch.nn.Module) -> bool:
    """Forward (pre-)hooks on the input embedding other than the ones
    transformers and PEFT register for gradient checkpointing (recognised by
    their code): those only mark the output as requiring grad, which a trained
    prompt already does; any other (NEFTune's noise, a user's) must run."""
    if embedding._forward_pre_hooks or "forward" in embedding.__dict__:
        return True
    harmless = _requires_grad_hook_code()
    return any(getattr(hook, "__code__", None) not in harmless for hook in embedding._forward_hooks.values())


def plain_embedding(embedding: torch.nn.Module) -> bool:
    """Whether the input embedding is a plain table lookup that the fused packer
    (``ops.pack_embed``) may do in its place: ``nn.Embedding``'s own forward, no
    hook that must run, no ``max_norm`` (which renormalises the table as it
    reads it), and a frozen table (the packer differentiates the prompts only)."""
    return (
        isinstance(embedding, torch.nn.Embedding)
        and type(embedding).forward is torch.nn.Embedding.forward
        and not embedding_hooks(embedding)
        and embedding.max_norm is None
        and not embedding.weight.requires_grad
    )


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


def module_modes(module: torch.nn.Module) -> tuple[bool, ...]:
    """Every submodule's train/eval flag: what decides whether a model draws random numbers."""
    return tuple(m.training for m in module.modules())


class RandomDraws:
    """Whether the code run since construction drew from torch's default
    generators (the CPU one and ``device``'s), and the means to undo it.

    What a model does, not what its modules are called: layer drop, stochastic
    depth, a custom noise module all advance a generator, however they are
    written. A generator's state is a host tensor (a few kilobytes on CPU,
    CUDA's seed and offset), compared here as bytes: no device work, no sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.seen = self._states()

    def _states(self) -> tuple[bytes, bytes | None]:
        accelerator = torch.cuda.get_rng_state(self.device) if self.accelerator is not None else None
        return (torch.get_rng_state().numpy().tobytes(), None if accelerator is None else accelerator.numpy().tobytes())

    def drew(self) -> bool:
        return self._states() != self.seen

    def undo(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.cuda.set_rng_state(self.accelerator, self.device)
