"""Triton kernels for `embed_concat`: gather + prompt concat + optional LayerNorm in one pass.

Trade-off. The unfused path (`reference.embed_concat_reference`) writes the gathered token rows,
copies them again into the concatenated tensor, upcasts that to fp32 for LayerNorm and writes the
result once more; its backward runs the LayerNorm backward over all B*(P+T) rows and only then
slices and sums the prompt part. Here the forward is one program per output row that reads its
source row (prompt row or `weight[id]`), normalises it in registers and writes the output once,
saving only the fp32 mean/rstd per row (8 bytes) when LayerNorm is on.

The backward exploits two facts. LayerNorm's backward is linear in the incoming gradient for a
fixed input, and a prompt row is the same input for every batch item, so the prompt gradient is
one LayerNorm backward applied to the batch-sum of the output gradient: one program per prompt
row loops over the batch accumulating in fp32, so no [B, P, H] temporary exists. Token rows cost
nothing unless something upstream of them trains: with a frozen embedding and frozen LayerNorm
(prompt tuning's usual case) their kernel is not launched at all.

What we give up: a whole row must fit one program (H <= 65536), and the prompt backward has only
P programs, so for large B it is latency-bound rather than bandwidth-bound; it still reads just
B*P*H gradient elements, far less than the unfused backward moves. The embedding gradient, when
asked for, is an fp32 scatter-add with atomics (order-dependent rounding, fp32 buffer of the
embedding's size) cast back to the embedding dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

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
    ids_ptr, weight_ptr, prompt_ptr, ln_weight_ptr, ln_bias_ptr,
    out_ptr, mean_ptr, rstd_ptr,
    n_prompt, n_tokens, hidden, weight_row_stride, eps,
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
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
    token_row = tl.load(weight_ptr + token_id.to(tl.int64) * weight_row_stride + cols,
                        mask=cols < token_width, other=0.0)
    prompt_row = tl.load(prompt_ptr + pos * hidden + cols, mask=cols < hidden - token_width, other=0.0)
    # The prompt is rounded to the embedding dtype first, exactly as the reference does.
    out_dtype = out_ptr.dtype.element_ty
    x = tl.where(is_prompt, _cast_rne(prompt_row, out_dtype), token_row).to(tl.float32)

    if HAS_LN:
        mean, rstd = _layer_norm_stats(x, col_mask, hidden, eps)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
        ln_w = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * ln_w
        if HAS_BIAS:
            y += tl.load(ln_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        y = x
    tl.store(out_ptr + row.to(tl.int64) * hidden + cols, _cast_rne(y, out_dtype), mask=col_mask)


@triton.jit
def _prompt_grad_kernel(
    grad_out_ptr, prompt_ptr, ln_weight_ptr,
    grad_prompt_ptr, ln_weight_partial_ptr, ln_bias_partial_ptr,
    batch, n_prompt, n_tokens, hidden, eps,
    HAS_LN: tl.constexpr, COMPUTE_DPROMPT: tl.constexpr, COMPUTE_DLN: tl.constexpr,
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
        # Statistics are recomputed from the prompt rather than read from batch item 0's saved row:
        # the row is identical for every item, and this keeps B = 0 free of special cases.
        x = tl.load(prompt_ptr + p * hidden + cols, mask=col_mask, other=0.0)
        x = _cast_rne(x, grad_out_ptr.dtype.element_ty).to(tl.float32)
        mean, rstd = _layer_norm_stats(x, col_mask, hidden, eps)
        x_hat = tl.where(col_mask, (x - mean) * rstd, 0.0)
        if COMPUTE_DLN:
            tl.store(ln_weight_partial_ptr + p * hidden + cols, grad_sum * x_hat, mask=col_mask)
            tl.store(ln_bias_partial_ptr + p * hidden + cols, grad_sum, mask=col_mask)
        if COMPUTE_DPROMPT:
            ln_w = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            grad_prompt = _layer_norm_input_grad(x_hat, ln_w * grad_sum, rstd, hidden)
    else:
        grad_prompt = grad_sum
    if COMPUTE_DPROMPT:
        tl.store(grad_prompt_ptr + p * hidden + cols,
                 _cast_rne(grad_prompt, grad_prompt_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _token_grad_kernel(
    grad_out_ptr, ids_ptr, weight_ptr, ln_weight_ptr, mean_ptr, rstd_ptr,
    grad_weight_ptr, ln_weight_partial_ptr, ln_bias_partial_ptr,
    n_prompt, n_tokens, hidden, weight_row_stride, n_token_rows, rows_per_program,
    HAS_LN: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, COMPUTE_DLN: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    seq = n_prompt + n_tokens
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    if HAS_LN:
        ln_w = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    ln_weight_grad = tl.zeros([BLOCK_H], dtype=tl.float32)
    ln_bias_grad = tl.zeros([BLOCK_H], dtype=tl.float32)

    # Each program owns a contiguous run of token rows so LayerNorm parameter gradients are
    # accumulated in registers and written once per program, not once per row.
    for i in range(0, rows_per_program):
        token_row = pid * rows_per_program + i
        valid = token_row < n_token_rows
        row_mask = cols < tl.where(valid, hidden, 0)
        out_row = ((token_row // n_tokens) * seq + n_prompt + token_row % n_tokens).to(tl.int64)
        grad = tl.load(grad_out_ptr + out_row * hidden + cols, mask=row_mask, other=0.0)
        grad = grad.to(tl.float32)
        token_id = tl.load(ids_ptr + token_row, mask=valid, other=0).to(tl.int64)
        if HAS_LN:
            x = tl.load(weight_ptr + token_id * weight_row_stride + cols,
                        mask=row_mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + out_row, mask=valid, other=0.0)
            rstd = tl.load(rstd_ptr + out_row, mask=valid, other=0.0)
            x_hat = tl.where(col_mask, (x - mean) * rstd, 0.0)
            if COMPUTE_DLN:
                ln_weight_grad += grad * x_hat
                ln_bias_grad += grad
            if COMPUTE_DWEIGHT:
                grad_x = _layer_norm_input_grad(x_hat, ln_w * grad, rstd, hidden)
        else:
            grad_x = grad
        if COMPUTE_DWEIGHT:
            tl.atomic_add(grad_weight_ptr + token_id * hidden + cols, grad_x, mask=row_mask, sem="relaxed")

    if COMPUTE_DLN:
        partial_row = (n_prompt + pid) * hidden
        tl.store(ln_weight_partial_ptr + partial_row + cols, ln_weight_grad, mask=col_mask)
        tl.store(ln_bias_partial_ptr + partial_row + cols, ln_bias_grad, mask=col_mask)


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


# The token-gradient kernel keeps two fp32 LayerNorm-gradient accumulators
# beside the row. At 16 warps ptxas gives each thread 64 registers for them
# and spills on sm_80-sm_89 from BLOCK_H 4096 (tests/test_triton_aot_compile.py);
# 8 warps leave it room (about 128 registers, no spill).
TOKEN_GRAD_MAX_WARPS = 8


def _token_programs(n_token_rows: int, device: torch.device) -> int:
    # A few programs per SM keeps the machine busy while bounding the number of LN partial rows.
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = torch.get_num_threads()
    return max(1, min(n_token_rows, target))


def embed_concat_forward(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    prompt: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel. Returns (out [B, P+T, H], mean, rstd); stats are None without LN."""
    batch, n_tokens = input_ids.shape
    n_prompt, hidden = prompt.shape
    block, num_warps = _launch_settings(hidden)
    out = torch.empty(batch, n_prompt + n_tokens, hidden, dtype=weight.dtype, device=weight.device)
    n_rows = batch * (n_prompt + n_tokens)
    has_ln = ln_weight is not None
    mean = torch.empty(n_rows, dtype=torch.float32, device=weight.device) if has_ln else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=weight.device) if has_ln else None
    if n_rows:
        _embed_concat_fwd_kernel[(n_rows,)](
            input_ids, weight, prompt, ln_weight, ln_bias,
            out, mean, rstd,
            n_prompt, n_tokens, hidden, weight.stride(0), eps,
            HAS_LN=has_ln, HAS_BIAS=ln_bias is not None, BLOCK_H=block, num_warps=num_warps,
        )
    return out, mean, rstd


