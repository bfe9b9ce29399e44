"""`embed_concat`: validates inputs on the host, then picks a backend.

Backends: "triton" (fused kernels, CUDA), "native" (C++/CUDA extension from `fastprompt.ops.native`,
written elsewhere and possibly absent), "torch" (the unfused reference). Without an explicit choice,
CUDA tensors go to Triton and CPU tensors to native when it is built, else torch. Triton is never
chosen for CPU tensors on its own: there it only runs under the slow TRITON_INTERPRET=1 interpreter,
which is for tests, so reaching it takes `impl="triton"` or FASTPROMPT_EMBED_IMPL=triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .frozen import check_frozen
from .packing import PackLayout, pack_layout
from .reference import embed_concat_reference, pack_embed_reference

IMPL_ENV_VAR = "FASTPROMPT_EMBED_IMPL"
IMPLS = ("triton", "torch", "native")


def _native_status():
    """(module, None) when the native backend is usable, else (None, why not)."""
    try:
        native = importlib.import_module("fastprompt.ops.native")
    except ImportError as exc:
        return None, f"fastprompt.ops.native does not import: {exc}"
    if native.available():
        return native, None
    # load_error() is an optional extra of the native contract; available() is the required part.
    load_error = getattr(native, "load_error", None)
    return None, load_error() if load_error else "fastprompt.ops.native.available() is False"


def _native_module():
    return _native_status()[0]


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _default_impl(device_type: str) -> str:
    if device_type == "cuda":
        return "triton" if _triton_importable() else "torch"
    return "native" if _native_module() is not None else "torch"


def resolve_impl(impl: str | None, device: torch.device | str) -> str:
    """The backend `embed_concat` uses for tensors on `device`: explicit `impl`, else the env var,
    else the device default."""
    if impl is None:
        forced = os.environ.get(IMPL_ENV_VAR, "").strip()
        if forced:
            if forced not in IMPLS:
                raise ValueError(f"{IMPL_ENV_VAR}={forced!r} is not one of {IMPLS}")
            return forced
        return _default_impl(torch.device(device).type)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS} or None")
    return impl


def backend_info() -> dict:
    """Which backend impl=None picks for CPU and CUDA tensors, and what is installed."""
    native, native_reason = _native_status()
    return {
        "cpu": resolve_impl(None, "cpu"),
        "cuda": resolve_impl(None, "cuda"),
        "forced_by_env": os.environ.get(IMPL_ENV_VAR) or None,
        "triton_available": _triton_importable(),
        "native_available": native is not None,
        "native_unavailable_reason": native_reason,
        "cuda_device_present": torch.cuda.is_available(),
    }


def _validate(input_ids, weight, prompt, ln_weight, ln_bias) -> None:
    named = {"input_ids": input_ids, "weight": weight, "prompt": prompt}
    named.update({"ln_weight": ln_weight, "ln_bias": ln_bias})
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input_ids is None or weight is None or prompt is None:
        raise TypeError("input_ids, weight and prompt are required tensors")

    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    vocab, hidden = weight.shape
    if prompt.dim() != 2 or prompt.shape[1] != hidden:
        raise ValueError(
            f"prompt must be [P, {hidden}] to match weight hidden size {hidden}, got shape {tuple(prompt.shape)}"
        )
    if ln_bias is not None and ln_weight is None:
        raise ValueError("ln_bias given without ln_weight; LayerNorm is applied only with ln_weight")
    for name, value in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if value is not None and tuple(value.shape) != (hidden,):
            raise ValueError(f"{name} must have shape ({hidden},), got {tuple(value.shape)}")
    check_frozen(weight, ln_weight, ln_bias)
    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if input_ids.numel():
        # An out-of-range id inside a kernel is a silent garbage read (Triton). Checked on the device
        # without reading its answer back: this op runs in every training step and decode step, where
        # a host sync would stall the GPU. On CPU the assert raises at once; on CUDA it is a device
        # assert that surfaces at the next synchronisation.
        torch._assert_async(
            ((input_ids >= 0) & (input_ids < vocab)).all(),
            f"embed_concat: input_ids out of range (ids must be in [0, {vocab}))",
        )


def embed_concat(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    prompt: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    impl: str | None = None,
) -> torch.Tensor:
    """`[prompt; weight[input_ids]]` per batch item, optionally LayerNorm'ed: [B, P+T, H].

    Semantics are those of `reference.embed_concat_reference`; `impl` picks the backend
    ("triton", "torch", "native", or None for the env var / device default). Only `prompt` is
    differentiated: a table or LayerNorm parameter that requires grad is a ValueError (`frozen.py`).
    """
    _validate(input_ids, weight, prompt, ln_weight, ln_bias)
    chosen = resolve_impl(impl, weight.device)
    if chosen == "torch":
        return embed_concat_reference(input_ids, weight, prompt, ln_weight, ln_bias, eps)
    if chosen == "native":
        native = _native_module()
        if native is None:
            raise RuntimeError("impl 'native' requested but fastprompt.ops.native is missing or not built")
        return native.embed_concat_native(input_ids, weight, prompt, ln_weight, ln_bias, eps)
    from . import embed_concat_triton as triton_backend

    if weight.device.type == "cpu" and not triton_backend.interpreted():
        raise RuntimeError(
            "impl 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "fastprompt.ops.embed_concat_triton is first imported"
        )
    return triton_backend.embed_concat_triton(input_ids, weight, prompt, ln_weight, ln_bias, eps)


def pack_embed(
    input_ids: torch.Tensor,
    keep: torch.Tensor | None,
    prompts: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    impl: str | None = None,
) -> tuple[torch.Tensor, PackLayout]:
    """The packed sequence of a padded batch: input_ids [B, T], ``keep`` [B, T]
    (the positions to keep; None: all), prompts [A, P, H]. Returns its
    embeddings [A*P + K, H] (``pack_embed_reference``) and its ``PackLayout``."""
    layout = pack_layout(keep, input_ids.shape[0], input_ids.shape[1], input_ids.device)
    return pack_embed_reference(input_ids, layout.token_index, prompts, weight, ln_weight, ln_bias, eps), layout
