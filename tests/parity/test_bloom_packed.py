"""BLOOM's own path packs a training step: the prompts once, then each row's kept positions.

Loss and prompt gradient against PEFT's forward on the same tiny BLOOM, for
the batches that decide what a packed pass must keep and where each key's
ALiBi position comes from (padding on either side, holes, a label on a left
pad's successor, rows with different prompts), in fp32, bf16 and 8-bit, with
and without gradient checkpointing; and what the pass computes: the real ids
and the prompt through the fused op, attention only within each block.
"""

import pytest
import torch
from models import padded_batch, pair, peft_prompt, prompt_config, tiny_causal_lm
from peft import get_peft_model as peft_get_peft_model
from tolerance import assert_within_reference_error, rel_err

import fastprompt
from fastprompt.paths import bloom as bloom_path
from fastprompt.paths import bloom_decoder

VOCAB = 512
LOSS_REL = 1e-4  # as test_parity_peft's bf16 / int8 comparisons


def ragged(side):
    return padded_batch(3, 10, VOCAB, side=side, lengths=[10, 7, 4])


def with_holes():
    ids, mask, labels = ragged("right")
    mask[0, 5] = 0  # a hole whose output predicts the next label: kept, never a key
    mask[1, 2:4] = 0
    labels[1, 2:4] = -100
    return ids, mask, labels


def first_real_labelled():
    """Left padding with the first real token of each short row labelled: a
    pad's output predicts it, so the packed pass must keep that pad."""
    ids, mask, labels = ragged("left")
    for row in (1, 2):
        first = int(mask[row].argmax())
        labels[row, first] = ids[row, first]
    return ids, mask, labels


BATCHES = {
    "left": lambda: ragged("left"),
    "right": lambda: ragged("right"),
    "holes": with_holes,
    "first real labelled after left pads": first_real_labelled,
}


def loss_and_grad(model, ids, mask, labels, **kwargs):
    peft_prompt(model).grad = None
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    return out, peft_prompt(model).grad.clone()


def assert_ran_packed(model):
    assert (model.last_call.path, model.last_call.run) == ("bloom", "packed"), model.last_call


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("return_logits", [False, True])
def test_fp32_loss_and_prompt_grad_match_peft(batch, return_logits):
    """return_logits keeps every position (the pads too, as queries only); without it only ``keep``'s."""
    ours, ref = pair(lambda: tiny_causal_lm("bloom", VOCAB), prompt_config(6))
    ours.train()
    ref.train()
    ids, mask, labels = BATCHES[batch]()
    got, got_grad = loss_and_grad(ours, ids, mask, labels, return_logits=return_logits)
    want, want_grad = loss_and_grad(ref, ids, mask, labels)
    assert_ran_packed(ours)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    assert rel_err(got_grad, want_grad) < 1e-5
    if return_logits:
        assert rel_err(got.logits, want.logits) < 1e-5


def test_rows_with_different_prompts_match_peft_with_each_prompt():
    """One packed call over rows of two adapters against PEFT run per adapter
    on its rows (summed losses: ``num_items_in_batch`` 1)."""
    ours, ref = pair(lambda: tiny_causal_lm("bloom", VOCAB), prompt_config(6))
    for model in (ours, ref):
        model.add_adapter("other", prompt_config(6))
        model.prompt_encoder["other"].embedding.weight.requires_grad_(True)
    with torch.no_grad():
        peft_prompt(ref).copy_(peft_prompt(ours))
        other = torch.randn_like(peft_prompt(ours))
        for model in (ours, ref):
            model.prompt_encoder["other"].embedding.weight.copy_(other)
    ids, mask, labels = padded_batch(4, 10, VOCAB, side="left", lengths=[10, 3, 7, 5])
    names = ["other", "default", "other", "default"]
    one = torch.tensor(1)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names, num_items_in_batch=one)
    assert_ran_packed(ours)
    got.loss.backward()
    want_loss = 0.0
    for name in ("default", "other"):
        ref.set_adapter(name)
        rows = [i for i, n in enumerate(names) if n == name]
        want = ref(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], num_items_in_batch=one)
        want.loss.backward()
        want_loss += want.loss.item()
        got_grad = ours.prompt_encoder[name].embedding.weight.grad
        assert rel_err(got_grad, ref.prompt_encoder[name].embedding.weight.grad) < 1e-5, name
    assert abs(got.loss.item() - want_loss) <= 1e-5 * abs(want_loss)


