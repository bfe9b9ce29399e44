"""Contenders timed against each other, the one way every suite does it.

Each round runs every contender once: in the given order on even rounds,
reversed on odd ones, so that drift on a shared machine (other jobs, clock
changes, a warming allocator) hits all of them alike and none always runs in
another's wake. After each round every checked output is compared with its
counterpart's (the reference contender's, or, where contenders come in pairs
such as fastprompt's and PEFT's of one method, its pair's): a speedup is only
reported for the same result (to a stated tolerance in low precision; a check
may return how far apart the two outputs were, and the largest such figure
goes into the summary as ``max_difference``, so a GPU run records its margin).
The speedup is the ratio of total times over the same rounds, so rounds that
differ in work (the tutorial's samples differ in length) weigh what they cost;
medians give the typical time of one call.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

# The same for every contender and every suite; set by bench/conftest.py.
THREADS = int(os.environ.get("FASTPROMPT_BENCH_THREADS", min(2, os.cpu_count() or 1)))


def rounds(default: int) -> int:
    """Timed rounds: the suite's default unless FASTPROMPT_BENCH_ROUNDS says
    otherwise (1 for a smoke run)."""
    return int(os.environ.get("FASTPROMPT_BENCH_ROUNDS", default))


def device_sync(device: str) -> Callable[[], None] | None:
    """What the clock must wait for on ``device``: CUDA runs asynchronously."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


class Alternation:
    """``contenders`` map a name to a call taking the round index and
    returning an output; ``check(reference_output, output)`` raises when two
    outputs differ, and may return a number saying by how much; ``measure(output)``
    may add metrics to each sample beside the call's wall time ("seconds"); ``sync`` waits for an asynchronous device
    before a clock is read; ``checked`` names the contenders whose outputs are checked against the reference's
    (default: every other one; a method that computes something else, such as LoRA beside prompt tuning, is timed
    but not checked), or maps each checked contender to the one its output is compared with (its pair)."""

    def __init__(
        self,
        contenders: dict[str, Callable[[int], Any]],
        reference: str,
        check: Callable[[Any, Any], None],
        measure: Callable[[Any], dict] | None = None,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        checked: tuple[str, ...] | dict[str, str] | None = None,
    ):
        if reference not in contenders or len(contenders) < 2:
            raise ValueError("need a reference and at least one other contender")
        if checked is None:
            checked = tuple(name for name in contenders if name != reference)
        # checked contender -> the contender its output is compared with
        self.counterparts = dict(checked) if isinstance(checked, dict) else dict.fromkeys(checked, reference)
        for name, counterpart in self.counterparts.items():
            if name == counterpart or not {name, counterpart} <= set(contenders):
                raise ValueError(f"checked contender {name!r} and counterpart {counterpart!r}: not two contenders")
        self.contenders, self.reference, self.check = contenders, reference, check
        self.measure, self.sync, self.clock = measure, sync, clock
        self.samples: dict[str, list[dict]] = {name: [] for name in contenders}
        self.timed_rounds: list[int] = []
        # checked contender -> how far its output was from its counterpart's, round by round
        self.differences: dict[str, list[float]] = {name: [] for name in self.counterparts}
        self._next_round = 0

    def play_round(self) -> None:
        index = self._next_round
        self._next_round += 1
        names = list(self.contenders) if index % 2 == 0 else list(reversed(self.contenders))
        outputs = {}
        for name in names:
            if self.sync:
                self.sync()
            start = self.clock()
            outputs[name] = self.contenders[name](index)
            if self.sync:
                self.sync()
            sample = {"seconds": self.clock() - start}
            if self.measure:
                sample.update(self.measure(outputs[name]))
            self.samples[name].append(sample)
        for name, counterpart in self.counterparts.items():
            try:
                difference = self.check(outputs[counterpart], outputs[name])
            except AssertionError as err:
                raise AssertionError(f"round {index}: {name} differs from {counterpart}: {err}") from None
            if isinstance(difference, (int, float)):
                self.differences[name].append(float(difference))
        self.timed_rounds.append(index)

    def run(self, benchmark, rounds: int, warmup_rounds: int = 1) -> None:
        """Warm-up rounds (checked, not recorded), then ``rounds`` timed ones
        through pytest-benchmark (which also keeps each round's total time)."""
        for _ in range(warmup_rounds):
            self.play_round()
        for samples in self.samples.values():
            samples.clear()
        self.timed_rounds.clear()
        benchmark.pedantic(self.play_round, rounds=rounds, iterations=1)

    def total(self, name: str, metric: str = "seconds") -> float:
        return sum(sample[metric] for sample in self.samples[name])

    def median(self, name: str, metric: str = "seconds") -> float:
        return statistics.median(sample[metric] for sample in self.samples[name])

    def speedup(self, name: str, metric: str = "seconds", over: str | None = None) -> float:
        """``over``'s total (default: the reference's) over ``name``'s, same rounds."""
        return self.total(over or self.reference, metric) / self.total(name, metric)

    def max_difference(self, name: str | None = None) -> float | None:
        """The largest difference a check returned for ``name`` (default: for any
        checked contender), over every checked round, warm-up included; None if none."""
        found = [d for checked, ds in self.differences.items() if name in (None, checked) for d in ds]
        return max(found) if found else None

    def summary(self, unit: str) -> dict:
        """``extra_info`` entries: each contender's median ``{name}_{unit}_s``,
        then the speedup of each other contender over the reference
        (``speedup`` when there is just one, else ``{name}_speedup``)."""
        out = {f"{name}_{unit}_s": self.median(name) for name in self.contenders}
        others = [name for name in self.contenders if name != self.reference]
        for name in others:
            out["speedup" if len(others) == 1 else f"{name}_speedup"] = self.speedup(name)
        out["rounds"] = len(self.timed_rounds)
        if self.max_difference() is not None:
            out["max_difference"] = self.max_difference()
        return out
