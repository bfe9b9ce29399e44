"""The whole model matches PEFT whichever backend runs the fused embedding op.

The backend is forced through FASTPROMPT_EMBED_IMPL, which the dispatcher reads on every call, so
all three run in this process: Triton through its CPU interpreter, which tests/conftest.py switches
on before triton is first imported (on a CUDA test run, on the GPU).
"""

import pytest
from models import DEVICE, padded_batch, pair, peft_prompt, prompt_config, random_bloom

from fastprompt.ops import dispatch


def backends():
    from fastprompt.ops import backend_info

    info = backend_info()
    yield pytest.param("torch", id="torch")
    yield pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not info["native_available"], reason=f"native op not built: {info['native_unavailable_reason']}"
        ),
        id="native",
    )
    yield pytest.param(
        "triton",
        marks=pytest.mark.skipif(not info["triton_available"], reason="triton not installed"),
        id="triton-interpreter" if DEVICE.type == "cpu" else "triton",
    )


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("impl", list(backends()))
def test_model_parity_with_each_embedding_backend(impl, monkeypatch):
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, impl)
    ran = []
    resolve = dispatch.resolve_impl
    monkeypatch.setattr(dispatch, "resolve_impl", lambda *args: ran.append(resolve(*args)) or ran[-1])
    ours, ref = pair(lambda: random_bloom(vocab=512), prompt_config(6))
    ids, mask, labels = padded_batch(3, 9, 512, side="left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    got.loss.backward()
    want.loss.backward()
    assert ran and set(ran) == {impl}, ran  # the forced backend ran the model's embedding
    assert rel(got.logits, want.logits) < 1e-5
    assert abs(got.loss.item() - want.loss.item()) / want.loss.item() < 1e-5
    assert rel(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5
