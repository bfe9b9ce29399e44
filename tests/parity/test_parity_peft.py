"""Parity of FastPromptModel with the real peft package, for every family with a fast path.

fp32: logits, loss and prompt gradient within 1e-5 relative of PEFT's, with
left and right padding, one row, holes in the mask and sparse labels. bf16 is
judged by the design tolerance rule against PEFT in fp32; int8 against PEFT on
the same 8-bit model in the same mode.
"""

import pytest
import torch
from models import (
    DEVICE,
    FAMILIES,
    TRAINING_PASSES,
    force_training_pass,
    padded_batch,
    pair,
    peft_prompt,
    prompt_config,
    random_bloom,
    tiny_causal_lm,
)
from peft import get_peft_model as peft_get_peft_model
from tolerance import rel_err

import fastprompt

VOCAB = 512
# Relative loss tolerance of the bf16 and int8 comparisons: tight enough that a
# per-row instead of per-token mean fails it (see the test right below).
LOSS_REL = 1e-4


def assert_loss_close(got, want, rel):
    assert abs(got.item() - want.item()) <= rel * abs(want.item()), (got.item(), want.item())


def low_precision_batch(side):
    """The batch of the bf16/int8 comparisons: rows of very different label
    counts, so that a per-row mean differs clearly from the per-token one."""
    return padded_batch(3, 12, VOCAB, side=side, lengths=[12, 7, 3])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_tolerance_detects_per_row_averaging(family, side):
    """On that batch, averaging each row's mean instead of every label token
    moves the loss by more than LOSS_REL."""
    _, ref = pair(lambda: tiny_causal_lm(family, VOCAB), prompt_config(8))
    ids, mask, labels = low_precision_batch(side)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits[:, 7:-1]  # each predicts the next label
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    labelled = labels != -100
    per_token = losses[labelled].mean()
    per_row = torch.stack(
        [row_losses[row_labelled].mean() for row_losses, row_labelled in zip(losses, labelled)]
    ).mean()
    assert abs(per_row - per_token) > 2 * LOSS_REL * per_token


CASES = [
    # batch, virtual tokens, length, padding side
    (1, 1, 5, "right"),
    (3, 8, 12, "right"),
    (3, 8, 12, "left"),
    (4, 20, 9, "left"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch,virtual,length,side", CASES)
def test_fp32_logits_loss_and_prompt_grad_match_peft(family, batch, virtual, length, side):
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB), prompt_config(virtual))
    assert ours.fast_path is not None
    ids, mask, labels = padded_batch(batch, length, VOCAB, side=side)

    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == want.logits.shape == (batch, virtual + length, VOCAB)
    assert rel_err(got.logits, want.logits) < 1e-5
    assert_loss_close(got.loss, want.loss, 1e-5)

    got.loss.backward()
    want.loss.backward()
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5


# Gemma2 has no sdpa attention in transformers: eager only.
GENERIC_PASSES_BY_ATTENTION = [
    (family, training_pass, attention)
    for family, training_pass in TRAINING_PASSES
    if family != "bloom"
    for attention in (["eager"] if family == "gemma2" else ["sdpa", "eager"])
]


@pytest.mark.parametrize("family,training_pass,attention", GENERIC_PASSES_BY_ATTENTION)
@pytest.mark.parametrize("side", ["left", "right"])
def test_trained_prompt_in_either_pass_matches_peft(monkeypatch, family, training_pass, side, attention):
    """A trained prompt's pass, packed with the tokens or in two passes, with
    uneven rows, a hole in the mask and both ways attention takes a 4D mask
    (sdpa applies a boolean one, eager adds a float one)."""
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB, attn_implementation=attention), prompt_config(6))
    ran = force_training_pass(monkeypatch, ours, training_pass)
    ids, mask, labels = padded_batch(3, 10, VOCAB, side=side, lengths=[10, 7, 4])
    mask[0, 5] = 0
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert ran == ["packed" if training_pass == "packed" else "tokens"]
    assert rel_err(got.logits, want.logits) < 1e-5
    assert_loss_close(got.loss, want.loss, 1e-5)
    got.loss.backward()
    want.loss.backward()
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_without_labels_and_without_mask(family):
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB), prompt_config(5))
    ids, _, _ = padded_batch(2, 7, VOCAB)
    assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5


