"""The shared soft-prompt prefix for any supported causal LM, through the model's own body.

Nothing here re-implements a decoder. The prompt's P positions run once, at
batch 1, through the base model's own body (its blocks, masks, positions,
hooks) with a ``DynamicCache``; that cache's per-layer K/V are then handed to
the body again, expanded to the batch, as the "past" of the T real tokens.
Gradients reach the prompt through the cached tensors.

Why this is exact for the families listed in ``FAMILIES``: in a causal LM the
virtual tokens attend only to each other, and their positions are the same in
every row — RoPE and learned positions count from ``arange`` (Llama, Mistral,
Qwen, Gemma, GPT-2: the body numbers the T tokens from the cache length P, as
PEFT's full pass does), while OPT and BLOOM derive positions from the
attention-mask cumsum, which over the all-ones prompt prefix is ``0..P-1`` in
every row. So the prefix's hidden states and K/V are identical for all rows,
left padding included.

What it cannot do: share a prefix through a layer that throws its cache away
(transformers drops caches inside gradient-checkpointed blocks), or one longer
than a sliding attention window (the layer keeps only the window). Those calls
take the full pass instead, or the packed pass below, which needs no cache;
``model.py`` decides.

When the prompt is trained, its pass is recomputed every step, and the two
passes above become two smaller matrix products per linear layer (P rows, then
B*T rows), which run well below the throughput of one product over all rows
(on a 2-core CPU, a [100, 2048] x [2048, 8192] product runs at 71 GMAC/s,
[356, 2048] at 125, [1056, 2048] at 136). ``packed`` instead runs the prompt
and every row's tokens as one sequence of A*P + B*T positions through one body
call, with each position's own position id and a 4D mask that lets a token
see its row's prompt and its row's earlier tokens. The same pairs attend as in
the two passes; the price is attention scores for all N^2 pairs of the packed
sequence, so it is taken only where that stays small next to the linear layers'
work (``packs``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .gated_mlp import gated_mlps, keeping_less

# model_type -> the facts the fast path must reproduce: "softcap", the config
# field of the logits' soft cap (a label-only loss applies it too); "positions",
# how the body numbers positions when not given ids, as the packed pass must
# give them: "arange" (RoPE, GPT-2), "mask_cumsum" (OPT), None where the body
# takes no position ids (BLOOM's ALiBi comes from the 2D mask: never packed).
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gpt2": {}, "opt": {"positions": "mask_cumsum"},
    "bloom": {"positions": None}, "gemma": {}, "gemma2": {"softcap": "final_logit_softcapping"},
    "gemma3_text": {"softcap": "final_logit_softcapping"},
}

# Attention implementations that apply a given 4D mask as it is (flash kernels
# take no mask; the packed pass falls back to the two passes there).
PACKED_MASK_FORMATS = ("sdpa", "eager")
# The packed pass computes attention scores for every pair of its N positions;
# it is taken when those beyond what the two passes compute cost at most this
# fraction of the linear layers' work over the N positions.
PACKING_OVERHEAD = 0.05


@dataclass
class Prefix:
    """The prompt after the body at batch 1 (or one row per adapter):
    ``final`` [A, P, H] is the body's last hidden state (after its final norm),
    ``kv`` the per-layer (key, value) [A, kv_heads, P, head_dim]."""

    final: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return self.final.shape[1]


def cache_argument(body: torch.nn.Module) -> str:
    """transformers 5.2x renamed the forward argument (and output field)
    ``past_key_values`` to ``cache``; accept either."""
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def sliding_windows(config) -> list[int]:
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_window_size")]
    return [w for w in windows if isinstance(w, int) and w > 0]


def _to_rows(states: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The prefix states of each of ``batch`` rows: the single row expanded,
    or row ``rows[i]`` for row i. Under autograd the expand's backward sums
    the rows' gradients; for bf16/fp16 states that sum runs in fp32, as PEFT's
    (which sums per-row gradients into the fp32 prompt) does."""
    if rows is not None:
        return states.index_select(0, rows)
    if states.requires_grad and states.dtype in (torch.bfloat16, torch.float16):
        return states.float().expand(batch, -1, -1, -1).to(states.dtype)
    return states.expand(batch, -1, -1, -1)


