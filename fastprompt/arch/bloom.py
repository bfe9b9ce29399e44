"""BLOOM's decoder, driven with a shared soft-prompt prefix.

We call BLOOM's own modules (layer norms, ``query_key_value``, ``dense``, MLP —
so 8-bit ``Linear8bitLt`` layers work unchanged) but run attention ourselves,
because the prefix must be attended *without* being copied per row: its keys
and values have batch size 1 and the real tokens' queries of every row are
folded into one matrix product against them. Its gradient is then one GEMM
reduced over the batch, not B copies summed afterwards.

Why this is exact: in a causal LM the prefix attends only to itself, and
BLOOM's ALiBi bias comes from the attention-mask cumsum, so the prefix's
hidden states and K/V are identical for every row and every request.

Internal K/V layout is ``[heads, batch, seq, head_dim]``: viewed as
``[heads, batch*seq, d]`` it multiplies a shared segment in one bmm, viewed as
``[heads*batch, seq, d]`` it does the per-row attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes



@dataclass
class KVSegment:
    """Keys/values of earlier positions for one layer. ``shared`` segments have
    batch 1 and are seen by every row (the soft prompt)."""

    key: torch.Tensor  # [heads, batch or 1, seq, head_dim]
    value: torch.Tensor
    shared: bool

    @property
    def length(self) -> int:
        return self.key.shape[2]


def alibi_bias(key_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi as BLOOM builds it (from the mask cumsum), laid out [heads, B, 1, K]."""
    slopes = _get_alibi_slopes(num_heads, key_mask.device)
    positions = (key_mask.cumsum(dim=-1) - 1) * key_mask
    return (slopes[:, None, None, None] * positions[None, :, None, :].float()).to(dtype)


def allowed_keys(key_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Boolean [1, B, T, K]: padding keys hidden, and causal order among the
    last ``query_len`` keys (the queries themselves)."""
    key_len = key_mask.shape[1]
    past_len = key_len - query_len
    q_pos = torch.arange(query_len, device=key_mask.device)[:, None] + past_len
    k_pos = torch.arange(key_len, device=key_mask.device)[None, :]
    causal = k_pos <= q_pos
    return (causal[None] & key_mask.bool()[:, None, :])[None]


class BloomDecoder:
    """Runs ``model.transformer``'s blocks from post-embedding hidden states."""

    def __init__(self, model):
        self.model = model
        self.transformer = model.transformer
        config = model.config
        if config.pretraining_tp > 1 and config.slow_but_exact:
            raise ValueError("BLOOM with slow_but_exact tensor-parallel emulation is not supported")
        self.num_heads = config.n_head
        self.head_dim = config.hidden_size // config.n_head

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.transformer.word_embeddings

    @property
    def embedding_layernorm(self) -> torch.nn.LayerNorm:
        return self.transformer.word_embeddings_layernorm

    def forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor,
        past: list[list[KVSegment]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """hidden: [B, T, H] after the embedding LayerNorm; key_mask: [B, K] over
        all keys (past segments then the T queries). Returns ``ln_f`` output and
        each layer's new (key, value) for the T positions."""
        batch, query_len, _ = hidden.shape
        alibi = alibi_bias(key_mask, self.num_heads, hidden.dtype)
        allowed = allowed_keys(key_mask, query_len)
        may_checkpoint = self.model.training and torch.is_grad_enabled()
        new_kv = []
        for index, block in enumerate(self.transformer.h):
            segments = past[index] if past is not None else []
            # transformers marks each block (it may skip some: every_n_layers).
            if may_checkpoint and getattr(block, "gradient_checkpointing", False):
                hidden, key, value = checkpoint(
                    self._block, block, hidden, alibi, allowed, segments, use_reentrant=False
                )
            else:
                hidden, key, value = self._block(block, hidden, alibi, allowed, segments)
            new_kv.append((key, value))
        return self.transformer.ln_f(hidden), new_kv

    def _block(self, block, hidden, alibi, allowed, segments):
        normed = block.input_layernorm(hidden)
        residual = normed if block.apply_residual_connection_post_layernorm else hidden
        attn = block.self_attention
        context, key, value = self._attention(attn, normed, alibi, allowed, segments)
        attn_out = attn.dense(context)
        attn_out = residual + F.dropout(attn_out, attn.hidden_dropout, attn.training)
        normed = block.post_attention_layernorm(attn_out)
        residual = normed if block.apply_residual_connection_post_layernorm else attn_out
        return block.mlp(normed, residual), key, value

    def _attention(self, attn, normed, alibi, allowed, segments):
        batch, query_len, hidden_size = normed.shape
        heads, dim = self.num_heads, self.head_dim
        fused = attn.query_key_value(normed).view(batch, query_len, heads, 3, dim)
        # -> [heads, B, T, d] each: the layout both bmm views below need.
        query, key, value = (fused[..., i, :].permute(2, 0, 1, 3).contiguous() for i in range(3))

        scores = []
        for seg in segments:
            scores.append(self._scores(query, seg.key, seg.shared))
        scores.append(self._scores(query, key, shared=False))
        scores = torch.cat(scores, dim=-1) * attn.inv_norm_factor + alibi
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = attn.attention_dropout(probs)

        context = None
        start = 0
        for seg_key, seg_value, shared in [(s.key, s.value, s.shared) for s in segments] + [
            (key, value, False)
        ]:
            length = seg_key.shape[2]
            part = self._weighted_values(probs[..., start : start + length], seg_value, shared)
            context = part if context is None else context + part
            start += length
        context = context.permute(1, 2, 0, 3).reshape(batch, query_len, hidden_size)
        return context, key, value

    @staticmethod
    def _scores(query, seg_key, shared):
        heads, batch, query_len, dim = query.shape
        if shared:
            flat = query.reshape(heads, batch * query_len, dim)
            return torch.bmm(flat, seg_key[:, 0].transpose(1, 2)).view(heads, batch, query_len, -1)
        seg_key = seg_key.expand(heads, batch, -1, dim)
        out = torch.bmm(
            query.reshape(heads * batch, query_len, dim),
            seg_key.reshape(heads * batch, -1, dim).transpose(1, 2),
        )
        return out.view(heads, batch, query_len, -1)

    @staticmethod
    def _weighted_values(probs, seg_value, shared):
        heads, batch, query_len, length = probs.shape
        dim = seg_value.shape[-1]
        if shared:
            out = torch.bmm(probs.reshape(heads, batch * query_len, length), seg_value[:, 0])
            return out.view(heads, batch, query_len, dim)
        seg_value = seg_value.expand(heads, batch, length, dim)
        out = torch.bmm(
            probs.reshape(heads * batch, query_len, length),
            seg_value.reshape(heads * batch, length, dim),
        )
        return out.view(heads, batch, query_len, dim)
