"""Native (C++/OpenMP) `embed_concat` vs the torch reference.

Forward and the prompt's gradient over awkward shapes and fp32/bf16/fp16 under the shared
tolerance rule (tests/tolerance.py), float64 gradcheck, the refusal of a trainable table or
LayerNorm, the registered fake kernels (opcheck, torch.compile), and the loader's "unavailable,
never raises" contract. The module is skipped when the library is not built (`make native`).
"""

import importlib.util

import pytest
import torch
from op_cases import (
    DTYPES,
    LAYER_NORMS,
    SHAPES,
    VOCAB,
    assert_prompt_grad_matches_reference,
    leaves,
    make_inputs,
    shape_id,
)
from tolerance import assert_within_reference_error

from fastprompt.ops import embed_concat, native
from fastprompt.ops.reference import embed_concat_reference

if not native.available():
    pytest.skip(f"native embed_concat unavailable: {native.load_error()}", allow_module_level=True)

# CUDA cases run only where the library was built with its CUDA kernels and a GPU is present.
DEVICES = ["cpu"]
if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fastprompt::embed_concat_fwd", "CUDA"):
    DEVICES.append("cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_matches_reference(shape, dtype, layer_norm, device):
    inputs = make_inputs(shape, dtype, layer_norm, device=device)
    out = native.embed_concat_native(**inputs)
    assert out.shape == (shape[0], shape[1] + shape[2], shape[3]) and out.dtype == dtype
    assert_within_reference_error(
        out,
        embed_concat_reference(**inputs),
        embed_concat_reference(**leaves(inputs, (), torch.float32)),
        name="out",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prompt_grad_matches_reference(shape, dtype, layer_norm, device):
    inputs = make_inputs(shape, dtype, layer_norm, device=device)
    grad_out = torch.randn(shape[0], shape[1] + shape[2], shape[3]).to(dtype).to(device)

    assert_prompt_grad_matches_reference(native.embed_concat_native, inputs, grad_out)


def test_fp32_prompt_with_bf16_table():
    # The usual training setup: an fp32 prompt parameter in front of a bf16 model.
    inputs = make_inputs((2, 3, 5, 1000), torch.bfloat16, "weight+bias", prompt_dtype=torch.float32)
    grad_out = torch.randn(2, 8, 1000).to(torch.bfloat16)
    results = []
    for run, upcast in (
        (native.embed_concat_native, False),
        (embed_concat_reference, False),
        (embed_concat_reference, True),
    ):
        args = leaves(inputs, ("prompt",), torch.float32 if upcast else None)
        out = run(**args)
        out.backward(grad_out.float() if upcast else grad_out)
        results.append((out, args["prompt"].grad))
    (out, grad), (out_ref, grad_ref), (out_fp32, grad_fp32) = results
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    assert_within_reference_error(out, out_ref, out_fp32, name="out")
    # Both prompt gradients are fp32 but come from bf16 grad_out rows: bf16's atol.
    assert_within_reference_error(grad, grad_ref, grad_fp32, atol=1e-2, name="grad prompt")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_norm", LAYER_NORMS)
def test_gradcheck_float64(layer_norm, device):
    inputs = leaves(make_inputs((3, 2, 4, 6), torch.float64, layer_norm, device=device), ("prompt",))
    names = [name for name in ("input_ids", "weight", "prompt", "ln_weight", "ln_bias") if name in inputs]

    def op(*tensors):
        return native.embed_concat_native(**dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(op, tuple(inputs[name] for name in names), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["weight", "ln_weight", "ln_bias"])
@pytest.mark.parametrize(
    "run",
    [native.embed_concat_native, lambda **inputs: embed_concat(**inputs, impl="native")],
    ids=["embed_concat_native", "dispatch-native"],
)
def test_trainable_table_or_layer_norm_is_refused(run, name):
    inputs = leaves(make_inputs((2, 3, 5, 16), torch.float32, "weight+bias"), ("prompt", name))
    with pytest.raises(ValueError, match=rf"table and the LayerNorm parameters as frozen.*: {name}\."):
        run(**inputs)


def test_int32_ids_and_row_strided_table():
    inputs = make_inputs((2, 3, 4, 40), torch.float32, "weight+bias")
    padded = torch.zeros(VOCAB, 64)
    padded[:, :40] = inputs["weight"]
    inputs["weight"] = padded[:, :40]
    inputs["input_ids"] = inputs["input_ids"].to(torch.int32)
    torch.testing.assert_close(
        native.embed_concat_native(**inputs), embed_concat_reference(**inputs), atol=1e-5, rtol=0
    )


def test_empty_batch_gives_empty_output_and_zero_prompt_grad():
    inputs = leaves(make_inputs((0, 3, 2, 16), torch.float32, "weight+bias"), ("prompt",))
    out = native.embed_concat_native(**inputs)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert torch.equal(inputs["prompt"].grad, torch.zeros_like(inputs["prompt"]))


def test_out_of_range_id_is_an_error():
    inputs = make_inputs((1, 2, 3, 8), torch.float32, "none")
    inputs["input_ids"] = torch.tensor([[0, VOCAB, 1]])
    with pytest.raises(RuntimeError, match=rf"token id {VOCAB} outside the table"):
        native.embed_concat_native(**inputs)


def test_fake_kernels_and_autograd_registration_pass_opcheck():
    for layer_norm in ("none", "weight+bias"):
        inputs = leaves(make_inputs((2, 3, 4, 16), torch.float32, layer_norm), ("prompt",))
        args = (inputs["input_ids"], inputs["weight"], inputs["prompt"], inputs["ln_weight"], inputs["ln_bias"], 1e-5)
        torch.library.opcheck(torch.ops.fastprompt.embed_concat_fwd.default, args)


def test_torch_compile_matches_eager():
    inputs = make_inputs((2, 3, 5, 64), torch.float32, "weight+bias")
    grad_out = torch.randn(2, 8, 64)

    def loss(prompt):
        args = dict(inputs, prompt=prompt)
        return (native.embed_concat_native(**args) * grad_out).sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        prompt = inputs["prompt"].clone().requires_grad_(True)
        value = fn(prompt)
        value.backward()
        results.append((value.detach(), prompt.grad))
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
        loader.embed_concat_native(**make_inputs((1, 2, 3, 8), torch.float32, "none"))


def test_broken_library_is_reported_not_raised(tmp_path):
    broken = tmp_path / "libfastprompt_native.so"
    broken.write_bytes(b"not an ELF file")
    loader = load_isolated_copy_of_native_module(broken)
    assert loader.available() is False
    assert loader.load_error().startswith(f"loading {broken} failed: OSError")
