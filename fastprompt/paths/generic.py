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
(measured on CPU: docs/results/CHANGELOG.md), and pay for every pad. ``packed``
instead runs the A prompts and each row's kept positions (its real tokens, and
the pads whose output predicts a label: ``PromptBatch.keep``) as one sequence
of A*P + K positions through one body call, each position with the id PEFT's
pass gives it. Attention runs segment by segment (``segments.py``,
``segment_attention.py``): a prompt against itself, a row against its prompt
and its own earlier real tokens, through the user's own attention function; the
pairs between segments are never computed. So a trained prompt shared by
several rows always packs where packing is exact (``packs``): the same pairs
attend as in PEFT's pass, less the pads. One row does not: its packed sequence
is PEFT's pass less the pads one row rarely has, and it measured no faster (a
training step of a 4-layer llama, hidden 512, P 20, one unpadded row, CPU, one
thread, median / min of 20 alternating steps: T 40 packed 136 / 75.5 ms, whole
pass 103 / 74.3 ms; T 120 244 / 161 ms against 247 / 160 ms); on a GPU its
masks would also keep sdpa off the causal flash kernel the whole pass gets.
Under transformers' gradient checkpointing, whose blocks re-run in backward,
after the pass, each checkpointed block's re-run enters the same per-segment
attention (``segment_attention``); a block wrapped by torch's checkpoint
wrapper gets the segments as one dense mask over the packed positions.

Prefix tuning learns each layer's K/V of the virtual positions: the prefix,
with nothing to run (``_prefix_tuned``). Its tokens take the packed pass with
that prefix in front of every row's keys, or the tokens' pass with it as their
cache; under gradient checkpointing, which drops caches, the packed pass.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable

import torch

from .. import ops
from ..batch import PromptBatch
from ..eligibility import plain_embedding
from ..ops import PackLayout
from ..prefix import Prefix
from ..prefix_cache import PrefixCache
from . import generic_generation
from .gated_mlp import gated_mlps, keeping_less
from .segment_attention import MASK_FORMATS, Packing, attending_by_segments, dense_mask, mask_in_format
from .segments import segments

# model_type -> the facts the fast path must reproduce: "softcap", the config
# field of the logits' soft cap (a label-only loss applies it too); "positions",
# how the body numbers positions when not given ids, as the packed pass must
# give them: "arange" (RoPE, GPT-2), "mask_cumsum" (OPT), None where the body
# takes no position ids (BLOOM's ALiBi comes from the 2D mask: the generic path never
# packs it; BLOOM's own path does, with each key's ALiBi position);
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


