"""``act(gate) * up``, the middle of a gated MLP (Llama, Mistral, Qwen, Gemma), keeping only ``gate``
and ``up`` for backward.

Autograd's own graph for ``act_fn(gate) * up`` keeps three ``[N, intermediate]``
tensors per layer: ``gate`` for the activation's backward, ``act(gate)`` and
``up`` for the product's. ``act(gate)`` can be recomputed from ``gate`` in
backward, so this Function keeps two. In a Llama-3.2-1B-shaped layer that is a
third of the MLP's saved activations and a fifth of the whole layer's (the
frozen linears save no inputs: no weight gradient is taken).

Exact, bit for bit: forward runs the ATen ops the module runs, and backward
calls the kernels autograd's derivative formulas call (``silu_backward(grad,
self)``, ``gelu_backward(grad, self, approximate)``, and ``grad * other`` for a
product); recomputing ``act(gate)`` reproduces forward's bits. That is also why
there is no Triton kernel here: a fused kernel would round the activation
differently from torch and change results, which a fast path may not.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# name -> (activation, its backward as autograd computes it, written into ``grad_input``)
ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward.grad_input),
    "gelu_tanh": (
        functools.partial(F.gelu, approximate="tanh"),
        functools.partial(torch.ops.aten.gelu_backward.grad_input, approximate="tanh"),
    ),
}


class GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        # In place where the operand is a temporary: the same elementwise
        # kernels, fewer [N, intermediate] allocations (on CPU each is fresh
        # pages from the OS, whose faults cost more than the recompute).
        return ACTIVATIONS[activation][0](gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        act, act_backward = ACTIVATIONS[ctx.activation]
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_act = grad * up
            grad_gate = act_backward(grad_act, gate, grad_input=grad_act)
        if ctx.needs_input_grad[1]:
            grad_up = act(gate).mul_(grad)
        return grad_gate, grad_up, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``activation`` in ``ACTIVATIONS``."""
    return GatedActivation.apply(gate, up, activation)
