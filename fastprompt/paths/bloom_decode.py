"""BLOOM's hand-written decode loop: the real tokens once against the cached prefix, then one position per step.

Why it exists: on BLOOM it is faster than transformers' loop running
transformers' BLOOM (whose attention is an eager baddbmm/softmax/bmm chain and
whose GELU is ten elementwise kernels): the steps run ``BloomDecoder`` (SDPA,
fused GELU) and the vocabulary head as ``W @ h.T``. It serves greedy and
sampled decoding with the settings in ``SUPPORTED_FIELDS``; any other request
(beam search, scores in the output, ...) goes to transformers' loop
(``generic_generation.py``), which gives the same tokens.

Memory is laid out as in gpt-fast: per layer one buffer ``[2, rows, heads,
P + T + max_new, head_dim]`` holding prefix | prompt tokens | new tokens,
written in place. Two step variants:

* eager (default): a step attends to the buffer's first ``slot + 1``
  positions, a view — no per-step concatenation;
* static (``cache_implementation="static"``): a step attends to the whole
  buffer, future slots masked, so every step has the same shapes; it is
  ``torch.compile``d (``mode="reduce-overhead"`` on CUDA: CUDA graphs).

Token choice is transformers' own warpers, stopping criteria and streamers,
built and ordered as ``generate`` builds them for these settings, so sampling
means what it means in ``transformers.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..batch import PromptBatch, with_virtual_tokens
from ..prefix_cache import PrefixCache
from .bloom_decoder import alibi
from .generic_generation import inferred_attention_mask, new_token_budget, request_config

# GenerationConfig fields this loop implements exactly as transformers does
# (the same warpers in the same order); a request setting any other field to a
# non-default value goes to transformers' loop. Repetition penalties and
# minimum lengths are left to it on purpose: how they treat left padding and
# defaults changed between transformers 5 releases.
SUPPORTED_FIELDS = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "num_return_sequences",
        "use_cache",
        "cache_implementation",
    }
)
# generate() arguments besides the config fields that this loop serves.
SUPPORTED_ARGUMENTS = frozenset({"input_ids", "attention_mask", "generation_config", "stopping_criteria", "streamer"})


@dataclass
class DecodeRequest:
    """A request this loop serves, resolved once."""

    config: GenerationConfig
    attention_mask: torch.Tensor  # as given, or inferred from the pad token as transformers does
    max_new: int
    copies: int  # num_return_sequences
    eos: torch.Tensor | None  # 1-D
    pad: int | None
    static: bool


def decode_request(default: GenerationConfig, args, kwargs) -> DecodeRequest | str:
    """The request ``generate(*args, **kwargs)`` makes of this loop, or why it cannot serve it."""
    if args:
        return "positional arguments"
    extra = sorted(set(kwargs) - SUPPORTED_ARGUMENTS - SUPPORTED_FIELDS)
    if extra:
        return f"arguments {extra}"
    input_ids = kwargs.get("input_ids")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return "no 2-D input_ids"
    config = request_config(
        default, {k: v for k, v in kwargs.items() if k in SUPPORTED_FIELDS or k == "generation_config"}
    )
    defaults = config._get_default_generation_params()
    other = sorted(
        name
        for name, value in config.to_dict().items()
        if name not in SUPPORTED_FIELDS
        and not name.startswith("_")
        and name != "transformers_version"
        and value is not None
        and value is not False
        and value != defaults.get(name)
    )
    if other:
        return f"settings {other}"
    if config.cache_implementation not in (None, "static"):
        return f"cache_implementation={config.cache_implementation!r}"
    max_new = new_token_budget(config, input_ids.shape[1])
    if max_new < 1:
        return "no new token to generate"  # transformers' loop says so in its own words
    config.update(**{k: v for k, v in defaults.items() if getattr(config, k, None) is None})
    copies = config.num_return_sequences
    if copies > 1 and not config.do_sample:
        return "greedy num_return_sequences > 1"
    eos_ids = config.eos_token_id
    eos_ids = None if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    eos = None if eos_ids is None else torch.tensor(eos_ids, device=input_ids.device, dtype=torch.long)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = inferred_attention_mask(input_ids, config.pad_token_id, eos_ids)
    if not bool(mask[:, -1].all()):
        return "inputs that are not left-padded"
    pad = config.pad_token_id
    if pad is None and eos_ids is not None:
        pad = eos_ids[0]  # transformers does the same
    return DecodeRequest(config, mask, max_new, copies, eos, pad, config.cache_implementation == "static")


def _token_rules(request: DecodeRequest, user_criteria):
    """transformers' warpers (in generate's order) and stopping criteria."""
    config = request.config
    warpers = LogitsProcessorList()
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p))
    criteria = StoppingCriteriaList()
    if request.eos is not None:
        criteria.append(EosTokenCriteria(request.eos))
    criteria.extend(user_criteria or [])
    return warpers, criteria


def next_token_logits(lm_head, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for a few rows (one per sequence). CPU BLAS runs ``W @ h.T``
    faster than ``h @ W.T`` when h has a handful of rows and W is a
    vocabulary-sized matrix (measured: docs/results/CHANGELOG.md): the head is the
    largest GEMM of a decode step. Same products, same fp32 accumulation."""
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None:
        return torch.mm(lm_head.weight, hidden.t()).t()
    return lm_head(hidden)


