"""No host synchronisation in the per-step hot paths (checked on CPU), except the declared ones.

On a GPU, reading a device value from Python (``.item()``, ``.tolist()``,
``bool(t)``, ``int(t)``, ``float(t)``, indexing with a tensor scalar) waits
for every queued kernel: one such read per layer or per step stalls the whole
pipeline. So does any op whose output size depends on device values: boolean-mask
indexing (``x[mask]``, and the ``index_put`` its backward runs), ``nonzero``,
``masked_select``, ``unique``, ``repeat_interleave`` with tensor counts and no
``output_size``, and the ops that return a Python value (``_local_scalar_dense``,
``equal``, ``is_nonzero``). The recorder here sees both levels: the Python entry
points are patched, and a ``TorchDispatchMode`` records those aten ops, each with
the innermost fastprompt function it ran under (``backward`` when autograd runs it).
A training step (forward + backward), the prefill and each decode step must record
exactly the syncs declared below, each with its reason: a new one fails, and a
removed one fails until its declaration goes. Validation that needs values happens
before, once per call.
"""

import sys
from contextlib import contextmanager

import pytest
import torch
from models import force_training_pass, padded_batch, pair, prompt_config, tiny_causal_lm
from torch.utils._python_dispatch import TorchDispatchMode

from fastprompt.paths import bloom_decode

ENTRY_POINTS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
aten = torch.ops.aten
# Ops that wait for the device whatever their arguments.
SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
# Indexing ops that sync when an index is a boolean (or uint8) mask: it becomes nonzero().
MASK_INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Sync unless output_size is given.
COUNT_OPS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}

# Known syncs: (op, where) -> why it is there. `where` is the innermost fastprompt function.
LABEL_SELECTION = (
    "the label-only loss selects the labelled rows with boolean masks; how many there "
    "are is data, and the rows through lm_head (and the chunks) depend on it: one wait "
    "per training step with labels, not per layer"
)
LOSS_SYNCS = {
    ("aten.index.Tensor[mask]", "fastprompt.loss:_labelled_rows"): LABEL_SELECTION,
    ("aten.index_put.default[mask]", "backward"): "the gradient of those boolean-mask selections "
    "(autograd's IndexBackward) scatters through the same masks",
}
PACKED_SYNCS = {
    **LOSS_SYNCS,
    ("tolist", "fastprompt.ops.packing:pack_layout"): "the packed pass's layout: how many positions each "
    "row keeps is data, and every shape of the packed sequence (and its attention segments) depends on it: "
    "one read per training step, not per layer",
}


def _fastprompt_frame() -> str:
    """The innermost fastprompt function on the stack; "backward" inside autograd's engine,
    else the innermost function outside torch."""
    frame, outside = sys._getframe(2), None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("fastprompt"):
            return f"{module}:{frame.f_code.co_name}"
        if outside is None and not module.startswith("torch") and module != __name__:
            outside = f"{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "backward" if torch._C._current_graph_task_id() != -1 else str(outside)


class _SyncingOps(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in SYNCING_OPS:
            name = str(func)
        elif func in MASK_INDEXING_OPS:
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
                name = f"{func}[mask]"
        elif func in COUNT_OPS and kwargs.get("output_size") is None:
            name = str(func)
        if name is not None:
            self.calls.append((name, _fastprompt_frame()))
        return func(*args, **kwargs)


@contextmanager
def recording_host_reads():
    """Records (what, where) for every host read and syncing aten op in the block."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in ENTRY_POINTS}

    def recorder(name):
        def patched(self, *args, **kwargs):
            calls.append((name, _fastprompt_frame()))
            return originals[name](self, *args, **kwargs)

        return patched

    for name in ENTRY_POINTS:
        setattr(torch.Tensor, name, recorder(name))
    try:
        with _SyncingOps(calls):
            yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def assert_declared(calls, declared: dict):
    recorded = set(calls)
    assert recorded == set(declared), (
        f"undeclared syncs: {sorted(recorded - set(declared))}; "
        f"declared but no longer made (remove the declaration): {sorted(set(declared) - recorded)}"
    )


def test_the_recorder_sees_a_host_read():
    with recording_host_reads() as calls:
        bool(torch.ones(2).sum() > 0)
        torch.zeros(3).tolist()
    assert [name for name, _ in calls] == ["__bool__", "aten._local_scalar_dense.default", "tolist"]


def test_the_recorder_sees_syncing_ops():
    x = torch.randn(6, requires_grad=True)
    mask = x > 0
    with recording_host_reads() as calls:
        x[mask].sum().backward()
        torch.nonzero(mask)
        x.detach().masked_select(mask)
        x.detach().repeat_interleave(torch.ones(6, dtype=torch.long))
        x.detach().repeat_interleave(torch.ones(6, dtype=torch.long), output_size=6)
        torch.unique(mask)
        torch.equal(x, x)
    names = {name for name, _ in calls}
    assert names >= {
        "aten.index.Tensor[mask]",
        "aten.index_put.default[mask]",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.repeat_interleave.Tensor",
        "aten.equal.default",
    }
    assert any("unique" in name for name in names)
    assert sum(name == "aten.repeat_interleave.Tensor" for name, _ in calls) == 1


@pytest.mark.parametrize("batch", [1, 4])
def test_bloom_training_step_reads_back_only_the_packed_layout(batch):
    model, _ = pair(lambda: tiny_causal_lm("bloom"), prompt_config(8))
    model.train()
    assert model.fast_path == "bloom"
    ids, mask, labels = padded_batch(batch, 12, 512, side="left")
    with recording_host_reads() as calls:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(20)).loss
        loss.backward()
    assert model.last_call.run == "packed"
    assert_declared(calls, PACKED_SYNCS)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gpt2", "opt"])
def test_packed_training_step_reads_only_its_layout_back(monkeypatch, family):
    """The generic path's packed pass reads the rows' kept counts once (its
    layout) and nothing else: no mask goes through transformers' mask code
    (the segments are the mask), and the attention segments are host slices."""
    model, _ = pair(lambda: tiny_causal_lm(family), prompt_config(8))
    model.train()
    ran = force_training_pass(monkeypatch, model, "packed")
    ids, mask, labels = padded_batch(4, 12, 512, side="left")
    with recording_host_reads() as calls:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(20)).loss
        loss.backward()
    assert ran == ["packed"]
    assert_declared(calls, PACKED_SYNCS)


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
    assert_declared(calls, {})
