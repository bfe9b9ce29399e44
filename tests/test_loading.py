"""The built-in tiny-bloom and load_model."""

import os
import subprocess
import sys

import pytest
import torch

import fastprompt
from fastprompt.loading import weights_fingerprint


def test_tiny_bloom_is_a_normal_hf_model_directory(tiny_bloom_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    assert model.config.model_type == "bloom"
    assert model.config.hidden_size // model.config.n_head == 128
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert len(tokenizer) <= model.config.vocab_size


def test_tokenizer_round_trips_chinese_and_english(tiny_bloom_dir):
    tokenizer = fastprompt.load_model(tiny_bloom_dir).tokenizer
    for text in ["下面是一段人与机器人的对话。", "Human: 考试有哪些技巧？\n\nAssistant: ", "naïve café ☕"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_same_name_gives_same_weights_and_tokenizer_everywhere(tmp_path, tiny_bloom_dir):
    """A second build in a fresh cache (another process) is identical."""
    code = (
        "import fastprompt, json;"
        "from fastprompt.loading import weights_fingerprint;"
        "m = fastprompt.load_model('tiny-bloom');"
        "print(weights_fingerprint(m)); print(json.dumps(m.tokenizer.get_vocab(), sort_keys=True))"
    )
    env = dict(os.environ, FASTPROMPT_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    fingerprint, vocab = out.stdout.strip().splitlines()[-2:]
    local = fastprompt.load_model("tiny-bloom")
    import json

    assert fingerprint == weights_fingerprint(local)
    assert vocab == json.dumps(local.tokenizer.get_vocab(), sort_keys=True)


def test_load_model_is_frozen_and_in_eval_mode():
    model = fastprompt.load_model("tiny-bloom")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_dtype_option():
    model = fastprompt.load_model("tiny-bloom", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float42'"):
        fastprompt.load_model("tiny-bloom", dtype="float42")


def test_load_in_8bit_uses_bitsandbytes(tiny_bloom_dir):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear8bitLt

    model = fastprompt.load_model(tiny_bloom_dir, load_in_8bit=True)
    assert isinstance(model.transformer.h[0].self_attention.query_key_value, Linear8bitLt)
