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
take the whole pass instead, or the packed pass below, which needs no cache
(``GenericPath.plan`` decides).

When the prompt is trained, its pass is recomputed every step, and the two
passes above become two smaller matrix products per linear layer (P rows, then
B*T rows), which run well below the throughput of one product over all rows
(measured on CPU: docs/results/CHANGELOG.md). ``packed`` instead runs the prompt
and every row's tokens as one sequence of A*P + B*T positions through one body
call, with each position's own position id and a 4D mask that lets a token
see its row's prompt and its row's earlier tokens. The same pairs attend as in
the two passes; the price is attention scores for all N^2 pairs of the packed
sequence, so it is taken only where that stays small next to the linear layers'
work (``packs``).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable

import torch

from ..batch import PromptBatch
from ..prefix_cache import Prefix, PrefixCache
from . import generic_generation
from .gated_mlp import gated_mlps, keeping_less

# model_type -> the facts the fast path must reproduce: "softcap", the config
# field of the logits' soft cap (a label-only loss applies it too); "positions",
# how the body numbers positions when not given ids, as the packed pass must
# give them: "arange" (RoPE, GPT-2), "mask_cumsum" (OPT), None where the body
# takes no position ids (BLOOM's ALiBi comes from the 2D mask: never packed);
# "body", the module the causal LM's forward calls, where it is not the
# ``base_model_prefix`` one (OPT's calls ``model.decoder``: hooks on it, and only
# on it, must fire as in PEFT).
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gpt2": {},
    "opt": {"positions": "mask_cumsum", "body": "model.decoder"},
    "bloom": {"positions": None},
    "gemma": {},
    "gemma2": {"softcap": "final_logit_softcapping"},
    "gemma3_text": {"softcap": "final_logit_softcapping"},
}

# Attention implementations that apply a given 4D mask as it is (flash kernels
# take no mask; the packed pass falls back to the two passes there).
PACKED_MASK_FORMATS = ("sdpa", "eager")
# The packed pass computes attention scores for every pair of its N positions;
# it is taken when those beyond what the two passes compute cost at most this
# fraction of the linear layers' work over the N positions.
PACKING_OVERHEAD = 0.05


class Pass(enum.Enum):
    """How a call's prompt and tokens go through the body."""

    WHOLE = "whole"  # PEFT's: cat(prompt, tokens) for every row
    SHARED = "shared"  # the prompt once, the tokens against its K/V
    PACKED = "packed"  # the prompt(s) and every row's tokens as one sequence


def cache_argument(body: torch.nn.Module) -> str:
    """transformers 5.2x renamed the forward argument (and output field)
    ``past_key_values`` to ``cache``; accept either."""
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def sliding_windows(config) -> list[int]:
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_window_size")]
    return [w for w in windows if isinstance(w, int) and w > 0]


def _to_rows(states: torch.Tensor, adapter_of_row: torch.Tensor | None, rows: int) -> torch.Tensor:
    """The prefix states of each of ``rows`` rows: the single prefix expanded,
    or prefix ``adapter_of_row[i]`` for row i. Under autograd the expand's
    backward sums the rows' gradients; for bf16/fp16 states that sum runs in
    fp32, as PEFT's (which sums per-row gradients into the fp32 prompt) does."""
    if adapter_of_row is not None:
        return states.index_select(0, adapter_of_row)
    if states.requires_grad and states.dtype in (torch.bfloat16, torch.float16):
        return states.float().expand(rows, -1, -1, -1).to(states.dtype)
    return states.expand(rows, -1, -1, -1)


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


def rotary_embeddings(body: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that turn position ids into rotary frequencies: by
    transformers' convention, those holding an ``*inv_freq`` buffer."""
    return [
        module
        for module in body.modules()
        if any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False))
    ]


