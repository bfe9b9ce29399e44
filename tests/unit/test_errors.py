"""Bad input gets a clear ValueError/TypeError naming the problem."""

import json

import pytest
import torch
from models import padded_batch, prompt_config, random_bloom
from peft import PromptTuningConfig, PromptTuningInit, TaskType

import fastprompt
from fastprompt import FastPromptModel


@pytest.fixture
def model():
    return fastprompt.get_peft_model(random_bloom(vocab=512), prompt_config(4))


def test_adapter_token_dim_differs_from_hidden_size(shared_dir):
    adapter = shared_dir / "fixtures" / "peft_prompt_tuning_bloom389m_zh"
    with pytest.raises(ValueError, match="token_dim 1024.*hidden size is 256"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), adapter)


def test_config_token_dim_differs_from_hidden_size():
    with pytest.raises(ValueError, match="token_dim 300 does not match the model's hidden size 256"):
        fastprompt.get_peft_model(random_bloom(vocab=512), prompt_config(4, token_dim=300))


@pytest.mark.parametrize("count", [0, -3])
def test_num_virtual_tokens_below_one(count):
    config = prompt_config(4)
    config.num_virtual_tokens = count
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1"):
        fastprompt.get_peft_model(random_bloom(vocab=512), config)


def test_text_init_without_text(tiny_bloom_dir):
    config = prompt_config(4, init=PromptTuningInit.TEXT, tokenizer=tiny_bloom_dir)
    config.prompt_tuning_init_text = ""
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        fastprompt.get_peft_model(random_bloom(vocab=512), config)


def test_text_init_without_tokenizer(tiny_bloom_dir):
    config = prompt_config(4, init=PromptTuningInit.TEXT, tokenizer=tiny_bloom_dir)
    config.tokenizer_name_or_path = None
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        fastprompt.get_peft_model(random_bloom(vocab=512), config)


def test_text_init_with_unloadable_tokenizer(tmp_path):
    config = prompt_config(4, init=PromptTuningInit.TEXT, tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot load the init-text tokenizer"):
        fastprompt.get_peft_model(random_bloom(vocab=512), config)


def test_task_type_other_than_causal_lm():
    config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4)
    with pytest.raises(ValueError, match="task_type must be CAUSAL_LM"):
        fastprompt.get_peft_model(random_bloom(vocab=512), config)


def test_not_a_prompt_tuning_config():
    from peft import LoraConfig

    with pytest.raises(
        TypeError,
        match="expected a peft.PromptTuningConfig, MultitaskPromptTuningConfig, PromptEncoderConfig or "
        "PrefixTuningConfig, got LoraConfig; fastprompt implements the soft-prompt methods only",
    ):
        fastprompt.get_peft_model(random_bloom(vocab=512), LoraConfig(task_type=TaskType.CAUSAL_LM))


def test_model_without_input_embeddings():
    base = random_bloom(vocab=512)
    base.set_input_embeddings(torch.nn.Identity())
    with pytest.raises(TypeError, match="has no input embedding layer"):
        fastprompt.get_peft_model(base, prompt_config(4))


def test_labels_shape_differs_from_inputs(model):
    ids, mask, labels = padded_batch(2, 6, 512)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 5\) but the inputs have shape \(2, 6\)"):
        model(input_ids=ids, attention_mask=mask, labels=labels[:, :5])


def test_mask_shape_differs_from_inputs(model):
    ids, mask, _ = padded_batch(2, 6, 512)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=ids, attention_mask=mask[:1])


def test_input_ids_not_integer(model):
    with pytest.raises(ValueError, match="input_ids must be a 2-D integer tensor"):
        model(input_ids=torch.zeros(2, 3))


def test_input_ids_not_a_tensor(model):
    with pytest.raises(TypeError, match="input_ids must be a tensor, got list"):
        model(input_ids=[[1, 2, 3]])


def test_missing_adapter_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path / "missing")


def test_adapter_without_weights(tmp_path, model):
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)


def test_corrupt_adapter_weights(tmp_path, model):
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="adapter_model.safetensors is corrupt or unreadable"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)


def test_corrupt_adapter_config(tmp_path, model):
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)


def test_adapter_of_another_peft_type(tmp_path, model):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes a 'LORA' adapter; fastprompt loads PROMPT_TUNING"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)


def test_adapter_tensor_shape_disagrees_with_config(tmp_path, model):
    from safetensors.torch import save_file

    model.save_pretrained(tmp_path)
    save_file({"prompt_embeddings": torch.zeros(3, 256)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \(3, 256\), but its config says \(4, 256\)"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)


def test_multitask_adapter_task_factor_shape_disagrees_with_config(tmp_path):
    from peft import MultitaskPromptTuningConfig
    from safetensors.torch import load_file, save_file

    config = MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    fastprompt.get_peft_model(random_bloom(vocab=512), config).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "prefix_task_rows": torch.zeros(2, 2, 256)}, str(weights))
    with pytest.raises(
        ValueError, match=r"prefix_task_rows in .* has shape \(2, 2, 256\), but its config says \(3, 2, 256\)"
    ):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)
    del state["prefix_task_cols"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="has no 'prefix_task_cols' tensor"):
        FastPromptModel.from_pretrained(random_bloom(vocab=512), tmp_path)


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as the library sees it: the library leaves the hub to
    transformers and PEFT, which fail at once in offline mode (the command line
    probes the hub itself: tests/e2e/test_cli.py)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_unknown_model_name(hub_offline):
    with pytest.raises(ValueError, match="cannot load model 'no-such-model-here'") as error:
        fastprompt.load_model("no-such-model-here")
    assert "\n" not in str(error.value)


def test_hub_adapter_id_offline_fails_at_once_in_one_line(hub_offline):
    import time

    started = time.perf_counter()
    with pytest.raises(ValueError) as error:
        FastPromptModel.from_pretrained(random_bloom(vocab=512), "some-org/some-adapter")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "\n" not in message and "'some-org/some-adapter'" in message


def test_push_to_hub_without_network_is_one_concise_error(model, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(
        ConnectionError, match=r"cannot push to the Hugging Face hub: https?://\S+ cannot be reached"
    ) as err:
        model.push_to_hub("someone/adapter")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "\n" not in str(err.value)


def test_text_generation_pipeline_accepts_the_model_without_an_error_log(model):
    import logging

    import transformers

    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        tokenizer = fastprompt.load_model("tiny-bloom").tokenizer
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:80] for r in records] == []
    assert pipe.model is model
    assert isinstance(pipe("Human: hi", max_new_tokens=2)[0]["generated_text"], str)
