"""``generate`` for a soft-prompted model: cached prefix, real tokens only.

What PEFT intends, ``base.generate(inputs_embeds=cat(prompt, embed(ids)))``,
runs the P virtual tokens again for every row of every request. Here their
K/V come from the ``PrefixCache`` as one shared batch-1 segment, the prefill
runs only the T real tokens against it, and the decode loop writes each row's
K/V into a buffer preallocated for T + max_new positions and hands the decoder
views of it (gpt-fast style: one screen, no framework). Token choice is transformers' own (``GenerationConfig``,
logits processors, stopping criteria, streamers) so sampling means what it
means in ``transformers.generate``.

Conventions are PEFT's for prompt tuning: lengths (``max_length``,
``min_length``) count the real input ids, never the virtual tokens, and the
result is ``[B * num_return_sequences, T + new]`` ids without virtual tokens.
Inputs must be left-padded, as for any decoder-only ``generate``: each row's
next token is predicted from its last position. ALiBi positions come from the
mask cumsum, so left padding is exact. Right padding is refused, not silently
mishandled.

Architectures without a fast decoder take the PEFT-intended path through the
base model's ``generate``, with the same argument checks and return convention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .arch.bloom import KVSegment
from .prefix_cache import prefix_cache_of

# GenerationConfig fields this loop implements. Any other field holding a
# non-default value (beam search, contrastive search, ...) is refused by name.
SUPPORTED_FIELDS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens",
    "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "num_return_sequences",
    "use_cache",  # a cache is always used; the output is the same either way
})
# Tokenizers of some models emit it; BLOOM has no token types.
IGNORED_INPUTS = ("token_type_ids",)


@dataclass
class _Plan:
    """Everything the loops need, resolved once from the config."""

    max_new: int
    min_new: int
    copies: int  # num_return_sequences
    do_sample: bool
    eos: torch.Tensor | None  # 1-D
    pad: int | None
    config: GenerationConfig


def generate(model, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """``model.generate``: returns ``[B * num_return_sequences, T + new]`` ids."""
    for name in IGNORED_INPUTS:
        kwargs.pop(name, None)
    streamer = kwargs.pop("streamer", None)
    user_processors = kwargs.pop("logits_processor", None) or []
    user_criteria = kwargs.pop("stopping_criteria", None) or []
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask)
    plan = _plan(model, dict(kwargs), input_ids.shape[1])
    with torch.no_grad():
        if model._decoder is None:
            return _generate_with_base(model, input_ids, attention_mask, plan, kwargs, streamer,
                                       user_processors, user_criteria)
        return _generate_with_cached_prefix(model, input_ids, attention_mask, plan, streamer,
                                            user_processors, user_criteria)


def _check_inputs(model, input_ids, attention_mask):
    if input_ids is None:
        raise ValueError("generate needs input_ids (a left-padded [batch, tokens] tensor)")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be a 2-D integer tensor [batch, tokens]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one real token per row")
    input_ids = input_ids.to(model.device, torch.long)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    attention_mask = attention_mask.to(model.device, torch.long)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "generate needs left-padded inputs: the last position of every row must be a real token "
            "(set tokenizer.padding_side = 'left')"
        )
    return input_ids, attention_mask


def _plan(model, kwargs, input_length) -> _Plan:
    config = copy.deepcopy(kwargs.pop("generation_config", None) or model.base_model.generation_config)
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(f"generate() got unsupported arguments: {sorted(unknown)}")
    defaults = config._get_default_generation_params()
    refused = sorted(
        name for name, value in config.to_dict().items()
        if name not in SUPPORTED_FIELDS and not name.startswith("_") and name != "transformers_version"
        and value is not None and value is not False and value != defaults.get(name)
    )
    if refused:
        raise ValueError(
            f"fastprompt generate supports greedy and sampling decoding only; unsupported settings: "
            f"{', '.join(f'{name}={getattr(config, name)!r}' for name in refused)}"
        )
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    elif config.max_length is not None:
        max_new = config.max_length - input_length
        if max_new <= 0:
            raise ValueError(
                f"input length is {input_length} but max_length is {config.max_length}: "
                "increase max_length or set max_new_tokens"
            )
    else:
        max_new = defaults["max_length"]  # transformers' default: that many *new* tokens
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    # Unset fields take transformers' global defaults (top_k 50, ...), as in generate().
    config.update(**{k: v for k, v in defaults.items() if getattr(config, k, None) is None})
    min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - input_length)

    copies = config.num_return_sequences
    if copies > 1 and not config.do_sample:
        raise ValueError(
            f"greedy decoding gives num_return_sequences={copies} identical rows; pass do_sample=True"
        )
    eos = config.eos_token_id
    eos = None if eos is None else torch.tensor(eos, device=model.device, dtype=torch.long).reshape(-1)
    pad = config.pad_token_id
    if pad is None and eos is not None:
        pad = int(eos[0])  # transformers does the same
    return _Plan(max_new, min_new, copies, bool(config.do_sample), eos, pad, config)


def _token_rules(plan: _Plan, attention_mask, input_length, user_processors, user_criteria):
    """transformers' logits processors (in its order) and stopping criteria."""
    config = plan.config
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        # Leading padding is not part of the prompt to penalise.
        padding = (attention_mask != 0).int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=padding))
    if plan.eos is not None and plan.min_new > 0:
        processors.append(
            MinNewTokensLengthLogitsProcessor(input_length, plan.min_new, plan.eos, device=plan.eos.device)
        )
    processors.extend(user_processors)
    if plan.do_sample:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p))
    criteria = StoppingCriteriaList()
    if plan.eos is not None:
        criteria.append(EosTokenCriteria(plan.eos))
    criteria.extend(user_criteria)
    return processors, criteria


