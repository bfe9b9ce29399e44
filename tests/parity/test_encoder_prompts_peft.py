"""P-tuning (MLP and LSTM encoders) and multitask prompt tuning on the fast path, against the real peft package.

For every family: fp32 loss and the gradient of every trainable encoder
parameter within 1e-5 relative of PEFT's (left and right padding, a batch of
mixed tasks for multitask), with the packed pass in training and the shared
prefix in evaluation; greedy ids equal to PEFT's intended generation path
(``base.generate(inputs_embeds=cat(get_prompt(...), embed(ids)))``, see
``test_generation.py``); adapter files both ways.
"""

import pytest
import torch
from models import FAMILIES, padded_batch, pair, tiny_causal_lm
from peft import MultitaskPromptTuningConfig, PeftModel, PromptEncoderConfig, TaskType
from tolerance import rel_err

from fastprompt import FastPromptModel

VOCAB = 512
VIRTUAL = 6


def encoder_config(method):
    if method == "multitask":
        return MultitaskPromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL, num_tasks=3, num_ranks=2
        )
    # LSTM: two layers, so its dropout (drawn in training, as in PEFT) is between them.
    lstm = dict(encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.2)
    return PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=VIRTUAL,
        encoder_hidden_size=32,
        **(lstm if method == "lstm" else {}),
    )


def method_pair(family, method, **model_kwargs):
    """(ours, PEFT's) on copies of one tiny model. A multitask adapter's task
    factors are drawn at std 1 instead of PEFT's 0.02, the same in both: at
    PEFT's init its prompts are ~1e-3 of the embeddings' scale, too faint for
    a per-row mix-up of tasks to move the loss beyond the parity tolerance."""
    ours, ref = pair(lambda: tiny_causal_lm(family, VOCAB, **model_kwargs), encoder_config(method))
    if method == "multitask":
        gen = torch.Generator().manual_seed(0)
        for name in ("prefix_task_cols", "prefix_task_rows"):
            values = torch.randn(getattr(ours.prompt_encoder["default"], name).shape, generator=gen)
            with torch.no_grad():
                for model in (ours, ref):
                    getattr(model.prompt_encoder["default"], name).copy_(values)
    return ours, ref


METHODS = ["mlp", "lstm", "multitask"]
MIXED_TASKS = [2, 0, 2]


def call_kwargs(method, tasks=MIXED_TASKS):
    return {"task_ids": torch.tensor(tasks)} if method == "multitask" else {}


def trainable_grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, seed, **inputs):
    torch.manual_seed(seed)  # the LSTM's dropout draws from here, in PEFT and in ours
    out = model(**inputs)
    out.loss.backward()
    return out.loss, trainable_grads(model)


