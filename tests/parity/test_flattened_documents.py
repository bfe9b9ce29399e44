"""Documents flattened into one row (transformers' DataCollatorWithFlattening,
TRL's padding_free) are served one document at a time, each behind the prompt:
against real PEFT run on each document alone. (PEFT itself drops the
position ids and lets the documents of a row attend to each other.)"""

import pytest
import torch
from models import DEVICE, FAMILIES, pair, peft_prompt, prompt_config, tiny_causal_lm
from tolerance import rel_err
from transformers import DataCollatorWithFlattening

VOCAB = 512
P = 6
LENGTHS = [9, 4, 13, 1, 7]
BOUNDARIES = {
    "position_ids": dict(),
    "cu_seq_lens": dict(return_position_ids=False, return_flash_attn_kwargs=True),
    "seq_idx": dict(return_position_ids=False, return_seq_idx=True),
}


def documents(seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = []
    for length in LENGTHS:
        ids = torch.randint(4, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[: length // 3] = -100  # an instruction
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return features


def flattened(features, boundary):
    batch = DataCollatorWithFlattening(**BOUNDARIES[boundary])(features)
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


def per_document(ref, flat_ids, flat_labels):
    """PEFT's loss over every document run alone (the collator's labels, whose
    first token of each document is -100), summed over labels and divided by
    their count, and each document's logits."""
    total, count, logits = 0.0, 0, []
    start = 0
    for length in LENGTHS:
        doc_ids = flat_ids[:, start : start + length]
        doc_labels = flat_labels[:, start : start + length]
        out = ref(input_ids=doc_ids, labels=doc_labels)
        labelled = int((doc_labels != -100).sum())
        if labelled:
            total = total + out.loss * labelled
            count += labelled
        logits.append(out.logits)
        start += length
    return total / count, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_flattened_loss_and_gradient_per_document(family):
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB, lively=True), prompt_config(P))
    batch = flattened(documents(), "position_ids")
    want, _ = per_document(ref, batch["input_ids"], batch["labels"])
    want.backward()
    got = ours(**batch).loss
    got.backward()
    assert ours.last_call.path is not None and ours.last_call.run != "peft"
    assert rel_err(got, want) <= 1e-5
    assert rel_err(ours.soft_prompt().grad, peft_prompt(ref).grad) <= 1e-5


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_flattened_logits_per_document(family, boundary):
    """Without gradients the logits come back flattened: the prompt's P
    positions, then every token's, each as its own document's PEFT pass gives it."""
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB, lively=True), prompt_config(P))
    batch = flattened(documents(), boundary)
    with torch.no_grad():
        want_loss, doc_logits = per_document(ref, batch["input_ids"], batch["labels"])
        out = ours(**batch)
    want = torch.cat([doc_logits[0][:, :P]] + [logits[:, P:] for logits in doc_logits], dim=1)
    assert out.logits.shape == (1, P + sum(LENGTHS), VOCAB)
    assert rel_err(out.logits, want) <= 1e-5
    assert rel_err(out.loss, want_loss) <= 1e-5


def test_one_document_per_row_is_peft_exactly():
    """position_ids that do not restart mark nothing: the call is PEFT's plain one."""
    ours, ref = pair(lambda: tiny_causal_lm("llama", VOCAB, lively=True), prompt_config(P))
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    positions = torch.arange(9, device=DEVICE).expand(2, -1)
    with torch.no_grad():
        got = ours(input_ids=ids, position_ids=positions).logits
        want = ref(input_ids=ids).logits
    assert rel_err(got, want) <= 1e-5


def test_flattened_documents_off_the_fast_path_raise():
    """PEFT's code would let the documents attend to each other: refused, not run."""
    ours, _ = pair(lambda: tiny_causal_lm("llama", VOCAB, lively=True), prompt_config(P))
    batch = flattened(documents(), "position_ids")
    with pytest.raises(ValueError, match="documents flattened into a row need fastprompt's fast path"):
        ours(**batch, output_hidden_states=True)


def test_flattened_documents_with_padding_raise():
    ours, _ = pair(lambda: tiny_causal_lm("llama", VOCAB, lively=True), prompt_config(P))
    batch = flattened(documents(), "position_ids")
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="attention_mask with zeros and several documents"):
        ours(**batch, attention_mask=mask)


def test_cu_seq_lens_that_do_not_split_the_input_raise():
    ours, _ = pair(lambda: tiny_causal_lm("llama", VOCAB, lively=True), prompt_config(P))
    batch = flattened(documents(), "cu_seq_lens")
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 5, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="do not split"):
        ours(**batch)


def test_ignoring_the_boundaries_would_fail_the_parity_check(monkeypatch):
    """The per-document reference tells the documents apart: run as PEFT runs
    them (one row, one prompt), the loss is off by far more than the tolerance."""
    from fastprompt import model as model_module

    monkeypatch.setattr(model_module, "find_documents", lambda *args: None)
    ours, ref = pair(lambda: tiny_causal_lm("llama", VOCAB, lively=True), prompt_config(P))
    batch = flattened(documents(), "position_ids")
    with torch.no_grad():
        want, _ = per_document(ref, batch["input_ids"], batch["labels"])
        got = ours(**batch).loss
    assert rel_err(got, want) > 1e-3
