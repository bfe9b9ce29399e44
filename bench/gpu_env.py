"""What the GPU check ran on: device, versions, and the device's copy bandwidth.

The copy bandwidth (a large device-to-device ``copy_``, read + write) is the
practical peak that memory-bound numbers are set against: the op benchmark's
GB/s and the decode bound of the summary (``gpu_summary.py``). On CPU (the
dry run) it is the same measurement of host memory.

    python bench/gpu_env.py OUT/env.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version

import torch

COPY_BYTES = 1 << 30  # 1 GiB on a GPU, enough to leave the caches behind
CPU_COPY_BYTES = 1 << 27
COPY_REPEATS = 10


def copy_bandwidth_gb_s(device: torch.device) -> float:
    size = COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: page-in, clocks
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(COPY_REPEATS):
        target.copy_(source)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 2 * size * COPY_REPEATS / seconds / 1e9  # every byte is read once and written once


def describe(device: torch.device) -> dict:
    versions = {}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "fastprompt"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return {
        "device": name,
        "device_type": device.type,
        "cuda": torch.version.cuda,
        "versions": versions,
        "copy_bandwidth_GB/s": round(copy_bandwidth_gb_s(device), 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    env = describe(torch.device(args.device))
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(env, handle, indent=2)
    print(json.dumps(env, indent=2))


if __name__ == "__main__":
    main()