def _blocks_of(body: torch.nn.Module) -> torch.nn.ModuleList:
    """The body's list of decoder blocks (``layers``, ``h``, or OPT's ``decoder.layers``)."""
    for path in ("layers", "h", "decoder.layers"):
        try:
            blocks = body.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise TypeError(f"cannot find the decoder blocks of {type(body).__name__}")


class GenericDriver:
    """Runs the body of ``model`` (a ``*ForCausalLM``) on embeddings, with or
    without the prompt's K/V as a pre-filled cache."""

    name = "generic"

    def __init__(self, model, word_embeddings: torch.nn.Module):
        self.model = model
        self.body = getattr(model, model.base_model_prefix)
        self.blocks = _blocks_of(self.body)
        self.gated_mlps = gated_mlps(self.blocks)
        self.word_embeddings = word_embeddings
        self.cache_arg = cache_argument(self.body)
        self.family = model.config.model_type
        softcap_field = FAMILIES[self.family].get("softcap")
        self.softcap = getattr(model.config, softcap_field, None) if softcap_field else None
        self.positions = FAMILIES[self.family].get("positions", "arange")
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # Multiply-adds per attending pair (scores and weighted values) and per
        # position through one block's matrices: the two costs ``packs`` weighs.
        self.macs_per_pair = 2 * text.num_attention_heads * head_dim
        self.macs_per_position = sum(p.numel() for p in self.blocks[0].parameters() if p.dim() == 2)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def can_share_prefix(self, prompt_length: int) -> bool:
        """Shared-prefix passes need every layer to keep the whole prefix and a
        body that honours a cache (checkpointed blocks drop it, or update it
        again when they re-run in backward)."""
        return self._within_windows(prompt_length) and not self._recomputes_blocks()

    def _within_windows(self, length: int) -> bool:
        """Whether ``length`` positions fit in every sliding attention window."""
        return all(length < window for window in sliding_windows(self.model.config.get_text_config()))

    def _recomputes_blocks(self) -> bool:
        """Whether blocks re-run their forward in backward in this call:
        transformers' gradient checkpointing (in training mode) or torch's
        checkpoint wrapper around a block (found as the submodule it registers:
        a dict lookup, where ``hasattr`` on a module raises and catches for
        every module without it, which doubled the cost of this walk)."""
        return torch.is_grad_enabled() and any(
            (module.training and getattr(module, "gradient_checkpointing", False))
            or "_checkpoint_wrapped_module" in module._modules
            for module in self.body.modules()
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # PEFT's own embedding call, so hooks on it (and scaled embeddings) behave as in PEFT.
        return self.word_embeddings(input_ids)

    def _run(self, embeds, key_mask, cache, position_ids=None):
        # Under autograd the gated MLPs keep less for backward (same numbers, see gated_mlp.py),
        # unless blocks re-run in backward: the rerun, outside this call, would save other tensors.
        lean = torch.is_grad_enabled() and not self._recomputes_blocks()
        with keeping_less(self.gated_mlps if lean else []):
            out = self.body(
                inputs_embeds=embeds, attention_mask=key_mask, position_ids=position_ids,
                use_cache=cache is not None, return_dict=True, **{self.cache_arg: cache},
            )
        return out.last_hidden_state

    def full(self, input_ids: torch.Tensor, prompts: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """PEFT's pass: ``cat(prompts, embed(ids))`` through the body, no cache.
        prompts: [B or 1, P, H]. Returns the final hidden states [B, P+T, H]."""
        embeds = self.embed_tokens(input_ids)
        prompts = prompts.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        return self._run(torch.cat([prompts, embeds], dim=1), key_mask, None)

    def prefix(self, prompts: torch.Tensor) -> Prefix:
        """prompts: [A, P, H] (one row per adapter) run once, no padding."""
        from transformers import DynamicCache

        dtype = self.word_embeddings.weight.dtype
        cache = DynamicCache(config=self.model.config)
        ones = torch.ones(prompts.shape[:2], dtype=torch.long, device=prompts.device)
        final = self._run(prompts.to(dtype), ones, cache)
        return Prefix(final, [(layer.keys, layer.values) for layer in cache.layers])

    def cache_for(self, prefix: Prefix, rows: torch.Tensor | None, batch: int):
        """A fresh ``DynamicCache`` holding the prefix for ``batch`` rows: the
        single prefix expanded, or ``prefix`` row ``rows[i]`` for row i."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.fill(cache, prefix, rows, batch)
        return cache

    @staticmethod
    def fill(cache, prefix: Prefix, rows: torch.Tensor | None, batch: int) -> None:
        for index, (key, value) in enumerate(prefix.kv):
            cache.update(_to_rows(key, rows, batch), _to_rows(value, rows, batch), index)

    def tokens(self, input_ids, key_mask, prefix: Prefix, rows: torch.Tensor | None) -> torch.Tensor:
        """The T real tokens against the prefix K/V; key_mask [B, P+T]. Returns [B, T, H]."""
        cache = self.cache_for(prefix, rows, input_ids.shape[0])
        return self._run(self.embed_tokens(input_ids), key_mask, cache)

    def packs(self, prompt_count: int, prompt_length: int, batch: int, length: int) -> bool:
        """Whether ``packed`` can run this call exactly and pays: positions the
        body can be given, a mask the attention applies as given, every row
        within each sliding window (the packed mask is one for all layers), and
        the extra attention pairs cheap next to the linear layers."""
        config = self.model.config
        if self.positions is None or config._attn_implementation not in PACKED_MASK_FORMATS:
            return False
        if not self._within_windows(prompt_length + length):
            return False
        positions = prompt_count * prompt_length + batch * length
        # The two passes: causal pairs among the prompt, then every token against P + T keys.
        two_pass = prompt_count * prompt_length * (prompt_length + 1) / 2 + batch * length * (prompt_length + length)
        extra = (positions * positions - two_pass) * self.macs_per_pair
        return extra <= PACKING_OVERHEAD * positions * self.macs_per_position

    def packed(self, input_ids, prompts, key_mask, rows: torch.Tensor | None):
        """The A prompts and the B rows' T tokens as one sequence through one
        body call. prompts: [A, P, H]; key_mask [B, P+T]; ``rows`` maps each
        row to its prompt (None: all rows read prompt 0). Returns the prompts'
        final hidden states [A, P, H] and the tokens' [B, T, H]."""
        count, length, hidden = prompts.shape
        batch, tokens = input_ids.shape
        embeds = self.embed_tokens(input_ids)
        sequence = torch.cat([prompts.to(embeds.dtype).reshape(1, count * length, hidden),
                              embeds.reshape(1, batch * tokens, hidden)], dim=1)
        mask, position_ids = self._packed_layout(key_mask, count, length, rows, embeds.dtype)
        final = self._run(sequence, mask, None, position_ids)[0]
        return final[: count * length].view(count, length, hidden), final[count * length:].view(batch, tokens, hidden)

    def _packed_layout(self, key_mask, count, length, rows, dtype):
        """The packed sequence's [1, 1, N, N] mask, in the form the attention
        implementation adds or applies, and its [1, N] position ids: prompt a
        at 0..P-1, each row's tokens where PEFT's pass puts them."""
        device = key_mask.device
        batch, tokens = key_mask.shape[0], key_mask.shape[1] - length
        blocks = torch.arange(count, device=device).repeat_interleave(length)
        row_prompt = rows if rows is not None else torch.zeros(batch, dtype=torch.long, device=device)
        # Which stretch a position belongs to (a prompt, or count + its row), and which prompt it reads.
        group = torch.cat([blocks, count + torch.arange(batch, device=device).repeat_interleave(tokens)])
        reads = torch.cat([blocks, row_prompt.repeat_interleave(tokens)])
        index = torch.arange(group.numel(), device=device)
        is_prompt = index < count * length
        key_valid = torch.cat([is_prompt.new_ones(count * length), key_mask[:, length:].reshape(-1).bool()])
        allowed = ((index[None, :] <= index[:, None]) & key_valid[None, :]
                   & ((group[None, :] == group[:, None]) | (is_prompt[None, :] & (group[None, :] == reads[:, None]))))
        if self.model.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
            blocked = torch.finfo(dtype).min
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, blocked)
        prompt_positions = torch.arange(length, device=device).repeat(count)
        if self.positions == "mask_cumsum":
            row_positions = key_mask.cumsum(1) * key_mask - 1  # as OPT numbers a padded row
            token_positions = row_positions[:, length:].reshape(-1)
        else:
            token_positions = torch.arange(length, length + tokens, device=device).repeat(batch)
        return allowed[None, None], torch.cat([prompt_positions, token_positions.to(torch.long)])[None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
