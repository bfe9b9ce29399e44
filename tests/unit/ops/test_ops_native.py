"""Native (C++/OpenMP) `pack_embed` vs the torch reference.

Forward and the prompts' gradient over the shared cases (tests/op_cases.py) in fp32/bf16/fp16
under the shared tolerance rule (tests/tolerance.py), float64 gradcheck, the refusal of a
trainable table or LayerNorm, the registered fake kernels (opcheck, torch.compile), and the
loader's "unavailable, never raises" contract. The module is skipped when the library is not
built (`make native`).
"""

import importlib.util

import op_cases
import pytest
import torch
from op_cases import CASES, DTYPES, LAYER_NORMS, VOCAB, Case, backend_inputs, case_id, leaves, make_inputs

from fastprompt.ops import native, pack_embed
from fastprompt.ops.reference import pack_embed_reference

if not native.available():
    pytest.skip(f"native pack_embed unavailable: {native.load_error()}", allow_module_level=True)

# CUDA cases run only where the library was built with its CUDA kernels and a GPU is present.
DEVICES = ["cpu"]
if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fastprompt::pack_embed_fwd", "CUDA"):
    DEVICES.append("cuda")
SMALL = Case(2, 3, 2, 5, 16, "holes")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype, layer_norm, device):
    inputs = backend_inputs(make_inputs(case, dtype, layer_norm, device=device))
    op_cases.assert_forward_matches_reference(native.pack_embed_native, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prompt_grad_matches_reference(case, dtype, layer_norm, device):
    inputs = backend_inputs(make_inputs(case, dtype, layer_norm, device=device))
    grad_out = torch.randn(op_cases.output_rows(inputs), case.hidden).to(dtype).to(device)
    op_cases.assert_prompt_grad_matches_reference(native.pack_embed_native, inputs, grad_out)


def test_fp32_prompts_with_bf16_table():
    # The usual training setup: fp32 prompt parameters in front of a bf16 model.
    case = Case(2, 3, 2, 5, 1000, "holes")
    inputs = backend_inputs(make_inputs(case, torch.bfloat16, "weight+bias", prompt_dtype=torch.float32))
    op_cases.assert_forward_matches_reference(native.pack_embed_native, inputs)
    grad_out = torch.randn(op_cases.output_rows(inputs), case.hidden).to(torch.bfloat16)
    # Both prompt gradients are fp32 but come from bf16 grad_out rows: bf16's atol.
    op_cases.assert_prompt_grad_matches_reference(native.pack_embed_native, inputs, grad_out, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
def test_gradcheck_float64(layer_norm, device):
    inputs = leaves(backend_inputs(make_inputs(SMALL, torch.float64, layer_norm, device=device)), ("prompts",))
    names = list(inputs)

    def op(*tensors):
        return native.pack_embed_native(**dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(op, tuple(inputs.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["weight", "ln_weight", "ln_bias"])
@pytest.mark.parametrize("entry", ["pack_embed_native", "dispatch-native"])
def test_trainable_table_or_layer_norm_is_refused(entry, name):
    inputs = leaves(make_inputs(SMALL, torch.float32, "weight+bias"), ("prompts", name))
    with pytest.raises(ValueError, match=rf"table and the LayerNorm parameters as frozen.*: {name}\."):
        if entry == "pack_embed_native":
            native.pack_embed_native(**backend_inputs(inputs))
        else:
            pack_embed(**inputs, impl="native")


def test_int32_ids_and_row_strided_table():
    inputs = backend_inputs(make_inputs(Case(1, 3, 2, 4, 40, "holes"), torch.float32, "weight+bias"))
    padded = torch.zeros(VOCAB, 64)
    padded[:, :40] = inputs["weight"]
    inputs["weight"] = padded[:, :40]
    inputs["input_ids"] = inputs["input_ids"].to(torch.int32)
    torch.testing.assert_close(native.pack_embed_native(**inputs), pack_embed_reference(**inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input_ids": torch.tensor([[0, VOCAB, 1]]), "token_index": torch.tensor([0, 1])}, rf"token id {VOCAB} "),
        ({"input_ids": torch.tensor([[0, 1, 2]]), "token_index": torch.tensor([3])}, r"token_index 3 outside"),
    ],
    ids=["id", "token-index"],
)
def test_out_of_range_index_is_an_error(overrides, message):
    # The op's own check, for callers that skip the dispatcher's.
    inputs = backend_inputs(make_inputs(SMALL, torch.float32, "none"))
    inputs.update(overrides)
    with pytest.raises(RuntimeError, match=message):
        native.pack_embed_native(**inputs)


def test_fake_kernels_and_autograd_registration_pass_opcheck():
    for layer_norm in ("none", "weight+bias"):
        inputs = leaves(backend_inputs(make_inputs(SMALL, torch.float32, layer_norm)), ("prompts",))
        args = (*inputs.values(), 1e-5)
        torch.library.opcheck(torch.ops.fastprompt.pack_embed_fwd.default, args)


def test_torch_compile_matches_eager():
    inputs = backend_inputs(make_inputs(Case(2, 3, 2, 5, 64, "holes"), torch.float32, "weight+bias"))
    grad_out = torch.randn(op_cases.output_rows(inputs), 64)

    def loss(prompts):
        return (native.pack_embed_native(**dict(inputs, prompts=prompts)) * grad_out).sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        prompts = inputs["prompts"].clone().requires_grad_(True)
        value = fn(prompts)
        value.backward()
        results.append((value.detach(), prompts.grad))
    (eager_value, eager_grad), (compiled_value, compiled_grad) = results
    torch.testing.assert_close(compiled_value, eager_value)
    torch.testing.assert_close(compiled_grad, eager_grad)


def load_isolated_copy_of_native_module(library_path):
    """fastprompt.ops.native re-executed as a separate module whose load has not been tried,
    pointed at `library_path`; the real module (already loaded) is left alone. Named inside
    fastprompt.ops so that its relative imports resolve."""
    spec = importlib.util.spec_from_file_location("fastprompt.ops.native_loader_under_test", native.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.LIBRARY_PATH = library_path
    return module


def test_unbuilt_library_is_reported_not_raised(tmp_path):
    loader = load_isolated_copy_of_native_module(tmp_path / "libfastprompt_native.so")
    assert loader.available() is False
    assert "is not built (run `make native`)" in loader.load_error()
    with pytest.raises(RuntimeError, match="native backend unavailable"):
        loader.pack_embed_native(**backend_inputs(make_inputs(SMALL, torch.float32, "none")))


def test_broken_library_is_reported_not_raised(tmp_path):
    broken = tmp_path / "libfastprompt_native.so"
    broken.write_bytes(b"not an ELF file")
    loader = load_isolated_copy_of_native_module(broken)
    assert loader.available() is False
    assert loader.load_error().startswith(f"loading {broken} failed: OSError")