def _step(path, next_ids, slot, slot_alibi, visible, buffers, attended: int):
    """One decode step: the new tokens' embeddings through every layer, their
    K/V written at ``slot``, attending to the first ``attended`` slots."""
    positions = torch.arange(attended, device=slot.device)
    allowed = visible[:, :attended] & (positions <= slot)
    bias = slot_alibi[:, :, :attended].masked_fill(~allowed[:, None, :], torch.finfo(slot_alibi.dtype).min)
    hidden = path.decoder.decode(path.embed_tokens(next_ids[:, None]), bias[:, :, None, :], buffers, slot, attended)
    return next_token_logits(path.lm_head, hidden[:, -1])


def _compiled_step(path, device: torch.device):
    if path.compiled_step is None:
        mode = "reduce-overhead" if device.type == "cuda" else None
        path.compiled_step = torch.compile(_step, mode=mode, dynamic=False)
    return path.compiled_step


@torch.no_grad()
def generate(path, batch: PromptBatch, request: DecodeRequest, kwargs: dict, prefixes: PrefixCache) -> torch.Tensor:
    """``[B * num_return_sequences, T + new]`` ids, as ``generate`` returns
    them; ``path`` is the ``BloomPath`` (its decoder, passes and compiled step)."""
    input_ids, mask = kwargs["input_ids"], request.attention_mask
    streamer = kwargs.get("streamer")
    inputs, input_length = input_ids.shape
    copies, num_virtual = request.copies, batch.num_virtual_tokens
    capacity = num_virtual + input_length + request.max_new

    key_mask = with_virtual_tokens(mask, num_virtual)
    prefix = prefixes.lookup(path, batch)
    if prefix is None and inputs == 1:
        # Nothing to share within the call: one pass over cat(prompt, tokens)
        # reads the weights once, and its first P positions are the prefix to keep.
        prefix, final, token_kv = path.prefill_with_prompt(input_ids, batch.prompts[0], key_mask)
        prefixes.store(path, batch, prefix)
    else:
        prefix = prefixes.prefix(path, batch)
        final, token_kv = path.prefill(input_ids, key_mask, prefix, batch.adapter_of_row)
    logits = next_token_logits(path.lm_head, final[:, -1]).repeat_interleave(copies, dim=0)

    total_rows = inputs * copies
    ids = input_ids.new_empty(total_rows, input_length + request.max_new)
    ids[:, :input_length] = input_ids.repeat_interleave(copies, dim=0)
    # Every generated position is attended to, finished rows included, as in transformers.
    slot_mask = mask.new_ones(total_rows, capacity)
    slot_mask[:, num_virtual : num_virtual + input_length] = mask.repeat_interleave(copies, dim=0)
    slot_alibi, visible = alibi(slot_mask, path.decoder.num_heads, final.dtype), slot_mask.bool()
    input_of_row = torch.arange(inputs, device=ids.device).repeat_interleave(copies)
    adapter_of_row = batch.adapter_of(total_rows)
    buffers = []
    for (prefix_key, prefix_value), (key, value) in zip(prefix.kv, token_kv):
        heads, dim = key.shape[1], key.shape[3]
        # Zeros, not empty: a static step reads every slot (masked to weight 0,
        # but 0 x NaN from uninitialised memory would still poison the sum).
        buffer = key.new_zeros(2, total_rows, heads, capacity, dim)
        buffer[0, :, :, :num_virtual] = (
            prefix_key if adapter_of_row is None else prefix_key.index_select(0, adapter_of_row)
        )
        buffer[1, :, :, :num_virtual] = (
            prefix_value if adapter_of_row is None else prefix_value.index_select(0, adapter_of_row)
        )
        buffer[0, :, :, num_virtual : num_virtual + input_length] = key.index_select(0, input_of_row)
        buffer[1, :, :, num_virtual : num_virtual + input_length] = value.index_select(0, input_of_row)
        buffers.append(buffer)

    processors, criteria = _token_rules(request, kwargs.get("stopping_criteria"))
    step = _compiled_step(path, ids.device) if request.static else _step
    if streamer is not None:
        streamer.put(ids[:, :input_length].cpu())
    unfinished = torch.ones(total_rows, dtype=torch.bool, device=ids.device)
    # Where each row finished: the loop learns that every row has finished
    # from a flag copied to the host without waiting (see _AllFinished), so it
    # may run a few steps past the last finish; the output is cut where
    # transformers' loop, which checks (and syncs) every step, would have stopped.
    finished_at = torch.full_like(unfinished, ids.shape[1], dtype=torch.long)
    all_finished = _AllFinished(ids.device, wait=streamer is not None)
    for position in range(input_length, ids.shape[1]):
        scores = processors(ids[:, :position], logits.float())
        if request.config.do_sample:
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_ids = scores.argmax(dim=-1)
        if request.eos is not None:
            next_ids = torch.where(unfinished, next_ids, request.pad)
        ids[:, position] = next_ids
        if streamer is not None:
            streamer.put(next_ids.cpu())
        still = unfinished & ~criteria(ids[:, : position + 1], scores)
        finished_at = torch.where(unfinished & ~still, position + 1, finished_at)
        unfinished = still
        if position + 1 == ids.shape[1] or all_finished.seen():
            break
        all_finished.post(unfinished)
        slot = torch.full((1,), num_virtual + position, dtype=torch.long, device=ids.device)
        logits = step(
            path,
            next_ids,
            slot,
            slot_alibi,
            visible,
            buffers,
            capacity if request.static else num_virtual + position + 1,
        )
    if streamer is not None:
        streamer.end()
    end = int(finished_at.max()) if not bool(unfinished.any()) else position + 1  # one sync, after the loop
    return ids[:, :end]


class _AllFinished:
    """Whether every row has finished, as the host can know it without
    stalling the device: each step posts the flag with a non-blocking copy to
    pinned memory and a CUDA event; a later step reads it once the event says
    the copy landed. On CPU the copy is immediate. With a streamer the loop
    must stop exactly (tokens past the end would be streamed), so it waits."""

    def __init__(self, device: torch.device, wait: bool):
        self.event = torch.cuda.Event() if device.type == "cuda" and not wait else None
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.event is not None)
        self.posted = False

    def post(self, unfinished: torch.Tensor) -> None:
        self.host.copy_(~unfinished.any(), non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.posted = True

    def seen(self) -> bool:
        if not self.posted or (self.event is not None and not self.event.query()):
            return False
        return bool(self.host)
