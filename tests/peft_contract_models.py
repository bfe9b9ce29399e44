"""Helpers for ``test_peft_contract.py``: the tiny local models, the two
implementations under test, and the reference semantics the generation cases
are checked against.

The models play the part of PEFT's ``peft-internal-testing/tiny-random-*``
checkpoints (nothing here can reach a hub): each is built from a config with
seeded weights, written once per session with ``save_pretrained`` next to a
BLOOM tokenizer (the built-in ``tiny-bloom`` one, vocab 2048), and every test
gets its own copy of ``AutoModelForCausalLM.from_pretrained(model_id)`` as
PEFT's tests do (loaded once per session, then copied), so ``_name_or_path``
and the tokenizer path are real.

Weights: the input and output embeddings are untied and every matrix is drawn
at a scale that keeps the residual stream from simply copying the last token.
With transformers' default init (std 0.02, tied embeddings) a 2-layer BLOOM
greedily repeats its last input token forever, which would hide exactly the
generation bugs (prompt re-inserted at each step) these tests must catch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from model_cache import built_once

VOCAB = 2048  # == the tiny-bloom tokenizer's vocabulary
NUM_VIRTUAL_TOKENS = 10  # PEFT's ALL_CONFIGS entry for PromptTuningConfig
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)

# Same inputs as PEFT's TestDecoderModels.prepare_inputs_for_testing (a masked-out hole in row 1).
INPUT_IDS = [[1, 1, 1], [1, 2, 1]]
ATTENTION_MASK = [[1, 1, 1], [1, 0, 1]]


def _bloom_config(hidden, heads):
    from transformers import BloomConfig

    return BloomConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        n_layer=2,
        n_head=heads,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **SPECIAL,
    )


def _opt_config():
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **SPECIAL,
    )


# kind -> (config factory, model class name). head size 8, head size 128, and one non-BLOOM model.
MODEL_KINDS = {
    "bloom-h8": (lambda: _bloom_config(32, 4), "BloomForCausalLM"),
    "bloom-h128": (lambda: _bloom_config(256, 2), "BloomForCausalLM"),
    "opt": (_opt_config, "OPTForCausalLM"),
}


def _seed_weights(model) -> None:
    """Weights from a generator seeded per parameter name (independent of
    transformers' init code and of the global RNG)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if "layernorm" in name or "layer_norm" in name or "ln_f" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() == 1:  # biases
                param.normal_(0.0, 0.02, generator=gen)
            elif "lm_head" in name:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=gen)  # logits of std ~1
            elif param.shape[0] == VOCAB or "embed_positions" in name:
                param.normal_(0.0, 1.0, generator=gen)  # input embeddings
            else:
                param.normal_(0.0, 1.1 * param.shape[1] ** -0.5, generator=gen)


def tokenizer_source() -> str:
    from fastprompt.loading import resolve_model_path

    return resolve_model_path("tiny-bloom")