def test_training_call_computes_only_the_loss_evaluation_gets_logits():
    ours, ref = pair(lambda: random_bloom(vocab=VOCAB), prompt_config(4))
    ids, mask, labels = padded_batch(2, 6, VOCAB)
    trained = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert trained.logits is None and trained.loss.requires_grad
    with torch.no_grad():  # Trainer.evaluate / predict
        evaluated = ours(input_ids=ids, attention_mask=mask, labels=labels)
        want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(evaluated.logits, want.logits) < 1e-5
    assert_loss_close(evaluated.loss, want.loss, 1e-5)


@pytest.mark.parametrize("family", ["bloom", "llama"])
@pytest.mark.parametrize("label_positions", ["first_only", "last_only", "none"])
def test_sparse_labels_match_peft(family, label_positions):
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB), prompt_config(6))
    ids, mask, _ = padded_batch(3, 10, VOCAB, side="left", lengths=[10, 10, 10])
    labels = torch.full_like(ids, -100)
    if label_positions == "first_only":
        labels[1, 0] = ids[1, 0]  # predicted by the last virtual token
    elif label_positions == "last_only":
        labels[2, -1] = ids[2, -1]
    got = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    if label_positions == "none":
        assert torch.isnan(got) and torch.isnan(want)
        return
    assert_loss_close(got, want, 1e-5)
    got.backward()
    want.backward()
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mask_with_holes_matches_peft(family):
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB), prompt_config(4))
    ids, mask, labels = padded_batch(2, 9, VOCAB, lengths=[9, 9])
    mask[0, 3] = 0
    mask[1, 5:7] = 0
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(got.logits, want.logits) < 1e-5
    assert_loss_close(got.loss, want.loss, 1e-5)


@pytest.mark.parametrize(
    "family,training_pass", [case for case in TRAINING_PASSES if case[0] in ("bloom", "llama", "gemma2")]
)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradient(monkeypatch, family, training_pass, use_reentrant):
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB), prompt_config(8))
    ran = force_training_pass(monkeypatch, ours, training_pass)
    for model in (ours, ref):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids, mask, labels = padded_batch(3, 10, VOCAB, side="left")
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    # Packing needs no cache, so checkpointed blocks may run it; the two passes
    # need one, which those blocks drop: they take the full pass instead.
    assert ran == (["packed"] if training_pass == "packed" else [])
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5


