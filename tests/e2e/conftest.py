"""End-to-end tests start processes: what those inherit from the pytest worker is a user's environment,
plus one thread per process."""

import os

import pytest


@pytest.fixture(autouse=True)
def _one_thread_per_process(monkeypatch):
    """The processes run tiny models too (tests/conftest.py gives this one a single torch thread):
    two threads each would only contend with the other pytest-xdist worker for the two cores. Code
    that picks its own thread count (the demo, torchrun's ranks, the benchmarks) still does."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_xdist_worker_variables(monkeypatch):
    """Under pytest-xdist the worker's PYTEST_XDIST_* variables would reach the processes started
    here, and a pytest among them (the bench command's, gpu_check.sh's steps) would take itself for
    an xdist worker: pytest-benchmark then switches benchmarks off (and refuses --benchmark-only)."""
    for name in list(os.environ):
        if name.startswith("PYTEST_XDIST_"):
            monkeypatch.delenv(name)
