"""``fastprompt`` as a user runs it: subprocesses, exit codes, one-line errors, signals (the parts of a
check that are not about the process run in-process, through ``main``)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PromptTuningConfig, TaskType
from processes import ROOT, cli_command, cli_env, run_cli, small_data
from safetensors.torch import save_file

import fastprompt
from fastprompt.app.cli import main


def test_generate_answers_with_an_adapter(tmp_path):
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(
        fastprompt.load_model("tiny-bloom"), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    model.save_pretrained(tmp_path / "adapter")
    answered = run_cli(
        "generate", "--adapter", tmp_path / "adapter", "请介绍一下你自己。", "--max-new-tokens", 4, cwd=tmp_path
    )
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.endswith("\n") and answered.stderr == ""


def mismatched_adapter(directory: Path) -> Path:
    """A valid adapter for a model of hidden size 128 (tiny-bloom's is 256)."""
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=4,
        token_dim=128,
        num_transformer_submodules=1,
        num_attention_heads=2,
        num_layers=2,
    )
    # PEFT's on-disk format for a prompt-tuning adapter: its config and one tensor.
    config.save_pretrained(directory / "other")
    save_file({"prompt_embeddings": torch.zeros(4, 128)}, directory / "other" / "adapter_model.safetensors")
    return directory / "other"


def assert_one_line_error(name, status, stderr, code, pattern):
    assert status == code, (name, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, (name, stderr)
    assert re.match(rf"fastprompt (train|generate): error: .*{pattern}", lines[0]), (name, lines[0])


def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    """Each case through ``main`` in this process; the case that goes deepest (it imports and
    loads the model and the adapter) also as the command, where anything else on stderr (a
    traceback, an import-time warning) and the exit status are the process's own."""
    cases = {
        "missing data": (
            ["train", "--data", tmp_path / "nope.json", "--output", tmp_path / "o1"],
            1,
            "data '.*nope.json' does not exist",
        ),
        "bad flag value": (
            ["train", "--output", tmp_path / "o2", "--lr", "-1"],
            2,
            r"argument --lr: must be > 0.0, got -1",
        ),
        "unknown model": (
            ["train", "--model", "./no-such-model", "--output", tmp_path / "o3"],
            1,
            "model directory './no-such-model' does not exist",
        ),
        "adapter mismatch": (
            ["generate", "--adapter", mismatched_adapter(tmp_path), "hello"],
            1,
            "has token_dim 128, but the model's hidden size is 256",
        ),
    }
    monkeypatch.chdir(tmp_path)
    for name, (argv, code, pattern) in cases.items():
        try:
            status = main([str(arg) for arg in argv])
        except SystemExit as exited:  # argparse's usage errors
            status = exited.code
        assert_one_line_error(name, status, capsys.readouterr().err, code, pattern)

    argv, code, pattern = cases["adapter mismatch"]
    done = subprocess.run(cli_command(*argv), cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert_one_line_error("adapter mismatch, as a process", done.returncode, done.stderr, code, pattern)


def test_train_survives_sigterm_and_resumes_to_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        small_data(tmp_path),
        "--output",
        out,
        "--max-steps",
        20,
        "--batch-size",
        2,
        "--save-every",
        0,
        "--log-every",
        1,
        "--no-progress",
    ]
    process = subprocess.Popen(
        cli_command(*argv), cwd=tmp_path, env=cli_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for line in process.stdout:
        if line.startswith("step 2 "):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and "--resume" in stderr
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    interrupted_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= interrupted_at < 20

    # The resumed run reads what the interrupted process left on disk: in this process.
    assert main([*map(str, argv), "--resume"]) == 0
    resumed = capsys.readouterr()
    assert re.search(rf"^step {interrupted_at + 1} ", resumed.out, re.M), resumed.err
    assert re.search(r"^step 20 ", resumed.out, re.M)
    assert (out / "adapter_model.safetensors").is_file()


FAKE_BENCH = """
def test_step(benchmark):
    benchmark(sum, range(10))
    benchmark.extra_info.update(shape="tiny", fastprompt_step_s=0.5, peft_step_s=1.0, speedup=2.0)
"""


def test_bench_runs_the_suites_and_prints_the_report(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_fake.py").write_text(FAKE_BENCH)
    shutil.copy(ROOT / "bench" / "report.py", bench / "report.py")
    done = run_cli(
        "bench", "--bench-dir", bench, "--json", tmp_path / "results.json", "--", "-p", "no:cacheprovider", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench_fake.py" in done.stdout and (tmp_path / "results.json").is_file()
    header, _, row = done.stdout.strip().splitlines()[-3:]
    assert header.split() == ["case", "shape", "fastprompt_step_s", "peft_step_s", "speedup"]
    assert row.split() == ["step", "tiny", "0.5", "1", "2"]


def test_help_imports_nothing_heavy():
    """--help builds the parser only: no torch, transformers or peft import (it answers in well under a second)."""
    probe = (
        "import sys, fastprompt.app.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_hub_model_id_without_network_fails_at_once_in_one_line(tmp_path):
    env = dict(cli_env(), HF_ENDPOINT="http://127.0.0.1:9")  # a closed port: the hub cannot be reached
    started = time.perf_counter()
    done = subprocess.run(
        cli_command("train", "--model", "some-org/some-model", "--output", tmp_path / "out"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.perf_counter() - started < 5
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE=1" in lines[0] and "local directory" in lines[0], done.stderr


def test_report_to_wandb_runs_offline(tmp_path):
    """Only where wandb is installed (an optional extra): WANDB_MODE=offline needs no account or network, and
    the run lands next to the adapter."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    argv = ["train", "--data", small_data(tmp_path), "--output", out, "--max-steps", 2, "--batch-size", 2]
    env = dict(cli_env(), WANDB_MODE="offline", WANDB_SILENT="true")
    done = subprocess.run(
        cli_command(*argv, "--report-to", "wandb", "--no-progress"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (run,) = (out / "wandb").glob("offline-run-*")
    (history,) = run.glob("run-*.wandb")
    assert history.stat().st_size > 0


def test_train_in_4bit_writes_a_card_with_the_run_and_generates(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    argv = ["train", "--load-in-4bit", "--data", small_data(tmp_path), "--output", out, "--max-steps", 3]
    argv += ["--batch-size", 2, "--log-every", 1, "--eval-fraction", 0.25, "--no-progress", "--device", "cpu"]
    assert main(list(map(str, argv))) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    final_loss = [entry["loss"] for entry in log if "loss" in entry][-1]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (
        'base_model: "tiny-bloom"' in card and "(4-bit, bitsandbytes)" in card and "| default | PROMPT_TUNING |" in card
    )
    assert "- optimizer steps: 3" in card and "- final eval loss: " in card
    assert float(re.search(r"- final training loss: (\S+)", card).group(1)) == pytest.approx(final_loss, abs=1e-4)
    answered = main(
        ["generate", "--load-in-4bit", "--device", "cpu", "--adapter", str(out), "你好", "--max-new-tokens", "3"]
    )
    assert answered == 0


def test_load_in_8bit_and_4bit_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--load-in-8bit", "--load-in-4bit", "--output", "x"])
    assert "not allowed with argument" in capsys.readouterr().err