def embed_concat_backward(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    prompt: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    eps: float,
    need_weight_grad: bool,
    need_prompt_grad: bool,
    need_ln_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels. Returns (grad_weight, grad_prompt, grad_ln_weight, grad_ln_bias).

    Only what is asked for is computed; `need_ln_grad` covers both LayerNorm parameters.
    """
    grad_out = grad_out.contiguous()
    batch, n_tokens = input_ids.shape
    n_prompt, hidden = prompt.shape
    block, num_warps = _launch_settings(hidden)
    device = grad_out.device
    has_ln = ln_weight is not None
    need_ln_grad = need_ln_grad and has_ln
    n_token_rows = batch * n_tokens
    token_programs = _token_programs(n_token_rows, device) if n_token_rows else 0

    grad_prompt = torch.empty_like(prompt) if need_prompt_grad else None
    ln_weight_partial = ln_bias_partial = None
    if need_ln_grad:
        ln_weight_partial = torch.empty(n_prompt + token_programs, hidden, dtype=torch.float32, device=device)
        ln_bias_partial = torch.empty_like(ln_weight_partial)

    if n_prompt and (need_prompt_grad or need_ln_grad):
        _prompt_grad_kernel[(n_prompt,)](
            grad_out, prompt, ln_weight,
            grad_prompt, ln_weight_partial, ln_bias_partial,
            batch, n_prompt, n_tokens, hidden, eps,
            HAS_LN=has_ln, COMPUTE_DPROMPT=need_prompt_grad, COMPUTE_DLN=need_ln_grad,
            BLOCK_H=block, num_warps=num_warps,
        )

    grad_weight_fp32 = None
    if need_weight_grad:
        grad_weight_fp32 = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    if token_programs and (need_weight_grad or need_ln_grad):
        _token_grad_kernel[(token_programs,)](
            grad_out, input_ids, weight, ln_weight, mean, rstd,
            grad_weight_fp32, ln_weight_partial, ln_bias_partial,
            n_prompt, n_tokens, hidden, weight.stride(0), n_token_rows,
            triton.cdiv(n_token_rows, token_programs),
            HAS_LN=has_ln, COMPUTE_DWEIGHT=need_weight_grad, COMPUTE_DLN=need_ln_grad,
            BLOCK_H=block, num_warps=min(num_warps, TOKEN_GRAD_MAX_WARPS),
        )

    grad_weight = None if grad_weight_fp32 is None else grad_weight_fp32.to(weight.dtype)
    grad_ln_weight = grad_ln_bias = None
    if need_ln_grad:
        grad_ln_weight = ln_weight_partial.sum(0).to(ln_weight.dtype)
        if ln_bias is not None:
            grad_ln_bias = ln_bias_partial.sum(0).to(ln_bias.dtype)
    return grad_weight, grad_prompt, grad_ln_weight, grad_ln_bias


class EmbedConcatTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, prompt, ln_weight, ln_bias, eps):
        out, mean, rstd = embed_concat_forward(input_ids, weight, prompt, ln_weight, ln_bias, eps)
        ctx.save_for_backward(input_ids, weight, prompt, ln_weight, ln_bias, mean, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input_ids, weight, prompt, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
        _, need_weight, need_prompt, need_ln_weight, need_ln_bias, _ = ctx.needs_input_grad
        grad_weight, grad_prompt, grad_ln_weight, grad_ln_bias = embed_concat_backward(
            grad_out, input_ids, weight, prompt, ln_weight, ln_bias, mean, rstd, ctx.eps,
            need_weight_grad=need_weight,
            need_prompt_grad=need_prompt,
            need_ln_grad=need_ln_weight or need_ln_bias,
        )
        return (
            None,
            grad_weight,
            grad_prompt,
            grad_ln_weight if need_ln_weight else None,
            grad_ln_bias if need_ln_bias else None,
            None,
        )


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
