"""Load the frozen base model: a hub id or local directory through transformers
(fp32 / bf16 / 8-bit via bitsandbytes), or the built-in ``"tiny-bloom"``.

``tiny-bloom`` exists because nothing here can reach a model hub: a small BLOOM
with the real head_dim (128), pre-trained on the bundled demo data by
``fastprompt/app/tiny_bloom.py``, shipped in the package as an ordinary HF model
directory, so ``AutoModelForCausalLM`` and ``AutoTokenizer`` (and PEFT) load it
like any other checkpoint.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TINY_BLOOM = "tiny-bloom"


def _resource(name: str) -> Path:
    return Path(str(resources.files("fastprompt") / "resources" / name))


def demo_data_path() -> Path:
    """The small Chinese + English Alpaca-style dataset shipped with the package."""
    return _resource("demo_alpaca.json")


def tiny_bloom_path() -> Path:
    """Directory of the built-in tiny-bloom (config, weights, tokenizer)."""
    return _resource(TINY_BLOOM)


def names_a_directory(name_or_path) -> bool:
    """A filesystem path rather than a hub id ("org/name"): a missing one is
    reported as missing, never looked up on the hub."""
    name = str(name_or_path)
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map the built-in name to its directory in the package; anything else is passed
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
    **from_pretrained_kwargs,
):
    """Load a causal LM for prompt tuning, frozen and in eval mode.

    ``load_in_8bit`` quantises linear layers with bitsandbytes (``Linear8bitLt``);
    ``dtype`` is the compute dtype of everything else (default fp32, or fp16 for
    8-bit as bitsandbytes expects). The tokenizer is attached as ``model.tokenizer``
    when one is found next to the weights. Other keywords go to transformers'
    ``from_pretrained`` (``revision``, ``local_files_only``, ...). Offline, a hub
    id fails after transformers' own retries; ``HF_HUB_OFFLINE=1`` makes that immediate.
    """
    # Imported here: the command line resolves names with this module before any heavy import.
    import torch
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
    hub_kwargs = {
        k: from_pretrained_kwargs[k] for k in ("local_files_only", "revision", "token") if k in from_pretrained_kwargs
    }
    # transformers probes the id for an adapter too, with its own arguments.
    adapter_kwargs = dict(hub_kwargs) if hub_kwargs else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, **kwargs, **from_pretrained_kwargs, adapter_kwargs=adapter_kwargs
        )
    except OSError as err:
        raise ValueError(f"cannot load model {str(name_or_path)!r}: {' '.join(str(err).split())}") from None
    model.requires_grad_(False)
    model.eval()
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError):
        model.tokenizer = None
    return model
