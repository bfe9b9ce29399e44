# Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, and that includes its own
# helpers (tl.sum, ...) decorated at `import triton`; transformers, peft and fastprompt all import
# triton. So the interpreter is switched on here, before any of them, and the kernel tests run on
# CPU in this process. A CUDA test run (FASTPROMPT_TEST_CUDA=1 or FASTPROMPT_TEST_DEVICE=cuda, as
# bench/gpu_check.sh sets) leaves it off: the kernels then compile for the GPU.
import os

CUDA_TEST_RUN = os.environ.get("FASTPROMPT_TEST_CUDA") == "1" or os.environ.get(
    "FASTPROMPT_TEST_DEVICE", "cpu"
).startswith("cuda")
if not CUDA_TEST_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Every model here is tiny (hidden 32 to 256): one intra-op thread is faster, and on a busy 2-core
# machine two threads mostly wait on each other (108 parity tests: 175.7 s with 2, 25.1 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_bloom_dir():
    from fastprompt.loading import tiny_bloom_path

    return str(tiny_bloom_path())


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: show the compile tables a worker published (compile_report.py)."""
    from compile_report import WORKER_OUTPUT_KEY, show

    show(node.config, getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY, []))


# pytest-xdist: the tests of these modules check one expensive module-scoped run (a process), so
# they go to one worker together; every other test is scheduled on its own, longest groups first.
# (xdist's xdist_group marks would say the same, but xdist 3.8 tags the group onto item._nodeid,
# which pytest 9.2 no longer reads, so they group nothing.)
SHARED_RUN_MODULES = ("tests/e2e/test_demo.py",)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None  # an explicit --dist loadfile/loadscope/... is the user's choice
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_RUN_MODULES else nodeid

    return SharedRunsTogether(config, log)
