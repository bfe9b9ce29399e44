"""No host synchronisation in the per-step hot paths (checked on CPU).

On a GPU, reading a device value from Python (``.item()``, ``.tolist()``,
``bool(t)``, ``int(t)``, ``float(t)``, indexing with a tensor scalar) waits
for every queued kernel: one such read per layer or per step stalls the whole
pipeline. Here those entry points are patched to record any call made during a
training step (forward + backward) and during the prefill and each decode step;
validation that needs values happens before, once per call.
"""

from contextlib import contextmanager

import pytest
import torch
from models import force_training_pass, padded_batch, pair, prompt_config, tiny_causal_lm

from fastprompt.paths import bloom_decode

ENTRY_POINTS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def recording_host_reads():
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in ENTRY_POINTS}

    def recorder(name):
        def patched(self, *args, **kwargs):
            calls.append((name, tuple(self.shape)))
            return originals[name](self, *args, **kwargs)

        return patched

    for name in ENTRY_POINTS:
        setattr(torch.Tensor, name, recorder(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_recorder_sees_a_host_read():
    with recording_host_reads() as calls:
        bool(torch.ones(2).sum() > 0)
        torch.zeros(3).tolist()
    assert [name for name, _ in calls] == ["__bool__", "tolist"]


@pytest.mark.parametrize("batch", [1, 4])
def test_training_step_reads_nothing_back(batch):
    model, _ = pair(lambda: tiny_causal_lm("bloom"), prompt_config(8))
    model.train()
    assert model.fast_path == "bloom"
    ids, mask, labels = padded_batch(batch, 12, 512, side="left")
    with recording_host_reads() as calls:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(20)).loss
        loss.backward()
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gpt2", "opt"])
def test_packed_training_step_reads_nothing_back(monkeypatch, family):
    """The generic path's packed pass hands the body a finished 4D mask, so
    transformers' mask code, which reads a 2D mask back once when the tokens
    run against a cache, has nothing to read either."""
    model, _ = pair(lambda: tiny_causal_lm(family), prompt_config(8))
    model.train()
    ran = force_training_pass(monkeypatch, model, "packed")
    ids, mask, labels = padded_batch(4, 12, 512, side="left")
    with recording_host_reads() as calls:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(20)).loss
        loss.backward()
    assert ran == ["packed"]
    assert calls == []


@pytest.mark.parametrize(
    "options",
    [
        {"max_new_tokens": 6},
        {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "num_return_sequences": 2},
        {"max_new_tokens": 6, "eos_token_id": 5, "pad_token_id": 0},
        {"max_new_tokens": 4, "cache_implementation": "static"},
    ],
)
def test_prefill_and_decode_steps_read_nothing_back(monkeypatch, options):
    model, _ = pair(lambda: tiny_causal_lm("bloom", lively=True), prompt_config(8))
    path = model.paths.own
    calls, steps = [], []

    def watched(function, label):
        def run(*args, **kwargs):
            with recording_host_reads() as inside:
                result = function(*args, **kwargs)
            calls.extend(inside)
            steps.append(label)
            return result

        return run

    ids, mask, _ = padded_batch(2, 9, 512, side="left")
    if options.get("cache_implementation") == "static":
        # Compile first (tracing reads values), then watch the compiled step as it runs.
        model.generate(input_ids=ids, attention_mask=mask, **options)
        path.compiled_step = watched(path.compiled_step, "step")
    else:
        monkeypatch.setattr(bloom_decode, "_step", watched(bloom_decode._step, "step"))
    monkeypatch.setattr(path, "prefill", watched(path.prefill, "prefill"))
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert steps[0] == "prefill" and steps.count("step") >= 1
    assert out.shape[1] > 9
    assert calls == []
