"""bench/training_cases.py data sources and bench/model_shapes.py's registry."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import flop_count  # noqa: E402
import method_comparison  # noqa: E402
import model_shapes  # noqa: E402
import torch  # noqa: E402
import training_cases  # noqa: E402


def test_tutorial_refuses_other_data_unless_told(monkeypatch, tmp_path):
    monkeypatch.setattr(training_cases, "SHARED_DATA", tmp_path / "missing.json")
    monkeypatch.delenv(training_cases.DEMO_DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{training_cases.DEMO_DATA_ENV}=1"):
        training_cases.make_batches("tutorial", 1, 46145)
    monkeypatch.setenv(training_cases.DEMO_DATA_ENV, "1")
    from fastprompt.loading import demo_data_path

    assert training_cases.tutorial_data_path() == demo_data_path()
    assert training_cases.data_source("tutorial").startswith("bundled demo data")


def test_real_data_is_named_as_such(shared_dir, monkeypatch):
    monkeypatch.setattr(training_cases, "SHARED_DATA", shared_dir / "data" / "alpaca_zh_demo.json")
    assert training_cases.data_source("tutorial").startswith("real alpaca_zh samples: alpaca_zh_demo.json")
    assert training_cases.data_source("classify") == "random token ids (seed 0)"


def test_random_batches_keep_the_asked_labels():
    (second_half,) = training_cases.random_batches(1, 2, 6, "second_half", 50)
    assert (second_half["labels"][:, :3] == -100).all() and (
        second_half["labels"][:, 3:] == second_half["input_ids"][:, 3:]
    ).all()
    (last,) = training_cases.random_batches(1, 2, 6, "last", 50)
    assert training_cases.step_shape(last, 5) == dict(
        batch=2, prompt=5, tokens=6, labelled=2, lengths=[6, 6], prompts=1
    )


def test_registry_shapes_and_labels():
    llama = model_shapes.dims("llama-3.2-1b")
    assert (llama.hidden, llama.layers, llama.heads, llama.kv_heads, llama.intermediate, llama.vocab) == (
        2048,
        16,
        32,
        8,
        8192,
        128256,
    )
    qwen = model_shapes.dims("qwen2.5-0.5b")
    assert (qwen.hidden, qwen.layers, qwen.heads, qwen.kv_heads, qwen.intermediate, qwen.vocab) == (
        896,
        24,
        14,
        2,
        4864,
        151936,
    )
    assert model_shapes.label("bloom-mini").startswith("bloom-mini (quick run:")
    assert model_shapes.label("bloom-1b4-zh").startswith("bloom-1b4-zh (real shape: bloom, hidden 2048, 24 layers")


def test_unknown_model_is_refused(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_BENCH_MODEL", "gpt-5")
    with pytest.raises(ValueError, match="bloom-mini"):
        model_shapes.setting_from_env()


def test_lengths_are_metamathqa_like_and_seeded():
    lengths = torch.tensor(method_comparison.sample_lengths(20000), dtype=torch.float64)
    # PEFT's MetaMathQA runs: 210 tokens per sample on average, max_seq_length 768.
    assert abs(lengths.mean().item() - 210) < 3
    assert lengths.min() >= method_comparison.MIN_LENGTH and lengths.max() <= 768
    assert abs(lengths.median().item() - 190) < 3
    # Log-normal with sigma 0.45: about 5 % above 400 tokens, about 0.1 % cut at 768.
    assert 0.04 < (lengths > 400).double().mean() < 0.06
    assert (lengths == 768).double().mean() < 0.003
    assert method_comparison.sample_lengths(8) == method_comparison.sample_lengths(8)
    assert method_comparison.sample_lengths(8, seed=1) != method_comparison.sample_lengths(8)


def test_method_comparison_batches_are_right_padded_with_labels_on_every_real_token():
    batches = method_comparison.make_batches(3, 100)
    lengths = method_comparison.sample_lengths(12)
    for index, batch in enumerate(batches):
        rows = lengths[index * 4 : (index + 1) * 4]
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == (4, max(rows)) and mask.sum(dim=1).tolist() == rows
        assert torch.equal(mask, (torch.arange(max(rows)) < torch.tensor(rows)[:, None]).long())  # right pads
        assert torch.equal(labels[mask == 1], ids[mask == 1]) and (labels[mask == 0] == -100).all()
        assert training_cases.step_shape(batch, 200)["lengths"] == rows


def test_method_comparison_contenders_count_their_padded_positions():
    (batch,) = method_comparison.make_batches(1, 100)
    dims = model_shapes.dims("llama-3.2-3b")
    rows, longest = batch["input_ids"].shape
    shape = training_cases.step_shape(batch, 200)
    flops = {name: method_comparison.step_flops(dims, name, batch) for name in method_comparison.CONTENDERS}
    assert flops["peft_prompt_tuning"] == flop_count.training_step(dims, "peft", **shape)
    assert flops["fastprompt_prompt_tuning"] == flop_count.training_step(dims, "fastprompt", **shape)
    assert flops["peft_lora"] == flop_count.method_step(dims, "peft_lora", **shape, rank=32)
    # Prompt tuning pays for 200 more positions per row than LoRA; packing pays for no pad.
    assert flops["fastprompt_prompt_tuning"] < flops["peft_prefix_tuning"] < flops["peft_prompt_tuning"]
    assert flops["peft_lora"] < flops["peft_prompt_tuning"]
    # P-tuning: prompt tuning's passes plus the same encoder run (once a step) on both sides.
    encoder = flop_count.prompt_encoder(dims, "p_tuning", 200)
    assert flops["peft_p_tuning"] == flops["peft_prompt_tuning"] + encoder
    assert flops["fastprompt_p_tuning"] == flops["fastprompt_prompt_tuning"] + encoder
    # fastprompt's planned prefix tuning, counted ahead of its contender: the padding-free pass.
    planned = flop_count.method_step(dims, "fastprompt_prefix_tuning", **shape)
    assert planned < flops["fastprompt_prompt_tuning"] and planned < flops["peft_prefix_tuning"]


def test_method_comparison_pairs_each_fastprompt_method_with_peft_s():
    contenders = method_comparison.CONTENDERS
    assert set(method_comparison.PAIRS) == {f"fastprompt_{m}" for m in method_comparison.FASTPROMPT_METHODS}
    for fast, peft_run in method_comparison.PAIRS.items():
        assert peft_run == fast.replace("fastprompt_", "peft_") and contenders.index(peft_run) > contenders.index(fast)
    assert {f"peft_{m}" for m in method_comparison.METHODS} <= set(contenders)
    assert method_comparison.REFERENCE in contenders
    with pytest.raises(ValueError, match="unknown contender"):
        method_comparison.method_of("fastprompt_lora")


def test_method_comparison_setting_and_shape(monkeypatch):
    for name in (method_comparison.MODEL_ENV, method_comparison.LAYERS_ENV, "FASTPROMPT_BENCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    run = method_comparison.setting()
    assert run == {"model": "llama-3.2-3b", "dtype": "float32", "device": "cpu", "layers": 2}
    assert "2 of its 28 layers" in method_comparison.label(run)
    monkeypatch.setenv("FASTPROMPT_BENCH_DEVICE", "cuda")
    assert method_comparison.setting()["layers"] == 28
    monkeypatch.setenv(method_comparison.LAYERS_ENV, "29")
    with pytest.raises(ValueError, match="28 layers"):
        method_comparison.setting()
    llama = model_shapes.dims("llama-3.2-3b")
    assert (llama.hidden, llama.layers, llama.heads, llama.kv_heads, llama.head_dim) == (3072, 28, 24, 8, 128)
    assert (llama.intermediate, llama.vocab) == (8192, 128256)
    config = model_shapes.SHAPES["llama-3.2-3b"].config
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 500000.0


def test_contenders_share_the_frozen_weights_not_the_modules():
    base = model_shapes.build_base("llama-tiny")
    lora, _ = method_comparison.make_contender("peft_lora", method_comparison.sharing_weights(base))
    prompt, _ = method_comparison.make_contender("fastprompt_prompt_tuning", method_comparison.sharing_weights(base))
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear  # LoRA wrapped its copy's, not the base's
    wrapped = lora.get_base_model().model.layers[0].self_attn.q_proj
    assert wrapped.base_layer.weight is q_proj.weight
    assert prompt.get_base_model().lm_head.weight is base.lm_head.weight


def test_alpaca_ragged_batches_are_padded_as_the_seq2seq_collator_does(shared_dir, monkeypatch):
    monkeypatch.setattr(training_cases, "SHARED_DATA", shared_dir / "data" / "alpaca_zh_demo.json")
    first, second = training_cases.make_batches("alpaca-ragged", 2, 46145)
    for batch in (first, second):
        mask, labels = batch["attention_mask"], batch["labels"]
        assert mask.shape[0] == 8 and mask.shape[1] == mask.sum(dim=1).max()
        assert len(set(mask.sum(dim=1).tolist())) > 1  # ragged
        assert (mask[:, -1] == 1).all()  # the tokenizer pads on the left
        assert (labels[mask == 0] == -100).all() and (labels[mask == 1] != -100).any()
    assert not torch.equal(first["attention_mask"].sum(dim=1), second["attention_mask"].sum(dim=1))
    source = training_cases.data_source("alpaca-ragged")
    assert "DataCollatorForSeq2Seq" in source and "seed 0" in source


def test_training_methods_share_one_config_and_multitask_rows_get_tasks(monkeypatch):
    monkeypatch.delenv(training_cases.METHOD_ENV, raising=False)
    assert training_cases.method_from_env() == "prompt_tuning"
    monkeypatch.setenv(training_cases.METHOD_ENV, "lora")
    with pytest.raises(ValueError, match="p_tuning"):
        training_cases.method_from_env()
    p_tuning = training_cases.prompt_config("p_tuning", 7)
    assert (p_tuning.peft_type, p_tuning.num_virtual_tokens, p_tuning.encoder_dropout) == ("P_TUNING", 7, 0.0)
    assert p_tuning.encoder_hidden_size is None  # PEFT's default: the hidden size, as flop_count counts it
    first, second = training_cases.make_batches("classify", 2, 100, method="multitask_prompt_tuning")
    for batch in (first, second):
        tasks = batch["task_ids"]
        assert tasks.shape == (8,) and 0 <= tasks.min() and tasks.max() < training_cases.TASKS
        assert training_cases.step_shape(batch, 100)["prompts"] == len(set(tasks.tolist())) > 1
    assert not torch.equal(first["task_ids"], second["task_ids"])
    assert "task" in training_cases.data_source("classify", "multitask_prompt_tuning")
    (plain,) = training_cases.make_batches("classify", 1, 100)
    assert "task_ids" not in plain and torch.equal(plain["input_ids"], first["input_ids"])


@pytest.mark.parametrize("method", training_cases.METHODS)
def test_each_training_method_runs_fastprompt_and_peft_to_the_same_loss(method):
    bases = model_shapes.build_bases(2, model="bloom-tiny")
    (batch,) = training_cases.make_batches("classify", 1, 512, method=method)
    losses = [
        training_cases.train_step(*training_cases.make_contender(name, base, 4, method), batch)
        for name, base in zip(training_cases.CONTENDERS, bases)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
