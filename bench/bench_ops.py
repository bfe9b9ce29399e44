"""embed_concat microbenchmark: each fused backend vs the unfused torch
reference, alternated round by round (``harness.py``), outputs checked.

Cases, LayerNorm on as in BLOOM unless marked noLN:
- CPU, fp32, native vs torch: the design's prototype shape, and B 8, P 20,
  T 128, H 2048 from a 16384-row table (134 MB, far beyond any cache, as a
  real vocabulary is), with and without BLOOM's embedding LayerNorm. The
  native library sizes its OpenMP teams from torch's thread count, which
  bench/conftest.py sets for every contender alike.
- CUDA (when present), bf16, Triton vs torch: a BLOOM-1b4-like batch and two
  shapes with B*(P+T)*H >= 32M output elements, where the op is
  bandwidth-bound (set GB/s against the card's peak: H100 SXM 3.35 TB/s).
  Triton runs on CUDA only: the interpreter is for correctness, not speed.

Two passes: forward, and forward + backward w.r.t. the prompt with the table
and LayerNorm frozen (prompt tuning). Backends are called directly, except
"dispatch", ``embed_concat(impl=None)``, which adds the dispatcher's host-side
id range check (a device sync on CUDA) to show what that check costs.

GB/s = the minimum traffic of the op / median time: ids, gathered and prompt
rows and LayerNorm parameters read once, the output written once; backward
adds the B*P prompt rows of grad_out read, the prompt read and grad_prompt
written. The byte count is the same for every backend, so it compares them
and can be set against a device's peak bandwidth.

    python -m pytest bench/bench_ops.py --benchmark-json=out.json
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import harness
import pytest
import torch

from fastprompt.ops import backend_info, embed_concat, embed_concat_reference


@dataclass(frozen=True)
class EmbedCase:
    device: str
    dtype: torch.dtype
    batch: int
    prompt: int
    tokens: int
    hidden: int
    vocab: int
    layer_norm: bool = True

    @property
    def id(self) -> str:
        norm = "" if self.layer_norm else "-noLN"
        return (
            f"{self.device}-{str(self.dtype).removeprefix('torch.')}-B{self.batch}P{self.prompt}"
            f"T{self.tokens}H{self.hidden}V{self.vocab}{norm}"
        )

    def forward_bytes(self) -> int:
        size = self.dtype.itemsize
        rows_read = (self.batch * self.tokens + self.prompt + (2 if self.layer_norm else 0)) * self.hidden
        written = self.batch * (self.prompt + self.tokens) * self.hidden
        return self.batch * self.tokens * 8 + (rows_read + written) * size

    def backward_bytes(self) -> int:
        return (self.batch * self.prompt + 2 * self.prompt) * self.hidden * self.dtype.itemsize


CASES = [
    EmbedCase("cpu", torch.float32, 8, 20, 64, 512, 46145),
    EmbedCase("cpu", torch.float32, 8, 20, 128, 2048, 16384),
    EmbedCase("cpu", torch.float32, 8, 20, 128, 2048, 16384, layer_norm=False),
    EmbedCase("cuda", torch.bfloat16, 8, 20, 256, 2048, 250880),
    EmbedCase("cuda", torch.bfloat16, 32, 20, 492, 2048, 250880),  # 33.5M output elements
    EmbedCase("cuda", torch.bfloat16, 64, 100, 412, 1024, 250880),  # 33.5M, long prompt
]
ROUNDS = 60


@functools.lru_cache(maxsize=1)
def inputs(case: EmbedCase) -> dict:
    gen = torch.Generator(device=case.device).manual_seed(0)
    randn = functools.partial(torch.randn, generator=gen, device=case.device)
    return {
        "input_ids": torch.randint(0, case.vocab, (case.batch, case.tokens), generator=gen, device=case.device),
        "weight": randn(case.vocab, case.hidden).to(case.dtype),
        "prompt": randn(case.prompt, case.hidden).to(case.dtype),
        "ln_weight": (1 + 0.1 * randn(case.hidden)).to(case.dtype) if case.layer_norm else None,
        "ln_bias": (0.1 * randn(case.hidden)).to(case.dtype) if case.layer_norm else None,
    }


def backends(case: EmbedCase) -> dict:
    """The unfused reference, the fused backend of the case's device, and the
    dispatcher; skips the case where that backend cannot run here."""
    if case.device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        from fastprompt.ops.embed_concat_triton import embed_concat_triton as fused

        name = "triton"
    else:
        info = backend_info()
        if not info["native_available"]:
            pytest.skip(f"native embed_concat unavailable: {info['native_unavailable_reason']}")
        from fastprompt.ops.native import embed_concat_native as fused

        name = "native"
    return {"torch": embed_concat_reference, name: fused, "dispatch": embed_concat}


def _same(dtype: torch.dtype):
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2

    def check(reference, output):
        torch.testing.assert_close(output, reference, rtol=tolerance, atol=tolerance)

    return check


def contest(benchmark, case: EmbedCase, backward: bool, rounds: int) -> None:
    """Times every backend of ``case`` alternately, checks each output against
    the reference's, and records medians, speedups and GB/s."""
    ops = backends(case)
    tensors = dict(inputs(case))
    if backward:
        prompt = tensors.pop("prompt").clone().requires_grad_(True)
        grad_out = torch.randn(case.batch, case.prompt + case.tokens, case.hidden, device=case.device).to(case.dtype)

        def call(op):
            return torch.autograd.grad(op(prompt=prompt, **tensors), prompt, grad_out)[0]
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
