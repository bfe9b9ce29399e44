"""The gated-MLP activation that keeps less for backward: same bits as the
module's own ``act_fn(gate) * up``, fewer saved tensors, swapped in only for
the fast path's passes and always undone."""

from __future__ import annotations

import contextlib

import pytest
import torch
from models import FAMILIES, padded_batch, prompt_config, tiny_causal_lm

import fastprompt
from fastprompt.ops import ACTIVATIONS, gated_activation
from fastprompt.paths import generic
from fastprompt.paths.gated_mlp import activation_name, gated_mlps, keeping_less

GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_same_bits_as_autograd_and_a_third_less_saved(activation, dtype, needs):
    torch.manual_seed(0)
    gate0, up0 = (torch.randn(3, 7, 37, dtype=dtype) * 3 for _ in range(2))
    grad = torch.randn(3, 7, 37, dtype=dtype)

    def run(fused):
        gate, up = (t.clone().requires_grad_(need) for t, need in zip((gate0, up0), needs))
        act = ACTIVATIONS[activation][0]
        out, saved = _saved_bytes(lambda: gated_activation(gate, up, activation) if fused else act(gate) * up)
        out.backward(grad)
        return out, gate.grad, up.grad, saved

    fused, plain = run(True), run(False)
    for got, want in zip(fused[:3], plain[:3]):
        assert (got is None and want is None) or torch.equal(got, want)
    if all(needs):
        assert fused[3] == 2 * gate0.nbytes and plain[3] == 3 * gate0.nbytes


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_mlps_are_found_in_the_gated_families_only(family):
    model = tiny_causal_lm(family, vocab=64)
    found = gated_mlps(model)
    layers = model.config.num_hidden_layers
    assert len(found) == (layers if family in GATED else 0)
    for mlp in found:
        assert activation_name(mlp.act_fn) == ("gelu_tanh" if family.startswith("gemma") else "silu")


def test_unknown_activations_and_forwards_are_left_alone():
    from transformers.activations import GELUActivation, GELUTanh

    assert activation_name(torch.nn.SiLU()) == "silu"
    assert activation_name(torch.nn.SiLU(inplace=True)) is None
    assert activation_name(GELUTanh()) == "gelu_tanh"
    assert activation_name(GELUTanh(use_gelu_tanh_python=True)) is None
    assert activation_name(GELUActivation()) is None

    class Scaled(type(tiny_causal_lm("llama", vocab=64).model.layers[0].mlp)):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_causal_lm("llama", vocab=64)
    model.model.layers[0].mlp.__class__ = Scaled
    assert gated_mlps(model) == [model.model.layers[1].mlp]


def test_swap_is_undone_on_return_and_on_error_and_spares_instance_forwards():
    model = tiny_causal_lm("llama", vocab=64)
    mlps = gated_mlps(model)
    own = mlps[1].forward = lambda x: x  # as accelerate's hooks install one
    with keeping_less(mlps):
        assert "forward" in vars(mlps[0]) and mlps[1].forward is own
    assert "forward" not in vars(mlps[0]) and mlps[1].forward is own
    with pytest.raises(RuntimeError), keeping_less(mlps):
        raise RuntimeError
    assert "forward" not in vars(mlps[0])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_is_bitwise_the_same_and_keeps_less(monkeypatch, family, dtype):
    ids, mask, labels = padded_batch(3, 11, 128, side="left")

    def step(lean):
        if not lean:
            monkeypatch.setattr(generic, "keeping_less", lambda mlps: contextlib.nullcontext())
        torch.manual_seed(0)
        model = fastprompt.get_peft_model(tiny_causal_lm(family, vocab=128, dtype=dtype), prompt_config(5))
        out, saved = _saved_bytes(lambda: model(input_ids=ids, attention_mask=mask, labels=labels))
        out.loss.backward()
        monkeypatch.undo()
        return out.loss, model.prompt_encoder["default"].embedding.weight.grad, saved

    lean, plain = step(True), step(False)
    assert torch.equal(lean[0], plain[0]) and torch.equal(lean[1], plain[1])
    assert lean[2] < plain[2]


def test_blocks_wrapped_for_recomputation_keep_their_own_mlp():
    """A block that re-runs in backward re-runs outside the swap: the MLP must
    save the same tensors both times, so it is not swapped (else torch's
    checkpoint raises on the mismatch)."""
    from peft import get_peft_model as peft_get_peft_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ids, mask, labels = padded_batch(3, 10, 128, side="left")
    grads = []
    for make in (fastprompt.get_peft_model, peft_get_peft_model):
        base = tiny_causal_lm("llama", vocab=128)
        base.model.layers = torch.nn.ModuleList(checkpoint_wrapper(layer) for layer in base.model.layers)
        base.config.use_cache = False  # a block re-run in backward would append to the cache again
        torch.manual_seed(0)
        model = make(base, prompt_config(5))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