def test_prompt_longer_than_a_sliding_window_takes_the_full_pass_and_matches():
    # mistral's window here is 40: a 48-token prompt cannot live in its cache.
    ours, ref = pair(lambda: tiny_causal_lm("mistral", VOCAB), prompt_config(48))
    ids, mask, labels = padded_batch(3, 10, VOCAB, side="left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(got.logits, want.logits) < 1e-5
    assert_loss_close(got.loss, want.loss, 1e-5)


def test_rows_reaching_past_a_sliding_window_are_not_packed_and_match(monkeypatch):
    # The packed pass has one mask for all layers: with P + T = 44 past mistral's
    # window of 40 it must not run, even when packing is forced; two passes do.
    ours, ref = pair(lambda: tiny_causal_lm("mistral", VOCAB), prompt_config(8))
    ran = force_training_pass(monkeypatch, ours, "packed")
    ids, mask, labels = padded_batch(3, 36, VOCAB, side="left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert ran == ["tokens"]
    assert rel_err(got.logits, want.logits) < 1e-5
    got.loss.backward()
    want.loss.backward()
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5


def test_only_the_prompt_is_trainable_and_base_untouched():
    base = random_bloom(vocab=VOCAB)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = fastprompt.get_peft_model(base, prompt_config(8))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, mask, labels = padded_batch(2, 6, VOCAB)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.get_nb_trainable_parameters()[0] == 8 * 256


def test_train_eval_and_to_follow_nn_module():
    model = fastprompt.get_peft_model(random_bloom(vocab=VOCAB), prompt_config(3))
    model.train()
    assert model.base_model.training
    model.eval()
    assert not model.base_model.training
    model.to(torch.float64)
    assert peft_prompt(model).dtype == torch.float64
    assert model.base_model.lm_head.weight.dtype == torch.float64
    ids, mask, _ = padded_batch(1, 4, VOCAB)
    assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float64


def eight_bit(family, directory):
    """``family`` saved and reloaded in 8-bit, as users load it."""
    tiny_causal_lm(family, VOCAB).save_pretrained(directory)
    return fastprompt.load_model(directory, load_in_8bit=True, device_map={"": DEVICE})


@pytest.mark.parametrize(
    "family,training_pass", [case for case in TRAINING_PASSES if case[0] in ("bloom", "llama", "qwen2")]
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_int8_matches_peft_on_the_same_8bit_model(monkeypatch, tmp_path, family, training_pass, mode):
    # Skipped, not failed, where bitsandbytes is missing (the GPU image unless its wheel is carried).
    Linear8bitLt = pytest.importorskip("bitsandbytes.nn").Linear8bitLt

    ours, ref = pair(lambda: eight_bit(family, tmp_path / family), prompt_config(8))
    force_training_pass(monkeypatch, ours, training_pass)
    assert any(isinstance(m, Linear8bitLt) for m in ours.modules())
    getattr(ours, mode)()
    getattr(ref, mode)()
    ids, mask, labels = low_precision_batch("left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    # Bounds from measurement: fastprompt vs PEFT on the same 8-bit model, these
    # 3 families x passes x train/eval, seeds 0-2 of model, prompt and batch (30
    # cases, CPU bitsandbytes). Both sides round their activations differently;
    # for scale, PEFT's own int8 run is 0.25-0.35 (prompt grad) and 0.16-0.4 %
    # (loss) from PEFT on the fp32 model (logits ~1.07 relative: the tiny random
    # models' logits are near zero), 100x what separates fastprompt from it.
    # logits: measured max 1.6e-3 (bloom and llama eval; most cases 1e-4-6e-4).
    assert rel_err(got.logits, want.logits) < 3e-3
    # loss: measured max 3.7e-5 (bloom eval); LOSS_REL 1e-4 (2.7x).
    assert_loss_close(got.loss, want.loss, LOSS_REL)
    got.loss.backward()
    want.loss.backward()
    # prompt grad: measured max 2.3e-3 (bloom; llama/qwen2 1.3e-3-1.5e-3); bound 5e-3 (was 1e-2).
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 5e-3


@pytest.mark.parametrize("family,training_pass", TRAINING_PASSES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_bf16_within_tolerance_rule_of_peft(monkeypatch, family, training_pass, side):
    """bf16 is judged against PEFT in fp32 on the same weights, allowed twice
    PEFT-in-bf16's own error (design.md's rule)."""
    from tolerance import assert_within_reference_error, rel_err

    config = prompt_config(8)
    torch.manual_seed(0)
    exact = peft_get_peft_model(tiny_causal_lm(family, VOCAB), config)
    ours = fastprompt.get_peft_model(tiny_causal_lm(family, VOCAB, dtype=torch.bfloat16), config)
    ref = peft_get_peft_model(tiny_causal_lm(family, VOCAB, dtype=torch.bfloat16), config)
    force_training_pass(monkeypatch, ours, training_pass)
    with torch.no_grad():
        peft_prompt(ours).copy_(peft_prompt(exact))
        peft_prompt(ref).copy_(peft_prompt(exact))
    ids, mask, labels = low_precision_batch(side)

    outs = [m(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True) for m in (ours, ref)]
    want = exact(input_ids=ids, attention_mask=mask, labels=labels)
    for out in outs + [want]:
        out.loss.backward()
    scale = want.logits.abs().max().item()
    assert_within_reference_error(outs[0].logits, outs[1].logits, want.logits, atol=1e-2 * scale, name="logits")
    # The loss is a mean over ~30 tokens: bf16 rounding mostly averages out, so
    # the floor is far below one bf16 ulp, and same-dtype PEFT is the sharper
    # reference (LOSS_REL is below what a per-row mean would move it).
    assert_within_reference_error(outs[0].loss, outs[1].loss, want.loss, atol=LOSS_REL * want.loss.item(), name="loss")
    assert_loss_close(outs[0].loss, outs[1].loss, LOSS_REL)
    # The prompt gradient sums B·T rows' bf16-rounded terms in an order that
    # differs from PEFT's, so the floor is two bf16 ulps at its scale; as a
    # whole it may be at most twice as far from fp32 as PEFT-in-bf16's.
    grads = [peft_prompt(ours).grad, peft_prompt(ref).grad, peft_prompt(exact).grad]
    gscale = grads[2].abs().max().item()
    assert_within_reference_error(grads[0], grads[1], grads[2], atol=2e-2 * gscale, name="prompt grad")
    assert rel_err(grads[0], grads[2]) <= 2 * rel_err(grads[1], grads[2])
