"""Triton `embed_concat` vs the torch reference, plus the dispatcher's choices and input checks.

By default the kernels run on CPU through Triton's interpreter. Triton reads TRITON_INTERPRET when
`@triton.jit` decorates a function, and that includes its own helpers (tl.sum, ...) decorated at
`import triton`; so tests/conftest.py sets the variable before anything in the process imports
triton. With FASTPROMPT_TEST_CUDA=1 the interpreter stays off and the same cases run on CUDA tensors.
"""

import os
import sys

CUDA_MODE = os.environ.get("FASTPROMPT_TEST_CUDA") == "1"

import types  # noqa: E402

import op_cases  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from op_cases import DTYPES, LAYER_NORMS, SHAPES, VOCAB, shape_id  # noqa: E402
from tolerance import assert_within_reference_error  # noqa: E402

from fastprompt.ops import (  # noqa: E402
    backend_info,
    dispatch,  # noqa: E402
    embed_concat,
    embed_concat_reference,
)
from fastprompt.ops import embed_concat_triton as triton_op  # noqa: E402

if CUDA_MODE and not torch.cuda.is_available():
    raise RuntimeError("FASTPROMPT_TEST_CUDA=1 but torch sees no CUDA device")

DEVICE = "cuda" if CUDA_MODE else "cpu"


def make_inputs(*args, **kwargs):
    return op_cases.make_inputs(*args, device=DEVICE, **kwargs)


def leaves(inputs, trainable, upcast=False):
    """`upcast` gives the fp32 reference's copies."""
    return op_cases.leaves(inputs, trainable, torch.float32 if upcast else None)


def run_triton(**inputs):
    return embed_concat(**inputs, impl="triton")


def test_kernels_run_where_intended():
    assert triton_op.interpreted() is not CUDA_MODE


@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_matches_reference(shape, dtype, layer_norm):
    inputs = make_inputs(shape, dtype, layer_norm)
    out = run_triton(**inputs)
    assert out.shape == (shape[0], shape[1] + shape[2], shape[3]) and out.dtype == dtype
    expected = embed_concat_reference(**inputs)
    if layer_norm == "none":
        assert torch.equal(out, expected), "without LayerNorm the op is a pure copy and must be exact"
        return
    assert_within_reference_error(out, expected, embed_concat_reference(**leaves(inputs, (), upcast=True)), name="out")


@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prompt_grad_matches_reference(shape, dtype, layer_norm):
    inputs = make_inputs(shape, dtype, layer_norm)
    grad_out = torch.randn(shape[0], shape[1] + shape[2], shape[3], device=DEVICE).to(dtype)

    op_cases.assert_prompt_grad_matches_reference(run_triton, inputs, grad_out)


def must_not_run(*args, **kwargs):
    raise AssertionError("the op computed something for inputs it refuses")


class NotLaunchable:
    def __getitem__(self, grid):
        return must_not_run


@pytest.mark.parametrize("name", ["weight", "ln_weight", "ln_bias"])
@pytest.mark.parametrize("entry", ["embed_concat_triton", "dispatch-triton", "dispatch-torch"])
def test_trainable_table_or_layer_norm_is_refused_before_computing(monkeypatch, entry, name):
    monkeypatch.setattr(triton_op, "_embed_concat_fwd_kernel", NotLaunchable())
    monkeypatch.setattr(dispatch, "embed_concat_reference", must_not_run)
    run = {
        "embed_concat_triton": triton_op.embed_concat_triton,
        "dispatch-triton": run_triton,
        "dispatch-torch": lambda **inputs: embed_concat(**inputs, impl="torch"),
    }[entry]
    inputs = leaves(make_inputs((2, 3, 5, 16), torch.float32, "weight+bias"), ("prompt", name))
    with pytest.raises(ValueError, match=rf"table and the LayerNorm parameters as frozen.*: {name}\."):
        run(**inputs)


def test_trainable_table_or_layer_norm_is_fine_under_no_grad():
    # Nothing is differentiated under no_grad, so no gradient can go missing.
    inputs = leaves(make_inputs((2, 3, 5, 16), torch.float32, "weight+bias"), ("weight", "ln_weight", "ln_bias"))
    with torch.no_grad():
        torch.testing.assert_close(run_triton(**inputs), embed_concat_reference(**inputs), atol=1e-5, rtol=0)


