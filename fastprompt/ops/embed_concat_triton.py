"""Triton kernels for `embed_concat`: gather + prompt concat + optional LayerNorm in one pass.

Trade-off. The unfused path (`reference.embed_concat_reference`) writes the gathered token rows,
copies them again into the concatenated tensor, upcasts that to fp32 for LayerNorm and writes the
result once more; its backward runs the LayerNorm backward over all B*(P+T) rows and only then
slices and sums the prompt part. Here the forward is one program per output row that reads its
source row (prompt row or `weight[id]`), normalises it in registers and writes the output once.

The backward computes the prompt's gradient only: the table and the LayerNorm parameters are
frozen (`frozen.check_frozen`), so token rows cost nothing. It exploits two facts. LayerNorm's
backward is linear in the incoming gradient for a fixed input, and a prompt row is the same input
for every batch item, so the prompt gradient is one LayerNorm backward applied to the batch-sum of
the output gradient: one program per prompt row loops over the batch accumulating in fp32, so no
[B, P, H] temporary exists.

What we give up: a whole row must fit one program (H <= 65536), and the prompt backward has only
P programs, so for large B it is latency-bound rather than bandwidth-bound; it still reads just
B*P*H gradient elements, far less than the unfused backward moves.
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
def _embed_concat_fwd_kernel(
    ids_ptr,
    weight_ptr,
    prompt_ptr,
    ln_weight_ptr,
    ln_bias_ptr,
    out_ptr,
    n_prompt,
    n_tokens,
    hidden,
    weight_row_stride,
    eps,
    HAS_LN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    seq = n_prompt + n_tokens
    batch_idx = row // seq
    pos = row % seq
    is_prompt = pos < n_prompt
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden

    # Both loads are issued but one is fully masked, so only one row is read and the kernel has no
    # data-dependent branch. Masks are built as `cols < width` with a per-source width because the
    # interpreter mishandles `vector_mask & scalar_mask`.
    token_width = tl.where(is_prompt, 0, hidden)
    token_id = tl.load(ids_ptr + batch_idx * n_tokens + (pos - n_prompt), mask=pos >= n_prompt, other=0)
    token_row = tl.load(
        weight_ptr + token_id.to(tl.int64) * weight_row_stride + cols, mask=cols < token_width, other=0.0
    )
    prompt_row = tl.load(prompt_ptr + pos * hidden + cols, mask=cols < hidden - token_width, other=0.0)
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
    prompt_ptr,
    ln_weight_ptr,
    grad_prompt_ptr,
    batch,
    n_prompt,
    n_tokens,
    hidden,
    eps,
    HAS_LN: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    p = tl.program_id(0)
    seq = n_prompt + n_tokens
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden

    grad_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    for b in range(0, batch):
        offset = (b * seq + p).to(tl.int64) * hidden
        grad_sum += tl.load(grad_out_ptr + offset + cols, mask=col_mask, other=0.0).to(tl.float32)

    if HAS_LN:
        # Statistics are recomputed from the prompt: the forward saves none, the row is identical
        # for every item, and this keeps B = 0 free of special cases.
        x = tl.load(prompt_ptr + p * hidden + cols, mask=col_mask, other=0.0)
        x = _cast_rne(x, grad_out_ptr.dtype.element_ty).to(tl.float32)
        mean, rstd = _layer_norm_stats(x, col_mask, hidden, eps)
        x_hat = tl.where(col_mask, (x - mean) * rstd, 0.0)
        ln_w = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        grad_prompt = _layer_norm_input_grad(x_hat, ln_w * grad_sum, rstd, hidden)
    else:
        grad_prompt = grad_sum
    tl.store(
        grad_prompt_ptr + p * hidden + cols, _cast_rne(grad_prompt, grad_prompt_ptr.dtype.element_ty), mask=col_mask
    )


def interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set as these kernels were decorated: they then run on CPU
    tensors through Triton's numpy interpreter (and cannot take CUDA tensors)."""
    return not isinstance(_embed_concat_fwd_kernel, triton.runtime.JITFunction)


def _launch_settings(hidden: int) -> tuple[int, int]:
    if hidden > MAX_HIDDEN:
        raise ValueError(f"embed_concat_triton supports hidden size <= {MAX_HIDDEN}, got {hidden}")
    block = triton.next_power_of_2(hidden)
    # Enough warps that each thread holds a handful of elements of the row.
    num_warps = max(1, min(16, block // 256))
    return block, num_warps


def embed_concat_forward(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    prompt: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Launch the forward kernel. Returns out [B, P+T, H]."""
    batch, n_tokens = input_ids.shape
    n_prompt, hidden = prompt.shape
    block, num_warps = _launch_settings(hidden)
    out = torch.empty(batch, n_prompt + n_tokens, hidden, dtype=weight.dtype, device=weight.device)
    n_rows = batch * (n_prompt + n_tokens)
    if n_rows:
        _embed_concat_fwd_kernel[(n_rows,)](
            input_ids,
            weight,
            prompt,
            ln_weight,
            ln_bias,
            out,
            n_prompt,
            n_tokens,
            hidden,
            weight.stride(0),
            eps,
            HAS_LN=ln_weight is not None,
            HAS_BIAS=ln_bias is not None,
            BLOCK_H=block,
            num_warps=num_warps,
        )
    return out


def embed_concat_backward(
    grad_out: torch.Tensor,
    prompt: torch.Tensor,
    ln_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Launch the prompt-gradient kernel. Returns grad_prompt [P, H] in prompt's dtype."""
    grad_out = grad_out.contiguous()
    batch, rows_per_item, _ = grad_out.shape
    n_prompt, hidden = prompt.shape
    block, num_warps = _launch_settings(hidden)
    grad_prompt = torch.empty_like(prompt)
    if n_prompt:
        _prompt_grad_kernel[(n_prompt,)](
            grad_out,
            prompt,
            ln_weight,
            grad_prompt,
            batch,
            n_prompt,
            rows_per_item - n_prompt,
            hidden,
            eps,
            HAS_LN=ln_weight is not None,
            BLOCK_H=block,
            num_warps=num_warps,
        )
    return grad_prompt


class EmbedConcatTriton(torch.autograd.Function):
    """Differentiable in `prompt` only; `embed_concat_triton` refuses a table or LayerNorm parameter
    that requires grad before applying it."""

    @staticmethod
    def forward(ctx, input_ids, weight, prompt, ln_weight, ln_bias, eps):
        ctx.save_for_backward(prompt, ln_weight)
        ctx.eps = eps
        return embed_concat_forward(input_ids, weight, prompt, ln_weight, ln_bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        prompt, ln_weight = ctx.saved_tensors
        return None, None, embed_concat_backward(grad_out, prompt, ln_weight, ctx.eps), None, None, None


def embed_concat_triton(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    prompt: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fused `embed_concat_reference`; inputs are assumed validated (see `dispatch.embed_concat`)."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"embed_concat_triton supports fp32, fp16 and bf16 weights, got {weight.dtype}")
    check_frozen(weight, ln_weight, ln_bias)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    return EmbedConcatTriton.apply(
        input_ids.contiguous(),
        weight,
        prompt.contiguous(),
        None if ln_weight is None else ln_weight.contiguous(),
        None if ln_bias is None else ln_bias.contiguous(),
        float(eps),
    )
