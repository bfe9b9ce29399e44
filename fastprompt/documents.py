"""Documents flattened into one row by the ecosystem's padding-free collators.

transformers' ``DataCollatorWithFlattening`` and TRL's ``padding_free=True``
concatenate a batch's examples into one row and mark where each starts:
``position_ids`` restarting per document, and optionally flash-attention's
``cu_seq_lens_q/k`` or a per-token ``seq_idx``. PEFT's prompt tuning ignores
those ids (it warns and drops them), so the documents of a row attend to each
other behind a single prompt. What such a user means is one example per
document, each with the prompt before it: that is what fastprompt computes.

``Documents`` turns the flattened rows into one right-padded row per document
and the per-document results back into the flattened layout. The fast path
then drops the padding again (``ops.packing``), so nothing is paid for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Forward arguments by which a collator marks document boundaries (flash-attention's
# ``max_length_*`` come with ``cu_seq_lens_*`` and carry nothing else).
BOUNDARY_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(frozen=True)
class Documents:
    """The flattened [B, T] input's documents: each one's row, and ``index``
    [D, Lmax], the flat source position of each document's tokens
    (right-padded; ``valid`` says which are tokens), built once per call on
    the input's device."""

    rows: tuple[int, ...]
    shape: tuple[int, int]
    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def laid_out(cls, rows, starts, lengths, shape, device) -> Documents:
        columns = torch.arange(max(lengths))
        first = torch.tensor([row * shape[1] + start for row, start in zip(rows, starts)])
        valid = columns[None, :] < torch.tensor(lengths)[:, None]
        index = torch.where(valid, first[:, None] + columns[None, :], 0)
        return cls(tuple(rows), shape, index.to(device), valid.to(device))

    def unflatten(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """[B, T] per-token values as one right-padded row per document [D, Lmax], ``fill`` at the pads."""
        return values.reshape(-1)[self.index].masked_fill(~self.valid, fill)

    def padding_mask(self) -> torch.Tensor:
        return self.valid.long()

    def flatten(self, per_document: torch.Tensor) -> torch.Tensor:
        """[D, Lmax, ...] back to the flattened [B, T, ...] layout."""
        rows, tokens = self.shape
        flat = per_document.new_zeros(rows * tokens, *per_document.shape[2:])
        flat = flat.index_copy(0, self.index[self.valid], per_document[self.valid])
        return flat.view(rows, tokens, *per_document.shape[2:])

    def first_of_each_row(self) -> list[int]:
        """The index of each row's first document."""
        first: dict[int, int] = {}
        for document, row in enumerate(self.rows):
            first.setdefault(row, document)
        return [first[row] for row in range(self.shape[0])]


def _starts_from_positions(positions: list[int]) -> list[int]:
    """A document starts wherever the ids do not continue the previous one by one."""
    return [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]


def find_documents(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, boundaries: dict) -> Documents | None:
    """The documents ``boundaries`` (the collator's arguments, ``BOUNDARY_KWARGS``)
    mark in ``input_ids`` [B, T]; None where every row is one document (the ids
    then change nothing: PEFT ignores them, and so may we). Raises ValueError
    for boundaries that do not describe the rows."""
    rows, tokens = input_ids.shape
    cu_seq_lens = boundaries.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        cu_seq_lens = boundaries.get("cu_seq_lens_k")
    per_row: list[list[int]]
    if cu_seq_lens is not None:
        # Flash attention's boundaries run over the rows laid end to end.
        ends = [int(x) for x in torch.as_tensor(cu_seq_lens).tolist()]
        if ends[0] != 0 or ends[-1] != rows * tokens or any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"cu_seq_lens {ends} do not split the {rows}x{tokens} input into documents")
        per_row = [[] for _ in range(rows)]
        for start in ends[:-1]:
            per_row[start // tokens].append(start % tokens)
        if any(not starts or starts[0] != 0 for starts in per_row):
            raise ValueError("cu_seq_lens: a document spans two rows")
    elif boundaries.get("seq_idx") is not None:
        seq_idx = torch.as_tensor(boundaries["seq_idx"]).reshape(rows, tokens).tolist()
        per_row = [[0] + [i for i in range(1, tokens) if row[i] != row[i - 1]] for row in seq_idx]
    elif boundaries.get("position_ids") is not None:
        position_ids = boundaries["position_ids"]
        if not torch.is_tensor(position_ids) or position_ids.numel() != rows * tokens:
            raise ValueError(f"position_ids must be a tensor of the inputs' shape {rows}x{tokens}")
        per_row = [_starts_from_positions(row) for row in position_ids.reshape(rows, tokens).tolist()]
    else:
        return None
    if all(starts == [0] for starts in per_row):
        return None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "documents flattened into a row (position_ids restart, cu_seq_lens or seq_idx) come without padding; "
            "this batch has both an attention_mask with zeros and several documents in a row"
        )
    doc_rows, doc_starts, doc_lengths = [], [], []
    for row, starts in enumerate(per_row):
        for start, end in zip(starts, [*starts[1:], tokens]):
            doc_rows.append(row)
            doc_starts.append(start)
            doc_lengths.append(end - start)
    return Documents.laid_out(doc_rows, doc_starts, doc_lengths, (rows, tokens), input_ids.device)
