"""Attention over a packed sequence, segment by segment, through the model's own attention function.

The packed pass (``generic.GenericPath.packed``) runs the prompts and every
row's kept positions as one sequence of N positions. Its attention is a set of
blocks (``segments.Segment``): each segment's queries against its keys. A
dense [N, N] mask would compute every pair and throw most away; here each
segment runs on its own, so the pairs between segments are never computed.

transformers' attention layers call ``ALL_ATTENTION_FUNCTIONS[config.
_attn_implementation]``. ``attending_by_segments`` points the configs at
``segment_attention`` (registered under ``NAME``) for the duration of one body
call; it reads the call's segments from a context variable and calls, per
segment, the function the user's implementation would have run (sdpa's, or the
layer's module's own ``eager_attention_forward``), with the segment's mask in
that implementation's format and every other argument passed through: scaling,
soft-capping, grouped K/V heads behave exactly as in the user's attention.

transformers builds no mask for an implementation that is not in its mask
registry, so the body call takes ``attention_mask=None``; the segments are the
mask. The swap is undone when the call returns or raises; the autograd graph
it built keeps the functions it called.

A prefix-tuning call also gives every layer its learned prefix (``Packing.
prefix``), put in front of the keys of each segment that reads it.

Layers checkpointed by transformers re-run their forward in backward, after
the call: each such layer's checkpoint function is wrapped for the call's
duration so that its re-run enters the same swap (``attending_by_segments``),
and computes what the forward did.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .segments import Segment

NAME = "fastprompt_segments"
# The user's implementations whose masks this module can write: sdpa applies a
# boolean one, eager adds a float one.
MASK_FORMATS = ("sdpa", "eager")


@dataclass
class Packing:
    """One packed body call: its segments, the user's implementation, and the
    dtype of its additive masks (eager adds them in the embeddings' dtype, as
    transformers' mask code makes them)."""

    segments: Sequence[Segment]
    implementation: str
    dtype: torch.dtype
    # Prefix tuning: each layer's learned (key, value) [1, kv_heads, P, head_dim].
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
    masks: list[torch.Tensor] = field(init=False)
    # Each segment's query length, and for each segment the indices (into the
    # same split) of its key stretches: the queries cover the sequence in order,
    # and every key stretch is some segment's queries.
    sizes: list[int] = field(init=False)
    key_pieces: list[tuple[int, ...]] = field(init=False)

    def __post_init__(self):
        starts = {}
        position = 0
        for index, segment in enumerate(self.segments):
            if segment.queries.start != position:
                raise ValueError("segments must cover the packed sequence in order")
            starts[segment.queries.start] = (index, segment.queries.stop)
            position = segment.queries.stop
        self.sizes = [s.queries.stop - s.queries.start for s in self.segments]
        self.key_pieces = []
        for segment in self.segments:
            pieces = []
            for keys in segment.keys:
                index, stop = starts.get(keys.start, (None, None))
                if stop != keys.stop:
                    raise ValueError("a segment's keys must be whole segments' queries")
                pieces.append(index)
            self.key_pieces.append(tuple(pieces))
        self.masks = [mask_in_format(s.visible[None, None], self.implementation, self.dtype) for s in self.segments]


def mask_in_format(visible: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attends) as ``implementation`` takes it: as is for
    sdpa, 0 / the dtype's minimum added to the scores for eager."""
    if implementation == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def dense_mask(segments: Iterable[Segment], positions: int, device: torch.device) -> torch.Tensor:
    """The same blocks as one [positions, positions] boolean mask (every other pair masked)."""
    allowed = torch.zeros(positions, positions, dtype=torch.bool, device=device)
    for segment in segments:
        start = 0
        for keys in segment.keys:
            width = keys.stop - keys.start
            allowed[segment.queries, keys] = segment.visible[:, start : start + width]
            start += width
    return allowed


_ACTIVE: contextvars.ContextVar[Packing | None] = contextvars.ContextVar("fastprompt_packing", default=None)


def eager_function(module: torch.nn.Module):
    """The ``eager_attention_forward`` of the modeling file that defines
    ``module``'s class (or a base class): what the layer runs under eager."""
    for cls in type(module).__mro__:
        function = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if function is not None:
            return function
    raise TypeError(f"no eager_attention_forward for {type(module).__name__}")


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa for one segment, with grouped K/V heads read in place
    by their query heads (SDPA's ``enable_gqa``) on CPU: the same numbers
    without the copy transformers makes of every segment's keys and values,
    repeated to every query head, whenever a mask is given (for CUDA, whose
    masked kernels lack GQA). Those copies were most of the packed pass's
    extra memory: a Llama-3.2-1B classify step (B 8, P 100, T 32) peaked 904
    MB above its start with them, 693 MB without, in the same step time
    (docs/results/CHANGELOG.md, 2026-12-07). Anything else is transformers' own."""
    plain = kwargs.get("softcap") is None and kwargs.get("position_bias") is None
    if query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1 or not plain:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def original_function(module: torch.nn.Module, implementation: str):
    """What the user's implementation runs for a segment: the model's eager
    function, or transformers' sdpa (grouped heads kept grouped on CPU)."""
    if implementation == "eager":
        return eager_function(module)
    return grouped_sdpa


def segment_attention(module, query, key, value, attention_mask, **kwargs):
    """query [1, heads, N, D], key/value [1, kv_heads, N, D] of a packed
    sequence: each segment's queries against its keys through the user's
    attention function; the outputs [1, N, heads, D] in query order."""
    packing = _ACTIVE.get()
    if packing is None or attention_mask is not None:
        raise RuntimeError(f"{NAME} runs only inside fastprompt's packed pass, which gives no mask")
    function = original_function(module, packing.implementation)
    # One split per tensor: its backward is one concatenation, where a slice per
    # segment would write each segment's gradient into a full-size buffer.
    queries = query.split(packing.sizes, dim=2)
    keys = key.split(packing.sizes, dim=2)
    values = value.split(packing.sizes, dim=2)
    prefix_key = prefix_value = None
    if packing.prefix is not None:
        prefix_key, prefix_value = packing.prefix[module.layer_idx]
        prefix_key, prefix_value = prefix_key.to(key.dtype), prefix_value.to(value.dtype)
    outputs = []
    for index, (segment, mask) in enumerate(zip(packing.segments, packing.masks)):
        pieces = packing.key_pieces[index]
        key_parts = [keys[i] for i in pieces]
        value_parts = [values[i] for i in pieces]
        if segment.prefix:
            key_parts.insert(0, prefix_key)
            value_parts.insert(0, prefix_value)
        segment_keys = torch.cat(key_parts, dim=2) if len(key_parts) > 1 else key_parts[0]
        segment_values = torch.cat(value_parts, dim=2) if len(value_parts) > 1 else value_parts[0]
        output, _ = function(module, queries[index], segment_keys, segment_values, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(NAME, segment_attention)


@contextlib.contextmanager
def attending_by_segments(configs: Iterable, packing: Packing, checkpointed: Sequence[torch.nn.Module] = ()):
    """Within the block, attention layers reading any of ``configs`` run
    ``segment_attention`` on ``packing``, and so do the ``checkpointed`` layers
    (transformers' ``GradientCheckpointingLayer``s) when they re-run in
    backward. Each config's own field is set and put back, not through the
    ``_attn_implementation`` setter, which also overwrites the sub-configs'
    with the top-level value (a model configured with a per-sub-config dict
    would come back changed)."""
    configs = list(configs)
    saved = [config._attn_implementation_internal for config in configs]
    token = _ACTIVE.set(packing)
    wrapped = [(layer, layer._gradient_checkpointing_func) for layer in checkpointed]
    try:
        for config in configs:
            config._attn_implementation_internal = NAME
        for layer, original in wrapped:
            layer._gradient_checkpointing_func = _recomputing_by_segments(original, configs, packing)
        yield
    finally:
        for layer, original in wrapped:
            layer._gradient_checkpointing_func = original
        for config, implementation in zip(configs, saved):
            config._attn_implementation_internal = implementation
        _ACTIVE.reset(token)


def _recomputing_by_segments(checkpoint_function, configs: list, packing: Packing):
    """``checkpoint_function`` (e.g. torch's checkpoint) of a layer forward that
    runs within ``attending_by_segments(configs, packing)`` both times: in the
    forward, and when backward re-runs it after the packed call has returned.
    A learned prefix goes in as the checkpoint's inputs, not read from
    ``packing``: a reentrant checkpoint differentiates its inputs only, and
    would otherwise run the prefix's graph once per layer."""
    prefix = [tensor for pair in packing.prefix or () for tensor in pair]

    def checkpointed(forward, *args, **kwargs):
        def forward_by_segments(*inputs, **keywords):
            this = packing
            if prefix:
                this = copy.copy(packing)
                given = inputs[len(inputs) - len(prefix) :]
                this.prefix = list(zip(given[0::2], given[1::2]))
                inputs = inputs[: len(inputs) - len(prefix)]
            with attending_by_segments(configs, this):
                return forward(*inputs, **keywords)

        return checkpoint_function(forward_by_segments, *args, *prefix, **kwargs)

    return checkpointed
