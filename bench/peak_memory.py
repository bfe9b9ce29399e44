"""Peak memory of one contender's training steps, in a process of its own.

CPU: the rise of peak RSS (``ru_maxrss``) over the RSS just before the first
step, so the frozen weights and the interpreter are not counted and the two
contenders are compared on what a step allocates. CUDA: ``max_memory_allocated``
minus the memory allocated before the first step.

    python bench/peak_memory.py --shape classify --contender peft
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import bloom_mini  # noqa: E402
from training_cases import CONTENDERS, SHAPES, make_batches, make_contender, train_step  # noqa: E402


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = bloom_mini(dtype=getattr(torch, args.dtype), device=args.device)
    model, optimizer = make_contender(args.contender, base, SHAPES[args.shape]["virtual"])
    batches = make_batches(args.shape, args.steps, base.config.vocab_size, device=args.device)
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
        for batch in batches:
            train_step(model, optimizer, batch)
        # ru_maxrss is in KiB on Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        method = "peak RSS rise over pre-step RSS, own process"
    print(json.dumps({"shape": args.shape, "contender": args.contender, "peak_bytes": peak, "method": method}))


if __name__ == "__main__":
    main()
