"""4-bit nf4 bases (bitsandbytes on the CPU): fastprompt trains and generates
as PEFT does on the same 4-bit model."""

import pytest
import torch
from models import padded_batch, pair, peft_prompt, prompt_config

import fastprompt

Linear4bit = pytest.importorskip("bitsandbytes.nn").Linear4bit


def four_bit():
    return fastprompt.load_model("tiny-bloom", load_in_4bit=True, device_map={"": "cpu"})


def test_four_bit_trains_like_peft_on_the_same_4bit_model():
    ours, ref = pair(four_bit, prompt_config(6))
    assert any(isinstance(m, Linear4bit) for m in ours.modules())
    ids, mask, labels = padded_batch(3, 16, 500, side="left", lengths=[16, 11, 7])
    optimizers = [torch.optim.AdamW([peft_prompt(m)], lr=3e-2) for m in (ours, ref)]
    losses = {"ours": [], "peft": []}
    for _ in range(4):
        for name, model, optimizer in zip(losses, (ours, ref), optimizers):
            model.train()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert ours.last_call.path == "bloom"
    # Both sides run the same nf4 layers in fp32; what separates them is the summation order of the
    # shared prefix (fp32 rounding), far below the 4 steps' change of the loss.
    assert losses["ours"] == pytest.approx(losses["peft"], rel=1e-4)
    assert losses["ours"][-1] < losses["ours"][0] - 0.1
    assert torch.allclose(peft_prompt(ours), peft_prompt(ref), atol=1e-4)


def test_four_bit_generates_the_greedy_tokens_of_pefts_forward():
    """Each generated token is the argmax of PEFT's forward over the sequence so
    far, on the same 4-bit model. (Compared with PEFT's forward, not its
    generate, which re-inserts the prompt at every step on BLOOM under
    transformers 5: README's known limits.)"""
    ours, ref = pair(four_bit, prompt_config(6))
    tokenizer = ours.get_base_model().tokenizer
    batch = tokenizer(["Human: 中国的首都是哪里？\n\nAssistant: "], return_tensors="pt")
    sequence = ours.generate(**batch, max_new_tokens=8, do_sample=False)
    assert ours.last_call.path == "bloom"
    start = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = ref(input_ids=sequence[:, :-1]).logits[:, 6:]  # PEFT's logits include the 6 virtual tokens
    assert torch.equal(logits[:, start - 1 :].argmax(-1), sequence[:, start:])


def test_four_bit_trains_after_an_evaluation_pass():
    """bitsandbytes repacks 4-bit weights for a kernel without backward at an
    eval forward on CPUs with AVX512-BF16; load_model keeps them trainable."""
    ours, ref = pair(four_bit, prompt_config(6))
    ids, mask, labels = padded_batch(3, 16, 500, side="left", lengths=[16, 11, 7])
    ours.eval()
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
    ours.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False)
    for model in (ours, ref):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert peft_prompt(ours).grad is not None and peft_prompt(ours).grad.abs().sum() > 0
    assert torch.allclose(peft_prompt(ours).grad, peft_prompt(ref).grad, rtol=1e-3, atol=1e-6)
