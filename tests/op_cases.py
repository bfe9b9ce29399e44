"""Inputs and cases shared by every embed_concat backend's tests (Triton, native),
so all backends are judged on the same shapes and the same data."""

from __future__ import annotations

import torch

VOCAB = 37
# (batch, prompt rows, tokens, hidden): P = 0, B = 1, T = 1, hidden sizes off every vector width.
SHAPES = [(1, 0, 3, 8), (2, 3, 5, 1000), (3, 7, 2, 1088), (1, 4, 1, 256), (2, 1, 1, 17)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYER_NORMS = ["none", "weight+bias", "weight"]


def shape_id(shape):
    return "B{}P{}T{}H{}".format(*shape)


def make_inputs(shape, dtype, layer_norm, prompt_dtype=None, seed=0, device="cpu"):
    """Random inputs whose rows have a nonzero mean (so LayerNorm's centring matters)."""
    batch, n_prompt, n_tokens, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (batch, n_tokens), generator=gen),
        "weight": (torch.randn(VOCAB, hidden, generator=gen) + 0.3).to(dtype),
        "prompt": (torch.randn(n_prompt, hidden, generator=gen) - 0.2).to(prompt_dtype or dtype),
        "ln_weight": None,
        "ln_bias": None,
    }
    if layer_norm != "none":
        inputs["ln_weight"] = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
    if layer_norm == "weight+bias":
        inputs["ln_bias"] = (0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return {name: None if value is None else value.to(device) for name, value in inputs.items()}


def leaves(inputs, trainable, dtype=None):
    """Fresh leaf copies (cast to `dtype` if given); names in `trainable` require grad."""
    out = {}
    for name, value in inputs.items():
        if value is not None and value.is_floating_point():
            value = value.detach().clone()
            if dtype is not None:
                value = value.to(dtype)
            value.requires_grad_(name in trainable)
        out[name] = value
    return out


def assert_prompt_grad_matches_reference(run, inputs, grad_out):
    """Backpropagate ``grad_out`` through ``run`` and through the reference in the
    inputs' dtype and in fp32; the prompt's gradient, the only one the op computes,
    must obey the tolerance rule."""
    from tolerance import assert_within_reference_error

    from fastprompt.ops.reference import embed_concat_reference

    grads = []
    for function, upcast in ((run, False), (embed_concat_reference, False), (embed_concat_reference, True)):
        args = leaves(inputs, ("prompt",), torch.float32 if upcast else None)
        function(**args).backward(grad_out.float() if upcast else grad_out)
        grads.append(args["prompt"].grad)
    assert_within_reference_error(*grads, name="grad prompt")
