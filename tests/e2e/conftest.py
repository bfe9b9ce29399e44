"""End-to-end tests start processes, which should see the environment a user's would."""

import os

import pytest


@pytest.fixture(autouse=True)
def _no_xdist_worker_variables(monkeypatch):
    """Under pytest-xdist the worker's PYTEST_XDIST_* variables would reach the processes started
    here, and a pytest among them (the bench command's, gpu_check.sh's steps) would take itself for
    an xdist worker: pytest-benchmark then switches benchmarks off (and refuses --benchmark-only)."""
    for name in list(os.environ):
        if name.startswith("PYTEST_XDIST_"):
            monkeypatch.delenv(name)
