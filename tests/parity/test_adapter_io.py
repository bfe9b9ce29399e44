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


def tiny_bloom_text_adapter(directory):
    """An adapter on the built-in model, text-initialised with its tokenizer, saved by fastprompt."""
    torch.manual_seed(0)
    config = prompt_config(6, init="TEXT", tokenizer="tiny-bloom")
    model = fastprompt.get_peft_model(fastprompt.load_model("tiny-bloom"), config)
    with torch.no_grad():
        model.soft_prompt().add_(0.25)
    model.save_pretrained(directory)
    return model


def test_saved_files_name_the_base_as_the_user_did_and_peft_loads_them(tmp_path):
    from peft import PeftConfig
    from peft import get_peft_model as peft_get_peft_model

    model = tiny_bloom_text_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny-bloom"
    # No tokenizer PEFT cannot resolve: PEFT would look "tiny-bloom" up on the hub.
    assert saved["tokenizer_name_or_path"] is None and saved["prompt_tuning_init"] == "RANDOM"
    assert model.peft_config["default"].tokenizer_name_or_path == "tiny-bloom"  # the live config is untouched
    ref = PeftModel.from_pretrained(fastprompt.load_model("tiny-bloom"), tmp_path)
    assert torch.equal(peft_prompt(ref), model.soft_prompt())
    # The saved config starts a new PEFT model too.
    config = PeftConfig.from_pretrained(tmp_path)
    config.inference_mode = False
    assert peft_get_peft_model(fastprompt.load_model("tiny-bloom"), config).get_nb_trainable_parameters()[0] == 6 * 256


def test_a_tokenizer_peft_can_resolve_is_kept(tmp_path, tiny_bloom_dir):
    config = prompt_config(6, init="TEXT", tokenizer=str(tiny_bloom_dir))
    fastprompt.get_peft_model(fastprompt.load_model(tiny_bloom_dir), config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["tokenizer_name_or_path"] == str(tiny_bloom_dir) and saved["prompt_tuning_init"] == "TEXT"


def test_model_card_says_what_made_the_adapter(tmp_path):
    import yaml

    tiny_bloom_text_adapter(tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-bloom" and meta["library_name"] == "peft"
    assert "More Information Needed" not in card  # PEFT's placeholder
    assert "| default | PROMPT_TUNING | 6 | text '下面是一段人与机器人的对话。' (tokenizer `tiny-bloom`) |" in card
    (tmp_path / "README.md").write_text("# my own card\n", encoding="utf-8")
    tiny_bloom_text_adapter(tmp_path)
    assert (tmp_path / "README.md").read_text(encoding="utf-8").startswith("---")  # PEFT updated, did not replace
    assert "# my own card" in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_auto_model_loads_the_base_the_adapter_names(tmp_path):
    model = tiny_bloom_text_adapter(tmp_path)
    loaded = fastprompt.AutoFastPromptModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, FastPromptModel) and not loaded.training
    ref = PeftModel.from_pretrained(fastprompt.load_model("tiny-bloom"), tmp_path)
    ids, mask, _ = padded_batch(2, 7, 500, side="left")
    with torch.no_grad():
        assert torch.allclose(
            loaded(input_ids=ids, attention_mask=mask).logits,
            ref(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    assert torch.equal(loaded.soft_prompt(), model.soft_prompt())


def test_auto_model_passes_base_keywords_and_needs_a_base_name(tmp_path):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear8bitLt

    tiny_bloom_text_adapter(tmp_path / "a")
    loaded = fastprompt.AutoFastPromptModelForCausalLM.from_pretrained(tmp_path / "a", load_in_8bit=True)
    assert any(isinstance(m, Linear8bitLt) for m in loaded.modules())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no base model"):
        fastprompt.AutoFastPromptModelForCausalLM.from_pretrained(tmp_path / "a")
