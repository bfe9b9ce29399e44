"""The whole model matches PEFT whichever backend runs the fused embedding op.

Each backend runs in a fresh process: the backend is forced through
FASTPROMPT_EMBED_IMPL, and Triton's CPU interpreter can only be switched on
before triton is first imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from models import padded_batch, pair, peft_prompt, prompt_config, random_bloom
ours, ref = pair(lambda: random_bloom(vocab=512), prompt_config(6))
ids, mask, labels = padded_batch(3, 9, 512, side="left")
got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
want = ref(input_ids=ids, attention_mask=mask, labels=labels)
got.loss.backward(); want.loss.backward()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
print(rel(got.logits, want.logits), abs(got.loss.item() - want.loss.item()) / want.loss.item(),
      rel(peft_prompt(ours).grad, peft_prompt(ref).grad))
"""


def backends():
    from fastprompt.ops import backend_info

    info = backend_info()
    yield pytest.param("torch", {}, id="torch")
    yield pytest.param(
        "native", {},
        marks=pytest.mark.skipif(not info["native_available"], reason=f"native op not built: {info['native_unavailable_reason']}"),
        id="native",
    )
    yield pytest.param(
        "triton", {"TRITON_INTERPRET": "1"},
        marks=pytest.mark.skipif(not info["triton_available"], reason="triton not installed"),
        id="triton-interpreter",
    )


@pytest.mark.parametrize("impl,extra_env", list(backends()))
def test_model_parity_with_each_embedding_backend(impl, extra_env):
    env = dict(os.environ, FASTPROMPT_EMBED_IMPL=impl, **extra_env)
    code = CHECK.format(tests=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    logits_err, loss_err, grad_err = map(float, out.stdout.split()[-3:])
    assert logits_err < 1e-5 and loss_err < 1e-5 and grad_err < 1e-5
