"""BLOOM's decoder, driven with a soft-prompt prefix computed once per batch.

We call BLOOM's own modules (layer norms, ``query_key_value``, ``dense``, the
MLP's linears — so 8-bit ``Linear8bitLt`` layers work unchanged) but run the
block ourselves so that earlier positions can come in as K/V segments: the
prompt's K/V, computed at batch 1, are expanded (stride 0) to the batch and the
real tokens attend to them. Gradients reach the prompt through that expand,
which autograd reduces over the batch.

Why this is exact: in a causal LM the prefix attends only to itself, and
BLOOM's ALiBi bias comes from the attention-mask cumsum, so the prefix's
hidden states and K/V are identical for every row and every request.

Attention itself is one fused ``scaled_dot_product_attention`` over the
concatenated segments with ALiBi + masking as its additive bias: on CPU that
is faster forward+backward than BLOOM's baddbmm/softmax/bmm chain (measured:
docs/results/CHANGELOG.md). The
concatenation copies the prefix K/V per row inside each layer (B·P·H values,
the size of one layer's K for P tokens); what is never repeated per row is the
prefix's own pass through the model, which is the cost that scales with P.

K/V segments are laid out ``[heads, batch, seq, head_dim]``, so that a
prefix shared by every row expands over the batch as a stride-0 view.

A training step runs ``packed`` instead: the prompts and every row's kept
positions as one sequence [N, H], each linear over all N at once, attention
one block at a time (``segments``: a prompt against itself, a row against its
prompt and its own earlier real positions), each block's bias being the ALiBi
of its keys where visible. The ALiBi bias depends on the key only, so a key
carries the position PEFT's mask cumsum gives it wherever it is packed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from .segments import Segment


@dataclass
class KVSegment:
    """Keys/values of earlier positions for one layer; a batch of 1 is seen by every row (the soft prompt)."""

    key: torch.Tensor  # [heads, batch or 1, seq, head_dim]
    value: torch.Tensor


def alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """BLOOM's per-head ALiBi slopes [heads], as transformers computes them,
    read off position 1 of ``build_alibi_tensor`` (slope x 1.0: exact). That
    function exists in every transformers 5.x; ``_get_alibi_slopes`` only from
    5.2x, not in the 5.17 of the GPU image."""
    return build_alibi_tensor(torch.ones(1, 2, device=device), num_heads, torch.float32)[:, 0, 1]


def key_positions(key_mask: torch.Tensor) -> torch.Tensor:
    """Each key's ALiBi position [B, K] as BLOOM takes it from the mask: the
    number of real keys before it, 0 at padding."""
    return (key_mask.cumsum(dim=-1) - 1) * key_mask


def alibi_of(positions: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """BLOOM's ALiBi [..., heads, K] of keys at ``positions`` [..., K]."""
    slopes = alibi_slopes(num_heads, positions.device)
    return (slopes[:, None] * positions[..., None, :].float()).to(dtype)


