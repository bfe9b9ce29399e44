"""Inputs and cases shared by every pack_embed backend's tests (Triton, native),
so all backends are judged on the same shapes and the same data, against the one
reference (`fastprompt.ops.reference.pack_embed_reference`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprompt.ops.packing import pack_layout

VOCAB = 37
KEEPS = ("all", "holes", "empty-row", "nothing")


@dataclass(frozen=True)
class Case:
    """A prompts of P rows in front of a padded batch of B rows of T tokens, hidden H; `keep`: which
    positions are packed ("all": keep=None, "holes": random ones, "empty-row": holes and row 0 keeps
    nothing, "nothing": K = 0)."""

    prompts: int
    prompt_rows: int
    rows: int
    tokens: int
    hidden: int
    keep: str

    @property
    def id(self) -> str:
        return f"A{self.prompts}P{self.prompt_rows}B{self.rows}T{self.tokens}H{self.hidden}-{self.keep}"


# A = 0 (no prompt), 1 and 3; batch rows 1 and 16; every keep kind; hidden sizes off every vector width.
CASES = [
    Case(0, 4, 2, 5, 8, "all"),
    Case(1, 3, 1, 1, 17, "all"),
    Case(3, 2, 3, 6, 1000, "holes"),
    Case(1, 4, 16, 3, 1088, "empty-row"),
    Case(3, 1, 2, 4, 33, "nothing"),
    Case(0, 2, 2, 3, 8, "nothing"),  # nothing at all to pack
    Case(1, 5, 4, 7, 257, "holes"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYER_NORMS = ["none", "weight+bias", "weight"]


def case_id(case: Case) -> str:
    return case.id


def make_keep(case: Case, gen: torch.Generator) -> torch.Tensor | None:
    if case.keep == "all":
        return None
    keep = torch.rand(case.rows, case.tokens, generator=gen) < 0.6
    if case.keep == "empty-row":
        keep[0] = False
    if case.keep == "nothing":
        keep[:] = False
    return keep


def make_inputs(case: Case, dtype, layer_norm, prompt_dtype=None, seed=0, device="cpu") -> dict:
    """`pack_embed`'s inputs (input_ids, keep, prompts, weight, ln_weight, ln_bias); random rows with a
    nonzero mean, so that LayerNorm's centring matters."""
    gen = torch.Generator().manual_seed(seed)
    hidden = case.hidden
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (case.rows, case.tokens), generator=gen),
        "keep": make_keep(case, gen),
        "prompts": (torch.randn(case.prompts, case.prompt_rows, hidden, generator=gen) - 0.2).to(prompt_dtype or dtype),
        "weight": (torch.randn(VOCAB, hidden, generator=gen) + 0.3).to(dtype),
        "ln_weight": None,
        "ln_bias": None,
    }
    if layer_norm != "none":
        inputs["ln_weight"] = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
    if layer_norm == "weight+bias":
        inputs["ln_bias"] = (0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return {name: None if value is None else value.to(device) for name, value in inputs.items()}


def backend_inputs(inputs: dict) -> dict:
    """What a backend and the reference take: `keep` replaced by the layout's token_index."""
    ids = inputs["input_ids"]
    layout = pack_layout(inputs["keep"], ids.shape[0], ids.shape[1], ids.device)
    return {
        "input_ids": ids,
        "token_index": layout.token_index,
        **{name: inputs[name] for name in ("prompts", "weight", "ln_weight", "ln_bias")},
    }


def output_rows(inputs: dict) -> int:
    """A*P + K of the packed sequence."""
    prompts = inputs["prompts"]
    return prompts.shape[0] * prompts.shape[1] + inputs["token_index"].shape[0]


def leaves(inputs, trainable, dtype=None):
    """Fresh leaf copies (floating ones cast to `dtype` if given); names in `trainable` require grad."""
    out = {}
    for name, value in inputs.items():
        if value is not None and value.is_floating_point():
            value = value.detach().clone()
            if dtype is not None:
                value = value.to(dtype)
            value.requires_grad_(name in trainable)
        out[name] = value
    return out


def assert_forward_matches_reference(run, inputs):
    """`run`'s output vs the reference's in the inputs' dtype and in fp32 (tests/tolerance.py); a pure
    copy (no LayerNorm) must be exact."""
    from tolerance import assert_within_reference_error

    from fastprompt.ops.reference import pack_embed_reference

    out = run(**inputs)
    expected = pack_embed_reference(**inputs)
    assert out.shape == (output_rows(inputs), inputs["weight"].shape[1]) and out.dtype == inputs["weight"].dtype
    if inputs["ln_weight"] is None:
        assert torch.equal(out, expected), "without LayerNorm the op is a pure copy and must be exact"
        return
    assert_within_reference_error(out, expected, pack_embed_reference(**leaves(inputs, (), torch.float32)), name="out")


def assert_prompt_grad_matches_reference(run, inputs, grad_out, atol=None):
    """Backpropagate ``grad_out`` through ``run`` and through the reference in the
    inputs' dtype and in fp32; the prompts' gradient, the only one the op computes,
    must obey the tolerance rule."""
    from tolerance import assert_within_reference_error

    from fastprompt.ops.reference import pack_embed_reference

    grads = []
    for function, upcast in ((run, False), (pack_embed_reference, False), (pack_embed_reference, True)):
        args = leaves(inputs, ("prompts",), torch.float32 if upcast else None)
        function(**args).backward(grad_out.float() if upcast else grad_out)
        grads.append(args["prompts"].grad)
    assert grads[0].dtype == inputs["prompts"].dtype
    assert_within_reference_error(*grads, atol=atol, name="grad prompts")
