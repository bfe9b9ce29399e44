"""Benchmark sessions: one thread count for every contender, and what each
results file records about where its numbers came from (pytest-benchmark
keeps the git commit in ``commit_info``; the rest goes into ``machine_info``).
"""

from __future__ import annotations

import dataclasses
import os
import platform

import torch
from harness import THREADS
from model_shapes import dims, setting_from_env, setting_label

import fastprompt  # noqa: F401  (first: it quiets bitsandbytes' optional-kernel warning before peft imports it)

_session: dict = {}


def pytest_configure(config):
    torch.set_num_threads(THREADS)
    _session["load_at_start"] = round(os.getloadavg()[0], 2)


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "fastprompt", "pytest-benchmark")}


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastprompt.ops import backend_info

    setting = setting_from_env()
    machine_info["fastprompt_bench"] = {
        "cpu_model": machine_info.get("cpu", {}).get("brand_raw") or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        # Other jobs on the machine slow both contenders; ratios survive, absolute times do not.
        "load_average_1min_start_end": [_session.get("load_at_start"), round(os.getloadavg()[0], 2)],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": _versions(),
        "pack_embed_backend": backend_info(),
        # The sizes too, so that bench/gpu_summary.py reads them here rather than importing transformers.
        "setting": {**setting, "label": setting_label(setting), "dims": dataclasses.asdict(dims(setting["model"]))},
    }
