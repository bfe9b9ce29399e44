"""Small models and batches shared by the tests."""

from __future__ import annotations

import os

import torch
from model_cache import built_once
from peft import PromptTuningConfig, PromptTuningInit, TaskType
from peft import get_peft_model as peft_get_peft_model

import fastprompt

INIT_TEXT = "下面是一段人与机器人的对话。"
# FASTPROMPT_TEST_DEVICE=cuda runs the model tests on a GPU (bench/gpu_check.sh); CPU otherwise.
DEVICE = torch.device(os.environ.get("FASTPROMPT_TEST_DEVICE", "cpu"))


@built_once(seeds=True)
def random_bloom(hidden=256, layers=2, heads=2, vocab=512, seed=0, dtype=torch.float32):
    """A BLOOM built from a config with seeded weights (no tokenizer)."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        n_layer=layers,
        n_head=heads,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = BloomForCausalLM(config).to(dtype)
    # Non-trivial LayerNorm parameters so parity also covers their use.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.to(DEVICE).requires_grad_(False).eval()


# Tiny configs of every family with a fast path: 4 heads (2 KV heads where the
# family has GQA), two layers, sliding windows short enough to be exercised.
FAMILY_CONFIGS = {
    "bloom": ("BloomConfig", dict(hidden_size=256, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0)),
    "llama": (
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=40,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=24,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
}
FAMILIES = list(FAMILY_CONFIGS)


@built_once(seeds=True)
def tiny_causal_lm(
    family: str, vocab: int = 512, seed: int = 0, dtype=torch.float32, lively: bool = False, **overrides
):
    """A frozen, seeded model of ``family`` built from a config (no hub).

    ``lively``: untied output embeddings and weights four times larger. A tiny
    random model with tied embeddings greedily repeats its last input token
    whatever the prompt, which would make generation tests vacuous; a lively
    one continues in varied, prompt-dependent ways."""
    import transformers

    config_class, settings = FAMILY_CONFIGS[family]
    if lively:
        overrides = {"tie_word_embeddings": False, "eos_token_id": None, "pad_token_id": None, **overrides}
    config = getattr(transformers, config_class)(vocab_size=vocab, **{**settings, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:  # non-trivial norm parameters so parity also covers their use
                param.add_(torch.randn_like(param) * 0.1)
            elif lively and param.dim() == 2:
                param.mul_(4.0)
    return model.to(DEVICE).requires_grad_(False).eval()


# (family, pass of a trained prompt) pairs: the generic families either packed
# with the tokens in one body call or in two passes; BLOOM its own decoder.
TRAINING_PASSES = [
    (family, training_pass)
    for family in FAMILIES
    for training_pass in (["own decoder"] if family == "bloom" else ["packed", "two passes"])
]


def force_training_pass(monkeypatch, model, training_pass: str) -> list[str]:
    """Make ``model`` run a trained prompt's pass as ``training_pass`` says (see
    TRAINING_PASSES): "packed" is what the path takes wherever it can pack;
    "two passes" turns packing off. Returns the list that records which pass
    each call ran ("packed" or "tokens")."""
    ran = []
    if training_pass == "own decoder":
        return ran
    path = model.paths.generic
    if training_pass != "packed":
        monkeypatch.setattr(path, "packs", lambda *args: False)
    for name in ("packed", "tokens"):
        method = getattr(path, name)
        monkeypatch.setattr(path, name, lambda *args, _method=method, _name=name: ran.append(_name) or _method(*args))
    return ran


def prompt_config(num_virtual_tokens=8, init=PromptTuningInit.RANDOM, tokenizer=None, **kwargs):
    if init == PromptTuningInit.TEXT:
        kwargs.setdefault("prompt_tuning_init_text", INIT_TEXT)
        kwargs["tokenizer_name_or_path"] = tokenizer
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=init, **kwargs
    )


def pair(make_base, config, seed=0):
    """(fastprompt model, peft model) on two identical copies of the base, with
    the same initial prompt."""
    torch.manual_seed(seed)
    ours = fastprompt.get_peft_model(make_base(), config)
    torch.manual_seed(seed)
    ref = peft_get_peft_model(make_base(), config)
    return ours, ref


def peft_prompt(ref):
    return ref.prompt_encoder["default"].embedding.weight


def padded_batch(batch, length, vocab, side="right", seed=0, lengths=None):
    """Random ids, a mask with per-row lengths, and labels with the first third
    of each row masked (an 'instruction') and padding masked."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    if lengths is None:
        lengths = [max(1, length - 2 * i) for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, length - n :] = 1
    labels = ids.clone()
    labels[mask == 0] = -100
    for row in range(batch):
        start = int(mask[row].nonzero()[0])
        labels[row, start : start + max(1, lengths[row] // 3)] = -100
    ids[mask == 0] = 3
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)
