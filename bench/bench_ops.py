"""pack_embed microbenchmark: each fused backend vs the unfused torch
reference, alternated round by round (``harness.py``), outputs checked.

Each case packs A prompts of P rows and the kept positions of a right-padded
batch of B rows of T tokens (row lengths spread evenly so that a share
``kept`` of the B*T positions is kept, the pads dropped) into one
[A*P + K, H] sequence. LayerNorm on, as in BLOOM, unless marked noLN.
- CPU, fp32, native vs torch: the design's prototype shape (nothing dropped),
  and bloom-1b4-zh's hidden 2048 on a packed batch (A 1, P 8, B 4, T 256, 30%
  pads dropped) from a 16384-row table (134 MB, far beyond any cache, as a
  real vocabulary is), with and without BLOOM's embedding LayerNorm. The
  native library sizes its OpenMP teams from torch's thread count, which
  bench/conftest.py sets for every contender alike.
- CUDA (when present), bf16, Triton vs torch: a BLOOM-1b4-like packed batch
  and two with A*P + K >= 16K rows (>= 32M output elements at H 2048), where
  the op is bandwidth-bound (set GB/s against the card's peak: H100 SXM
  3.35 TB/s). Triton runs on CUDA only: the interpreter is for correctness,
  not speed.

Two passes: forward, and forward + backward w.r.t. the prompts with the table
and LayerNorm frozen (prompt tuning). Backends are called directly with the
layout's token_index, except "dispatch", ``pack_embed(impl=None)`` from the
keep mask, which adds the host-side validation (a device-side id check) and
``pack_layout`` (the packed pass's one host sync) to show what they cost.

GB/s = the minimum traffic of the op / median time: token_index and the kept
ids, the kept table rows, the prompt rows and the LayerNorm parameters read
once, the output written once; backward adds the A*P prompt rows of grad_out
read, the prompts read and their gradient written. The byte count is the same
for every backend, so it compares them and can be set against a device's peak
bandwidth.

    python -m pytest bench/bench_ops.py --benchmark-json=out.json
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import harness
import pytest
import torch

from fastprompt.ops import backend_info, pack_embed, pack_embed_reference, pack_layout


@dataclass(frozen=True)
class PackCase:
    device: str
    dtype: torch.dtype
    prompts: int
    prompt: int
    batch: int
    tokens: int
    hidden: int
    vocab: int
    kept: float = 1.0  # share of the B*T positions kept
    layer_norm: bool = True

    def row_lengths(self) -> list[int]:
        """Right-padded rows from T long down to (2*kept - 1)*T, evenly: kept*B*T in all."""
        if self.batch == 1:
            return [round(self.kept * self.tokens)]
        low = 2 * self.kept - 1
        return [round(self.tokens * (1 - (1 - low) * b / (self.batch - 1))) for b in range(self.batch)]

    @property
    def kept_tokens(self) -> int:
        return sum(self.row_lengths())

    @property
    def prompt_rows(self) -> int:
        return self.prompts * self.prompt

    @property
    def id(self) -> str:
        norm = "" if self.layer_norm else "-noLN"
        return (
            f"{self.device}-{str(self.dtype).removeprefix('torch.')}-A{self.prompts}P{self.prompt}"
            f"B{self.batch}T{self.tokens}H{self.hidden}V{self.vocab}K{self.kept_tokens}{norm}"
        )

    def forward_bytes(self) -> int:
        size = self.dtype.itemsize
        rows_read = (self.kept_tokens + self.prompt_rows + (2 if self.layer_norm else 0)) * self.hidden
        written = (self.prompt_rows + self.kept_tokens) * self.hidden
        return self.kept_tokens * 2 * 8 + (rows_read + written) * size

    def backward_bytes(self) -> int:
        return 3 * self.prompt_rows * self.hidden * self.dtype.itemsize


CASES = [
    PackCase("cpu", torch.float32, 1, 20, 8, 64, 512, 46145),
    PackCase("cpu", torch.float32, 1, 8, 4, 256, 2048, 16384, kept=0.7),
    PackCase("cpu", torch.float32, 1, 8, 4, 256, 2048, 16384, kept=0.7, layer_norm=False),
    PackCase("cuda", torch.bfloat16, 1, 8, 8, 256, 2048, 250880, kept=0.7),
    PackCase("cuda", torch.bfloat16, 1, 20, 32, 492, 2048, 250880),  # 15,764 rows: 32.3M output elements
    PackCase("cuda", torch.bfloat16, 4, 100, 64, 412, 1024, 250880, kept=0.7),  # 18,858 rows, long prompts
]
ROUNDS = 60


@functools.lru_cache(maxsize=1)
def inputs(case: PackCase) -> dict:
    gen = torch.Generator(device=case.device).manual_seed(0)
    randn = functools.partial(torch.randn, generator=gen, device=case.device)
    positions = torch.arange(case.tokens, device=case.device)
    lengths = torch.tensor(case.row_lengths(), device=case.device)
    return {
        "input_ids": torch.randint(0, case.vocab, (case.batch, case.tokens), generator=gen, device=case.device),
        "keep": positions < lengths[:, None],
        "prompts": randn(case.prompts, case.prompt, case.hidden).to(case.dtype),
        "weight": randn(case.vocab, case.hidden).to(case.dtype),
        "ln_weight": (1 + 0.1 * randn(case.hidden)).to(case.dtype) if case.layer_norm else None,
        "ln_bias": (0.1 * randn(case.hidden)).to(case.dtype) if case.layer_norm else None,
    }


def backends(case: PackCase) -> dict:
    """The unfused reference, the fused backend of the case's device, and the
    dispatcher, each as a function of the inputs above; skips the case where
    that backend cannot run here."""
    if case.device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        from fastprompt.ops.pack_embed_triton import pack_embed_triton as fused

        name = "triton"
    else:
        info = backend_info()
        if not info["native_available"]:
            pytest.skip(f"native pack_embed unavailable: {info['native_unavailable_reason']}")
        from fastprompt.ops.native import pack_embed_native as fused

        name = "native"
    layout = pack_layout(inputs(case)["keep"], case.batch, case.tokens, case.device)
    assert layout.kept == case.kept_tokens

    def packed(op):
        return lambda input_ids, keep, **rest: op(input_ids, layout.token_index, **rest)

    return {
        "torch": packed(pack_embed_reference),
        name: packed(fused),
        "dispatch": lambda **tensors: pack_embed(**tensors)[0],
    }


def _same(dtype: torch.dtype):
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2

    def check(reference, output):
        torch.testing.assert_close(output, reference, rtol=tolerance, atol=tolerance)

    return check


def contest(benchmark, case: PackCase, backward: bool, rounds: int) -> None:
    """Times every backend of ``case`` alternately, checks each output against
    the reference's, and records medians, speedups and GB/s."""
    ops = backends(case)
    tensors = dict(inputs(case))
    if backward:
        prompts = tensors.pop("prompts").clone().requires_grad_(True)
        rows = case.prompt_rows + case.kept_tokens
        grad_out = torch.randn(rows, case.hidden, device=case.device).to(case.dtype)

        def call(op):
            return torch.autograd.grad(op(prompts=prompts, **tensors), prompts, grad_out)[0]
    else:

        def call(op):
            with torch.no_grad():
                return op(**tensors)

    game = harness.Alternation(
        {name: (lambda _, op=op: call(op)) for name, op in ops.items()},
        reference="torch",
        check=_same(case.dtype),
        sync=harness.device_sync(case.device),
    )
    game.run(benchmark, rounds, warmup_rounds=3)
    nbytes = case.forward_bytes() + (case.backward_bytes() if backward else 0)
    benchmark.extra_info.update(
        data="random ids and tensors (seed 0)",
        device=torch.cuda.get_device_name() if case.device == "cuda" else "cpu",
        **game.summary("call"),
        **{f"{name}_GB/s": nbytes / game.median(name) / 1e9 for name in ops},
    )


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_forward(benchmark, case):
    contest(benchmark, case, backward=False, rounds=harness.rounds(ROUNDS))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_forward_backward_prompt(benchmark, case):
    contest(benchmark, case, backward=True, rounds=harness.rounds(ROUNDS))
