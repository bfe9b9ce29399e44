"""BLOOM's own path: its blocks through ``BloomDecoder``, embeddings through the fused op, its own decode loop.

Taken for BLOOM when nothing in the call needs BLOOM's own module calls (hooks
on the blocks, accelerate's placement hooks, dropout that must draw like
PEFT's: ``paths.choose``), since it is faster than transformers' eager BLOOM
attention. Generation requests its own loop does not serve go to transformers'
loop with the prefix computed here; a call that may not share the prompt's
pass with rows of different prompts, to the generic path over the same model,
which it holds (the ``whole`` pass takes one prompt).

A training step packs: the A prompts once, then each row's kept positions
(``batch.keep``: its real tokens and the pads whose output predicts a label),
as one sequence built by the fused embedding op. Every linear runs over all of
it at once; attention runs block by block (``segments``), each key with the
ALiBi position PEFT's pass over ``cat(prompt, tokens)`` gives it, so neither
pads nor pairs across rows are computed. Evaluation and other calls without
a gradient share the prompt's pass (its K/V, computed once or cached,
expanded to the rows); one row runs ``cat(prompt, tokens)`` once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..batch import PromptBatch
from ..ops import pack_embed
from ..prefix import Prefix
from ..prefix_cache import PrefixCache
from . import bloom_decode, generic_generation
from .bloom_decoder import BloomDecoder, KVSegment, key_positions, packed_attention
from .generic import GenericPath
from .segments import segments

log = logging.getLogger("fastprompt")


def _to_cache_layout(kv):
    """``BloomDecoder``'s [heads, B, T, d] segments as transformers' cache holds them, [B, heads, T, d]."""
    return [(key.transpose(0, 1), value.transpose(0, 1)) for key, value in kv]


class BloomPath:
    name = "bloom"
    softcap = None

    def __init__(self, model, generic: GenericPath):
        self.model = model
        self.decoder = BloomDecoder(model)
        self.generic = generic
        self.compiled_step = None  # the static-shape decode step, compiled on first use

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def runs_as_written(self) -> bool:
        """Whether the model's modules still run the forwards this path
        re-implements (BLOOM's model, block, attention and MLP): a subclass
        that overrides one does something this path would not."""
        from transformers.models.bloom import modeling_bloom as bloom

        transformer = self.decoder.transformer
        return type(transformer).forward is bloom.BloomModel.forward and all(
            type(block).forward is bloom.BloomBlock.forward
            and type(block.self_attention).forward is bloom.BloomAttention.forward
            and type(block.mlp).forward is bloom.BloomMLP.forward
            for block in transformer.h
        )

    def fused_inputs_frozen(self) -> bool:
        """Whether the table and LayerNorm parameters the fused embedding op
        reads get no gradient in this call: its backward computes the prompt's
        gradient only (a trainable one, PEFT's ``modules_to_save`` for one,
        needs the modules called as PEFT calls them)."""
        norm = self.decoder.embedding_layernorm
        return not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (self.decoder.word_embeddings.weight, norm.weight, norm.bias)
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ------------------------------------------------------------ embeddings
    def _embed(self, input_ids: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """LayerNorm of the prompts [A, P, H] then of ``weight[ids]`` for every
        position of ids [B, T], packed: [A*P + B*T, H]."""
        norm = self.decoder.embedding_layernorm
        weight = self.decoder.word_embeddings.weight
        packed, _ = pack_embed(input_ids, None, prompts, weight, norm.weight, norm.bias, norm.eps)
        return packed

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.decoder.word_embeddings.weight
        return self._embed(input_ids, weight.new_empty(0, 0, weight.shape[1])).view(*input_ids.shape, -1)

    def _embed_row(self, input_ids: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """cat(prompt [P, H], tokens) for one row of ids [1, T]: [1, P+T, H]."""
        return self._embed(input_ids, prompt[None]).view(1, prompt.shape[0] + input_ids.shape[1], -1)

    # ------------------------------------------------------------- the passes
    def prefix(self, prompts: torch.Tensor) -> Prefix:
        no_tokens = torch.empty(1, 0, dtype=torch.long, device=prompts.device)
        embeds = self._embed(no_tokens, prompts).view(prompts.shape[0], prompts.shape[1], -1)
        ones = torch.ones(prompts.shape[:2], dtype=torch.long, device=prompts.device)
        final, kv = self.decoder.forward(embeds, ones)
        return Prefix(final, _to_cache_layout(kv))

    def hidden_states(
        self, batch: PromptBatch, input_ids: torch.Tensor, prefixes: PrefixCache
    ) -> tuple[torch.Tensor, torch.Tensor, str, str | None]:
        num_virtual = batch.num_virtual_tokens
        if batch.learned is not None:
            return self._prefix_tuned(batch, input_ids)
        if batch.trains and batch.shares_prefix:
            prompt_final, token_final = self.packed(batch, input_ids)
            if batch.adapter_of_row is not None:
                prompt_final = prompt_final.index_select(0, batch.adapter_of_row)
            return prompt_final, token_final, "packed", None
        if input_ids.shape[0] == 1 or not batch.shares_prefix:
            if batch.adapter_of_row is not None:
                return self.generic.hidden_states(batch, input_ids, prefixes)
            final, _ = self.decoder.forward(self._embed_row(input_ids, batch.prompts[0]), batch.key_mask)
            return final[:, :num_virtual], final[:, num_virtual:], "whole", None
        prefix = prefixes.prefix(self, batch)
        token_final, _ = self.prefill(input_ids, batch.key_mask, prefix, batch.adapter_of_row)
        if batch.adapter_of_row is not None:
            return prefix.final.index_select(0, batch.adapter_of_row), token_final, "shared", None
        return prefix.final, token_final, "shared", None

    def _prefix_tuned(self, batch: PromptBatch, input_ids: torch.Tensor) -> tuple[None, torch.Tensor, str, None]:
        """Prefix tuning: a training step packs the rows' kept positions against
        the learned prefix; any other call runs the tokens with it as their
        past, one stride-0 view for every row (the blocks take it as an
        argument, so a checkpointed block's re-run has it too)."""
        if batch.trains and batch.shares_prefix:
            return None, self.packed(batch, input_ids)[1], "packed", None
        token_final, _ = self.prefill(input_ids, batch.key_mask, batch.learned, batch.adapter_of_row)
        return None, token_final, "shared", None

    def packed(self, batch: PromptBatch, input_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The prompts' final hidden [A, P, H] and the tokens' [B, T, H] (zero
        where not kept) from one packed pass. A learned prefix (prefix tuning)
        puts no prompt in the sequence: no prompts' states (None) then."""
        num_adapters, num_virtual = batch.num_adapters, batch.num_virtual_tokens
        norm = self.decoder.embedding_layernorm
        weight = self.decoder.word_embeddings.weight
        learned = batch.learned is not None
        prompts = weight.new_empty(0, 0, weight.shape[1]) if learned else batch.prompts
        num_adapters = 0 if learned else num_adapters
        sequence, layout = pack_embed(input_ids, batch.keep, prompts, weight, norm.weight, norm.bias, norm.eps)
        # Prompt keys sit at 0..P-1 and each token key where PEFT's mask cumsum puts it.
        prompt_positions = torch.arange(num_virtual, device=input_ids.device)
        token_positions = layout.gather(key_positions(batch.key_mask)[:, num_virtual:])
        real = layout.gather(batch.key_mask[:, num_virtual:]).bool()
        blocks = segments(layout, num_adapters, num_virtual, batch.row_adapters, real, learned)
        plan = packed_attention(
            blocks,
            torch.cat([prompt_positions.repeat(num_adapters), token_positions]),
            self.decoder.num_heads,
            sequence.dtype,
            prompt_positions,
        )
        final = self.decoder.packed(sequence, plan, batch.learned.kv if learned else None)
        prompts_end = num_adapters * num_virtual
        if learned:
            return None, layout.scatter(final)
        return final[:prompts_end].view(num_adapters, num_virtual, -1), layout.scatter(final[prompts_end:])

    def prefill(self, input_ids, key_mask, prefix: Prefix, adapter_of_row: torch.Tensor | None):
        """The T real tokens against the prefix: final hidden [B, T, H] and each
        layer's new (key, value) [B, heads, T, d]."""
        segments = []
        for key, value in prefix.kv:
            if adapter_of_row is not None:
                key, value = key.index_select(0, adapter_of_row), value.index_select(0, adapter_of_row)
            segments.append([KVSegment(key.transpose(0, 1), value.transpose(0, 1))])
        final, kv = self.decoder.forward(self.embed_tokens(input_ids), key_mask, past=segments)
        return final, _to_cache_layout(kv)

    def prefill_with_prompt(self, input_ids, prompt: torch.Tensor, key_mask):
        """One pass over cat(prompt, tokens) for one row (nothing to share):
        the prompt's Prefix, and the tokens' final hidden [1, T, H] and K/V as
        ``prefill`` returns them."""
        num_virtual = prompt.shape[0]
        final, kv = self.decoder.forward(self._embed_row(input_ids, prompt), key_mask)
        kv = _to_cache_layout(kv)
        # Copies, so the cached prefix does not keep the tokens' K/V alive.
        prefix = Prefix(
            final[:, :num_virtual].clone(),
            [(k[:, :, :num_virtual].clone(), v[:, :, :num_virtual].clone()) for k, v in kv],
        )
        return prefix, final[:, num_virtual:], [(k[:, :, num_virtual:], v[:, :, num_virtual:]) for k, v in kv]

    # ------------------------------------------------------------- generation
    def generate(self, batch: PromptBatch, args: tuple, kwargs: dict, prefixes: PrefixCache) -> torch.Tensor | None:
        """BLOOM's own decode loop where it serves the request (``bloom_decode``);
        None, with the reason logged, where transformers' loop must."""
        request = bloom_decode.decode_request(self.model.generation_config, args, kwargs)
        if isinstance(request, str):
            log.info("fastprompt: generate runs transformers' loop (with the cached prefix) for %s", request)
            return None
        return bloom_decode.generate(self, batch, request, kwargs, prefixes)

    def generation_kwargs(self, batch: PromptBatch, args: tuple, kwargs: dict) -> dict:
        return self.generic.generation_kwargs(batch, args, kwargs)

    def prepare_step_inputs(
        self,
        batch: PromptBatch,
        prefixes: PrefixCache,
        prepare_base: Callable,
        input_ids: torch.Tensor,
        *args,
        **kwargs,
    ) -> dict:
        """transformers' loop runs transformers' BLOOM: the generic path's steps,
        with the prefix computed here (it fits that cache: same numbers, same
        layout), so this loop and BLOOM's own share one cached entry."""
        return generic_generation.prepare_step_inputs(
            self.generic, self, batch, prefixes, prepare_base, input_ids, *args, **kwargs
        )