def assert_grads_match(got, want):
    assert got.keys() == want.keys() and len(got) >= 3
    for name, grad in want.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert rel_err(got[name], grad) < 1e-5, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_fp32_loss_and_encoder_grads_match_peft_in_the_packed_pass(family, method, side):
    ours, ref = method_pair(family, method)
    assert ours.fast_path is not None
    ids, mask, labels = padded_batch(3, 10, VOCAB, side=side, lengths=[10, 7, 4])
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **call_kwargs(method))
    # The encoders are in training mode (as PEFT builds them): the LSTM's dropout draws.
    assert ours.prompt_encoder.training
    loss, grads = loss_and_grads(ours, 7, **inputs)
    assert ours.last_call.run == "packed" and ours.last_call.reason is None
    want_loss, want_grads = loss_and_grads(ref, 7, **inputs)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert_grads_match(grads, want_grads)


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_lstm_dropout_draws_are_peft_draws(family):
    """Guards the fixture above: another seed moves PEFT's loss, so the
    agreement at one seed means the encoder drew as PEFT's did."""
    ours, ref = method_pair(family, "lstm")
    ids, mask, labels = padded_batch(3, 10, VOCAB)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    loss, _ = loss_and_grads(ours, 3, **inputs)
    want, _ = loss_and_grads(ref, 3, **inputs)
    other, _ = loss_and_grads(ref, 4, **inputs)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert abs(other.item() - want.item()) > 1e-5 * abs(want.item())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_eval_logits_match_peft_on_the_shared_prefix(family, method):
    ours, ref = method_pair(family, method)
    ours.eval()
    ref.eval()
    ids, mask, labels = padded_batch(3, 9, VOCAB, side="left")
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **call_kwargs(method))
    with torch.no_grad():
        got = ours(**inputs)
        assert ours.last_call.run == "shared"
        want = ref(**inputs)
    assert rel_err(got.logits, want.logits) < 1e-5
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_multitask_rows_of_one_task_share_one_prompt(family):
    ours, ref = method_pair(family, "multitask")
    ids, mask, labels = padded_batch(3, 9, VOCAB)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **call_kwargs("multitask", [1, 1, 1]))
    seen = []
    ours.prefix_cache.store = lambda path, batch, prefix: seen.append(batch.prompts.shape[0])
    loss, grads = loss_and_grads(ours, 0, **inputs)
    want_loss, want_grads = loss_and_grads(ref, 0, **inputs)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert_grads_match(grads, want_grads)
    with torch.no_grad():
        ours(**inputs)
    assert seen == [1]


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_a_hook_on_the_multitask_encoder_sees_peft_s_calls(family):
    """A forward hook on the encoder sees one call over every row, as in PEFT,
    and the numbers stay PEFT's."""
    ours, ref = method_pair(family, "multitask")
    ids, mask, labels = padded_batch(3, 9, VOCAB)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **call_kwargs("multitask"))
    seen = {"ours": [], "peft": []}
    for name, model in (("ours", ours), ("peft", ref)):
        model.prompt_encoder["default"].register_forward_hook(
            lambda module, args, output, name=name: seen[name].append((tuple(args[0].shape), args[1].tolist()))
        )
    loss, grads = loss_and_grads(ours, 0, **inputs)
    want_loss, want_grads = loss_and_grads(ref, 0, **inputs)
    assert seen["ours"] == seen["peft"] == [((3, VIRTUAL), MIXED_TASKS)]
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert_grads_match(grads, want_grads)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_multitask_tasks_move_the_loss_beyond_the_tolerance(family):
    """Guards the fixtures: in PEFT's forward, giving every row one task instead
    of the mixed ones moves the loss over ten times the 1e-5 tolerance, so reading a wrong task's
    prompt fails the parity tests."""
    _, ref = method_pair(family, "multitask")
    ids, mask, labels = padded_batch(3, 10, VOCAB)
    with torch.no_grad():
        mixed = ref(input_ids=ids, attention_mask=mask, labels=labels, **call_kwargs("multitask")).loss
        same = ref(input_ids=ids, attention_mask=mask, labels=labels, **call_kwargs("multitask", [2, 2, 2])).loss
    assert abs(mixed.item() - same.item()) > 1e-4 * abs(mixed.item())


