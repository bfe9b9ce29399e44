"""Load the frozen base model: a hub id or local directory through transformers
(fp32 / bf16 / 8-bit or 4-bit nf4 via bitsandbytes), or the built-in ``"tiny-bloom"``.

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


# What a bitsandbytes-quantised model computes in when no dtype is given. On a
# GPU, fp16: bitsandbytes' int8 and nf4 kernels are made for it. On a CPU,
# fp32: CPUs have no fast fp16 matmul, and bf16 is fast only on CPUs with
# bf16 instructions. Measured (prompt-tuning step, fwd+bwd, B 4, T 64, P 8,
# 1 thread, median of 5-7 alternated rounds; 8-bit layers in training mode;
# Xeon with AVX512-BF16, no AMX), step time over the fp32 model's and |loss -
# fp32 model's loss|:
#   tiny-bloom  int8+fp32 1.00x 3.0e-3   int8+bf16 0.55x 1.0e-2   int8+fp16 14.9x 2.9e-3
#   bloom-mini  int8+fp32 0.99x 2.7e-4   int8+bf16 0.49x 5.1e-4   int8+fp16 53x   2.3e-4
#   the same with oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, a CPU without bf16):
#   tiny-bloom  int8+fp32 1.08x          int8+bf16 15x
#   bloom-mini  int8+fp32 1.12x          int8+bf16 66x
# nf4 the same way (tiny-bloom, layers in eval mode): fp32 1.15x, bf16 0.73x, fp16 16x.
# fp32 adds no error beyond the int8 rounding itself and costs what the fp32
# model costs on every CPU; bf16 (pass dtype="bfloat16") halves the step where
# the CPU has bf16 instructions, at 2-3x the loss error, and is 15-66x slower
# where it has not. bench/bench_quantized.py times the default against fp32.
GPU_QUANTIZED_DTYPE = "float16"
DEFAULT_DTYPE = "float32"
# Placements that leave the choice of device to transformers / accelerate.
AUTOMATIC_PLACEMENTS = (None, "auto", "balanced", "balanced_low_0", "sequential")


def _lands_on_cpu(device_map) -> bool:
    """Whether transformers puts a quantised model loaded with ``device_map`` on the CPU only."""
    import torch

    if device_map in AUTOMATIC_PLACEMENTS:
        # bitsandbytes' quantisers pick the accelerator when there is one.
        return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    placements = device_map.values() if isinstance(device_map, dict) else [device_map]
    # An integer is an accelerator's index.
    return all(
        not isinstance(place, int) and (str(place) in ("cpu", "disk") or torch.device(place).type == "cpu")
        for place in placements
    )


def _dtype(value, name: str):
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ValueError(f"unknown {name} {value!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")


def _requested_dtype(dtype, kwargs: dict):
    """``dtype``, or transformers' older name for it, ``torch_dtype``; both only if they agree."""
    torch_dtype = _dtype(kwargs.pop("torch_dtype", None), "torch_dtype")
    dtype = _dtype(dtype, "dtype")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them (dtype)")
    return dtype if dtype is not None else torch_dtype


def _quantization(load_in_8bit: bool, load_in_4bit: bool, quantization_config, dtype):
    """The quantisation config of a load: ours for ``load_in_8bit`` / ``load_in_4bit``
    (nf4, computing in ``dtype``), or the caller's."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit are exclusive; pass one of them")
    if quantization_config is not None and (load_in_8bit or load_in_4bit):
        flag = "load_in_8bit" if load_in_8bit else "load_in_4bit"
        raise ValueError(f"{flag}=True and quantization_config both say how to quantise; pass one of them")
    if not (load_in_8bit or load_in_4bit):
        return quantization_config
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    # dtype "auto" (the checkpoint's) leaves bitsandbytes' own compute dtype.
    compute = dtype if dtype != "auto" else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def _is_bitsandbytes(quantization_config) -> bool:
    method = (
        quantization_config.get("quant_method")
        if isinstance(quantization_config, dict)
        else getattr(quantization_config, "quant_method", None)
    )
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights, on a CPU with
    AVX512-BF16, at its first forward in eval mode without gradients, for a
    faster inference kernel that has no backward; the layer keeps that format,
    so a training step after an evaluation or a ``generate`` fails ("a view of
    a leaf Variable ... in-place") or, without a bias, passes no gradient to
    the prompt. A prompt is trained through the frozen layers, so they keep
    the differentiable format: inference takes the dequantising kernel that
    training takes."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(
    name_or_path: str | os.PathLike,
    *,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map=None,
    quantization_config=None,
    **from_pretrained_kwargs,
):
    """Load a causal LM for prompt tuning, frozen and in eval mode.

    ``load_in_8bit`` quantises linear layers with bitsandbytes (``Linear8bitLt``),
    ``load_in_4bit`` to nf4 (``Linear4bit``); or pass transformers'
    ``quantization_config``. ``dtype`` (or ``torch_dtype``) is the dtype of
    everything else and what quantised layers compute in: default fp32, and
    for a bitsandbytes-quantised model fp16 on a GPU (fp32 on a CPU, where fp16
    is an order of magnitude slower). The tokenizer is attached as
    ``model.tokenizer`` when one is found next to the weights. Other keywords
    go to transformers' ``from_pretrained`` (``revision``, ``attn_implementation``,
    ``trust_remote_code``, ``local_files_only``, ...). Offline, a hub id fails
    after transformers' own retries; ``HF_HUB_OFFLINE=1`` makes that immediate.
    """
    # Imported here: the command line resolves names with this module before any heavy import.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    dtype = _requested_dtype(dtype, from_pretrained_kwargs)
    quantized = load_in_8bit or load_in_4bit or _is_bitsandbytes(quantization_config)
    if dtype is None:
        on_gpu = quantized and not _lands_on_cpu(device_map)
        dtype = _dtype(GPU_QUANTIZED_DTYPE if on_gpu else DEFAULT_DTYPE, "dtype")
    kwargs = {"dtype": dtype}
    quantization_config = _quantization(load_in_8bit, load_in_4bit, quantization_config, dtype)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
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
    _keep_4bit_layers_differentiable(model)
    if str(name_or_path) == TINY_BLOOM:
        # PEFT records this name as the adapter's base: the built-in one by its name, not its directory here.
        model.name_or_path = TINY_BLOOM
    tokenizer_kwargs = {**hub_kwargs}
    if "trust_remote_code" in from_pretrained_kwargs:
        tokenizer_kwargs["trust_remote_code"] = from_pretrained_kwargs["trust_remote_code"]
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    except (OSError, ValueError):
        model.tokenizer = None
    return model
