"""The built-in tiny-bloom (shipped weights and the recipe that made them) and load_model."""

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fastprompt
from fastprompt.app import tiny_bloom
from fastprompt.app.data import PadCollator, load_alpaca
from fastprompt.loading import demo_data_path

# What the task asks of a shipped model: small enough to live in the package.
MAX_SHIPPED_BYTES = 8 * 2**20


def test_tiny_bloom_is_a_normal_hf_model_directory(tiny_bloom_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    assert model.config.model_type == "bloom"
    assert model.config.hidden_size // model.config.n_head == 128
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert len(tokenizer) <= model.config.vocab_size


def test_weights_are_stored_in_fp16_and_load_as_fp32(tiny_bloom_dir):
    from transformers import AutoModelForCausalLM

    weights = Path(tiny_bloom_dir) / "model.safetensors"
    assert sum(p.stat().st_size for p in Path(tiny_bloom_dir).iterdir()) <= MAX_SHIPPED_BYTES
    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)  # no dtype: what any user would type
    with safe_open(str(weights), "pt") as stored:
        names = list(stored.keys())
        for name in names:
            tensor = stored.get_tensor(name)
            assert tensor.dtype == tiny_bloom.STORAGE_DTYPE
            assert torch.equal(model.get_parameter(name), tensor.float())
    assert len(names) == len(dict(model.named_parameters()))  # lm_head is tied, stored once


def test_shipped_model_loads_offline_with_transformers_and_peft(tiny_bloom_dir, tmp_path, monkeypatch):
    """With the hub off (HF_HUB_OFFLINE=1 as huggingface_hub sees it) and no
    network at all: transformers loads the directory, PEFT builds a
    TEXT-initialised prompt with its tokenizer, saves it and loads it back on a
    fresh base with the same logits."""
    import socket

    from huggingface_hub import constants
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    path, adapter = tiny_bloom_dir, str(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=6,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="下面是一段人与机器人的对话。",
        tokenizer_name_or_path=path,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config).eval()
    model.save_pretrained(adapter)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), adapter).eval()
    ids = tokenizer("Human: 中国的首都是哪里？\n\nAssistant: ", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reloaded(**ids).logits)


