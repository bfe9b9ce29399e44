"""Shape-faithful BLOOM stand-ins for benchmarks (random weights, no hub)."""

from __future__ import annotations

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
    model = BloomForCausalLM(config).to(device=device, dtype=dtype)
    return model.requires_grad_(False).eval()


def bloom_mini(dtype=torch.float32, seed: int = 0, device="cpu"):
    return bloom_from_shape(BLOOM_MINI, dtype=dtype, seed=seed, device=device)