def length_dependent(rotary: torch.nn.Module, num_virtual_tokens: int, tokens: int) -> bool:
    """Whether ``rotary`` gives positions 0..P-1 other frequencies inside a
    sequence of P + T positions than alone (dynamic NTK scaling, LongRoPE, and
    any scheme that rescales by the longest position): asked of the module
    itself, and whatever state it updates on the way put back."""
    layer_types = [
        name[: -len("_inv_freq")]
        for name, _ in rotary.named_buffers(recurse=False)
        if name.endswith("_inv_freq") and "original" not in name
    ]
    takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
    calls = [{"layer_type": kind} for kind in layer_types] if takes_layer_type and layer_types else [{}]
    buffers, settings = dict(rotary._buffers), {k: v for k, v in vars(rotary).items() if not k.startswith("_")}
    device = next(iter(buffers.values())).device
    probe = torch.zeros(1, device=device)
    alone = torch.arange(num_virtual_tokens, device=device)[None]
    within = torch.arange(num_virtual_tokens + tokens, device=device)[None]
    try:
        with torch.no_grad():
            for kwargs in calls:
                short, long = rotary(probe, alone, **kwargs), rotary(probe, within, **kwargs)
                if any(not torch.equal(a, b[:, :num_virtual_tokens]) for a, b in zip(short, long)):
                    return True
        return False
    finally:
        rotary._buffers.update(buffers)
        for name, value in settings.items():
            setattr(rotary, name, value)


