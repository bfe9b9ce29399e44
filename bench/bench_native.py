"""Native embed_concat vs the unfused torch reference on CPU, op level.

Shape: B 8, P 20, T 128, H 2048, fp32, from a 16384-row table (134 MB, far beyond any cache,
as a real vocabulary is), with BLOOM's embedding LayerNorm ("layernorm") and without it
("plain"). Two passes: forward, and forward + backward w.r.t. the prompt with the table and
LayerNorm frozen, as in prompt tuning.

Both contenders run in the same session with the same thread count, 2 unless
FASTPROMPT_BENCH_THREADS says otherwise: torch.set_num_threads sets torch's intra-op pool, and the
native library sizes its OpenMP teams from the same setting.

Every case runs ROUNDS timed rounds after WARMUP_ROUNDS, so both contenders get the same
sample count; on a shared machine compare minima as well as medians.

extra_info per case: "threads"; "GB/s", achieved bandwidth = the minimum traffic the op needs
(each input row read once, each output written once; backward: the B*P prompt rows of grad_out
read, grad_prompt written) / median time, the same byte count for both contenders; and on the
native cases "speedup_vs_torch_median" and "speedup_vs_torch_min" (torch time / native time,
this run).

    python -m pytest bench/bench_native.py --benchmark-only
"""

import os

import pytest
import torch

from fastprompt.ops import native
from fastprompt.ops.reference import embed_concat_reference

if not native.available():
    pytest.skip(f"native embed_concat unavailable: {native.load_error()}", allow_module_level=True)

BATCH, PROMPT, TOKENS, HIDDEN, VOCAB = 8, 20, 128, 2048, 16384
THREADS = int(os.environ.get("FASTPROMPT_BENCH_THREADS", min(2, os.cpu_count() or 1)))
ROUNDS, WARMUP_ROUNDS = 60, 3
IMPLS = {"torch": embed_concat_reference, "native": native.embed_concat_native}
# (median, min) per case, filled as the cases run; "torch" is parametrised first so that the
# "native" case can report its speedup.
_timings: dict[tuple[str, str, str], tuple[float, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def same_thread_count_for_both():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen),
        "weight": torch.randn(VOCAB, HIDDEN, generator=gen),
        "prompt": torch.randn(PROMPT, HIDDEN, generator=gen),
        "ln_weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
        "ln_bias": 0.1 * torch.randn(HIDDEN, generator=gen),
    }


def op_args(inputs, layer_norm, prompt):
    args = dict(inputs, prompt=prompt)
    if layer_norm == "plain":
        args.update(ln_weight=None, ln_bias=None)
    return args


def forward_bytes():
    read = (BATCH * TOKENS + PROMPT) * HIDDEN
    written = BATCH * (PROMPT + TOKENS) * HIDDEN
    return (read + written) * 4


def backward_bytes():
    return (BATCH * PROMPT + 2 * PROMPT) * HIDDEN * 4


def run(benchmark, fn, pass_name, layer_norm, impl, nbytes):
    benchmark.group = f"{pass_name} {layer_norm}"
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    stats = benchmark.stats.stats
    _timings[(pass_name, layer_norm, impl)] = (stats.median, stats.min)
    benchmark.extra_info["threads"] = THREADS
    benchmark.extra_info["GB/s"] = round(nbytes / stats.median / 1e9, 2)
    baseline = _timings.get((pass_name, layer_norm, "torch"))
    if impl == "native" and baseline is not None:
        benchmark.extra_info["speedup_vs_torch_median"] = round(baseline[0] / stats.median, 2)
        benchmark.extra_info["speedup_vs_torch_min"] = round(baseline[1] / stats.min, 2)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layer_norm", ["layernorm", "plain"])
def test_forward(benchmark, inputs, layer_norm, impl):
    op = IMPLS[impl]
    args = op_args(inputs, layer_norm, inputs["prompt"])

    def forward():
        with torch.no_grad():
            return op(**args)

    run(benchmark, forward, "forward", layer_norm, impl, forward_bytes())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layer_norm", ["layernorm", "plain"])
def test_forward_backward_prompt(benchmark, inputs, layer_norm, impl):
    op = IMPLS[impl]
    prompt = inputs["prompt"].clone().requires_grad_(True)
    args = op_args(inputs, layer_norm, prompt)
    grad_out = torch.randn(BATCH, PROMPT + TOKENS, HIDDEN)

    def forward_backward():
        return torch.autograd.grad(op(**args), prompt, grad_out)

    run(benchmark, forward_backward, "forward+backward(prompt)", layer_norm, impl, forward_bytes() + backward_bytes())
