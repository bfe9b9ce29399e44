"""Peak memory of one contender's training step: what the step allocates on
top of the frozen model.

CPU: in a process of its own (``measure`` starts it), after one unmeasured
warm-up step, so lazy imports, one-off library buffers and the optimizer's
state are not counted, nor are the weights. Two things keep a warm heap from
hiding the step's memory. The process runs with glibc's mmap threshold pinned
at 128 KiB and heap trimming at 0 (``MALLOC_ENV``): every tensor larger than
that is mapped when allocated and unmapped when freed, so the resident set
follows live memory instead of reusing what the warm-up step freed (with the
default, adaptive threshold, freed blocks stay in the heap and a second step
shows little or no growth). And the peak is the kernel's resident high-water
mark (VmHWM), reset through /proc/self/clear_refs just before the step, so it
is exact rather than sampled. Timing runs keep the default allocator: that
is what users run.

CUDA: in the timing process, ``torch.cuda.max_memory_allocated`` over the
memory allocated before the step (the caching allocator's peak is exact and
resettable).

``FASTPROMPT_BENCH_MEMORY_PROBE=0`` starts no CPU probe (``cpu_probes()``):
each probe is a fresh interpreter importing torch and peft, seconds per
contender and case, too slow for a plumbing run (``bench/gpu_check.sh
--dry-run``). The CUDA measurement, in-process, is unaffected.

    python bench/peak_memory.py --case classify --contender peft [--method p_tuning]
(with MALLOC_ENV set) prints one JSON line; ``--case method-comparison`` with a
contender of ``method_comparison.CONTENDERS`` and ``--layers`` measures the
method comparison's step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import method_comparison  # noqa: E402
from model_shapes import SHAPES, build_base  # noqa: E402
from training_cases import CASES, CONTENDERS, METHODS, make_batches, make_contender, train_step  # noqa: E402

METHOD_COMPARISON = "method-comparison"

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
CPU_METHOD = (
    "CPU: peak resident set (VmHWM, reset before the step) minus resident set before it, one process "
    "per contender after a warm-up step, glibc MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0"
)
CUDA_METHOD = "CUDA: max_memory_allocated during the step minus memory allocated before it"
PROBE_ENV = "FASTPROMPT_BENCH_MEMORY_PROBE"
NOT_MEASURED = f"not measured ({PROBE_ENV}=0: no CPU probe processes)"


def cpu_probes() -> bool:
    """Whether CPU runs measure peak memory (one probe process per contender and case)."""
    return os.environ.get(PROBE_ENV, "1") != "0"


def cuda_peak_bytes(model, optimizer, batch) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(case: str, contender: str, setting: dict, threads: int) -> int:
    """Peak bytes of a CPU step of ``contender`` on ``case``, from a process
    of its own."""
    command = [sys.executable, __file__, "--case", case, "--contender", contender, f"--threads={threads}"]
    command += [f"--{key}={value}" for key, value in setting.items()]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode:
        raise RuntimeError(f"peak-memory probe failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES) + [METHOD_COMPARISON], required=True)
    parser.add_argument("--contender", choices=sorted({*CONTENDERS, *method_comparison.CONTENDERS}), required=True)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: all)")
    parser.add_argument("--method", default="prompt_tuning", choices=METHODS, help="a training case's prompt method")
    parser.add_argument("--model", default="bloom-mini", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"])
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    unset = [f"{key}={value}" for key, value in MALLOC_ENV.items() if os.environ.get(key) != value]
    if unset:
        # glibc reads these at start-up only; without them the heap hides memory.
        raise SystemExit(f"run with {' '.join(unset)} in the environment (bench/peak_memory.py's measure() sets them)")
    torch.set_num_threads(args.threads)

    base = build_base(args.model, args.dtype, args.device, layers=args.layers)
    if args.case == METHOD_COMPARISON:
        model, optimizer = method_comparison.make_contender(args.contender, base)
        warmup, measured = method_comparison.make_batches(2, base.config.vocab_size)
    else:
        model, optimizer = make_contender(args.contender, base, CASES[args.case]["virtual"], args.method)
        warmup, measured = make_batches(args.case, 2, base.config.vocab_size, method=args.method)
    train_step(model, optimizer, warmup)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    train_step(model, optimizer, measured)
    peak = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"case": args.case, "contender": args.contender, "peak_bytes": peak, "method": CPU_METHOD}))


if __name__ == "__main__":
    main()
