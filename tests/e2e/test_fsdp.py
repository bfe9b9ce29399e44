"""FSDP2 (``fully_shard`` per block) over two gloo processes on CPU: the same
loss and prompt gradient as one unsharded process. FSDP2's unshard runs as a
forward pre-hook on each block, so this also checks that block hooks fire."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from models import padded_batch, peft_prompt, prompt_config, tiny_causal_lm

import fastprompt

TESTS = Path(__file__).resolve().parents[1]


def test_fsdp2_sharded_blocks_give_one_process_numbers(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TESTS / "fsdp_worker.py"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    base = tiny_causal_lm("bloom")
    torch.manual_seed(0)  # the worker's prompt init
    model = fastprompt.get_peft_model(base, prompt_config(6))
    model.train()
    ids, mask, labels = padded_batch(3, 8, 512, side="left")
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    for rank in (0, 1):
        sharded = torch.load(tmp_path / f"rank{rank}.pt")
        assert sharded["path"] == "generic:bloom"  # FSDP2's hooks: the model's own blocks, one pass as in PEFT
        assert abs(sharded["loss"].item() - loss.item()) <= 1e-5 * loss.item()
        assert ((sharded["grad"] - peft_prompt(model).grad).norm() / peft_prompt(model).grad.norm()).item() < 1e-5