def model_configs(model: torch.nn.Module) -> list:
    """Every config the model's modules read (their own and sub-configs): where
    an attention layer may look up its implementation."""
    from transformers import PretrainedConfig

    found = {}

    def visit(config):
        if id(config) in found:
            return
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                visit(sub)

    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            visit(config)
    return list(found.values())


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
        self.rotaries = rotary_embeddings(self.body)
        self.configs = model_configs(model)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def plan(self, batch: PromptBatch, rows: int, tokens: int) -> tuple[Pass, str | None]:
        """A trained prompt is recomputed every step: packed with the rows'
        kept positions in one body call wherever that is exact (``packs``)
        and there are several rows. Otherwise the prompt's pass is shared by
        the rows unless sharing would change what happens (hooks, dropout),
        cannot work (``unshareable`` says why) or cannot help (one row). The
        reason comes with the pass where sharing could not work."""
        # One row packs to PEFT's own pass over cat(prompt, tokens), less pads a
        # single row rarely has: measured no faster (module docstring), so it runs that pass.
        if rows > 1 and batch.shares_prefix and batch.trains and self.packs(batch.num_virtual_tokens, tokens):
            return Pass.PACKED, None
        if rows == 1 or not batch.shares_prefix:
            return Pass.WHOLE, None
        reason = self.unshareable(batch.num_virtual_tokens, tokens)
        return (Pass.SHARED, None) if reason is None else (Pass.WHOLE, reason)

    def hidden_states(
        self, batch: PromptBatch, input_ids: torch.Tensor, prefixes: PrefixCache
    ) -> tuple[torch.Tensor | None, torch.Tensor, str, str | None]:
        rows, tokens = input_ids.shape
        if batch.learned is not None:
            return self._prefix_tuned(batch, input_ids)
        chosen, reason = self.plan(batch, rows, tokens)
        if chosen is Pass.PACKED:
            prefix_final, token_final = self.packed(input_ids, batch)
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

    def _prefix_tuned(self, batch: PromptBatch, input_ids: torch.Tensor) -> tuple[None, torch.Tensor, str, None]:
        """Prefix tuning: the tokens against the learned prefix, which needs no
        pass of its own. A training step over several rows packs them where
        that is exact (as a trained prompt does), and so does any step under
        transformers' gradient checkpointing, whose layers drop a cache but
        keep the segments' prefix. Otherwise the tokens take PEFT's own pass,
        the prefix as their cache, one stride-0 view for every row."""
        rows, tokens = input_ids.shape
        recomputes = self._recomputes_blocks()
        # The packed pass gives each layer its prefix through the segments' attention, so every layer
        # must call it: forward and checkpointed re-runs alike.
        packable = (
            self.packs(batch.num_virtual_tokens, tokens)
            and self._attends_through_interface()
            and self._checkpointed_layers() is not None
        )
        if packable and (recomputes or (rows > 1 and batch.shares_prefix and batch.trains)):
            return None, self.packed(input_ids, batch)[1], Pass.PACKED.value, None
        if recomputes:
            raise ValueError(
                "prefix tuning under gradient checkpointing needs fastprompt's packed pass (checkpointed "
                f"layers drop the prefix's cache), which {self.name} cannot run here: attention "
                f"{self.model.config._attn_implementation!r} (sdpa or eager needed), positions from the mask, a "
                "sliding window shorter than prefix and tokens, or blocks wrapped by torch's checkpoint_wrapper"
            )
        return None, self.tokens(input_ids, batch.key_mask, batch.learned, batch.adapter_of_row), "shared", None

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

    def _checkpointed_layers(self) -> list[torch.nn.Module] | None:
        """The layers transformers checkpoints in this call, whose re-runs in
        backward the packed pass wraps (``segment_attention``); None where a
        block re-runs in a way no wrapper reaches (torch's checkpoint wrapper)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        if not torch.is_grad_enabled():
            return []
        layers = []
        for module in self.body.modules():
            if "_checkpoint_wrapped_module" in module._modules:
                return None
            if isinstance(module, GradientCheckpointingLayer) and module.training and module.gradient_checkpointing:
                layers.append(module)
        return layers

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

    def packs(self, num_virtual_tokens: int, tokens: int) -> bool:
        """Whether ``packed`` can run this call exactly: positions the body can
        be given (BLOOM's ALiBi comes from a 2D mask), an attention whose masks
        ``segment_attention`` can write (flash kernels take none), and every
        row within each sliding window (the segments are the same for all
        layers, so a windowed layer must see no further than PEFT's does)."""
        if self.positions is None or self.model.config._attn_implementation not in MASK_FORMATS:
            return False
        return self._within_windows(num_virtual_tokens + tokens)

    def packed(self, input_ids: torch.Tensor, batch: PromptBatch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The A prompts and each row's kept positions (``batch.keep``) as one
        sequence of A*P + K positions through one body call, attention by
        segments (``segments.py``). Returns the prompts' final hidden states
        [A, P, H] (None for a learned prefix: prefix tuning runs the rows'
        positions only) and the tokens' [B, T, H], zeros at positions not kept."""
        prompts, key_mask = batch.prompts, batch.key_mask
        num_adapters, num_virtual, hidden = prompts.shape
        if batch.learned is not None:
            # Prefix tuning: the rows' positions only, each row reading the learned prefix.
            hidden = self.word_embeddings.weight.shape[1]
            prompts, num_adapters = prompts.new_empty(0, 0, hidden), 0
        keep = batch.keep
        if keep is not None and self.rotaries:
            # Rotary scalings that depend on the sequence (dynamic NTK, LongRoPE) read the
            # largest position id: PEFT's is P + T - 1, so that position runs even when a pad.
            keep = keep.clone()
            keep[0, -1] = True
        sequence, layout = self._pack_embeddings(input_ids, keep, prompts)
        attention_mask = key_mask[:, num_virtual:]
        position_ids = torch.cat(
            [
                torch.arange(num_virtual, device=input_ids.device).repeat(num_adapters),
                self._token_positions(key_mask, layout),
            ]
        )[None]
        learned = batch.learned is not None
        real = layout.gather(attention_mask.bool())
        blocks = segments(layout, num_adapters, num_virtual, batch.row_adapters, real, learned)
        implementation = self.model.config._attn_implementation
        checkpointed = self._checkpointed_layers()
        if checkpointed is None or not self._attends_through_interface():
            # A block re-run by torch's checkpoint wrapper, or attention that bypasses the
            # configured function, would not see the segments: the same blocks as one dense
            # mask for the user's attention (still padding-free in the linear layers).
            mask = mask_in_format(
                dense_mask(blocks, sequence.shape[0], sequence.device), implementation, sequence.dtype
            )
            final = self._run(sequence[None], mask[None, None], None, position_ids)[0]
        else:
            packing = Packing(blocks, implementation, sequence.dtype, batch.learned.kv if learned else None)
            with attending_by_segments(self.configs, packing, checkpointed):
                final = self._run(sequence[None], None, None, position_ids)[0]
        prompt_positions = num_adapters * num_virtual
        if learned:
            return None, layout.scatter(final)
        prompts_final = final[:prompt_positions].view(num_adapters, num_virtual, hidden)
        return prompts_final, layout.scatter(final[prompt_positions:])

    def _pack_embeddings(
        self, input_ids: torch.Tensor, keep: torch.Tensor | None, prompts: torch.Tensor
    ) -> tuple[torch.Tensor, PackLayout]:
        """The packed sequence's embeddings [A*P + K, H] and its layout. A plain
        frozen embedding table goes through the fused packer; any other input
        embedding (hooks such as NEFTune's, Gemma3's scaled one) is called as
        PEFT calls it, on every id of the batch, and its kept rows gathered."""
        embedding = self.word_embeddings
        if plain_embedding(embedding):
            return ops.pack_embed(input_ids, keep, prompts, embedding.weight)
        layout = ops.pack_layout(keep, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        tokens = layout.gather(embedding(input_ids))
        return torch.cat([prompts.reshape(-1, prompts.shape[-1]).to(tokens.dtype), tokens]), layout

    def _token_positions(self, key_mask: torch.Tensor, layout: PackLayout) -> torch.Tensor:
        """Each kept token's position id in PEFT's pass: P + its column where
        the body counts from ``arange`` (left pads included), the mask's cumsum
        less one where it counts real tokens (OPT)."""
        num_virtual = key_mask.shape[1] - layout.tokens
        if self.positions == "mask_cumsum":
            return layout.gather((key_mask.cumsum(1) * key_mask - 1)[:, num_virtual:]).to(torch.long)
        return num_virtual + layout.token_index % layout.tokens

    def _attends_through_interface(self) -> bool:
        """Whether every attention layer calls the configured attention function.
        GPT-2 with ``reorder_and_upcast_attn`` runs its own upcast attention under
        eager, bypassing it: the segments would compute something else."""
        config = self.model.config
        return not (config._attn_implementation == "eager" and getattr(config, "reorder_and_upcast_attn", False))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