def alibi(key_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """BLOOM's ALiBi [B, heads, K] of every key, from the mask cumsum as BLOOM computes it."""
    return alibi_of(key_positions(key_mask), num_heads, dtype)


def attention_bias(key_mask: torch.Tensor, query_len: int, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, heads, T, K]: BLOOM's ALiBi where a key is
    visible, dtype-min where it is padding or in the future of the query (the
    queries are the last ``query_len`` keys). Min-value rather than -inf keeps
    every row finite, as BLOOM's mask does."""
    key_len = key_mask.shape[1]
    q_pos = torch.arange(query_len, device=key_mask.device)[:, None] + (key_len - query_len)
    causal = torch.arange(key_len, device=key_mask.device)[None, :] <= q_pos
    visible = causal[None, None] & key_mask.bool()[:, None, None, :]
    return alibi(key_mask, num_heads, dtype)[:, :, None, :].masked_fill(~visible, torch.finfo(dtype).min)


@dataclass(frozen=True)
class PackedAttention:
    """The blocks of a packed sequence as every layer attends them: the
    sequence split into ``lengths`` stretches (each block's queries, in
    order), each block's key stretches as indexes into them, and its additive
    bias [1, heads, queries, keys]."""

    lengths: tuple[int, ...]
    keys: tuple[tuple[int, ...], ...]
    biases: tuple[torch.Tensor, ...]
    # Per block: whether the layer's learned prefix (prefix tuning) comes before its keys.
    prefixed: tuple[bool, ...]


def packed_attention(
    blocks: Sequence[Segment],
    positions: torch.Tensor,
    num_heads: int,
    dtype: torch.dtype,
    prefix_positions: torch.Tensor | None = None,
) -> PackedAttention:
    """``blocks`` (``segments.segments``: their queries cover the sequence in
    order, their keys are stretches of it) with the ALiBi of each key at
    ``positions`` [N] where ``visible``, dtype-min elsewhere (as ``attention_bias``);
    a learned prefix's keys at ``prefix_positions`` [P] (0..P-1)."""
    stretch_of, start = {}, 0
    for index, block in enumerate(blocks):
        if block.queries.start != start:
            raise ValueError("the blocks' queries must cover the packed sequence in order")
        stretch_of[(block.queries.start, block.queries.stop)] = index
        start = block.queries.stop
    keys = tuple(tuple(stretch_of[(k.start, k.stop)] for k in block.keys) for block in blocks)
    key_alibi = alibi_of(positions, num_heads, dtype)  # [heads, N]
    minimum = torch.finfo(dtype).min
    prefix_alibi = [] if prefix_positions is None else [alibi_of(prefix_positions, num_heads, dtype)]
    biases = tuple(
        torch.cat((prefix_alibi if block.prefix else []) + [key_alibi[:, k] for k in block.keys], dim=1)[
            None, :, None, :
        ].masked_fill(~block.visible, minimum)
        for block in blocks
    )
    lengths = tuple(b.queries.stop - b.queries.start for b in blocks)
    return PackedAttention(lengths, keys, biases, tuple(block.prefix for block in blocks))


class BloomDecoder:
    """Runs ``model.transformer``'s blocks from post-embedding hidden states."""

    def __init__(self, model):
        self.model = model
        self.transformer = model.transformer
        config = model.config
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
        bias = attention_bias(key_mask, query_len, self.num_heads, hidden.dtype)
        new_kv = []
        for index, block in enumerate(self.transformer.h):
            segments = past[index] if past is not None else []
            hidden, key, value = self._run_block(self._segments_block, block, hidden, bias, segments)
            new_kv.append((key, value))
        return self.transformer.ln_f(hidden), new_kv

    def packed(
        self, hidden: torch.Tensor, plan: PackedAttention, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """A packed sequence's ``ln_f`` output [N, H] from hidden [N, H] after
        the embedding LayerNorm: every linear over all N positions at once,
        attention block by block as ``plan`` says; ``prefix``: each layer's
        learned (key, value) [1, heads, P, d] (prefix tuning)."""
        hidden = hidden[None]
        for index, block in enumerate(self.transformer.h):
            layer_prefix = None if prefix is None else prefix[index]
            hidden = self._run_block(self._packed_block, block, hidden, plan, layer_prefix)
        return self.transformer.ln_f(hidden)[0]

    def decode(self, hidden, bias, buffers, slot: torch.Tensor, attended: int) -> torch.Tensor:
        """One new position per row against K/V kept in preallocated buffers
        (the gpt-fast layout): hidden [R, 1, H] after the embedding LayerNorm;
        buffers per layer [2, R, heads, capacity, head_dim]. Each layer writes
        its new K/V at ``slot`` (a 1-element tensor) in place, and the query
        attends to the first ``attended`` slots — a view, never a concatenation —
        with ``bias`` [R, heads, 1, attended] (ALiBi, and min over slots it must
        not see). Returns ``ln_f`` output [R, 1, H]."""
        for block, buffer in zip(self.transformer.h, buffers):
            hidden, _, _ = self._block(
                block,
                hidden,
                lambda attn, normed, buffer=buffer: self._attention_in_buffer(
                    attn, normed, bias, buffer, slot, attended
                ),
            )
        return self.transformer.ln_f(hidden)

    def _run_block(self, function, block, *args):
        """``function(block, *args)``, checkpointed where transformers marked
        the block (it may skip some: every_n_layers) and this call trains."""
        if self.model.training and torch.is_grad_enabled() and getattr(block, "gradient_checkpointing", False):
            return checkpoint(function, block, *args, use_reentrant=False)
        return function(block, *args)

    def _segments_block(self, block, hidden, bias, segments):
        return self._block(block, hidden, lambda attn, normed: self._attention(attn, normed, bias, segments))

    def _packed_block(self, block, hidden, plan, prefix):
        return self._block(block, hidden, lambda attn, normed: self._packed_attention(attn, normed, plan, prefix))[0]

    def _block(self, block, hidden, attention):
        normed = block.input_layernorm(hidden)
        residual = normed if block.apply_residual_connection_post_layernorm else hidden
        attn = block.self_attention
        context, key, value = attention(attn, normed)
        attn_out = attn.dense(context)
        attn_out = residual + F.dropout(attn_out, attn.hidden_dropout, attn.training)
        normed = block.post_attention_layernorm(attn_out)
        residual = normed if block.apply_residual_connection_post_layernorm else attn_out
        return self._mlp(block.mlp, normed, residual), key, value

    @staticmethod
    def _mlp(mlp, normed, residual):
        # BLOOM's GeLUFunction is the tanh approximation written as ~10 separate
        # elementwise ops forward and backward; F.gelu(approximate="tanh") is the
        # same function in one fused kernel each way (same constants to 1e-9).
        inner = F.gelu(mlp.dense_h_to_4h(normed), approximate="tanh")
        return residual + F.dropout(mlp.dense_4h_to_h(inner), mlp.hidden_dropout, mlp.training)

    def _qkv(self, attn, normed):
        """query, key, value [B, heads, T, d] as views of one fused projection.
        unbind, not three selects: its backward is one stack instead of three
        zero-filled full-size gradients."""
        batch, query_len, _ = normed.shape
        fused = attn.query_key_value(normed).view(batch, query_len, self.num_heads, 3, self.head_dim)
        return (part.transpose(1, 2) for part in fused.unbind(dim=3))

    def _attention(self, attn, normed, bias, segments):
        batch, query_len, hidden_size = normed.shape
        heads, dim = self.num_heads, self.head_dim
        query, key, value = self._qkv(attn, normed)
        # Segments are kept [heads, B, T, d]: expanding a shared prefix over B is then a stride-0 view.
        key, value = key.transpose(0, 1), value.transpose(0, 1)
        keys = [seg.key.expand(heads, batch, -1, dim) for seg in segments] + [key]
        values = [seg.value.expand(heads, batch, -1, dim) for seg in segments] + [value]
        context = F.scaled_dot_product_attention(
            query,
            torch.cat(keys, dim=2).transpose(0, 1),
            torch.cat(values, dim=2).transpose(0, 1),
            attn_mask=bias,
            dropout_p=attn.attention_dropout.p if attn.training else 0.0,
            scale=attn.inv_norm_factor,
        )
        return context.transpose(1, 2).reshape(batch, query_len, hidden_size), key, value

    def _packed_attention(self, attn, normed, plan: PackedAttention, prefix):
        _, length, hidden_size = normed.shape
        # split, not slices: its backward is one cat, where each slice's would write a full-size zero gradient.
        query, key, value = (part.split(plan.lengths, dim=2) for part in self._qkv(attn, normed))
        contexts = []
        for queries, keys, bias, prefixed in zip(query, plan.keys, plan.biases, plan.prefixed):
            key_parts = ([prefix[0].to(normed.dtype)] if prefixed else []) + [key[k] for k in keys]
            value_parts = ([prefix[1].to(normed.dtype)] if prefixed else []) + [value[k] for k in keys]
            context = F.scaled_dot_product_attention(
                queries,
                torch.cat(key_parts, dim=2) if len(key_parts) > 1 else key_parts[0],
                torch.cat(value_parts, dim=2) if len(value_parts) > 1 else value_parts[0],
                attn_mask=bias,
                dropout_p=attn.attention_dropout.p if attn.training else 0.0,
                scale=attn.inv_norm_factor,
            )
            contexts.append(context.transpose(1, 2))
        return torch.cat(contexts, dim=1).reshape(1, length, hidden_size), None, None

    def _attention_in_buffer(self, attn, normed, bias, buffer, slot, attended):
        rows, _, hidden_size = normed.shape
        query, key, value = self._qkv(attn, normed)
        buffer[0].index_copy_(2, slot, key)
        buffer[1].index_copy_(2, slot, value)
        context = F.scaled_dot_product_attention(
            query,
            buffer[0, :, :, :attended],
            buffer[1, :, :, :attended],
            attn_mask=bias,
            scale=attn.inv_norm_factor,
        )
        return context.transpose(1, 2).reshape(rows, 1, hidden_size), None, None
