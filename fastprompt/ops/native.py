"""Native (C++/OpenMP, optionally CUDA) backend of the packer, ``pack_embed``.

The kernels live in ``kernels/`` and are built by ``make native`` into
``fastprompt/_native/libfastprompt_native.so`` as torch custom ops
(``torch.ops.fastprompt.pack_embed_fwd`` / ``pack_embed_bwd``), not as a
pybind module: the dispatcher then handles devices, and ``torch.compile`` can
trace through them once the fake kernels below describe their outputs.

Building is optional. ``available()`` loads the library at most once and
reports ``False`` (never raises) when it is missing or unusable;
``load_error()`` says why, for the dispatcher's report. Call ``available()``
once eagerly before ``torch.compile`` traces ``pack_embed_native`` (the
dispatcher does): the load itself is file-system work dynamo cannot trace.

Autograd is ``torch.library.register_autograd`` on the forward op, so eager
and compiled code share one backward. It differentiates the prompts only:
``pack_embed_native`` refuses a table or LayerNorm parameter that requires
grad (``frozen.py``) before the op runs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .frozen import check_frozen

LIBRARY_PATH = Path(__file__).resolve().parent.parent / "_native" / "libfastprompt_native.so"


def available() -> bool:
    """True when the native library is built and its ops are registered."""
    return _load() is None


def load_error() -> str | None:
    """Why the native backend is unavailable, or None when it is available."""
    return _load()


def pack_embed_native(
    input_ids: torch.Tensor,
    token_index: torch.Tensor,
    prompts: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Same contract as ``fastprompt.ops.reference.pack_embed_reference``."""
    if not available():
        raise RuntimeError(f"fastprompt native backend unavailable: {load_error()}")
    check_frozen(weight, ln_weight, ln_bias)
    if ln_weight is None:
        # The reference applies no LayerNorm, hence no bias, without ln_weight.
        ln_bias = None
    out, _mean, _rstd = torch.ops.fastprompt.pack_embed_fwd(
        input_ids, token_index, prompts, weight, ln_weight, ln_bias, float(eps)
    )
    return out


_NOT_TRIED = "not tried yet"
# Outcome of the one load attempt: None (loaded) or why not. A plain global
# rather than functools.cache, so that torch.compile traces `available()` as
# a guarded constant instead of breaking the graph on the file-system check.
_load_outcome: str | None = _NOT_TRIED
_load_lock = threading.Lock()


def _load() -> str | None:
    global _load_outcome
    if _load_outcome is not _NOT_TRIED:
        return _load_outcome
    with _load_lock:
        if _load_outcome is _NOT_TRIED:
            _load_outcome = _try_load(LIBRARY_PATH)
    return _load_outcome


def _try_load(path: Path) -> str | None:
    if not path.exists():
        return f"{path} is not built (run `make native`)"
    try:
        torch.ops.load_library(str(path))
        _register_python_side()
    except Exception as exc:  # a broken build must degrade to "unavailable", whatever the cause
        return f"loading {path} failed: {type(exc).__name__}: {exc}"
    return None


def _stats_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _fake_forward(input_ids, token_index, prompts, weight, ln_weight, ln_bias, eps):
    prompt_rows = prompts.shape[0] * prompts.shape[1]
    out = weight.new_empty((prompt_rows + token_index.shape[0], weight.shape[1]))
    stats_shape = (prompt_rows,) if ln_weight is not None else (0,)
    stats_dtype = _stats_dtype(weight.dtype)
    return out, weight.new_empty(stats_shape, dtype=stats_dtype), weight.new_empty(stats_shape, dtype=stats_dtype)


def _fake_backward(grad_out, prompts, ln_weight, mean, rstd):
    return prompts.new_empty(prompts.shape)


def _setup_context(ctx, inputs, output):
    _input_ids, _token_index, prompts, _weight, ln_weight, _ln_bias, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(prompts, ln_weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    prompts, ln_weight, mean, rstd = ctx.saved_tensors
    grad_prompts = torch.ops.fastprompt.pack_embed_bwd(grad_out, prompts, ln_weight, mean, rstd)
    return None, None, grad_prompts, None, None, None, None


def _register_python_side() -> None:
    torch.library.register_fake("fastprompt::pack_embed_fwd", _fake_forward)
    torch.library.register_fake("fastprompt::pack_embed_bwd", _fake_backward)
    torch.library.register_autograd("fastprompt::pack_embed_fwd", _backward, setup_context=_setup_context)
