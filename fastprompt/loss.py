"""Causal-LM loss computed only where a label exists, in bounded chunks.

PEFT computes ``lm_head`` on all B·(P+T) positions and upcasts the whole
``[B, P+T, V]`` tensor to fp32 before cross-entropy; with vocabularies of
46k-250k that tensor dominates both time and memory, although most positions
(virtual tokens, the instruction) carry label -100. Here only labelled rows go
through ``lm_head``, a chunk at a time, and the gradient w.r.t. the hidden rows
is produced in the same pass (``softmax − onehot``) so no logits chunk is kept
for backward. The reduction is PEFT's: sum over labelled rows divided by their
count (or by ``num_items_in_batch`` when the Trainer supplies it). The same
pass gives, per label, what TRL's fused LM head returns instead of a loss:
the label's log-probability (differentiable), the entropy of the distribution
that predicts it and whether it is that distribution's argmax
(``prefix_token_log_probs``, served by ``trl_head.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .eligibility import has_forward_hooks, has_placement_hook

IGNORE_INDEX = -100
# Upper bound on a live fp32 logits chunk (its log-softmax is a second one of the same size).
# Rows per chunk set the lm_head GEMMs' M: at Llama-3.2-3B's head (3072 x 128256, CPU, fp32) 130
# rows ran the forward product at 141 GFLOP/s and the gradient's at 163, 520 rows at 161 and 200;
# a method-comparison step (2 layers, 684 labels) took 12.9 s with 64 MiB chunks and 11.3 s with
# 256 MiB, alternated in one process (docs/results/CHANGELOG.md, 2026-12-07).
LOGITS_CHUNK_BYTES = 256 * 2**20


def rows_per_chunk(vocab_size: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab_size))


def _chunk_log_softmax(chunk, weight, bias, softcap):
    """(logits, log-probabilities, tanh of the capped logits or None) of one chunk of rows, in fp32."""
    logits = F.linear(chunk, weight, bias).float()
    capped = None
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    # One fused log_softmax pass (logsumexp is five kernels on CPU).
    return logits, torch.log_softmax(logits, dim=-1), capped


def _ce_grad_rows_(probs, target, capped, softcap, weight):
    """d(sum CE)/d rows of one chunk, ``(softmax − onehot) @ weight``, built in place of ``probs``."""
    probs[torch.arange(target.shape[0], device=target.device), target] -= 1.0
    if softcap:
        probs.mul_(1.0 - capped.square_())
    return probs.to(weight.dtype) @ weight


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(cap(rows_i @ weight.T + bias), targets_i) with the gradient
    w.r.t. ``rows`` computed during forward, chunk by chunk. ``weight`` is
    frozen; ``cap`` is Gemma's final-logit soft-capping ``c·tanh(z/c)`` or None."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_rows, softcap):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if rows.requires_grad else None
        for start in range(0, rows.shape[0], chunk_rows):
            span = slice(start, start + chunk_rows)
            target = targets[span]
            _, log_probs, capped = _chunk_log_softmax(rows[span], weight, bias, softcap)
            total -= log_probs.gather(1, target[:, None]).sum()
            if grad_rows is not None:
                grad_rows[span] = _ce_grad_rows_(log_probs.exp_(), target, capped, softcap, weight)
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_total.to(grad_rows.dtype), None, None, None, None, None


class _LinearTokenLogProbs(torch.autograd.Function):
    """Per row: the target's log-probability under ``cap(rows_i @ weight.T +
    bias)`` (differentiable, its gradient w.r.t. ``rows`` computed during
    forward as in ``_LinearCrossEntropySum``), the distribution's entropy and
    whether the target is its first argmax (neither differentiable)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_rows, softcap):
        count = rows.shape[0]
        token_log_probs = torch.empty(count, dtype=torch.float32, device=rows.device)
        entropy = torch.empty_like(token_log_probs)
        is_top1 = torch.empty(count, dtype=torch.bool, device=rows.device)
        grad_rows = torch.empty_like(rows) if rows.requires_grad else None
        for start in range(0, count, chunk_rows):
            span = slice(start, start + chunk_rows)
            target = targets[span]
            logits, log_probs, capped = _chunk_log_softmax(rows[span], weight, bias, softcap)
            token_log_probs[span] = log_probs.gather(1, target[:, None])[:, 0]
            is_top1[span] = log_probs.argmax(dim=-1) == target
            log_partition = logits.gather(1, target[:, None])[:, 0] - token_log_probs[span]
            probs = log_probs.exp_()
            # H = log Z − Σ p·z, without a second [rows, V] buffer.
            entropy[span] = log_partition - torch.einsum("nv,nv->n", probs, logits)
            if grad_rows is not None:
                grad_rows[span] = _ce_grad_rows_(probs, target, capped, softcap, weight)
        ctx.save_for_backward(grad_rows)
        ctx.mark_non_differentiable(entropy, is_top1)
        return token_log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_is_top1):
        (grad_rows,) = ctx.saved_tensors
        # d log p / d rows = −d CE / d rows.
        return -grad_rows * grad_log_probs[:, None].to(grad_rows.dtype), None, None, None, None, None