def test_multitask_without_task_ids_is_refused_as_peft_refuses_it():
    ours, ref = method_pair("llama", "multitask")
    ids, mask, _ = padded_batch(2, 5, VOCAB)
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        ref(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        ours(input_ids=ids, attention_mask=mask)


def peft_intended(ref, ids, mask, task_ids=None, **kwargs):
    """PEFT's intended generation: the base model's generate on PEFT's own
    ``get_prompt`` in front of the token embeddings."""
    with torch.no_grad():
        embeds = ref.word_embeddings(ids)
        prompt = ref.get_prompt(batch_size=ids.shape[0], task_ids=task_ids).to(embeds.dtype)
        ones = mask.new_ones(ids.shape[0], prompt.shape[1])
        return ref.get_base_model().generate(
            inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=torch.cat([ones, mask], dim=1), **kwargs
        )


def lively_pair(family, method):
    ours, ref = method_pair(family, method, lively=True)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_ids_equal_the_peft_intended_path(family, method):
    ours, ref = lively_pair(family, method)
    ids, mask, _ = padded_batch(3, 8, VOCAB, side="left")
    kwargs = call_kwargs(method)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
    assert ours.last_call.path is not None
    assert torch.equal(got[:, :8], ids)
    assert torch.equal(got[:, 8:], peft_intended(ref, ids, mask, max_new_tokens=6, **kwargs))


@pytest.mark.parametrize("family", ["bloom", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_changing_an_encoder_parameter_changes_what_generate_returns(family, method):
    """The prefix cache compares the computed prompts: an encoder parameter
    written in place (no new prompt tensor, no version the cache could read)
    makes it recompute."""
    ours, ref = lively_pair(family, method)
    ids, mask, _ = padded_batch(2, 8, VOCAB, side="left")
    kwargs = call_kwargs(method, [1, 2])
    before = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
    assert torch.equal(before, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs))
    computed = ours.prefix_cache.computations
    for model in (ours, ref):
        encoder = model.prompt_encoder["default"]
        with torch.no_grad():
            if method == "multitask":
                encoder.prefix_task_rows.mul_(-3.0)
            else:
                # Not a constant shift: BLOOM's embedding LayerNorm would remove it.
                bias = encoder.mlp_head[-1].bias
                bias.add_(torch.linspace(-2.0, 2.0, bias.numel()))
    after = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
    assert ours.prefix_cache.computations == computed + 1
    assert not torch.equal(before, after)
    assert torch.equal(after[:, 8:], peft_intended(ref, ids, mask, max_new_tokens=6, **kwargs))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_files_both_ways(tmp_path, method):
    ours, ref = method_pair("llama", method)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        for model in (ours, ref):  # a trained-looking encoder, not the init
            model.prompt_encoder["default"].embedding.weight.mul_(3.0)
    ids, mask, _ = padded_batch(2, 7, VOCAB, side="left")
    kwargs = call_kwargs(method, [2, 1])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, **kwargs).logits

    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    peft_loads_ours = PeftModel.from_pretrained(tiny_causal_lm("llama", VOCAB), tmp_path / "ours")
    ours_loads_peft = FastPromptModel.from_pretrained(tiny_causal_lm("llama", VOCAB), tmp_path / "peft")
    assert isinstance(ours_loads_peft, FastPromptModel)
    want = logits(ref)
    assert rel_err(logits(peft_loads_ours), want) < 1e-5
    assert rel_err(logits(ours_loads_peft), want) < 1e-5
    assert ours_loads_peft.last_call.run == "shared"


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_rows_of_two_p_tuning_adapters_match_peft_per_adapter(family):
    """``adapter_names`` over P-tuning adapters (an MLP and an LSTM encoder):
    each prompt is its encoder's output, computed once; PEFT runs each
    adapter's rows alone."""
    ours, ref = method_pair(family, "mlp")
    for model in (ours, ref):
        torch.manual_seed(1)
        model.add_adapter("lstm", encoder_config("lstm"))
        model.prompt_encoder.requires_grad_(True)
        model.prompt_encoder.eval()  # no dropout: PEFT's separate calls would draw in another order
    ids, mask, labels = padded_batch(4, 9, VOCAB, side="left", lengths=[9, 4, 7, 2])
    names = ["lstm", "default", "lstm", "default"]
    total = (labels != -100).sum()
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names, num_items_in_batch=total).loss
    loss.backward()
    assert ours.last_call.run == "packed"
    want = torch.zeros(())
    for name in ("default", "lstm"):
        ref.set_adapter(name)
        rows = [i for i, n in enumerate(names) if n == name]
        part = ref(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], num_items_in_batch=total).loss
        part.backward()
        want = want + part
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    ref_grads = dict(ref.named_parameters())
    trained = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert {name.split(".")[1] for name, _ in trained} == {"default", "lstm"}
    for name, param in trained:
        assert rel_err(param.grad, ref_grads[name].grad) < 1e-5, name


def test_a_multitask_adapter_in_adapter_names_is_refused():
    ours, _ = method_pair("llama", "multitask")
    ids, mask, _ = padded_batch(2, 5, VOCAB)
    with pytest.raises(ValueError, match="choose their task with task_ids"):
        ours(input_ids=ids, attention_mask=mask, adapter_names=["default", "default"], task_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_flattened_documents_read_their_rows_task(family):
    """Documents flattened into rows (``position_ids`` restarting, as a
    padding-free collator writes them) are served one at a time behind their
    row's task prompt: PEFT run on each document alone with that task."""
    ours, ref = method_pair(family, "multitask", lively=True)
    documents_of_row = [[5, 7], [8, 4]]
    task_ids = torch.tensor([2, 0])
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in lengths])[None] for lengths in documents_of_row])
    labels[position_ids < 2] = -100  # each document's first tokens: an instruction
    total, count = 0.0, 0
    for row, lengths in enumerate(documents_of_row):
        start = 0
        for length in lengths:
            doc = slice(start, start + length)
            labelled = int((labels[row, doc][1:] != -100).sum())
            one = slice(row, row + 1)
            out = ref(input_ids=ids[one, doc], labels=labels[one, doc], task_ids=task_ids[one])
            total, count = total + out.loss * labelled, count + labelled
            start += length
    want = total / count
    want.backward()
    got = ours(input_ids=ids, labels=labels, position_ids=position_ids, task_ids=task_ids).loss
    got.backward()
    assert ours.last_call.path is not None and ours.last_call.run != "peft"
    assert rel_err(got, want) <= 1e-5
    assert_grads_match(trainable_grads(ours), trainable_grads(ref))


@pytest.mark.parametrize("family", ["bloom", "llama", "opt"])
@pytest.mark.parametrize("method", ["lstm", "multitask"])
def test_beam_search_equals_the_peft_intended_path(family, method):
    """Beams repeat each input row: each keeps its row's task prompt."""
    ours, ref = lively_pair(family, method)
    ids, mask, _ = padded_batch(3, 8, VOCAB, side="left")
    options = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, **call_kwargs(method))
    got = ours.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(got[:, 8:], peft_intended(ref, ids, mask, **options))
