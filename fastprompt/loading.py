"""Load the frozen base model: a hub id or local directory through transformers
(fp32 / bf16 / 8-bit via bitsandbytes), or the built-in ``"tiny-bloom"``.

``tiny-bloom`` exists because nothing here can reach a model hub: it is a small
BLOOM with the real head_dim (128) and seeded random weights, plus a byte-level
BPE tokenizer trained locally on the bundled demo data. It is written once to a
cache directory as an ordinary HF model directory, so ``AutoModelForCausalLM``
and ``AutoTokenizer`` (and PEFT) load it like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from . import hub

TINY_BLOOM = "tiny-bloom"
# Bump when the recipe below changes: the cache key includes it, so stale
# directories are never reused.
_TINY_BLOOM_RECIPE = 1
_TINY_BLOOM_SEED = 1234
TINY_BLOOM_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    n_layer=2,
    n_head=2,  # head_dim 128, as in every released BLOOM
    layer_norm_epsilon=1e-5,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def demo_data_path() -> Path:
    """The small Chinese + English Alpaca-style dataset shipped with the package."""
    return Path(str(resources.files("fastprompt") / "resources" / "demo_alpaca.json"))


def cache_dir() -> Path:
    root = os.environ.get("FASTPROMPT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastprompt"
    )
    return Path(root)


def tiny_bloom_path() -> Path:
    """Directory holding tiny-bloom, built on first use (atomically, so concurrent
    processes such as DDP ranks never see a half-written model)."""
    target = cache_dir() / f"tiny-bloom-r{_TINY_BLOOM_RECIPE}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-bloom-", dir=target.parent))
    try:
        _write_tiny_bloom(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race; its copy is identical by construction.
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _tokenizer_corpus() -> list[str]:
    records = json.loads(demo_data_path().read_text(encoding="utf-8"))
    lines = []
    for r in records:
        lines.append(f"Human: {r['instruction']}\n{r['input']}".strip() + "\n\nAssistant: " + r["output"])
    lines.append("下面是一段人与机器人的对话。")
    return lines


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    # Byte-level: any UTF-8 text (Chinese included) is representable, no <unk>.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # BLOOM's convention; generation needs left padding
    )


def _seeded_bloom(config):
    """BLOOM with weights drawn from our own generator in a fixed parameter
    order, so the weights do not depend on transformers' init code."""
    from transformers import BloomForCausalLM

    model = BloomForCausalLM(config)
    gen = torch.Generator().manual_seed(_TINY_BLOOM_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "layernorm" in name or name.startswith("transformer.ln_f"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


def _write_tiny_bloom(directory: Path) -> None:
    from transformers import BloomConfig

    tokenizer = _train_tokenizer(TINY_BLOOM_CONFIG["vocab_size"])
    if len(tokenizer) > TINY_BLOOM_CONFIG["vocab_size"]:
        raise RuntimeError("tiny-bloom tokenizer outgrew the model vocabulary")
    model = _seeded_bloom(BloomConfig(**TINY_BLOOM_CONFIG))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of every parameter, used to check that a build is reproducible."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map the built-in name to its cache directory; anything else is passed
    through for transformers to resolve (local directory or hub id)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model name or path must be a string or path, got {type(name_or_path).__name__}")
    if str(name_or_path) == TINY_BLOOM:
        return str(tiny_bloom_path())
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    load_in_8bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map=None,
):
    """Load a causal LM for prompt tuning, frozen and in eval mode.

    ``load_in_8bit`` quantises linear layers with bitsandbytes (``Linear8bitLt``);
    ``dtype`` is the compute dtype of everything else (default fp32, or fp16 for
    8-bit as bitsandbytes expects). The tokenizer is attached as ``model.tokenizer``
    when one is found next to the weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype or torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = dtype or torch.float16
    hub_kwargs = hub.from_pretrained_kwargs(path, "config.json", "model")
    # transformers probes the id for an adapter too, with its own arguments.
    adapter_kwargs = dict(hub_kwargs) if hub_kwargs else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **hub_kwargs, adapter_kwargs=adapter_kwargs)
    except OSError as err:
        raise ValueError(f"cannot load model {str(name_or_path)!r}: {' '.join(str(err).split())}") from None
    model.requires_grad_(False)
    model.eval()
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError):
        model.tokenizer = None
    return model
