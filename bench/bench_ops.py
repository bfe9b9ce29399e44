"""embed_concat microbenchmark: each fused backend vs the unfused torch reference.

Cases: CUDA (when present) in bf16 at a BLOOM-1b4-like batch and at two shapes with
B*(P+T)*H >= 32M output elements, where the op is bandwidth-bound; CPU in fp32 at the design's
prototype shape. LayerNorm on, as in BLOOM. Two passes: forward, and forward + backward w.r.t. the
prompt with table and LayerNorm frozen (prompt tuning). Backends are called directly: the
dispatcher's host-side id range check costs a device sync that would swamp a ~50 us kernel,
so "dispatch" measures `embed_concat(impl=None)` separately to show what that check costs.

extra_info["GB/s"] = the minimum traffic of the op (ids, gathered and prompt rows, LN parameters
read once, output written once; backward: the B*P prompt rows of grad_out read, the prompt read,
grad_prompt written) / median time. The byte count is the same for every backend, so it compares
them and can be set against the card's peak (H100 SXM 3.35 TB/s).
Triton cases are skipped without CUDA: the interpreter is for correctness, not speed.

    python -m pytest bench/bench_ops.py --benchmark-json=out.json
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastprompt.ops import backend_info, embed_concat, embed_concat_reference

HAS_CUDA = torch.cuda.is_available()

# (device, dtype, batch, prompt, tokens, hidden, vocab)
CASES = [
    ("cpu", torch.float32, 8, 20, 64, 512, 46145),
    ("cuda", torch.bfloat16, 8, 20, 256, 2048, 250880),
    ("cuda", torch.bfloat16, 32, 20, 492, 2048, 250880),  # 33.5M output elements
    ("cuda", torch.bfloat16, 64, 100, 412, 1024, 250880),  # 33.5M, long prompt
]
IMPLS = ["torch", "triton", "native", "dispatch"]


def case_id(case):
    device, dtype, batch, prompt, tokens, hidden, _ = case
    return f"{device}-{str(dtype).removeprefix('torch.')}-B{batch}P{prompt}T{tokens}H{hidden}"


def backend_or_skip(impl: str, device: str):
    """The op for `impl` on `device`; skips the case where it cannot run here."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if impl == "torch":
        return embed_concat_reference
    if impl == "dispatch":
        return embed_concat
    if impl == "triton":
        if device != "cuda":
            pytest.skip("triton is benchmarked on CUDA only")
        from fastprompt.ops.embed_concat_triton import embed_concat_triton

        return embed_concat_triton
    if device != "cpu" or not backend_info()["native_available"]:
        pytest.skip("native is benchmarked on CPU only, and only when built")
    from fastprompt.ops.native import embed_concat_native

    return embed_concat_native


@functools.lru_cache(maxsize=1)
def make_inputs(case):
    device, dtype, batch, n_prompt, n_tokens, hidden, vocab = case
    gen = torch.Generator(device=device).manual_seed(0)
    randn = functools.partial(torch.randn, generator=gen, device=device)
    return {
        "input_ids": torch.randint(0, vocab, (batch, n_tokens), generator=gen, device=device),
        "weight": randn(vocab, hidden).to(dtype),
        "prompt": randn(n_prompt, hidden).to(dtype),
        "ln_weight": (1 + 0.1 * randn(hidden)).to(dtype),
        "ln_bias": (0.1 * randn(hidden)).to(dtype),
    }


def forward_bytes(case) -> int:
    _, dtype, batch, n_prompt, n_tokens, hidden, _ = case
    size = dtype.itemsize
    ids = batch * n_tokens * 8
    rows_read = (batch * n_tokens + n_prompt + 2) * hidden * size
    written = batch * (n_prompt + n_tokens) * hidden * size
    return ids + rows_read + written


def backward_bytes(case) -> int:
    _, dtype, batch, n_prompt, _, hidden, _ = case
    return (batch * n_prompt + 2 * n_prompt) * hidden * dtype.itemsize


def synchronized(fn, device):
    if device != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def record(benchmark, case, impl, nbytes):
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
        return
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if case[0] == "cuda" else "cpu"
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward(benchmark, case, impl):
    op = backend_or_skip(impl, case[0])
    benchmark.group = f"forward {case_id(case)}"
    inputs = make_inputs(case)
    run = synchronized(lambda: op(**inputs), case[0])
    with torch.no_grad():
        run()  # compile / warm caches outside the timed rounds
        benchmark(run)
    record(benchmark, case, impl, forward_bytes(case))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_prompt(benchmark, case, impl):
    op = backend_or_skip(impl, case[0])
    benchmark.group = f"forward+backward(prompt) {case_id(case)}"
    inputs = dict(make_inputs(case))
    prompt = inputs.pop("prompt").clone().requires_grad_(True)
    out_shape = (case[2], case[3] + case[4], case[5])
    grad_out = torch.randn(out_shape, device=case[0]).to(case[1])

    def step():
        return torch.autograd.grad(op(prompt=prompt, **inputs), prompt, grad_out)

    run = synchronized(step, case[0])
    run()
    benchmark(run)
    record(benchmark, case, impl, forward_bytes(case) + backward_bytes(case))
