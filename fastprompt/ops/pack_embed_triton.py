"""Triton kernels for `pack_embed`: the packed sequence's embeddings, gather + prompts + optional
LayerNorm in one pass.

Trade-off. The unfused path (`reference.pack_embed_reference`) gathers the kept ids, writes the
gathered rows, copies them again behind the prompts with `cat`, upcasts that to fp32 for LayerNorm
and writes the result once more; its backward runs the LayerNorm backward over all A*P + K rows and
then slices the prompt part. Here the forward is one program per output row that reads its source
row (a prompt row, or `weight[ids_flat[token_index[k]]]`), normalises it in registers and writes the
output once, straight into the packed buffer.

The backward computes the prompts' gradient only: the table and the LayerNorm parameters are frozen
(`frozen.check_frozen`), so token rows cost nothing. Each prompt row appears once in the packed
sequence, so its gradient is one LayerNorm backward of its own output row: one program per prompt
row, statistics recomputed from the prompt (A*P rows: cheaper than saving them). Without LayerNorm
the gradient is the first A*P rows of grad_out, cast to the prompts' dtype, and no kernel runs.

What we give up: a whole row must fit one program (H <= 65536).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .frozen import check_frozen

# A row lives in one program's registers; past this it spills heavily (Triton's hard cap on a block
# is 2**20 elements). Wider rows would need a split reduction.
MAX_HIDDEN = 65536


@triton.jit
def _cast_rne(x, dtype: tl.constexpr):
    """Cast to `dtype` rounding to nearest-even, as torch does. GPUs round so already, but the
    interpreter truncates fp32 -> bf16; rounding the fp32 bits by hand gives the same answer on
    both, so interpreter tests check what the GPU computes."""
    x = x.to(tl.float32)
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # The carry could turn a NaN into inf; keep its top bits and make sure it stays a NaN.
        rounded = tl.where(x == x, rounded, (bits >> 16) | 0x40)
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _layer_norm_stats(x, col_mask, hidden, eps):
    """fp32 mean and reciprocal std of one row; masked lanes do not count."""
    mean = tl.sum(x, axis=0) / hidden
    centered = tl.where(col_mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / hidden
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _layer_norm_input_grad(x_hat, weighted_grad, rstd, hidden):
    """d(LN)/dx for one row given x_hat and ln_weight * grad_out (masked lanes must be 0)."""
    mean_x_hat_grad = tl.sum(x_hat * weighted_grad, axis=0) / hidden
    mean_grad = tl.sum(weighted_grad, axis=0) / hidden
    return (weighted_grad - (x_hat * mean_x_hat_grad + mean_grad)) * rstd


@triton.jit
def _pack_embed_fwd_kernel(
    ids_ptr,
    token_index_ptr,
    prompts_ptr,
    weight_ptr,
    ln_weight_ptr,
    ln_bias_ptr,
    out_ptr,
    n_prompt_rows,
    hidden,
    weight_row_stride,
    eps,
    HAS_LN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    is_prompt = row < n_prompt_rows
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden

    # Both loads are issued but one is fully masked, so only one row is read and the kernel has no
    # data-dependent branch. Masks are built as `cols < width` with a per-source width because the
    # interpreter mishandles `vector_mask & scalar_mask`.
    token_width = tl.where(is_prompt, 0, hidden)
    flat = tl.load(token_index_ptr + (row - n_prompt_rows), mask=row >= n_prompt_rows, other=0)
    token_id = tl.load(ids_ptr + flat, mask=row >= n_prompt_rows, other=0)
    token_row = tl.load(
        weight_ptr + token_id.to(tl.int64) * weight_row_stride + cols, mask=cols < token_width, other=0.0
    )
    prompt_row = tl.load(prompts_ptr + row.to(tl.int64) * hidden + cols, mask=cols < hidden - token_width, other=0.0)
    # The prompt is rounded to the embedding dtype first, exactly as the reference does.
    out_dtype = out_ptr.dtype.element_ty
    x = tl.where(is_prompt, _cast_rne(prompt_row, out_dtype), token_row).to(tl.float32)

    if HAS_LN:
        mean, rstd = _layer_norm_stats(x, col_mask, hidden, eps)
        ln_w = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * ln_w
        if HAS_BIAS:
            y += tl.load(ln_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        y = x
    tl.store(out_ptr + row.to(tl.int64) * hidden + cols, _cast_rne(y, out_dtype), mask=col_mask)


@triton.jit
def _prompt_grad_kernel(
    grad_out_ptr,
    prompts_ptr,
    ln_weight_ptr,
    grad_prompts_ptr,
    hidden,
    eps,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * hidden
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden

    grad = tl.load(grad_out_ptr + offset + cols, mask=col_mask, other=0.0).to(tl.float32)
    x = tl.load(prompts_ptr + offset + cols, mask=col_mask, other=0.0)
    x = _cast_rne(x, grad_out_ptr.dtype.element_ty).to(tl.float32)
    mean, rstd = _layer_norm_stats(x, col_mask, hidden, eps)
    x_hat = tl.where(col_mask, (x - mean) * rstd, 0.0)
    ln_w = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_prompt = _layer_norm_input_grad(x_hat, ln_w * grad, rstd, hidden)
    tl.store(grad_prompts_ptr + offset + cols, _cast_rne(grad_prompt, grad_prompts_ptr.dtype.element_ty), mask=col_mask)


def interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set as these kernels were decorated: they then run on CPU
    tensors through Triton's numpy interpreter (and cannot take CUDA tensors)."""
    return not isinstance(_pack_embed_fwd_kernel, triton.runtime.JITFunction)


