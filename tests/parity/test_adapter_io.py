"""PEFT-format adapter files, both ways, including a real adapter saved by PEFT."""

import json

import pytest
import torch
from models import padded_batch, pair, peft_prompt, prompt_config, random_bloom
from peft import PeftModel
from safetensors.torch import load_file

import fastprompt
from fastprompt import FastPromptModel


def test_save_writes_peft_format_that_peft_loads(tmp_path):
    ours, _ = pair(lambda: random_bloom(vocab=512), prompt_config(6))
    with torch.no_grad():
        peft_prompt(ours).add_(0.5)  # a trained-looking prompt, not the init
    ours.save_pretrained(tmp_path)
    # PEFT's files, model card included.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert list(state) == ["prompt_embeddings"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"

    ref = PeftModel.from_pretrained(random_bloom(vocab=512), tmp_path)
    assert torch.equal(peft_prompt(ref).detach(), peft_prompt(ours).detach())
    ids, mask, _ = padded_batch(2, 7, 512, side="left")
    got = ours(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loads_adapter_written_by_peft(tmp_path):
    _, ref = pair(lambda: random_bloom(vocab=512), prompt_config(5))
    with torch.no_grad():
        peft_prompt(ref).mul_(3.0)
    ref.save_pretrained(tmp_path)
    ours = FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)
    assert torch.equal(peft_prompt(ours).detach(), peft_prompt(ref).detach())
    # PEFT's state after loading: eval mode, inference config.
    assert not ours.training and ours.active_peft_config.inference_mode
    assert (
        peft_prompt(ours).requires_grad
        == peft_prompt(PeftModel.from_pretrained(random_bloom(vocab=512), tmp_path)).requires_grad
    )
    # PEFT refuses a trainable prompt-learning adapter from files; so do we.
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path, is_trainable=True)
    ids, mask, _ = padded_batch(2, 7, 512)
    assert torch.allclose(
        ours(input_ids=ids, attention_mask=mask).logits,
        ref(input_ids=ids, attention_mask=mask).logits,
        rtol=1e-5,
        atol=1e-5,
    )


def test_loads_the_shared_real_peft_adapter_unchanged(shared_dir):
    adapter = shared_dir / "fixtures" / "peft_prompt_tuning_bloom389m_zh"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}

    def base():
        return random_bloom(hidden=1024, layers=1, heads=8, vocab=512)

    ours = FastPromptModel.from_pretrained(base(), adapter)
    ref = PeftModel.from_pretrained(base(), adapter)
    assert peft_prompt(ours).shape == (8, 1024)
    assert ours.active_peft_config.prompt_tuning_init_text == "下面是一段人与机器人的对话。"
    assert torch.equal(peft_prompt(ours).detach(), peft_prompt(ref).detach())
    ids, mask, _ = padded_batch(2, 6, 512, side="left")
    got = ours(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_round_trip_keeps_the_prompt_and_config(tmp_path):
    ours, _ = pair(lambda: random_bloom(vocab=512), prompt_config(3))
    ours.save_pretrained(tmp_path)
    again = FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)
    assert torch.equal(peft_prompt(again).detach(), peft_prompt(ours).detach())
    assert again.active_peft_config.num_virtual_tokens == 3


def test_adapter_state_dict_is_pefts():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    ours, ref = pair(lambda: random_bloom(vocab=512), prompt_config(3))
    state = get_peft_model_state_dict(ours)
    assert list(state) == ["prompt_embeddings"] == list(get_peft_model_state_dict(ref))
    other = fastprompt.get_peft_model(random_bloom(vocab=512), prompt_config(3))
    set_peft_model_state_dict(other, {"prompt_embeddings": state["prompt_embeddings"] + 1})
    assert torch.equal(peft_prompt(other).detach(), state["prompt_embeddings"] + 1)