def test_fp32_prompt_with_bf16_embedding():
    # The usual training setup: an fp32 prompt parameter in front of a bf16 model.
    inputs = make_inputs((2, 3, 5, 1000), torch.bfloat16, "weight+bias", prompt_dtype=torch.float32)
    grad_out = torch.randn(2, 8, 1000, device=DEVICE).to(torch.bfloat16)
    results = []
    for run, upcast in ((run_triton, False), (embed_concat_reference, False), (embed_concat_reference, True)):
        args = leaves(inputs, ("prompt",), upcast)
        out = run(**args)
        out.backward(grad_out.float() if upcast else grad_out)
        results.append((out, args["prompt"].grad))
    (out, grad), (out_ref, grad_ref), (out_fp32, grad_fp32) = results
    assert grad.dtype == torch.float32
    assert_within_reference_error(out, out_ref, out_fp32, name="out")
    # The same-dtype reference's prompt gradient is fp32 too, so compare it with bf16's atol.
    assert_within_reference_error(grad, grad_ref, grad_fp32, atol=1e-2, name="grad prompt")
    # Rounding the prompt to bf16 (to nearest even) before use is part of the op's definition;
    # without LayerNorm that is all that happens to it, so it must match bit for bit.
    inputs.update(ln_weight=None, ln_bias=None)
    assert torch.equal(run_triton(**inputs), embed_concat_reference(**inputs))


def test_int32_ids_and_row_strided_weight():
    inputs = make_inputs((2, 3, 4, 40), torch.float32, "weight+bias")
    padded = torch.zeros(VOCAB, 64, device=DEVICE)
    padded[:, :40] = inputs["weight"]
    inputs["weight"] = padded[:, :40]
    inputs["input_ids"] = inputs["input_ids"].to(torch.int32)
    expected = embed_concat_reference(**inputs)
    torch.testing.assert_close(run_triton(**inputs), expected, atol=1e-5, rtol=0)


def test_empty_batch_gives_empty_output_and_zero_prompt_grad():
    inputs = leaves(make_inputs((0, 3, 2, 16), torch.float32, "weight+bias"), ("prompt",))
    out = run_triton(**inputs)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert torch.equal(inputs["prompt"].grad, torch.zeros_like(inputs["prompt"]))


# ---- dispatcher -------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch.IMPL_ENV_VAR, raising=False)


@pytest.fixture
def native_backend(monkeypatch):
    """Install a stand-in `fastprompt.ops.native`; call with available=None to make it missing."""

    def install(available):
        if available is None:
            monkeypatch.setitem(sys.modules, "fastprompt.ops.native", None)  # import -> ImportError
            return
        fake = types.ModuleType("fastprompt.ops.native")
        fake.available = lambda: available
        fake.embed_concat_native = lambda *args: embed_concat_reference(*args) + 1
        monkeypatch.setitem(sys.modules, "fastprompt.ops.native", fake)

    return install


@pytest.mark.parametrize("native", [None, False, True], ids=["missing", "unbuilt", "built"])
def test_default_backend_never_triton_on_cpu(no_env, native_backend, monkeypatch, native):
    native_backend(native)
    expected = "native" if native else "torch"
    assert dispatch.resolve_impl(None, "cpu") == expected
    info = backend_info()
    assert info["cpu"] == expected and info["native_available"] is bool(native)

    def no_triton(*args, **kwargs):
        raise AssertionError("triton was picked for CPU tensors")

    monkeypatch.setattr(triton_op, "embed_concat_triton", no_triton)
    inputs = make_inputs((1, 2, 3, 8), torch.float32, "none")
    cpu_inputs = {k: None if v is None else v.cpu() for k, v in inputs.items()}
    shift = 1 if native else 0  # the stand-in native backend adds 1 so its use is visible
    torch.testing.assert_close(embed_concat(**cpu_inputs), embed_concat_reference(**cpu_inputs) + shift)


def test_default_backend_for_cuda_is_triton(no_env, monkeypatch):
    assert dispatch.resolve_impl(None, "cuda") == "triton"
    assert backend_info()["cuda"] == "triton"
    if CUDA_MODE:
        calls = []
        real = triton_op.embed_concat_triton
        monkeypatch.setattr(triton_op, "embed_concat_triton", lambda *a: calls.append(1) or real(*a))
        embed_concat(**make_inputs((1, 2, 3, 8), torch.float32, "none"))
        assert calls == [1]


