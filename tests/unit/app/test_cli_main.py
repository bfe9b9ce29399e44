"""``fastprompt.app.cli.main`` called in-process: standard help, and errors with and without --debug.
The command as a user runs it (processes, exit codes, signals) is tests/e2e/test_cli.py."""

from __future__ import annotations

import pytest

from fastprompt.app.cli import main


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["bench"], ["demo"]])
def test_every_command_has_standard_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(['fastprompt', *command])}")


def test_errors_in_process_and_debug(tmp_path, capsys):
    assert main(["generate", "--adapter", str(tmp_path / "none"), "hello"]) == 1
    assert (
        capsys.readouterr().err
        == f"fastprompt generate: error: adapter directory {str(tmp_path / 'none')!r} does not exist\n"
    )
    with pytest.raises(FileNotFoundError):
        main(["train", "--data", str(tmp_path / "nope.json"), "--output", str(tmp_path / "o"), "--debug"])
