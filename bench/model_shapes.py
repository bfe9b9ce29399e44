"""Benchmark models by name: published models' shapes with seeded random
weights, built from a transformers config (no hub, no download).

bloom-mini is the quick run (a CPU step in about a second, BLOOM's head size
and BLOOM-zh's vocabulary); the others are real models' shapes, where a step
takes seconds on a CPU. To benchmark another model, add an entry to SHAPES.
``FASTPROMPT_BENCH_MODEL`` / ``_DTYPE`` / ``_DEVICE`` pick the setting of a run
(``bench/gpu_check.sh`` and ``make bench-full`` set them).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
from flop_count import Dims
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, Qwen2Config


@dataclass(frozen=True)
class ModelShape:
    config: object  # a transformers config
    quick: bool = False  # the quick run: more rounds, seconds per suite
    # Whether fastprompt has a fast path for the family today; without one it
    # runs PEFT's code, so both the FLOP bound and the expected ratio are 1.
    fast_path: bool = False


# Dropout off: a benchmark step must compute the same thing for both contenders.
SHAPES = {
    "bloom-mini": ModelShape(
        BloomConfig(vocab_size=46145, hidden_size=512, n_layer=6, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
        quick=True,
        fast_path=True,
    ),
    # The GPU check's dry run (bench/gpu_check.sh --dry-run): its plumbing, in seconds on a CPU. The
    # vocabulary of tiny-bloom's tokenizer (512 entries: the tutorial case's ids fit) and a narrow
    # model: 8-bit layers computed in fp16 then, which is slow on a CPU (with BLOOM-zh's 46145-entry head
    # at hidden 256, one 8-bit classify step of PEFT took about a minute on a busy 2-core machine; a CPU
    # load computes in fp32 now, see fastprompt/loading.py).
    "bloom-tiny": ModelShape(
        BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0),
        quick=True,
        fast_path=True,
    ),
    "bloom-1b4-zh": ModelShape(
        BloomConfig(
            vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16, hidden_dropout=0.0, attention_dropout=0.0
        ),
        fast_path=True,
    ),
    "llama-3.2-1b": ModelShape(
        LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        fast_path=True,
    ),
    # PEFT's method comparison model (method_comparison/MetaMathQA: Llama-3.2-3B), for
    # bench_method_comparison.py; rope theta as Llama 3.2's (its llama3 long-context scaling left out:
    # it changes no shape and no cost at 768 tokens).
    "llama-3.2-3b": ModelShape(
        LlamaConfig(
            hidden_size=3072,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
        fast_path=True,
    ),
    # Its quick setting (the method comparison's smoke test and the GPU check's dry run): Llama's
    # layout (grouped KV heads 3:1, gated MLP, tied embeddings) at a width a CPU steps in a second.
    "llama-3.2-3b-quick": ModelShape(
        LlamaConfig(
            hidden_size=384,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=1024,
            vocab_size=8192,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
        quick=True,
        fast_path=True,
    ),
    # The method comparison in the GPU check's dry run: its plumbing (four contenders, the lengths of
    # PEFT's batches) at a width where its eight steps take a second or two.
    "llama-tiny": ModelShape(
        LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=512,
            tie_word_embeddings=True,
        ),
        quick=True,
        fast_path=True,
    ),
    "qwen2.5-0.5b": ModelShape(
        Qwen2Config(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
        fast_path=True,
    ),
}


def dims(name: str, layers: int | None = None) -> Dims:
    """The sizes of ``name``, at ``layers`` of its decoder layers when given."""
    full = Dims.from_config(SHAPES[name].config)
    return full if layers is None else dataclasses.replace(full, layers=layers)


def label(name: str, layers: int | None = None) -> str:
    """What every table says about the model it measured (``layers``: how many
    of its decoder layers a run kept)."""
    d = dims(name)
    kind = "quick run" if SHAPES[name].quick else "real shape"
    depth = f"{d.layers} layers" if layers in (None, d.layers) else f"{layers} of its {d.layers} layers"
    return (
        f"{name} ({kind}: {SHAPES[name].config.model_type}, hidden {d.hidden}, {depth}, "
        f"{d.heads} heads of {d.head_dim} / {d.kv_heads} KV, MLP {d.intermediate}, vocab {d.vocab}; "
        f"random weights)"
    )


def _from_config(name: str, dtype: torch.dtype, seed: int, device: str, layers: int | None = None):
    config = copy.deepcopy(SHAPES[name].config)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: a 1.4B model on GPU in seconds
        model = AutoModelForCausalLM.from_config(config).to(dtype=dtype)
    return model.requires_grad_(False).eval()


def build_base(
    model: str = "bloom-mini", dtype: str = "float32", device: str = "cpu", seed: int = 0, layers: int | None = None
):
    """A frozen benchmark model by shape name (``layers``: its first that many
    decoder layers' shape, for a CPU run of a deep model); dtype "int8"
    quantises the linear layers with bitsandbytes (via a temporary checkpoint,
    as users load 8-bit models), computing in load_model's default dtype (fp16
    on a GPU, fp32 on a CPU)."""
    if dtype != "int8":
        return _from_config(model, getattr(torch, dtype), seed, device, layers)
    import tempfile

    import fastprompt

    with tempfile.TemporaryDirectory() as directory:
        _from_config(model, torch.float32, seed, "cpu", layers).save_pretrained(directory)
        return fastprompt.load_model(directory, load_in_8bit=True, device_map=device)


def build_bases(count: int, **setting) -> list:
    """``count`` identical frozen models, one per contender. Copies are made
    rather than rebuilt: a random init of 1.4B weights takes half a minute on
    a CPU, a copy a few seconds. 8-bit models are rebuilt (bitsandbytes'
    quantised parameters are not made to be deep-copied)."""
    first = build_base(**setting)
    if setting.get("dtype") == "int8":
        return [first] + [build_base(**setting) for _ in range(count - 1)]
    return [first] + [copy.deepcopy(first) for _ in range(count - 1)]


def setting_from_env() -> dict:
    """Benchmark model, dtype and device: bloom-mini fp32 on CPU unless
    FASTPROMPT_BENCH_MODEL (a key of SHAPES) / _DTYPE (float32|bfloat16|int8) /
    _DEVICE say otherwise."""
    setting = {
        "model": os.environ.get("FASTPROMPT_BENCH_MODEL", "bloom-mini"),
        "dtype": os.environ.get("FASTPROMPT_BENCH_DTYPE", "float32"),
        "device": os.environ.get("FASTPROMPT_BENCH_DEVICE", "cpu"),
    }
    if setting["model"] not in SHAPES:
        raise ValueError(f"FASTPROMPT_BENCH_MODEL={setting['model']!r}: choose one of {', '.join(SHAPES)}")
    return setting


def setting_label(setting: dict) -> str:
    return f"{label(setting['model'])}, {setting['dtype']} on {setting['device']}"