def _launch_settings(hidden: int) -> tuple[int, int]:
    if hidden > MAX_HIDDEN:
        raise ValueError(f"pack_embed_triton supports hidden size <= {MAX_HIDDEN}, got {hidden}")
    block = triton.next_power_of_2(hidden)
    # Enough warps that each thread holds a handful of elements of the row.
    num_warps = max(1, min(16, block // 256))
    return block, num_warps


def pack_embed_forward(
    input_ids: torch.Tensor,
    token_index: torch.Tensor,
    prompts: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Launch the forward kernel. Returns out [A*P + K, H]."""
    hidden = weight.shape[1]
    n_prompt_rows = prompts.shape[0] * prompts.shape[1]
    block, num_warps = _launch_settings(hidden)
    n_rows = n_prompt_rows + token_index.shape[0]
    out = torch.empty(n_rows, hidden, dtype=weight.dtype, device=weight.device)
    if n_rows and hidden:
        _pack_embed_fwd_kernel[(n_rows,)](
            input_ids,
            token_index,
            prompts,
            weight,
            ln_weight,
            ln_bias,
            out,
            n_prompt_rows,
            hidden,
            weight.stride(0),
            eps,
            HAS_LN=ln_weight is not None,
            HAS_BIAS=ln_bias is not None,
            BLOCK_H=block,
            num_warps=num_warps,
        )
    return out


def pack_embed_backward(
    grad_out: torch.Tensor,
    prompts: torch.Tensor,
    ln_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The prompts' gradient [A, P, H] in their dtype, from the first A*P rows of grad_out."""
    hidden = grad_out.shape[1]
    n_prompt_rows = prompts.shape[0] * prompts.shape[1]
    prompt_grad_out = grad_out[:n_prompt_rows]
    if ln_weight is None:
        return prompt_grad_out.to(prompts.dtype, copy=True).reshape(prompts.shape)
    block, num_warps = _launch_settings(hidden)
    grad_prompts = torch.empty_like(prompts)
    if n_prompt_rows and hidden:
        _prompt_grad_kernel[(n_prompt_rows,)](
            prompt_grad_out.contiguous(),
            prompts,
            ln_weight,
            grad_prompts,
            hidden,
            eps,
            BLOCK_H=block,
            num_warps=num_warps,
        )
    return grad_prompts


class PackEmbedTriton(torch.autograd.Function):
    """Differentiable in `prompts` only; `pack_embed_triton` refuses a table or LayerNorm parameter
    that requires grad before applying it."""

    @staticmethod
    def forward(ctx, input_ids, token_index, prompts, weight, ln_weight, ln_bias, eps):
        ctx.save_for_backward(prompts, ln_weight)
        ctx.eps = eps
        return pack_embed_forward(input_ids, token_index, prompts, weight, ln_weight, ln_bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        prompts, ln_weight = ctx.saved_tensors
        return None, None, pack_embed_backward(grad_out, prompts, ln_weight, ctx.eps), None, None, None, None


def pack_embed_triton(
    input_ids: torch.Tensor,
    token_index: torch.Tensor,
    prompts: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fused `pack_embed_reference`; inputs are assumed validated (see `dispatch.pack_embed`)."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pack_embed_triton supports fp32, fp16 and bf16 weights, got {weight.dtype}")
    check_frozen(weight, ln_weight, ln_bias)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    return PackEmbedTriton.apply(
        input_ids.contiguous(),
        token_index.contiguous(),
        prompts.contiguous(),
        weight,
        None if ln_weight is None else ln_weight.contiguous(),
        None if ln_bias is None else ln_bias.contiguous(),
        float(eps),
    )