@pytest.mark.skipif(CUDA_MODE, reason="the interpreter is off in CUDA mode")
def test_env_var_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, "triton")
    assert dispatch.resolve_impl(None, "cpu") == "triton"
    assert backend_info()["cpu"] == "triton"
    calls = []
    real = triton_op.embed_concat_triton
    monkeypatch.setattr(triton_op, "embed_concat_triton", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs((2, 2, 3, 24), torch.float32, "weight+bias")
    torch.testing.assert_close(embed_concat(**inputs), embed_concat_reference(**inputs), atol=1e-5, rtol=0)
    assert calls == [1]


@pytest.mark.skipif(not CUDA_MODE, reason="needs the interpreter off")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    inputs = make_inputs((1, 2, 3, 8), torch.float32, "none")
    cpu_inputs = {k: None if v is None else v.cpu() for k, v in inputs.items()}
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        embed_concat(**cpu_inputs, impl="triton")


def test_env_var_forces_torch(monkeypatch):
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, "torch")
    assert dispatch.resolve_impl(None, "cuda") == "torch"
    assert dispatch.resolve_impl(None, "cpu") == "torch"


def test_explicit_impl_beats_env_var(monkeypatch):
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, "triton")
    assert dispatch.resolve_impl("torch", "cpu") == "torch"


def test_unknown_impl_values_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"impl='cuda' is not one of"):
        dispatch.resolve_impl("cuda", "cpu")
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"FASTPROMPT_EMBED_IMPL='fast' is not one of"):
        dispatch.resolve_impl(None, "cpu")


def test_forcing_missing_native_is_a_clear_error(no_env, native_backend):
    native_backend(None)
    inputs = make_inputs((1, 2, 3, 8), torch.float32, "none")
    with pytest.raises(RuntimeError, match="native.*missing or not built"):
        embed_concat(**inputs, impl="native")


# ---- input validation (impl="triton": the checks must fire before any kernel) -------------------


BAD_INPUTS = [
    # A device-side assert (no host sync in the hot path): immediate on CPU.
    pytest.param(
        {"input_ids": torch.tensor([[0, VOCAB]])},
        RuntimeError,
        rf"input_ids out of range \(ids must be in \[0, {VOCAB}\)\)",
        id="id-too-big",
    ),
    pytest.param(
        {"input_ids": torch.tensor([[-2, 5]])},
        RuntimeError,
        rf"input_ids out of range \(ids must be in \[0, {VOCAB}\)\)",
        id="id-negative",
    ),
    pytest.param(
        {"input_ids": torch.zeros(2, 4)},
        TypeError,
        r"input_ids must have an integer dtype, got torch\.float32",
        id="float-ids",
    ),
    pytest.param({"input_ids": torch.zeros(4, dtype=torch.long)}, ValueError, r"input_ids must be 2-D", id="1d-ids"),
    pytest.param(
        {"prompt": torch.zeros(3, 7)},
        ValueError,
        r"prompt must be \[P, 8\] to match weight hidden size 8, got shape \(3, 7\)",
        id="hidden-mismatch",
    ),
    pytest.param({"prompt": torch.zeros(8)}, ValueError, r"prompt must be \[P, 8\].*got shape \(8,\)", id="1d-prompt"),
    pytest.param(
        {"ln_weight": torch.ones(9)}, ValueError, r"ln_weight must have shape \(8,\), got \(9,\)", id="ln-shape"
    ),
    pytest.param({"ln_weight": None}, ValueError, r"ln_bias given without ln_weight", id="bias-without-weight"),
    pytest.param({"prompt": [[0.0] * 8]}, TypeError, r"prompt must be a torch\.Tensor, got list", id="list-prompt"),
    pytest.param({"weight": None}, TypeError, r"input_ids, weight and prompt are required", id="missing-weight"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_inputs_are_rejected_with_clear_errors(overrides, error, message):
    inputs = make_inputs((2, 3, 4, 8), torch.float32, "weight+bias")
    inputs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()})
    with pytest.raises(error, match=message):
        embed_concat(**inputs, impl="triton")