def _chunked_module_ce_sum(rows, lm_head, targets, chunk_rows, softcap):
    """For heads we must call as modules (quantised, hooked, trainable): each
    chunk is recomputed in backward instead of keeping its logits."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(chunk, target):
        logits = lm_head(chunk).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, target, reduction="sum")

    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        total = total + checkpoint(
            chunk_loss, rows[start : start + chunk_rows], targets[start : start + chunk_rows], use_reentrant=False
        )
    return total


def _chunked_module_token_log_probs(rows, lm_head, targets, chunk_rows, softcap):
    """``_LinearTokenLogProbs`` for heads we must call as modules, each chunk recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    def chunk_stats(chunk, target):
        logits = lm_head(chunk).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        return log_probs.gather(1, target[:, None])[:, 0], entropy.detach(), log_probs.argmax(dim=-1) == target

    spans = [slice(start, start + chunk_rows) for start in range(0, rows.shape[0], chunk_rows)]
    chunks = [checkpoint(chunk_stats, rows[span], targets[span], use_reentrant=False) for span in spans]
    if not chunks:
        empty = rows.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty.bool()
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def _is_plain_frozen_linear(module: torch.nn.Module) -> bool:
    """A head whose weight we may use directly: no quantisation, no hooks
    (accelerate's offload hooks bring the weight in only inside the call)."""
    return (
        type(module) is torch.nn.Linear
        and not module.weight.requires_grad
        and not (has_forward_hooks(module) or has_placement_hook(module))
    )


def linear_cross_entropy_sum(
    rows: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    vocab = lm_head.weight.shape[0]
    chunk = rows_per_chunk(vocab)
    if _is_plain_frozen_linear(lm_head):
        return _LinearCrossEntropySum.apply(rows, lm_head.weight, lm_head.bias, targets, chunk, softcap)
    return _chunked_module_ce_sum(rows, lm_head, targets, chunk, softcap)


def token_log_probs(
    rows: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each target, entropy, whether the target is the argmax), one per row."""
    chunk = rows_per_chunk(lm_head.weight.shape[0])
    if _is_plain_frozen_linear(lm_head):
        return _LinearTokenLogProbs.apply(rows, lm_head.weight, lm_head.bias, targets, chunk, softcap)
    return _chunked_module_token_log_probs(rows, lm_head, targets, chunk, softcap)


def _labelled_rows(prefix_last, token_hidden, labels):
    """The final states that predict a label, and those labels: first the
    last virtual token's for rows whose first token is labelled (none for a
    learned prefix, ``prefix_last`` None), then the tokens' (row-major). Also
    the two masks that select them."""
    first_labelled = labels[:, 0] != IGNORE_INDEX
    if prefix_last is None:
        first_labelled = torch.zeros_like(first_labelled)
        prefix_last = token_hidden.new_empty(1, token_hidden.shape[-1])
    next_labels = labels[:, 1:]
    labelled = next_labels != IGNORE_INDEX
    prefix_states = prefix_last.expand(labels.shape[0], -1)[first_labelled]
    rows = torch.cat([prefix_states.to(token_hidden.dtype), token_hidden[:, :-1][labelled]])
    targets = torch.cat([labels[:, 0][first_labelled], next_labels[labelled]]).to(rows.device)
    return rows, targets, first_labelled, labelled


def prefix_causal_lm_loss(
    prefix_last: torch.Tensor | None,
    token_hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    num_items_in_batch=None,
    softcap: float | None = None,
) -> torch.Tensor:
    """PEFT's loss for ``cat(prompt, tokens)`` with labels ``cat(-100·P, labels)``.

    prefix_last: [1 or B, H] final hidden state of the last virtual token (it
    predicts ``labels[:, 0]``; one row when every row has the same prompt;
    None for prefix tuning, whose virtual positions have no output, so that
    label is not predicted, as in PEFT's loss over the T tokens alone);
    token_hidden: [B, T, H]; labels: [B, T].
    """
    rows, targets, _, _ = _labelled_rows(prefix_last, token_hidden, labels)
    total = linear_cross_entropy_sum(rows, lm_head, targets, softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    # Same as PEFT (mean over zero items is NaN) when every label is masked.
    return total / targets.numel() if targets.numel() else total / 0.0


def prefix_token_log_probs(
    prefix_last: torch.Tensor | None,
    token_hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per label of ``labels`` [B, T], as ``prefix_causal_lm_loss`` reads
    them: its log-probability (differentiable), the entropy of the
    distribution that predicts it and whether it is that distribution's
    argmax, each [B, T] and zero (False) where the label is -100."""
    rows, targets, first_labelled, labelled = _labelled_rows(prefix_last, token_hidden, labels)
    first = int(first_labelled.sum())
    per_label = []
    for values in token_log_probs(rows, lm_head, targets, softcap):
        column = values.new_zeros(first_labelled.shape).masked_scatter(first_labelled, values[:first])
        rest = values.new_zeros(labelled.shape).masked_scatter(labelled, values[first:])
        per_label.append(torch.cat([column[:, None], rest], dim=1))
    return tuple(per_label)
