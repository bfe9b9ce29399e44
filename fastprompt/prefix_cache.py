"""The soft prompts' prefix (final hidden states and per-layer K/V), computed once and reused.

The virtual tokens attend only to each other and their positions are the same
in every row (see ``paths/generic.py``), so their pass through the body depends
on the prompt and the frozen base model alone: not on the request, the row or
its padding. One batch-1 copy per adapter serves every row of every call made
without gradients (``generate``, evaluation).

Staleness is the whole difficulty. An entry is reused only when

* each prompt has the same *contents*, dtype and device as when it was
  computed. Contents, not ``weight._version``: writes through ``.data`` do not
  bump the version counter, and after a ``.to()`` round trip a fresh tensor
  (version restarted) may land on the old address. Comparing P×H numbers costs
  microseconds next to a forward pass. A P-tuning or multitask prompt is
  its encoder's output, computed anew each call, so a changed encoder
  parameter shows as changed contents;
* every base-model parameter and buffer (rotary frequencies, for one) is
  backed by the same storage (held by a weak reference, so the address cannot
  be recycled while the entry lives) at the same version: ``.to(dtype/device)``
  swaps storages, ``load_state_dict`` and other in-place writes bump versions;
* every base module's plain attributes that a forward may read — numbers,
  flags and strings such as the train/eval flag, BLOOM's ``inv_norm_factor``,
  a rotary embedding's ``attention_scaling`` — the autocast state and the
  path that computed it (BLOOM's own decoder or the model's body) are
  unchanged: each of them changes the numbers.

What it cannot see: an in-place write through ``.data`` (which does not bump
the version counter), a tensor held as a plain attribute rather than a buffer,
and state outside the modules (a config object read at forward time). Call
``clear()`` after such surgery.

A few entries are kept (one per adapter set and path), so memory stays bounded
however many prompts are seen.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .prefix import Prefix

if TYPE_CHECKING:
    from .batch import PromptBatch

MAX_ENTRIES = 4


class PrefixSource(Protocol):
    """What computes a prefix: every fast path (``paths.Path``)."""

    name: str  # which computation: the cache keeps one entry per source and adapter set
    model: torch.nn.Module  # the base model, whose tensors and settings the entry is checked against

    def prefix(self, prompts: torch.Tensor) -> Prefix:
        """The prompts [A, P, H] through the body, once, without padding."""


def _tensor_identity(model: torch.nn.Module) -> list[tuple]:
    return [
        (StorageWeakRef(t.untyped_storage()), t.storage_offset(), t._version, t.dtype, t.device)
        for t in (*model.parameters(), *model.buffers())
    ]


def _module_settings(model: torch.nn.Module) -> tuple:
    """Every module's public plain attributes (numbers, flags, strings), its train/eval flag among them."""
    return tuple(
        tuple(
            (name, value)
            for name, value in vars(module).items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str))
        )
        for module in model.modules()
    )


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    return (
        torch.is_autocast_enabled(kind),
        torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None,
    )


@dataclass
class _Entry:
    prompts: torch.Tensor  # a private copy of the prompts the prefix was computed from
    base_identity: list[tuple]
    settings: tuple
    autocast: tuple
    prefix: Prefix

    def matches(self, base_model, prompts: torch.Tensor) -> bool:
        return (
            self.prompts.dtype == prompts.dtype
            and self.prompts.device == prompts.device
            and self.prompts.shape == prompts.shape
            and self.autocast == _autocast_state(prompts.device)
            and torch.equal(self.prompts, prompts)
            and self.settings == _module_settings(base_model)
            and self.base_identity == _tensor_identity(base_model)
        )


class PrefixCache:
    """Per-model cache of prefixes, keyed by (path, adapters) and validated on use."""

    def __init__(self):
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.computations = 0  # how many times a prefix was actually run

    def prefix(self, path: PrefixSource, batch: PromptBatch) -> Prefix:
        """The batch's prompts through ``path``: recomputed when a gradient
        flows to them (it must flow through this pass), cached otherwise. A
        learned prefix (prefix tuning) is the batch's own: nothing to compute."""
        if batch.learned is not None:
            return batch.learned
        if batch.trains:
            return path.prefix(batch.prompts)
        prefix = self.lookup(path, batch)
        if prefix is None:
            with torch.no_grad():
                prefix = path.prefix(batch.prompts)
            self.store(path, batch, prefix)
        return prefix

    def lookup(self, path: PrefixSource, batch: PromptBatch) -> Prefix | None:
        """The valid entry's prefix, or None (a stale entry is freed at once)."""
        if batch.learned is not None:
            return batch.learned
        key = (path.name, batch.adapters)
        entry = self._entries.get(key)
        if entry is not None and entry.matches(path.model, batch.prompts.detach()):
            self._entries.move_to_end(key)
            return entry.prefix
        self._entries.pop(key, None)
        return None

    def store(self, path: PrefixSource, batch: PromptBatch, prefix: Prefix) -> None:
        """Keep ``prefix``, computed (without gradients) from the batch's prompts now."""
        self.computations += 1
        prompts = batch.prompts.detach()
        self._entries[(path.name, batch.adapters)] = _Entry(
            prompts.clone(),
            _tensor_identity(path.model),
            _module_settings(path.model),
            _autocast_state(prompts.device),
            prefix,
        )
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
