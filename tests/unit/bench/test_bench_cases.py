"""bench/training_cases.py data sources and bench/model_shapes.py's registry."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import model_shapes  # noqa: E402
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
    assert training_cases.step_shape(last, 5) == dict(batch=2, prompt=5, tokens=6, labelled=2)


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
