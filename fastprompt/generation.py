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

import torch

from .arch import GenericDriver


def _rows_for_batch(rows: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Per-row adapter index for the batch transformers runs, which repeats
    each input row for its beams / returned sequences."""
    if rows is None:
        return None
    if batch % rows.numel():
        raise ValueError(f"generate ran {batch} rows for {rows.numel()} inputs with adapter_names")
    return rows.repeat_interleave(batch // rows.numel())


def _shift_positions(position_ids: torch.Tensor, mask: torch.Tensor | None, count: int) -> torch.Tensor:
    """Positions transformers numbered from the real tokens' mask, renumbered
    as if ``count`` unmasked virtual tokens came first (padding stays put)."""
    if mask is None:
        return position_ids + count
    mask = mask[:, -position_ids.shape[-1]:].to(position_ids.device).bool()
    return torch.where(mask, position_ids + count, position_ids)


def prepare_step_inputs(model, row_adapters, call_plan, input_ids, *args, **kwargs) -> dict:
    """``prepare_inputs_for_generation`` of a FastPromptModel (see module doc);
    ``call_plan`` is ``model._call_plan()`` for this ``generate`` call."""
    adapters, rows = row_adapters
    generic = model._drivers()[1]
    cache = kwargs.get(generic.cache_arg)
    count = model.peft_config[adapters[0]].num_virtual_tokens
    batch = input_ids.shape[0]
    row_index = _rows_for_batch(rows, batch)
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = _shift_positions(kwargs["position_ids"], mask, count)
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, count), mask], dim=1)
    prompts = torch.stack([model._prompt(name) for name in adapters])

    driver, share = call_plan
    if cache is not None and share:
        if cache.get_seq_length() == 0:
            prefix = model._prefix(driver, adapters, prompts)
            GenericDriver.fill(cache, prefix, row_index, batch)
        return model.base_model_prepare_inputs_for_generation(input_ids, *args, **kwargs)
    if cache is not None and cache.get_seq_length() > 0:  # a later step of an unshared prefill
        return model.base_model_prepare_inputs_for_generation(input_ids, *args, **kwargs)

    # The prompt goes in front of the embeddings, as in PEFT: without a cache
    # (use_cache=False) every step recomputes the whole sequence; with hooks or
    # dropout that must see PEFT's calls, the first step runs cat(prompt, tokens).
    inputs = model.base_model_prepare_inputs_for_generation(input_ids, *args, **kwargs)
    embeds = inputs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.word_embeddings(inputs["input_ids"])
    inputs["input_ids"] = None
    row_prompts = prompts.expand(batch, -1, -1) if row_index is None else prompts.index_select(0, row_index)
    inputs["inputs_embeds"] = torch.cat([row_prompts.to(embeds.dtype), embeds], dim=1)
    if inputs.get("position_ids") is not None:
        virtual = torch.arange(count, device=embeds.device).expand(batch, -1)
        inputs["position_ids"] = torch.cat([virtual, inputs["position_ids"]], dim=1)
    return inputs


def with_room_for_prompt(model, args, kwargs) -> dict:
    """A static cache sized for the virtual tokens too. transformers sizes the
    cache it creates for ``cache_implementation="static"`` by the real tokens
    only; a cache passed in (empty: the prefix goes in on the first step)
    leaves room for the P prompt positions as well."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    if config.cache_implementation != "static":
        return kwargs
    from transformers import StaticCache

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = (input_ids if input_ids is not None else embeds).shape[1]
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    else:
        new = (config.max_length or config._get_default_generation_params()["max_length"]) - length
    count = model.active_peft_config.num_virtual_tokens
    config.cache_implementation = None
    kwargs = dict(kwargs, generation_config=config)
    kwargs.pop("cache_implementation", None)
    base_config = model.get_base_model().config
    kwargs[model._drivers()[1].cache_arg] = StaticCache(config=base_config, max_cache_len=count + length + max(new, 1))
    return kwargs
