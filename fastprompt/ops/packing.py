"""Where each kept token of a padded batch lands in a packed sequence.

A packed pass runs the A prompts' P positions, then each row's kept token
positions, as one sequence: ``[prompt_0 .. prompt_{A-1}, row_0's kept, row_1's
kept, ...]``. ``pack_layout`` says which positions those are and where each
row's stretch starts; ``pack_embed`` (``dispatch.py``) builds the sequence's
embeddings from it in one op.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass(frozen=True)
class PackLayout:
    """``token_index`` [K]: the flat index ``b * T + t`` of each kept position,
    row by row in column order; ``offsets``: B + 1 host integers, row b's kept
    positions being ``token_index[offsets[b]:offsets[b + 1]]``."""

    token_index: torch.Tensor
    offsets: tuple[int, ...]
    tokens: int  # T, the padded width

    @property
    def kept(self) -> int:
        return self.offsets[-1]

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    def gather(self, per_position: torch.Tensor) -> torch.Tensor:
        """A [B, T, ...] tensor's entries at the kept positions: [K, ...]."""
        return per_position.reshape(-1, *per_position.shape[2:]).index_select(0, self.token_index)

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """[K, ...] back to [B, T, ...], zeros where a position was not kept."""
        flat = packed.new_zeros(self.rows * self.tokens, *packed.shape[1:])
        return flat.index_copy(0, self.token_index, packed).view(self.rows, self.tokens, *packed.shape[1:])


def pack_layout(keep: torch.Tensor | None, rows: int, tokens: int, device: torch.device) -> PackLayout:
    """The layout keeping ``keep`` [B, T] (bool; None: every position)."""
    if keep is None:
        offsets = tuple(range(0, rows * tokens + 1, tokens)) if tokens else (0,) * (rows + 1)
        return PackLayout(torch.arange(rows * tokens, device=device), offsets, tokens)
    # The packed pass's one host read: every shape after it depends on these counts.
    counts = keep.sum(1).tolist()
    offsets = (0, *accumulate(counts))
    # nonzero_static: the size is known here, so no second device sync.
    token_index = torch.nonzero_static(keep.reshape(-1), size=offsets[-1]).squeeze(1)
    return PackLayout(token_index, offsets, tokens)
