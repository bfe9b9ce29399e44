"""Helpers of the end-to-end tests (tests/e2e) that start ``fastprompt`` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastprompt.loading import demo_data_path

ROOT = Path(__file__).resolve().parents[1]


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "fastprompt.app.cli", *map(str, args)]


def cli_env() -> dict:
    """The checkout importable from any working directory."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_cli(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def small_data(directory: Path, count: int = 12) -> Path:
    records = json.loads(demo_data_path().read_text(encoding="utf-8"))[:count]
    path = directory / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path
