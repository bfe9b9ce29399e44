"""The soft prompt's per-layer K/V, computed once and reused by generation.

The virtual tokens attend only to each other and BLOOM's ALiBi is derived from
the mask cumsum, so their K/V depend on the prompt and the frozen base model
alone: not on the request, the row or its padding. One batch-1 copy serves
every row of every ``generate`` call as a shared ``KVSegment``.

Staleness is the whole difficulty. An entry is reused only when

* the prompt has the same *contents*, dtype and device as when it was
  computed. Contents, not ``prompt._version``: writes through ``.data`` do
  not bump the version counter, and after a ``.to()`` round trip a fresh
  tensor (version restarted) may land on the old address. Comparing P×H
  numbers costs microseconds next to a forward pass;
* every base-model parameter is backed by the same storage (held by a weak
  reference, so the address cannot be recycled while the entry lives) at the
  same version: ``.to(dtype/device)`` swaps storages, ``load_state_dict`` and
  other in-place writes bump versions. The base model is frozen; an in-place
  write to one of its weights through ``.data`` is the one change this cannot
  see (call ``clear()`` after such surgery);
* the train/eval mode is unchanged (dropout would make the prefix differ).

Only the latest entry is kept, so memory never grows with the number of
prompts seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .arch.bloom import KVSegment


def _parameter_identity(model: torch.nn.Module) -> list[tuple]:
    return [
        (StorageWeakRef(p.untyped_storage()), p.storage_offset(), p._version, p.dtype, p.device)
        for p in model.parameters()
    ]


@dataclass
class _Entry:
    prompt: torch.Tensor  # a private copy of the prompt the K/V were computed from
    base_identity: list[tuple]
    training: bool
    segments: list[KVSegment]

    def matches(self, model) -> bool:
        prompt = model.prompt_embeddings.detach()
        return (
            self.training == model.training
            and self.prompt.dtype == prompt.dtype
            and self.prompt.device == prompt.device
            and torch.equal(self.prompt, prompt)
            and self.base_identity == _parameter_identity(model.base_model)
        )


class PrefixCache:
    """Per-model cache of the prefix K/V (one shared segment per layer)."""

    def __init__(self):
        self._entry: _Entry | None = None
        self.computations = 0  # how many times the prefix was actually run

    def segments(self, model) -> list[KVSegment]:
        if self._entry is None or not self._entry.matches(model):
            self._entry = None  # free the stale K/V before computing new ones
            with torch.no_grad():
                _, past = model.prefix_states()
            self.computations += 1
            self._entry = _Entry(
                prompt=model.prompt_embeddings.detach().clone(),
                base_identity=_parameter_identity(model.base_model),
                training=model.training,
                segments=[layer[0] for layer in past],
            )
        return self._entry.segments

    def clear(self) -> None:
        self._entry = None

    # Copying or pickling a model starts its copy with an empty cache: the
    # weak references must not be duplicated (each one is freed on deletion).
    def __reduce__(self):
        return (PrefixCache, ())


def prefix_cache_of(model) -> PrefixCache:
    """The model's cache, attached on first use (it is not part of the
    module's state: never saved, never moved by ``.to()``)."""
    cache = model.__dict__.get("prefix_cache")
    if cache is None:
        cache = model.__dict__["prefix_cache"] = PrefixCache()
    return cache
