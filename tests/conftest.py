import os
import sys
from pathlib import Path

import pytest
import torch

import fastprompt  # noqa: F401  (first: it quiets bitsandbytes' optional-kernel warning before peft imports it)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# FASTPROMPT_TEST_THREADS overrides (bench/gpu_check.sh --dry-run: 1, since on a busy 2-core machine a
# tiny model's test waited seconds on its second thread where one thread took a tenth of a second).
torch.set_num_threads(int(os.environ.get("FASTPROMPT_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="session")
def tiny_bloom_dir():
    from fastprompt.loading import tiny_bloom_path

    return str(tiny_bloom_path())


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED
