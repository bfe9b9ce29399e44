"""Where the GPU compile checks publish their register and spill tables.

Each table goes to a file under build/compile-reports/ and into pytest's terminal summary, so a
plain `pytest` run shows the numbers without -s or -rP. Under pytest-xdist a worker has no terminal:
it hands its tables to the controller (tests/conftest.py's pytest_testnodedown), which shows them.
"""

from __future__ import annotations

from pathlib import Path

REPORT_DIR = Path(__file__).resolve().parents[1] / "build" / "compile-reports"
_PLUGIN_NAME = "fastprompt-compile-report"
WORKER_OUTPUT_KEY = "fastprompt_compile_reports"


class _TerminalSummary:
    def __init__(self):
        self.sections: list[tuple[str, str]] = []

    def pytest_terminal_summary(self, terminalreporter):
        for title, text in self.sections:
            terminalreporter.write_sep("-", title)
            terminalreporter.write_line(text)


def publish(config, name: str, title: str, summary: str, details: str) -> Path:
    """Show `summary` under `title` at the end of the run; write it and `details` to <name>.txt."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / f"{name}.txt"
    path.write_text(f"{title}\n\n{summary}\n\n{details}\n")
    section = (title, f"{summary}\n(per-configuration table: {path})")
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: the controller prints it
        config.workeroutput.setdefault(WORKER_OUTPUT_KEY, []).append(section)
    else:
        show(config, [section])
    return path


def show(config, sections) -> None:
    """Add (title, text) sections to this process's terminal summary."""
    plugin = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if plugin is None:
        plugin = _TerminalSummary()
        config.pluginmanager.register(plugin, _PLUGIN_NAME)
    plugin.sections.extend(map(tuple, sections))
