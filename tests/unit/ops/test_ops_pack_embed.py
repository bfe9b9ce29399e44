"""Triton `pack_embed` vs the torch reference, plus the dispatcher's choices and input checks.

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
from op_cases import CASES, DTYPES, LAYER_NORMS, VOCAB, Case, backend_inputs, case_id  # noqa: E402

from fastprompt.ops import backend_info, dispatch, pack_embed, pack_embed_reference  # noqa: E402
from fastprompt.ops import pack_embed_triton as triton_op  # noqa: E402

if CUDA_MODE and not torch.cuda.is_available():
    raise RuntimeError("FASTPROMPT_TEST_CUDA=1 but torch sees no CUDA device")

DEVICE = "cuda" if CUDA_MODE else "cpu"
SMALL = Case(2, 3, 2, 5, 16, "holes")


def make_inputs(*args, **kwargs):
    return op_cases.make_inputs(*args, device=DEVICE, **kwargs)


def run_triton(input_ids, token_index, prompts, weight, ln_weight=None, ln_bias=None, eps=1e-5):
    return triton_op.pack_embed_triton(input_ids, token_index, prompts, weight, ln_weight, ln_bias, eps)


def test_kernels_run_where_intended():
    assert triton_op.interpreted() is not CUDA_MODE


@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype, layer_norm):
    op_cases.assert_forward_matches_reference(run_triton, backend_inputs(make_inputs(case, dtype, layer_norm)))


@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prompt_grad_matches_reference(case, dtype, layer_norm):
    inputs = backend_inputs(make_inputs(case, dtype, layer_norm))
    grad_out = torch.randn(op_cases.output_rows(inputs), case.hidden, device=DEVICE).to(dtype)
    op_cases.assert_prompt_grad_matches_reference(run_triton, inputs, grad_out)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dispatch_returns_the_packed_sequence_and_its_layout(impl):
    inputs = make_inputs(Case(3, 2, 4, 5, 24, "empty-row"), torch.float32, "weight+bias")
    hidden, layout = pack_embed(**inputs, impl=impl)
    keep = inputs["keep"]
    assert layout.offsets == (0, *keep.sum(1).cumsum(0).tolist())
    assert torch.equal(layout.token_index, keep.reshape(-1).nonzero().squeeze(1))
    torch.testing.assert_close(hidden, pack_embed_reference(**backend_inputs(inputs)), atol=1e-5, rtol=0)


def must_not_run(*args, **kwargs):
    raise AssertionError("the op computed something for inputs it refuses")


class NotLaunchable:
    def __getitem__(self, grid):
        return must_not_run


@pytest.mark.parametrize("name", ["weight", "ln_weight", "ln_bias"])
@pytest.mark.parametrize("entry", ["pack_embed_triton", "dispatch-triton", "dispatch-torch"])
def test_trainable_table_or_layer_norm_is_refused_before_computing(monkeypatch, entry, name):
    monkeypatch.setattr(triton_op, "_pack_embed_fwd_kernel", NotLaunchable())
    monkeypatch.setattr(dispatch, "pack_embed_reference", must_not_run)
    inputs = op_cases.leaves(make_inputs(SMALL, torch.float32, "weight+bias"), ("prompts", name))
    with pytest.raises(ValueError, match=rf"table and the LayerNorm parameters as frozen.*: {name}\."):
        if entry == "pack_embed_triton":
            run_triton(**backend_inputs(inputs))
        else:
            pack_embed(**inputs, impl=entry.removeprefix("dispatch-"))


def test_trainable_table_or_layer_norm_is_fine_under_no_grad():
    # Nothing is differentiated under no_grad, so no gradient can go missing.
    inputs = op_cases.leaves(make_inputs(SMALL, torch.float32, "weight+bias"), ("weight", "ln_weight", "ln_bias"))
    with torch.no_grad():
        hidden, _ = pack_embed(**inputs, impl="triton")
    torch.testing.assert_close(hidden, pack_embed_reference(**backend_inputs(inputs)), atol=1e-5, rtol=0)


def test_fp32_prompts_with_bf16_embedding():
    # The usual training setup: fp32 prompt parameters in front of a bf16 model.
    case = Case(2, 3, 2, 5, 1000, "holes")
    inputs = backend_inputs(make_inputs(case, torch.bfloat16, "weight+bias", prompt_dtype=torch.float32))
    op_cases.assert_forward_matches_reference(run_triton, inputs)
    grad_out = torch.randn(op_cases.output_rows(inputs), case.hidden, device=DEVICE).to(torch.bfloat16)
    # The same-dtype reference's prompt gradient is fp32 too, but comes from bf16 rows: bf16's atol.
    op_cases.assert_prompt_grad_matches_reference(run_triton, inputs, grad_out, atol=1e-2)
    # Rounding the prompts to bf16 (to nearest even) before use is part of the op's definition;
    # without LayerNorm that is all that happens to them, so it must match bit for bit.
    inputs.update(ln_weight=None, ln_bias=None)
    assert torch.equal(run_triton(**inputs), pack_embed_reference(**inputs))


def test_int32_ids_and_row_strided_weight():
    inputs = backend_inputs(make_inputs(Case(1, 3, 2, 4, 40, "holes"), torch.float32, "weight+bias"))
    padded = torch.zeros(VOCAB, 64, device=DEVICE)
    padded[:, :40] = inputs["weight"]
    inputs["weight"] = padded[:, :40]
    inputs["input_ids"] = inputs["input_ids"].to(torch.int32)
    torch.testing.assert_close(run_triton(**inputs), pack_embed_reference(**inputs), atol=1e-5, rtol=0)


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
        fake.pack_embed_native = lambda *args: pack_embed_reference(*args) + 1
        monkeypatch.setitem(sys.modules, "fastprompt.ops.native", fake)

    return install


@pytest.mark.parametrize("native", [None, False, True], ids=["missing", "unbuilt", "built"])
def test_default_backend_never_triton_on_cpu(no_env, native_backend, monkeypatch, native):
    native_backend(native)
    expected = "native" if native else "torch"
    assert dispatch.resolve_impl(None, "cpu") == expected
    info = backend_info()
    assert info["cpu"] == expected and info["native_available"] is bool(native)

    monkeypatch.setattr(triton_op, "pack_embed_triton", must_not_run)
    inputs = make_inputs(SMALL, torch.float32, "none")
    cpu_inputs = {k: None if v is None else v.cpu() for k, v in inputs.items()}
    shift = 1 if native else 0  # the stand-in native backend adds 1 so its use is visible
    hidden, _ = pack_embed(**cpu_inputs)
    torch.testing.assert_close(hidden, pack_embed_reference(**backend_inputs(cpu_inputs)) + shift)


def test_default_backend_for_cuda_is_triton(no_env, monkeypatch):
    assert dispatch.resolve_impl(None, "cuda") == "triton"
    assert backend_info()["cuda"] == "triton"
    if CUDA_MODE:
        calls = []
        real = triton_op.pack_embed_triton
        monkeypatch.setattr(triton_op, "pack_embed_triton", lambda *a: calls.append(1) or real(*a))
        pack_embed(**make_inputs(SMALL, torch.float32, "none"))
        assert calls == [1]


@pytest.mark.skipif(CUDA_MODE, reason="the interpreter is off in CUDA mode")
def test_env_var_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, "triton")
    assert dispatch.resolve_impl(None, "cpu") == "triton"
    assert backend_info()["cpu"] == "triton"
    calls = []
    real = triton_op.pack_embed_triton
    monkeypatch.setattr(triton_op, "pack_embed_triton", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(SMALL, torch.float32, "weight+bias")
    hidden, _ = pack_embed(**inputs)
    torch.testing.assert_close(hidden, pack_embed_reference(**backend_inputs(inputs)), atol=1e-5, rtol=0)
    assert calls == [1]


@pytest.mark.skipif(not CUDA_MODE, reason="needs the interpreter off")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    inputs = make_inputs(SMALL, torch.float32, "none")
    cpu_inputs = {k: None if v is None else v.cpu() for k, v in inputs.items()}
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pack_embed(**cpu_inputs, impl="triton")


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
    with pytest.raises(RuntimeError, match="native.*missing or not built"):
        pack_embed(**make_inputs(SMALL, torch.float32, "none"), impl="native")


# ---- input validation (impl="triton": the checks must fire before any kernel) -------------------

OUT_OF_RANGE = rf"input_ids out of range \(ids must be in \[0, {VOCAB}\)\)"
BAD_INPUTS = [
    # A device-side assert (no host sync in the hot path): immediate on CPU. A pad (not kept) id
    # out of range is refused too.
    pytest.param({"input_ids": torch.tensor([[0, VOCAB]])}, RuntimeError, OUT_OF_RANGE, id="id-too-big"),
    pytest.param({"input_ids": torch.tensor([[-2, 5]])}, RuntimeError, OUT_OF_RANGE, id="id-negative"),
    pytest.param(
        {"input_ids": torch.tensor([[1, VOCAB]]), "keep": torch.tensor([[True, False]])},
        RuntimeError,
        OUT_OF_RANGE,
        id="dropped-id-too-big",
    ),
    pytest.param(
        {"input_ids": torch.zeros(2, 4)},
        TypeError,
        r"input_ids must have an integer dtype, got torch\.float32",
        id="float-ids",
    ),
    pytest.param({"input_ids": torch.zeros(4, dtype=torch.long)}, ValueError, r"input_ids must be 2-D", id="1d-ids"),
    pytest.param(
        {"keep": torch.ones(2, 4, dtype=torch.long)},
        ValueError,
        r"keep must be a bool mask shaped like input_ids \(2, 4\), got torch\.int64 of shape \(2, 4\)",
        id="int-keep",
    ),
    pytest.param(
        {"keep": torch.ones(2, 3, dtype=torch.bool)}, ValueError, r"keep must be a bool mask", id="keep-shape"
    ),
    pytest.param(
        {"prompts": torch.zeros(1, 3, 7)},
        ValueError,
        r"prompts must be \[A, P, 8\] to match weight hidden size 8, got shape \(1, 3, 7\)",
        id="hidden-mismatch",
    ),
    pytest.param(
        {"prompts": torch.zeros(3, 8)}, ValueError, r"prompts must be \[A, P, 8\].*got shape \(3, 8\)", id="2d-prompts"
    ),
    pytest.param(
        {"prompts": torch.zeros(1, 3, 8, dtype=torch.long)},
        TypeError,
        r"prompts must have a floating-point dtype, got torch\.int64",
        id="int-prompts",
    ),
    pytest.param(
        {"weight": torch.zeros(VOCAB, 8, dtype=torch.int32)},
        TypeError,
        r"weight must have a floating-point dtype, got torch\.int32",
        id="int-weight",
    ),
    pytest.param(
        {"ln_weight": torch.ones(9)}, ValueError, r"ln_weight must have shape \(8,\), got \(9,\)", id="ln-shape"
    ),
    pytest.param({"ln_weight": None}, ValueError, r"ln_bias given without ln_weight", id="bias-without-weight"),
    pytest.param({"prompts": [[0.0] * 8]}, TypeError, r"prompts must be a torch\.Tensor, got list", id="list-prompts"),
    pytest.param({"weight": None}, TypeError, r"input_ids, prompts and weight are required", id="missing-weight"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_inputs_are_rejected_with_clear_errors(overrides, error, message):
    inputs = make_inputs(Case(1, 3, 2, 4, 8, "all"), torch.float32, "weight+bias")
    inputs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()})
    with pytest.raises(error, match=message):
        pack_embed(**inputs, impl="triton")
