"""Test models built once per session (per pytest-xdist worker), handed out as copies."""

from __future__ import annotations

import copy
import functools

import torch


def built_once(*, seeds: bool):
    """Decorate a model builder: the first call with given arguments builds, and every call returns
    its own deep copy of that build (tests train, cast, hook and wrap their models), as if built anew.

    That includes the CPU random state a build leaves behind, which later draws depend on (``pair``
    seeds, builds the base, then draws the initial prompt). ``seeds``: the builder seeds the RNG
    itself, so the state after it is always the same and is restored; otherwise the builder must
    not use the RNG at all (checked on the first build; one that does is not cached)."""

    def decorate(build):
        built = {}

        @functools.wraps(build)
        def copy_of(*args, **kwargs):
            key = (args, tuple(sorted(kwargs.items())))
            try:
                hash(key)
            except TypeError:  # unhashable arguments (a list): no cache
                return build(*args, **kwargs)
            if key not in built:
                before = torch.get_rng_state()
                model = build(*args, **kwargs)
                after = torch.get_rng_state()
                if not seeds and not torch.equal(before, after):
                    built[key] = None
                    return model
                built[key] = (model, after)
            if built[key] is None:
                return build(*args, **kwargs)
            model, after = built[key]
            if seeds:
                torch.set_rng_state(after)
            return copy.deepcopy(model)

        return copy_of

    return decorate
