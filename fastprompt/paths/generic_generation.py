"""``generate`` for a soft-prompted model: transformers' own loop, the prompt's K/V from the prefix cache.

PEFT's ``generate`` runs the base model's ``generate`` with PEFT's
``prepare_inputs_for_generation`` installed, which puts the prompt in front of
the token embeddings on the first step. Here (``prepare_step_inputs``) the
first step instead finds the cache transformers created still empty and fills
it with the prompt's per-layer K/V, expanded to the batch (beams and returned
sequences included) or picked per row for mixed-adapter batches; the forward
then runs only the real tokens. To the base model the virtual tokens look like
P tokens already in its cache, so every option of transformers' ``generate``
(beam search, scores and logits, processors, stopping criteria, streamers,
``max_length``/``max_new_tokens``, ...) means what it means there.

Conventions are PEFT's for prompt tuning: lengths count the real input ids,
never the virtual tokens, and sequences hold the input ids and the new ones.
Each step gets the attention mask with P ones in front, and position ids (when
transformers passes them) shifted by P, which is what
``base.generate(inputs_embeds=cat(prompt, embed(ids)))`` computes for the real
tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from ..batch import PromptBatch, with_virtual_tokens
from ..prefix_cache import PrefixCache, PrefixSource


def request_config(default: GenerationConfig, kwargs: dict) -> GenerationConfig:
    """The generation config of one ``generate`` call: the given (or the
    model's) config updated with the call's keyword fields, as transformers does."""
    config = copy.deepcopy(kwargs.get("generation_config") or default)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    return config


def new_token_budget(config: GenerationConfig, input_length: int) -> int:
    """How many tokens a request may add, as transformers counts them:
    ``max_new_tokens``, else what a given ``max_length`` leaves after the
    input, else the default ``max_length`` (20) as new tokens."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        return config.max_length - input_length
    return config._get_default_generation_params()["max_length"]


def inferred_attention_mask(input_ids: torch.Tensor, pad: int | None, eos: int | list[int] | None) -> torch.Tensor:
    """transformers' rule for a ``generate`` call without ``attention_mask``:
    pad tokens are masked where the pad token is set and is not an end-of-sequence token."""
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if pad is None or pad in eos_ids:
        return torch.ones_like(input_ids)
    return input_ids.ne(pad).long()


def _peft_positions(position_ids: torch.Tensor, mask: torch.Tensor | None, batch: PromptBatch) -> torch.Tensor:
    """Positions transformers numbered from the real tokens' mask (pads at 0,
    each new token one past the last column), renumbered as
    ``base.generate(inputs_embeds=cat(prompt, embed(ids)))`` numbers them: the
    input's real tokens shifted by P, its pads in place, and the new tokens
    continuing from the input's last column, shifted by P only where that
    column is a real token (a right-padded row continues from its pad's 0)."""
    num_virtual = batch.num_virtual_tokens
    if mask is None or batch.key_mask is None:
        return position_ids + num_virtual  # no padding: every position follows the virtual tokens
    rows = position_ids.shape[0]
    input_mask = batch.key_mask[:, num_virtual:]
    input_mask = input_mask.repeat_interleave(rows // input_mask.shape[0], dim=0)
    generated = mask.shape[1] - input_mask.shape[1]
    shifted = torch.cat([input_mask, input_mask[:, -1:].expand(-1, generated)], dim=1)
    return position_ids + num_virtual * shifted[:, -position_ids.shape[-1] :].to(position_ids.device)


def prepare_step_inputs(
    path,
    source: PrefixSource,
    batch: PromptBatch,
    prefixes: PrefixCache,
    prepare_base: Callable,
    input_ids,
    *args,
    **kwargs,
) -> dict:
    """One step's inputs for the base model (see module doc); ``path`` is the
    ``GenericPath`` (its cache argument, embedding and ``fill``), ``source`` the
    path whose prefix fills the cache (BLOOM's own computes one that fits, so
    its decode loop and this one share a cached entry), ``prepare_base`` the
    base model's ``prepare_inputs_for_generation``."""
    cache = kwargs.get(path.cache_arg)
    num_virtual = batch.num_virtual_tokens
    rows = input_ids.shape[0]
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = _peft_positions(kwargs["position_ids"], mask, batch)
    if mask is not None:
        kwargs["attention_mask"] = with_virtual_tokens(mask, num_virtual)

    if cache is not None and cache.get_seq_length() > 0:  # a later step: the cache holds the prompt
        return prepare_base(input_ids, *args, **kwargs)
    # A learned prefix (prefix tuning) is a cache by nature: PEFT gives it as one whatever the model.
    learned = batch.learned is not None
    if cache is not None and (
        learned or (batch.shares_prefix and path.unshareable(num_virtual, input_ids.shape[1]) is None)
    ):
        path.fill(cache, prefixes.prefix(source, batch), batch.adapter_of(rows), rows)
        return prepare_base(input_ids, *args, **kwargs)
    if learned:
        raise ValueError("prefix tuning generates with a cache (its prefix is one): use_cache=False cannot serve it")

    # The prompt goes in front of the embeddings, as in PEFT: without a cache
    # (use_cache=False) every step recomputes the whole sequence; with hooks or
    # dropout that must see PEFT's calls, the first step runs cat(prompt, tokens).
    inputs = prepare_base(input_ids, *args, **kwargs)
    embeds = inputs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = path.embed_tokens(inputs["input_ids"])
    inputs["input_ids"] = None
    inputs["inputs_embeds"] = torch.cat([batch.row_prompts(rows).to(embeds.dtype), embeds], dim=1)
    if inputs.get("position_ids") is not None:
        virtual = torch.arange(num_virtual, device=embeds.device).expand(rows, -1)
        inputs["position_ids"] = torch.cat([virtual, inputs["position_ids"]], dim=1)
    prepared = inputs.get("attention_mask")
    if prepared is not None and (isinstance(prepared, dict) or prepared.dim() != 2):
        inputs["attention_mask"] = _mask_with_virtual_tokens(path.model, inputs, kwargs.get("attention_mask"))
    return inputs


def _mask_with_virtual_tokens(model, inputs: dict, mask: torch.Tensor | None):
    """A mask the base model prepared in its own form (4D, or one per layer
    type) covers the real tokens only; made anew, as PEFT does, for the
    sequence with the virtual tokens in front, from the 2D mask over it (its
    padding kept) or all ones where none was given."""
    from peft.utils.other import create_attention_mask

    embeds = inputs["inputs_embeds"]
    rows, length = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(rows, length, dtype=torch.long, device=embeds.device)
    cache = inputs.get("cache", inputs.get("past_key_values"))
    return create_attention_mask(
        model,
        model_input=None,
        attention_mask=mask,
        past_key_values=cache,
        cache_position=torch.arange(length, device=embeds.device),
        batch_size=rows,
        sequence_length=length,
        position_ids=inputs.get("position_ids"),
    )


def with_room_for_prompt(path, batch: PromptBatch, args: tuple, kwargs: dict) -> dict:
    """A static cache sized for the virtual tokens too. transformers sizes the
    cache it creates for ``cache_implementation="static"`` by the real tokens
    only; a cache passed in (empty: the prefix goes in on the first step)
    leaves room for the P prompt positions as well."""
    config = request_config(path.model.generation_config, kwargs)
    if config.cache_implementation != "static":
        return kwargs
    from transformers import StaticCache

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = (input_ids if input_ids is not None else embeds).shape[1]
    config.cache_implementation = None
    kwargs = dict(kwargs, generation_config=config)
    kwargs.pop("cache_implementation", None)
    room = batch.num_virtual_tokens + length + max(new_token_budget(config, length), 1)
    kwargs[path.cache_arg] = StaticCache(config=path.model.config, max_cache_len=room)
    return kwargs