class GenericPath:
    """Runs the body of ``model`` (a ``*ForCausalLM``) on embeddings, with or
    without the prompt's K/V as a pre-filled cache, or packed."""

    def __init__(self, model, word_embeddings: torch.nn.Module):
        self.model = model
        self.family = model.config.model_type
        self.body = model.get_submodule(FAMILIES[self.family].get("body", model.base_model_prefix))
        self.blocks = _blocks_of(self.body)
        self.gated_mlps = gated_mlps(self.blocks)
        self.word_embeddings = word_embeddings
        self.cache_arg = cache_argument(self.body)
        self.name = f"generic:{self.family}"
        softcap_field = FAMILIES[self.family].get("softcap")
        self.softcap = getattr(model.config, softcap_field, None) if softcap_field else None
        self.positions = FAMILIES[self.family].get("positions", "arange")
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # Multiply-adds per attending pair (scores and weighted values) and per
        # position through one block's matrices: the two costs ``packs`` weighs.
        self.macs_per_pair = 2 * text.num_attention_heads * head_dim
        self.macs_per_position = sum(p.numel() for p in self.blocks[0].parameters() if p.dim() == 2)
        self.rotaries = rotary_embeddings(self.body)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def plan(self, batch: PromptBatch, rows: int, tokens: int) -> tuple[Pass, str | None]:
        """A trained prompt is recomputed every step: packed with the rows'
        tokens in one body call where that pays. Otherwise the prompt's pass is
        shared by the rows unless sharing would change what happens (hooks,
        dropout), cannot work (``unshareable`` says why) or cannot help (one
        row). The reason comes with the pass where sharing could not work."""
        if (
            rows > 1
            and batch.shares_prefix
            and batch.trains
            and self.packs(batch.num_adapters, batch.num_virtual_tokens, rows, tokens)
        ):
            return Pass.PACKED, None
        if rows == 1 or not batch.shares_prefix:
            return Pass.WHOLE, None
        reason = self.unshareable(batch.num_virtual_tokens, tokens)
        return (Pass.SHARED, None) if reason is None else (Pass.WHOLE, reason)

    def hidden_states(
        self, batch: PromptBatch, input_ids: torch.Tensor, prefixes: PrefixCache
    ) -> tuple[torch.Tensor, torch.Tensor, str, str | None]:
        rows, tokens = input_ids.shape
        chosen, reason = self.plan(batch, rows, tokens)
        if chosen is Pass.PACKED:
            prefix_final, token_final = self.packed(input_ids, batch.prompts, batch.key_mask, batch.adapter_of_row)
        elif chosen is Pass.WHOLE:
            final = self.whole(input_ids, batch.row_prompts(rows), batch.key_mask)
            return final[:, : batch.num_virtual_tokens], final[:, batch.num_virtual_tokens :], chosen.value, reason
        else:
            prefix = prefixes.prefix(self, batch)
            prefix_final = prefix.final
            token_final = self.tokens(input_ids, batch.key_mask, prefix, batch.adapter_of_row)
        if batch.adapter_of_row is not None:
            prefix_final = prefix_final.index_select(0, batch.adapter_of_row)
        return prefix_final, token_final, chosen.value, None

    def generate(self, batch: PromptBatch, args: tuple, kwargs: dict, prefixes: PrefixCache) -> None:
        """transformers' loop serves every request (see ``generic_generation``)."""
        return None

    def generation_kwargs(self, batch: PromptBatch, args: tuple, kwargs: dict) -> dict:
        return generic_generation.with_room_for_prompt(self, batch, args, kwargs)

    def prepare_step_inputs(
        self,
        batch: PromptBatch,
        prefixes: PrefixCache,
        prepare_base: Callable,
        input_ids: torch.Tensor,
        *args,
        **kwargs,
    ) -> dict:
        return generic_generation.prepare_step_inputs(
            self, self, batch, prefixes, prepare_base, input_ids, *args, **kwargs
        )

    def unshareable(self, num_virtual_tokens: int, tokens: int) -> str | None:
        """Why the prompt's pass cannot be run alone and shared (None: it can).
        It needs every layer to keep the whole prefix, a body that honours a
        cache (checkpointed blocks drop it, or update it again when they re-run
        in backward), and positions that do not depend on the sequence's length
        (the prefix runs alone, at length P)."""
        if not self._within_windows(num_virtual_tokens):
            return "the prompt does not fit in a sliding attention window"
        if self._recomputes_blocks():
            return "checkpointed blocks recompute in backward, without the shared prefix's cache"
        if any(length_dependent(rotary, num_virtual_tokens, tokens) for rotary in self.rotaries):
            return "rotary positions depend on the sequence length"
        return None

    def _within_windows(self, positions: int) -> bool:
        """Whether ``positions`` positions fit in every sliding attention window."""
        return all(positions < window for window in sliding_windows(self.model.config.get_text_config()))

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
                inputs_embeds=embeds,
                attention_mask=key_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                return_dict=True,
                **{self.cache_arg: cache},
            )
        return out.last_hidden_state

    def whole(self, input_ids: torch.Tensor, prompts: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """PEFT's pass: ``cat(prompts, embed(ids))`` through the body, no cache.
        prompts: [B, P, H]. Returns the final hidden states [B, P+T, H]."""
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

    @staticmethod
    def fill(cache, prefix: Prefix, adapter_of_row: torch.Tensor | None, rows: int) -> None:
        """Put the prefix into an empty transformers cache for ``rows`` rows: the
        single prefix expanded, or prefix ``adapter_of_row[i]`` for row i."""
        for index, (key, value) in enumerate(prefix.kv):
            cache.update(_to_rows(key, adapter_of_row, rows), _to_rows(value, adapter_of_row, rows), index)

    def tokens(self, input_ids, key_mask, prefix: Prefix, adapter_of_row: torch.Tensor | None) -> torch.Tensor:
        """The T real tokens against the prefix K/V; key_mask [B, P+T]. Returns [B, T, H]."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.fill(cache, prefix, adapter_of_row, input_ids.shape[0])
        return self._run(self.embed_tokens(input_ids), key_mask, cache)

    def packs(self, num_adapters: int, num_virtual_tokens: int, rows: int, tokens: int) -> bool:
        """Whether ``packed`` can run this call exactly and pays: positions the
        body can be given, a mask the attention applies as given, every row
        within each sliding window (the packed mask is one for all layers), and
        the extra attention pairs cheap next to the linear layers."""
        config = self.model.config
        if self.positions is None or config._attn_implementation not in PACKED_MASK_FORMATS:
            return False
        if not self._within_windows(num_virtual_tokens + tokens):
            return False
        prompt_positions = num_adapters * num_virtual_tokens
        positions = prompt_positions + rows * tokens
        # The two passes: causal pairs among the prompt, then every token against P + T keys.
        two_pass = prompt_positions * (num_virtual_tokens + 1) / 2 + rows * tokens * (num_virtual_tokens + tokens)
        extra = (positions * positions - two_pass) * self.macs_per_pair
        return extra <= PACKING_OVERHEAD * positions * self.macs_per_position

    def packed(self, input_ids, prompts, key_mask, adapter_of_row: torch.Tensor | None):
        """The A prompts and the B rows' T tokens as one sequence through one
        body call. prompts: [A, P, H]; key_mask [B, P+T]; ``adapter_of_row``
        maps each row to its prompt (None: all rows read prompt 0). Returns the
        prompts' final hidden states [A, P, H] and the tokens' [B, T, H]."""
        num_adapters, num_virtual, hidden = prompts.shape
        rows, tokens = input_ids.shape
        prompt_positions = num_adapters * num_virtual
        embeds = self.embed_tokens(input_ids)
        sequence = torch.cat(
            [prompts.to(embeds.dtype).reshape(1, prompt_positions, hidden), embeds.reshape(1, rows * tokens, hidden)],
            dim=1,
        )
        mask, position_ids = self._packed_layout(key_mask, num_adapters, num_virtual, adapter_of_row, embeds.dtype)
        final = self._run(sequence, mask, None, position_ids)[0]
        return (
            final[:prompt_positions].view(num_adapters, num_virtual, hidden),
            final[prompt_positions:].view(rows, tokens, hidden),
        )

    def _packed_layout(self, key_mask, num_adapters, num_virtual, adapter_of_row, dtype):
        """The packed sequence's [1, 1, N, N] mask, in the form the attention
        implementation adds or applies, and its [1, N] position ids: prompt a
        at 0..P-1, each row's tokens where PEFT's pass puts them."""
        device = key_mask.device
        rows, tokens = key_mask.shape[0], key_mask.shape[1] - num_virtual
        prompt_positions = num_adapters * num_virtual
        blocks = torch.arange(num_adapters, device=device).repeat_interleave(num_virtual)
        if adapter_of_row is None:
            adapter_of_row = torch.zeros(rows, dtype=torch.long, device=device)
        # Which stretch a position belongs to (a prompt, or num_adapters + its row), and which prompt it reads.
        group = torch.cat([blocks, num_adapters + torch.arange(rows, device=device).repeat_interleave(tokens)])
        reads = torch.cat([blocks, adapter_of_row.repeat_interleave(tokens)])
        index = torch.arange(group.numel(), device=device)
        is_prompt = index < prompt_positions
        key_valid = torch.cat([is_prompt.new_ones(prompt_positions), key_mask[:, num_virtual:].reshape(-1).bool()])
        allowed = (
            (index[None, :] <= index[:, None])
            & key_valid[None, :]
            & ((group[None, :] == group[:, None]) | (is_prompt[None, :] & (group[None, :] == reads[:, None])))
        )
        if self.model.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
            blocked = torch.finfo(dtype).min
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, blocked)
        virtual_positions = torch.arange(num_virtual, device=device).repeat(num_adapters)
        if self.positions == "mask_cumsum":
            row_positions = key_mask.cumsum(1) * key_mask - 1  # as OPT numbers a padded row
            token_positions = row_positions[:, num_virtual:].reshape(-1)
        else:
            token_positions = torch.arange(num_virtual, num_virtual + tokens, device=device).repeat(rows)
        return allowed[None, None], torch.cat([virtual_positions, token_positions.to(torch.long)])[None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