def next_token_logits(lm_head, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for a few rows (one per sequence). CPU BLAS runs ``W @ h.T`` about
    twice as fast as ``h @ W.T`` when h has a handful of rows and W is a
    vocabulary-sized matrix (bloom-mini, 8 rows: 14 vs 29 ms): the head is the
    largest GEMM of a decode step. Same products, same fp32 accumulation."""
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None:
        return torch.mm(lm_head.weight, hidden.t()).t()
    return lm_head(hidden)


def _prefill(model, prefix, input_ids, attention_mask, plan):
    """Runs the real tokens once per distinct row against the shared prefix,
    then makes the num_return_sequences copies: the first logits, the ids
    buffer, the key mask over every position to come and, per layer, a K/V
    buffer ``[2, heads, rows, T + max_new, d]`` holding the T tokens' K/V."""
    virtual, (batch, length) = prefix[0].length, input_ids.shape
    key_mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)
    hidden, token_kv = model._decoder.forward(
        model._embed_tokens(input_ids), key_mask, past=[[seg] for seg in prefix]
    )
    logits = next_token_logits(model.base_model.get_output_embeddings(), hidden[:, -1])

    copies = plan.copies
    rows, total = batch * copies, length + plan.max_new
    ids = input_ids.new_empty(rows, total)
    ids[:, :length] = input_ids.repeat_interleave(copies, dim=0)
    # Every generated position is attended to, finished rows included, as in transformers.
    key_mask = attention_mask.new_ones(rows, virtual + total)
    key_mask[:, virtual : virtual + length] = attention_mask.repeat_interleave(copies, dim=0)
    kv_cache = []
    for key, value in token_kv:
        heads, _, _, dim = key.shape
        buffer = key.new_empty(2, heads, rows, total, dim)
        buffer[0, :, :, :length] = key.repeat_interleave(copies, dim=1)
        buffer[1, :, :, :length] = value.repeat_interleave(copies, dim=1)
        kv_cache.append(buffer)
    return logits.repeat_interleave(copies, dim=0), ids, key_mask, kv_cache


def _generate_with_cached_prefix(model, input_ids, attention_mask, plan, streamer, user_processors, user_criteria):
    prefix = prefix_cache_of(model).segments(model)
    virtual, length = prefix[0].length, input_ids.shape[1]
    logits, ids, key_mask, kv_cache = _prefill(model, prefix, input_ids, attention_mask, plan)
    processors, criteria = _token_rules(
        plan, key_mask[:, virtual : virtual + length], length, user_processors, user_criteria
    )
    lm_head = model.base_model.get_output_embeddings()
    if streamer is not None:
        streamer.put(ids[:, :length].cpu())
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    for position in range(length, ids.shape[1]):
        scores = processors(ids[:, :position], logits.float())
        if plan.do_sample:
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_ids = scores.argmax(dim=-1)
        if plan.eos is not None:
            next_ids = torch.where(unfinished, next_ids, plan.pad)
        ids[:, position] = next_ids
        if streamer is not None:
            streamer.put(next_ids.cpu())
        unfinished &= ~criteria(ids[:, : position + 1], scores)
        if position + 1 == ids.shape[1] or not bool(unfinished.any()):
            break
        # One new position per row, against the prefix and the row's K/V so far.
        past = [[seg, KVSegment(buf[0, :, :, :position], buf[1, :, :, :position], shared=False)]
                for seg, buf in zip(prefix, kv_cache)]
        hidden, new_kv = model._decoder.forward(
            model._embed_tokens(next_ids[:, None]), key_mask[:, : virtual + position + 1], past=past
        )
        for buf, (key, value) in zip(kv_cache, new_kv):
            buf[0, :, :, position] = key[:, :, 0]
            buf[1, :, :, position] = value[:, :, 0]
        logits = next_token_logits(lm_head, hidden[:, -1])
    if streamer is not None:
        streamer.end()
    return ids[:, : position + 1]


def _generate_with_base(model, input_ids, attention_mask, plan, kwargs, streamer, user_processors, user_criteria):
    """The PEFT-intended path, for architectures without a fast decoder: the
    prompt is concatenated to the token embeddings for every row and call."""
    embeds = model.base_model.get_input_embeddings()(input_ids)
    prompt = model.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prompt.shape[1]), attention_mask], dim=1)
    # Lengths were resolved over the real tokens; say them as new-token counts,
    # since the base model counts from the start of inputs_embeds.
    passed = {k: v for k, v in kwargs.items() if k not in ("max_length", "min_length", "min_new_tokens")}
    passed.update(max_new_tokens=plan.max_new, min_new_tokens=plan.min_new or None)
    new = model.base_model.generate(
        inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask, streamer=streamer,
        logits_processor=LogitsProcessorList(user_processors), stopping_criteria=StoppingCriteriaList(user_criteria),
        **passed,
    )
    return torch.cat([input_ids.repeat_interleave(plan.copies, dim=0), new], dim=1)
