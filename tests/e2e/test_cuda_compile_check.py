"""The CUDA backend's device code compiles for every GPU generation we target, without spills.

`make cuda-compile-check` compiles kernels/pack_embed_cuda.cu to one cubin per architecture
with nvcc. It needs no GPU and no CUDA build of torch, only nvcc, so the test is skipped where
nvcc is missing. The target itself fails on a spill; the test also reads each architecture's
ptxas report, checks it, and publishes the register/spill table.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from compile_report import publish

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which(os.environ.get("NVCC", "nvcc"))
MAKE = shutil.which("make")
REQUIRED_ARCHS = ("80", "86", "89", "90")
# Compiled where this nvcc knows them (CUDA 12.8 and later).
NEWER_ARCHS = ("120",)
KERNEL_REPORT = re.compile(
    r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r"ptxas info\s*: Used (\d+) registers"
)

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH (or $NVCC): the CUDA source cannot be compiled"),
    pytest.mark.skipif(MAKE is None, reason="make not found"),
]


def target_archs() -> tuple[str, ...]:
    known = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    return REQUIRED_ARCHS + tuple(arch for arch in NEWER_ARCHS if f"compute_{arch}" in known)


def short_kernel_names(mangled: list[str]) -> dict[str, str]:
    """`forward_kernel<c10::Half, float>` for each mangled name (unchanged without c++filt)."""
    if shutil.which("c++filt") is None:
        return {name: name for name in mangled}
    demangled = subprocess.run(
        ["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    short = [re.search(r"::(\w+<[^()]*>)\(", name) for name in demangled]
    return {name: match.group(1) if match else full for name, full, match in zip(mangled, demangled, short)}


def kernel_reports(log: str) -> list[dict]:
    rows = [
        {
            "kernel": name,
            "stack_bytes": int(stack),
            "spill_stores": int(stores),
            "spill_loads": int(loads),
            "regs": int(regs),
        }
        for name, stack, stores, loads, regs in KERNEL_REPORT.findall(log)
    ]
    assert len(rows) == log.count("Compiling entry function"), f"unrecognised ptxas report:\n{log[:3000]}"
    return rows


def spilled(row: dict) -> bool:
    return bool(row["stack_bytes"] or row["spill_stores"] or row["spill_loads"])


def test_cuda_kernels_compile_for_every_gpu_generation_without_spills(request, tmp_path):
    archs = target_archs()
    jobs = max(1, min(len(archs), len(os.sched_getaffinity(0))))
    start = time.perf_counter()
    result = subprocess.run(
        [
            MAKE,
            f"-j{jobs}",
            "--no-print-directory",
            "cuda-compile-check",
            f"CUDA_CHECK_DIR={tmp_path}",
            f"CUDA_CHECK_ARCHS={' '.join(archs)}",
            f"NVCC={NVCC}",
            f"PYTHON={sys.executable}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]

    reports = {arch: kernel_reports((tmp_path / f"sm_{arch}.log").read_text()) for arch in archs}
    names = short_kernel_names(sorted({row["kernel"] for rows in reports.values() for row in rows}))
    kernels = sorted(set(names.values()))
    assert kernels and all(sorted(names[row["kernel"]] for row in rows) == kernels for rows in reports.values())

    by_kernel = {(names[row["kernel"]], arch): row for arch, rows in reports.items() for row in rows}
    width = max(map(len, kernels))
    header = f"{'kernel':{width}} |" + "".join(f" {'sm_' + arch:>8}" for arch in archs)
    summary = [header, "-" * len(header)]
    for kernel in kernels:
        cells = [f"{by_kernel[kernel, arch]['regs']}/{by_kernel[kernel, arch]['spill_stores']}" for arch in archs]
        summary.append(f"{kernel:{width}} |" + "".join(f" {cell:>8}" for cell in cells))
    summary.append("cells: registers / spill-store bytes per thread")
    details = [f"{'kernel':{width}} {'arch':>6} {'regs':>4} {'stack B':>7} {'spill st B':>10} {'spill ld B':>10}"]
    details += [
        f"{kernel:{width}} {'sm_' + arch:>6} {row['regs']:>4} {row['stack_bytes']:>7} "
        f"{row['spill_stores']:>10} {row['spill_loads']:>10}"
        for (kernel, arch), row in sorted(by_kernel.items())
    ]
    title = (
        f"CUDA pack_embed, nvcc for sm_{', sm_'.join(archs)}: {len(by_kernel)} kernels "
        f"in {elapsed:.0f} s with make -j{jobs}"
    )
    publish(request.config, "cuda_pack_embed", title, "\n".join(summary), "\n".join(details))

    spills = [f"{kernel} sm_{arch}: {row}" for (kernel, arch), row in by_kernel.items() if spilled(row)]
    assert not spills, "register spills:\n" + "\n".join(spills)