def build_tiny_models(root: Path) -> dict[str, str]:
    """Write every tiny model (weights, config, generation config, tokenizer)
    under ``root``; returns kind -> directory (the tests' ``model_id``)."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
    assert len(tokenizer) <= VOCAB, "the models' vocabulary must cover the tokenizer"
    out = {}
    for kind, (make_config, class_name) in MODEL_KINDS.items():
        directory = root / kind
        model = getattr(transformers, class_name)(make_config())
        _seed_weights(model)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[kind] = str(directory)
    return out


@built_once(seeds=False)
def load_base(model_id: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(model_id)`` as PEFT's tests call it (loaded once per
    session and copied: ``_name_or_path`` and the rest are the loaded model's)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_id, **kwargs)


def prompt_config(**kwargs):
    from peft import PromptTuningConfig

    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("num_virtual_tokens", NUM_VIRTUAL_TOKENS)
    return PromptTuningConfig(**kwargs)


def inputs():
    return {"input_ids": torch.tensor(INPUT_IDS), "attention_mask": torch.tensor(ATTENTION_MASK)}


# --------------------------------------------------------------- implementations
@dataclass(frozen=True)
class Impl:
    name: str
    get_peft_model: Callable
    from_pretrained: Callable  # (model, model_id, **kwargs) -> PeftModel
    model_cls: type  # what both entry points must return


def implementation(name: str) -> Impl:
    if name == "peft":
        import peft

        return Impl("peft", peft.get_peft_model, peft.PeftModel.from_pretrained, peft.PeftModelForCausalLM)
    if name == "fastprompt":
        import fastprompt

        cls = fastprompt.FastPromptModel
        return Impl("fastprompt", fastprompt.get_peft_model, cls.from_pretrained, cls)
    raise ValueError(name)


# ------------------------------------------------------------ reference semantics
def prompt_matrix(model, adapter: str = "default") -> torch.Tensor:
    """The soft prompt, [P, H], where PEFT keeps it."""
    return model.prompt_encoder[adapter].embedding.weight


def reference_logits(model, input_ids, attention_mask=None, adapter: str = "default", prompt=None):
    """PEFT's prompt-tuning forward, computed on the frozen base model alone:
    ``base(inputs_embeds=cat(prompt, embed(ids)), attention_mask=cat(ones, mask))``.
    Logits cover the virtual tokens too: [B, P + T, V]."""
    base = model.get_base_model()
    if prompt is None:
        prompt = prompt_matrix(model, adapter)
    embeds = base.get_input_embeddings()(input_ids)
    batch = embeds.shape[0]
    embeds = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    if attention_mask is not None:
        ones = attention_mask.new_ones(batch, prompt.shape[0])
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    return base(inputs_embeds=embeds, attention_mask=attention_mask).logits


def check_greedy_generation(model, output, input_ids, attention_mask, new_tokens, tol, adapter="default"):
    """``output`` (what ``generate`` returned) is greedy decoding behind the
    soft prompt: the input ids followed by ``new_tokens`` tokens, each the argmax
    of the full-recompute logits of everything before it (the greedy loop
    ``model(ids_so_far, mask_so_far).logits[:, -1].argmax(-1)``, teacher-forced
    along ``output`` so one forward checks every step). A token within ``tol``
    of the maximum counts as a tie. After EOS a row holds only padding."""
    batch, length = input_ids.shape
    assert output.shape == (batch, length + new_tokens), f"generate returned shape {tuple(output.shape)}"
    assert torch.equal(output[:, :length], input_ids), "generate must return the input ids first"
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    full_mask = torch.cat([mask, mask.new_ones(batch, new_tokens)], dim=1)
    with torch.no_grad():
        logits = reference_logits(model, output[:, :-1], full_mask[:, :-1], adapter=adapter).float()
    count = prompt_matrix(model, adapter).shape[0]
    logits = logits[:, count + length - 1 :]  # [B, new, V]: the distribution of each new token
    assert_greedy_tokens(output, length, logits, model.get_base_model().generation_config, tol)


def assert_greedy_tokens(output, length: int, logits, config, tol) -> None:
    """Each new token of ``output`` (after its first ``length``) within ``tol``
    of the argmax of its distribution, ``logits`` [B, new, V]; after EOS a row
    holds only padding (``config``: the generation config)."""
    batch, new_tokens = logits.shape[:2]
    for row in range(batch):
        finished = False
        for step in range(new_tokens):
            token = int(output[row, length + step])
            if finished:
                assert token == config.pad_token_id, f"row {row}: token {token} after EOS"
                continue
            best = int(logits[row, step].argmax())
            gap = float(logits[row, step, best] - logits[row, step, token])
            assert gap <= tol, (
                f"row {row}, new token {step}: generated {token} but the full-recompute argmax is {best} "
                f"(logit gap {gap:.4g}); generated {output[row, length:].tolist()}"
            )
            finished = token == config.eos_token_id


def regression_fill(model) -> None:
    """Deterministic, name-derived values for every trainable parameter (PEFT
    tests/regression/test_state_dict.py::fill_trainable_params, for a model
    without tuner buffers)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
                values = torch.rand(param.shape, generator=gen, dtype=torch.float32) * 0.2 - 0.1
                param.copy_(values.to(param.dtype))