@pytest.mark.parametrize("side", ["left", "right"])
def test_bf16_within_tolerance_rule_of_peft(side):
    """Judged against PEFT in fp32 on the same weights, allowed twice PEFT-in-bf16's own error."""
    config = prompt_config(8)
    torch.manual_seed(0)
    exact = peft_get_peft_model(tiny_causal_lm("bloom", VOCAB), config)
    ours = fastprompt.get_peft_model(tiny_causal_lm("bloom", VOCAB, dtype=torch.bfloat16), config)
    ref = peft_get_peft_model(tiny_causal_lm("bloom", VOCAB, dtype=torch.bfloat16), config)
    with torch.no_grad():
        peft_prompt(ours).copy_(peft_prompt(exact))
        peft_prompt(ref).copy_(peft_prompt(exact))
    ids, mask, labels = padded_batch(3, 12, VOCAB, side=side, lengths=[12, 7, 3])
    (got, got_grad), (same, same_grad), (want, want_grad) = (
        loss_and_grad(model, ids, mask, labels) for model in (ours, ref, exact)
    )
    assert_ran_packed(ours)
    assert_within_reference_error(got.loss, same.loss, want.loss, atol=LOSS_REL * want.loss.item(), name="loss")
    gscale = want_grad.abs().max().item()
    assert_within_reference_error(got_grad, same_grad, want_grad, atol=2e-2 * gscale, name="prompt grad")
    assert rel_err(got_grad, want_grad) <= 2 * rel_err(same_grad, want_grad)


def test_int8_in_train_mode_matches_peft_on_the_same_8bit_model(tmp_path):
    """Bounds as test_parity_peft's int8 comparison (measured there for BLOOM's own decoder)."""
    Linear8bitLt = pytest.importorskip("bitsandbytes.nn").Linear8bitLt

    def eight_bit():
        tiny_causal_lm("bloom", VOCAB).save_pretrained(tmp_path / "bloom")
        return fastprompt.load_model(tmp_path / "bloom", load_in_8bit=True)

    ours, ref = pair(eight_bit, prompt_config(8))
    assert any(isinstance(m, Linear8bitLt) for m in ours.modules())
    ours.train()
    ref.train()
    ids, mask, labels = padded_batch(3, 12, VOCAB, side="left", lengths=[12, 7, 3])
    got, got_grad = loss_and_grad(ours, ids, mask, labels)
    want, want_grad = loss_and_grad(ref, ids, mask, labels)
    assert_ran_packed(ours)
    assert abs(got.loss.item() - want.loss.item()) <= LOSS_REL * abs(want.loss.item())
    assert rel_err(got_grad, want_grad) < 5e-3


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_checkpoints_the_packed_blocks(monkeypatch, use_reentrant):
    ours, ref = pair(lambda: tiny_causal_lm("bloom", VOCAB), prompt_config(8))
    for model in (ours, ref):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = []
    real_checkpoint = bloom_decoder.checkpoint
    monkeypatch.setattr(
        bloom_decoder,
        "checkpoint",
        lambda function, *args, **kwargs: (
            checkpointed.append(function.__name__) or real_checkpoint(function, *args, **kwargs)
        ),
    )
    ids, mask, labels = ragged("left")
    got, got_grad = loss_and_grad(ours, ids, mask, labels)
    want, want_grad = loss_and_grad(ref, ids, mask, labels)
    assert_ran_packed(ours)
    assert checkpointed == ["_packed_block"] * ours.get_base_model().config.n_layer
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    assert rel_err(got_grad, want_grad) < 1e-5


def test_the_fused_op_gets_the_real_ids_the_kept_positions_and_the_prompt(monkeypatch):
    model, _ = pair(lambda: tiny_causal_lm("bloom", VOCAB), prompt_config(6))
    calls = []
    real_pack_embed = bloom_path.pack_embed
    monkeypatch.setattr(bloom_path, "pack_embed", lambda *args: calls.append(args) or real_pack_embed(*args))
    ids, mask, labels = ragged("right")
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert_ran_packed(model)
    ((input_ids, keep, prompts, weight, *_),) = calls
    assert input_ids is ids
    assert torch.equal(keep, mask.bool())  # right padding: no pad's output predicts a label
    assert torch.equal(prompts, peft_prompt(model)[None]) and prompts.requires_grad
    assert weight is model.get_base_model().transformer.word_embeddings.weight
    assert peft_prompt(model).grad is not None and peft_prompt(model).grad.any()


@pytest.mark.parametrize("names", [None, ["other", "default", "other"]])
def test_attention_runs_within_blocks_only(monkeypatch, names):
    """Every attention call is one block: a prompt against itself, or one row's
    kept positions against its prompt and itself; no scores across blocks."""
    model, _ = pair(lambda: tiny_causal_lm("bloom", VOCAB), prompt_config(6))
    if names is not None:
        model.add_adapter("other", prompt_config(6))
    shapes = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, value, **kwargs):
        shapes.append((query.shape[:3], key.shape[:3], kwargs["attn_mask"].shape))
        return real_sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(bloom_decoder.F, "scaled_dot_product_attention", recorded)
    ids, mask, labels = ragged("left")
    model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names).loss.backward()
    assert_ran_packed(model)
    config = model.get_base_model().config
    heads, virtual = config.n_head, 6
    kept = [10, 7, 4]  # left padding, no label on a pad's successor: the real tokens only
    prompts = 1 if names is None else 2
    per_layer = [(virtual, virtual)] * prompts + [(n, virtual + n) for n in kept]
    assert [(q[2], k[2]) for q, k, _ in shapes] == per_layer * config.n_layer
    assert all(q[:2] == k[:2] == (1, heads) and bias == (1, heads, q[2], k[2]) for q, k, bias in shapes)
