"""Which positions of a packed sequence attend to which, as blocks.

A packed sequence holds the A prompts' P positions, then each row's kept
positions (``ops.packing``). Each prompt attends causally to itself; each row's
positions attend to their row's prompt and, causally, to the row's earlier real
positions: the pairs PEFT's pass over ``cat(prompt, tokens)`` computes for that
row, less its pads. ``segments`` lists those blocks, so attention runs block by
block and never computes the pairs between them, which a dense mask over all
N positions would (N^2 scores for a few percent of useful ones at B 8).

Prefix tuning has no prompt positions in the sequence: its P keys and values
per layer are learned, so each row attends to that layer's learned prefix
(``Segment.prefix``) and, causally, to its own earlier real positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops import PackLayout


@dataclass(frozen=True)
class Segment:
    """``queries``: a stretch of the packed sequence; ``keys``: the stretches
    it attends to, in order; ``visible`` [len(queries), sum of key lengths]
    bool: which of those keys each query sees."""

    queries: slice
    keys: tuple[slice, ...]
    visible: torch.Tensor
    # The layer's learned prefix (prefix tuning) comes before ``keys``: its P
    # keys are the first P columns of ``visible``, and no segment's queries.
    prefix: bool = False


def segments(
    layout: PackLayout,
    num_adapters: int,
    num_virtual: int,
    row_adapters: Sequence[int] | None,
    real: torch.Tensor,
    learned: bool = False,
) -> list[Segment]:
    """The blocks of a packed sequence laid out by ``layout`` after A prompts of
    P positions. ``row_adapters``: each row's prompt (None: all read prompt 0);
    ``real`` [K] bool: which kept positions are real tokens (keys) rather than
    pads kept only for their own output (queries, never keys). ``learned``:
    the prompt is a learned prefix of P keys per layer (prefix tuning): the
    sequence holds the rows' positions only (A is 0)."""
    device = real.device
    prompt_positions = num_adapters * num_virtual
    causal = torch.ones(num_virtual, num_virtual, dtype=torch.bool, device=device).tril()
    blocks = [
        Segment(slice(a * num_virtual, (a + 1) * num_virtual), (slice(a * num_virtual, (a + 1) * num_virtual),), causal)
        for a in range(num_adapters)
    ]
    for row, (start, end) in enumerate(zip(layout.offsets, layout.offsets[1:])):
        if start == end:
            continue
        length = end - start
        adapter = 0 if row_adapters is None else row_adapters[row]
        prompt = slice(adapter * num_virtual, (adapter + 1) * num_virtual)
        own = slice(prompt_positions + start, prompt_positions + end)
        # Kept positions are in column order, so "earlier" is "earlier in the stretch".
        earlier = torch.ones(length, length, dtype=torch.bool, device=device).tril() & real[start:end][None, :]
        visible = torch.cat([torch.ones(length, num_virtual, dtype=torch.bool, device=device), earlier], dim=1)
        blocks.append(Segment(own, (own,), visible, prefix=True) if learned else Segment(own, (prompt, own), visible))
    return blocks
