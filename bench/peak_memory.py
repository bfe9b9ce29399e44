"""Peak memory of one contender's training steps, in a process of its own.

CPU: the highest RSS seen (sampled every millisecond by a thread) during the
measured steps, minus the RSS just before them. One unmeasured warm-up step
runs first, so lazy imports and one-off library buffers are not counted, nor
are the frozen weights: the contenders are compared on what a step allocates. CUDA: ``max_memory_allocated``
minus the memory allocated before the first step.

    python bench/peak_memory.py --shape classify --contender peft
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import SHAPES_BY_NAME, build_base  # noqa: E402
from training_cases import CONTENDERS, SHAPES, make_batches, make_contender, train_step  # noqa: E402


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class RssPeak:
    """Samples this process's RSS in the background while the block runs."""

    def __enter__(self):
        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"])
    parser.add_argument("--model", default="bloom-mini", choices=sorted(SHAPES_BY_NAME))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = build_base(args.model, args.dtype, args.device)
    model, optimizer = make_contender(args.contender, base, SHAPES[args.shape]["virtual"])
    batches = make_batches(args.shape, args.steps + 1, base.config.vocab_size, device=args.device)
    train_step(model, optimizer, batches.pop())  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for batch in batches:
            train_step(model, optimizer, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        method = "cuda max_memory_allocated"
    else:
        before = current_rss_bytes()
        with RssPeak() as sampled:
            for batch in batches:
                train_step(model, optimizer, batch)
        peak = sampled.peak - before
        method = "peak sampled RSS over pre-step RSS after a warm-up step, own process"
    print(json.dumps({"shape": args.shape, "contender": args.contender, "peak_bytes": peak, "method": method}))


if __name__ == "__main__":
    main()
