"""Gated MLPs that keep less for backward, for the duration of one fast-path pass.

The generic fast path runs the model's own blocks. A gated MLP among them
whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
(Llama, Mistral, Qwen2/3 and Gemma 1-3 in transformers 5) with a SiLU or
tanh-GELU activation runs, during the pass, a forward that makes the same
module calls in the same order and computes ``act(gate) * up`` through
``ops.gated_activation``: the same bits, one ``[N, intermediate]`` tensor less
kept per layer. Anything else runs as it is: another forward, another
activation, or a forward already replaced on the instance (accelerate's hooks
replace it). The swap is undone when the pass returns or raises; the autograd
graph it built stays valid.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ..ops import gated_activation


def _gated_forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _same_code(function, reference) -> bool:
    code = getattr(function, "__code__", None)
    want = reference.__code__
    return code is not None and all(
        getattr(code, field) == getattr(want, field) for field in ("co_code", "co_names", "co_varnames", "co_consts")
    )


def gated_mlps(blocks: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules in ``blocks`` whose class forward is the gated MLP above.
    Recognised by what the forward does (its bytecode), not by class name, so
    a family or a transformers version whose MLP differs keeps its own."""
    return [m for m in blocks.modules() if _same_code(type(m).forward, _gated_forward)]


def activation_name(act: torch.nn.Module) -> str | None:
    """The ``ops.ACTIVATIONS`` name of transformers' (or torch's) SiLU or
    tanh-GELU module, or None for anything else."""
    from transformers.activations import GELUTanh, SiLUActivation

    if "forward" in vars(act):
        return None
    kind = type(act)
    if kind is SiLUActivation or (kind is torch.nn.SiLU and not act.inplace):
        return "silu"
    inner = getattr(act, "act", None)
    if (
        kind is GELUTanh
        and isinstance(inner, functools.partial)
        and inner.func is F.gelu
        and not inner.args
        and inner.keywords == {"approximate": "tanh"}
    ):
        return "gelu_tanh"
    return None


def _lean_forward(mlp, activation, x):
    return mlp.down_proj(gated_activation(mlp.gate_proj(x), mlp.up_proj(x), activation))


@contextlib.contextmanager
def keeping_less(mlps: list[torch.nn.Module]):
    """Within the block, each of ``mlps`` (from ``gated_mlps``) whose
    activation is known and whose instance has no forward of its own computes
    through ``gated_activation``."""
    swapped = []
    try:
        for mlp in mlps:
            activation = activation_name(mlp.act_fn)
            if activation is None or "forward" in vars(mlp):
                continue
            lean = functools.partial(_lean_forward, mlp, activation)
            mlp.forward = lean
            swapped.append((mlp, lean))
        yield
    finally:
        for mlp, lean in swapped:
            if vars(mlp).get("forward") is lean:
                del mlp.forward
