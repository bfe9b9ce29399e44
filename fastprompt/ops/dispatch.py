"""`pack_embed`: validates inputs on the host, lays the packed sequence out, then picks a backend.

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
from .reference import pack_embed_reference

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
    """The backend `pack_embed` uses for tensors on `device`: explicit `impl`, else the env var,
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


def _validate(input_ids, keep, prompts, weight, ln_weight, ln_bias) -> None:
    named = {"input_ids": input_ids, "keep": keep, "prompts": prompts, "weight": weight}
    named.update({"ln_weight": ln_weight, "ln_bias": ln_bias})
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input_ids is None or weight is None or prompts is None:
        raise TypeError("input_ids, prompts and weight are required tensors")

    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != input_ids.shape):
        raise ValueError(
            f"keep must be a bool mask shaped like input_ids {tuple(input_ids.shape)}, "
            f"got {keep.dtype} of shape {tuple(keep.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    vocab, hidden = weight.shape
    if prompts.dim() != 3 or prompts.shape[2] != hidden:
        raise ValueError(
            f"prompts must be [A, P, {hidden}] to match weight hidden size {hidden}, got shape {tuple(prompts.shape)}"
        )
    for name in ("weight", "prompts", "ln_weight", "ln_bias"):
        value = named[name]
        if value is not None and not value.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
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
        # assert that surfaces at the next synchronisation. Every id is checked, kept or not: that
        # needs no gather, and a pad id outside the table is a bug all the same.
        torch._assert_async(
            ((input_ids >= 0) & (input_ids < vocab)).all(),
            f"pack_embed: input_ids out of range (ids must be in [0, {vocab}))",
        )


def _backend(impl: str | None, device: torch.device):
    """The function computing `pack_embed_reference`'s contract on the chosen backend."""
    chosen = resolve_impl(impl, device)
    if chosen == "torch":
        return pack_embed_reference
    if chosen == "native":
        native = _native_module()
        if native is None:
            raise RuntimeError("impl 'native' requested but fastprompt.ops.native is missing or not built")
        return native.pack_embed_native
    from . import pack_embed_triton as triton_backend

    if device.type == "cpu" and not triton_backend.interpreted():
        raise RuntimeError(
            "impl 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "fastprompt.ops.pack_embed_triton is first imported"
        )
    return triton_backend.pack_embed_triton


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
    embeddings [A*P + K, H] and its ``PackLayout``.

    Semantics are those of `reference.pack_embed_reference`; `impl` picks the backend
    ("triton", "torch", "native", or None for the env var / device default). Only `prompts` is
    differentiated: a table or LayerNorm parameter that requires grad is a ValueError (`frozen.py`).
    """
    _validate(input_ids, keep, prompts, weight, ln_weight, ln_bias)
    backend = _backend(impl, weight.device)
    layout = pack_layout(keep, input_ids.shape[0], input_ids.shape[1], input_ids.device)
    return backend(input_ids, layout.token_index, prompts, weight, ln_weight, ln_bias, eps), layout
