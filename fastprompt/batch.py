"""The per-call object: which soft prompt each row reads, the prompts themselves, the key mask.

Built once per ``forward`` or ``generate`` call by the model and handed to the
path that runs it, so no path looks anything up on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prefix import Prefix


@dataclass(frozen=True)
class PromptBatch:
    """``adapters``: the names of the call's distinct prompts (an adapter's
    name, or ``adapter[task t]`` for a multitask adapter's task; the prefix
    cache keys its entries by them); ``adapter_of_row``: each row's index into
    them (None: every row reads ``adapters[0]``); ``prompts`` [num_adapters,
    P, H] as PEFT's ``get_prompt`` computes them for these rows; ``key_mask``
    [B, P + T], the virtual tokens' ones then the attention mask (None in
    ``generate``, whose mask changes every step); ``shares_prefix``: whether
    the prompt's pass may be run once for all rows (nothing in the call must
    see PEFT's single pass over ``cat(prompt, tokens)``: hooks, dropout);
    ``keep`` [B, T] bool, the token positions a packed pass must run: the
    real ones (every later position may attend to them) and those whose
    final state the call reads (None: every position, as when logits are
    returned); ``learned``: a prefix-tuning adapter's per-layer K/V, the
    prefix itself (``prompts`` is then the encoder output it is a view of,
    [1, P, layers * 2 * kv_dim], and nothing goes in front of the tokens)."""

    adapters: tuple[str, ...]
    adapter_of_row: torch.Tensor | None
    prompts: torch.Tensor
    key_mask: torch.Tensor | None
    shares_prefix: bool
    keep: torch.Tensor | None = None
    # adapter_of_row as host integers, to lay out per-row work without reading the device.
    row_adapters: tuple[int, ...] | None = None
    learned: Prefix | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompts.shape[1]

    @property
    def num_adapters(self) -> int:
        return self.prompts.shape[0]

    @property
    def trains(self) -> bool:
        """Whether a gradient flows to the prompts in this call (their pass is then recomputed, not cached)."""
        return torch.is_grad_enabled() and self.prompts.requires_grad

    def adapter_of(self, rows: int) -> torch.Tensor | None:
        """Each of ``rows`` rows' adapter index where generation repeats every
        input row for its beams or returned sequences (None: all read adapter 0)."""
        if self.adapter_of_row is None:
            return None
        inputs = self.adapter_of_row.numel()
        if rows % inputs:
            raise ValueError(f"generate ran {rows} rows for {inputs} inputs with adapter_names")
        return self.adapter_of_row.repeat_interleave(rows // inputs)

    def row_prompts(self, rows: int) -> torch.Tensor:
        """[rows, P, H]: each row's prompt (a stride-0 view when all rows share one)."""
        index = self.adapter_of(rows)
        return self.prompts.expand(rows, -1, -1) if index is None else self.prompts.index_select(0, index)


def positions_to_keep(attention_mask: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[B, T]: the real positions and those whose final state predicts a label
    (a pad before a labelled token: PEFT's pass computes it, so must ours)."""
    predicts_label = labels[:, 1:] != ignore_index
    return attention_mask.bool() | torch.nn.functional.pad(predicts_label, (0, 1))


def with_virtual_tokens(attention_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """The mask over ``cat(prompt, tokens)``: ones for the virtual tokens, as PEFT prepends them."""
    return torch.cat([attention_mask.new_ones(attention_mask.shape[0], num_virtual_tokens), attention_mask], dim=1)
