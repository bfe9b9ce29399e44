"""Shape-faithful BLOOM stand-ins for benchmarks (random weights, no hub)."""

from __future__ import annotations

import os

import torch

# BLOOM's head_dim (128) and BLOOM-zh's vocabulary (46145), fewer layers and a
# smaller hidden size so a CPU step takes about a second.
BLOOM_MINI = dict(vocab_size=46145, hidden_size=512, n_layer=6, n_head=4)
# Langboat/bloom-1b4-zh's shape, for GPU runs.
BLOOM_1B4_ZH = dict(vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16)


def bloom_from_shape(shape: dict, dtype=torch.float32, seed: int = 0, device="cpu"):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(**shape, hidden_dropout=0.0, attention_dropout=0.0)
    with torch.device(device):  # initialise in place: a 1.4B model on GPU in seconds
        model = BloomForCausalLM(config).to(dtype=dtype)
    return model.requires_grad_(False).eval()


def bloom_mini(dtype=torch.float32, seed: int = 0, device="cpu"):
    return bloom_from_shape(BLOOM_MINI, dtype=dtype, seed=seed, device=device)


SHAPES_BY_NAME = {"bloom-mini": BLOOM_MINI, "bloom-1b4-zh": BLOOM_1B4_ZH}


def build_base(model: str = "bloom-mini", dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """A frozen benchmark model by shape name; dtype "int8" quantises the
    linear layers with bitsandbytes (via a temporary checkpoint, as users load
    8-bit models) with fp16 activations."""
    if dtype != "int8":
        return bloom_from_shape(SHAPES_BY_NAME[model], dtype=getattr(torch, dtype), seed=seed, device=device)
    import tempfile

    import fastprompt

    with tempfile.TemporaryDirectory() as directory:
        bloom_from_shape(SHAPES_BY_NAME[model], seed=seed).save_pretrained(directory)
        return fastprompt.load_model(directory, load_in_8bit=True, device_map=device)


def setting_from_env() -> dict:
    """Benchmark model, dtype and device: bloom-mini fp32 on CPU unless
    FASTPROMPT_BENCH_MODEL / _DTYPE (float32|bfloat16|int8) / _DEVICE say
    otherwise (bench/gpu_check.sh sets them for GPU runs)."""
    return {
        "model": os.environ.get("FASTPROMPT_BENCH_MODEL", "bloom-mini"),
        "dtype": os.environ.get("FASTPROMPT_BENCH_DTYPE", "float32"),
        "device": os.environ.get("FASTPROMPT_BENCH_DEVICE", "cpu"),
    }