def test_tokenizer_round_trips_chinese_and_english(tiny_bloom_dir):
    tokenizer = fastprompt.load_model(tiny_bloom_dir).tokenizer
    for text in ["下面是一段人与机器人的对话。", "Human: 考试有哪些技巧？\n\nAssistant: ", "naïve café ☕"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_shipped_tokenizer_and_config_are_the_recipes(tiny_bloom_dir):
    from transformers import AutoConfig, AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    assert shipped.get_vocab() == tiny_bloom.train_tokenizer().get_vocab()
    config = AutoConfig.from_pretrained(tiny_bloom_dir)
    assert {key: getattr(config, key) for key in tiny_bloom.CONFIG} == tiny_bloom.CONFIG


def test_recipe_is_deterministic():
    """Two shortened runs give the same weights bit for bit, and they are not
    the untrained start."""
    first, _ = tiny_bloom.pretrain(steps=2)
    second, _ = tiny_bloom.pretrain(steps=2)
    start = tiny_bloom.initial_model().state_dict()
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert any(not torch.equal(tensor, start[name]) for name, tensor in first.state_dict().items())


def test_saved_run_is_a_loadable_model_directory(tmp_path):
    assert tiny_bloom.main(["--output", str(tmp_path), "--steps", "1"]) == 0
    model = fastprompt.load_model(tmp_path)
    assert model.config.vocab_size == tiny_bloom.CONFIG["vocab_size"]
    assert model.tokenizer.get_vocab() == tiny_bloom.train_tokenizer().get_vocab()


def _loss_on_bundled_data(model, tokenizer) -> float:
    batch = PadCollator(tokenizer.pad_token_id)(load_alpaca(demo_data_path(), tokenizer).examples)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_pretrained_loss_on_bundled_data_is_far_below_a_random_models():
    model = fastprompt.load_model("tiny-bloom")
    trained = _loss_on_bundled_data(model, model.tokenizer)
    untrained = _loss_on_bundled_data(tiny_bloom.initial_model().eval(), model.tokenizer)
    uniform = math.log(model.config.vocab_size)
    # A random model guesses about uniformly; the trained one must put most
    # of its probability on the right answer token (loss under ln 2).
    assert untrained > 0.9 * uniform
    assert trained < math.log(2)


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


def test_8bit_on_a_cpu_computes_in_fp32_unless_told(tiny_bloom_dir):
    """fp16 on a CPU made an 8-bit step 15-50x slower than fp32 (loading.py's figures)."""
    pytest.importorskip("bitsandbytes")
    default = fastprompt.load_model(tiny_bloom_dir, load_in_8bit=True, device_map={"": "cpu"})
    assert default.dtype == torch.float32 and default.lm_head.weight.dtype == torch.float32
    fp16 = fastprompt.load_model(tiny_bloom_dir, load_in_8bit=True, device_map={"": "cpu"}, dtype="float16")
    assert fp16.dtype == torch.float16


def test_quantized_default_dtype_follows_the_device(monkeypatch):
    from fastprompt.loading import _lands_on_cpu

    assert _lands_on_cpu({"": "cpu"}) and _lands_on_cpu("cpu") and _lands_on_cpu({"a": "cpu", "b": "disk"})
    assert not _lands_on_cpu({"": "cuda:0"}) and not _lands_on_cpu({"": 0}) and not _lands_on_cpu(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not _lands_on_cpu(None) and not _lands_on_cpu("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert _lands_on_cpu(None)


def test_load_in_4bit_is_nf4_computing_in_the_model_dtype(tiny_bloom_dir):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    model = fastprompt.load_model(tiny_bloom_dir, load_in_4bit=True)
    layer = model.transformer.h[0].self_attention.query_key_value
    assert isinstance(layer, Linear4bit) and layer.weight.quant_type == "nf4"
    assert layer.compute_dtype == torch.float32 and model.dtype == torch.float32
    bf16 = fastprompt.load_model(tiny_bloom_dir, load_in_4bit=True, dtype=torch.bfloat16)
    assert bf16.transformer.h[0].self_attention.query_key_value.compute_dtype == torch.bfloat16


def test_from_pretrained_keywords_reach_transformers(tiny_bloom_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear8bitLt

    seen = {}
    load = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = fastprompt.load_model(
        tiny_bloom_dir,
        torch_dtype=torch.bfloat16,
        attn_implementation="eager",
        revision="main",
        trust_remote_code=False,
        low_cpu_mem_usage=True,
    )
    assert model.dtype == torch.bfloat16 and "torch_dtype" not in seen and seen["dtype"] == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert seen["revision"] == "main" and seen["trust_remote_code"] is False and seen["low_cpu_mem_usage"] is True
    quantized = fastprompt.load_model(tiny_bloom_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(quantized.transformer.h[0].mlp.dense_h_to_4h, Linear8bitLt)
    assert quantized.dtype == torch.float32  # a bitsandbytes config of the caller's gets the CPU default too


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(load_in_8bit=True, load_in_4bit=True), "load_in_8bit and load_in_4bit are exclusive"),
        (dict(load_in_4bit=True, quantization_config={"load_in_4bit": True}), "load_in_4bit=True and quantization"),
        (dict(dtype="float16", torch_dtype="bfloat16"), "dtype=torch.float16 and torch_dtype=torch.bfloat16 disagree"),
        (dict(torch_dtype="float42"), "unknown torch_dtype 'float42'"),
    ],
)
def test_conflicting_keywords_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastprompt.load_model("tiny-bloom", **kwargs)


def test_eight_bit_inference_in_fp32_logs_no_cast_warning_per_layer(tiny_bloom_dir, caplog):
    """bitsandbytes warns, on every 8-bit layer of every eval call, that it
    quantises fp32 activations through fp16; with fp32 the default on a CPU
    that line would repeat for every call, and import fastprompt filters it."""
    pytest.importorskip("bitsandbytes")
    model = fastprompt.load_model(tiny_bloom_dir, load_in_8bit=True)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")]
