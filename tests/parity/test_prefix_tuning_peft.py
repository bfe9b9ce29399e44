"""Prefix tuning on the fast path, against the real peft package.

For every family, with and without PEFT's ``prefix_projection``: the fp32 loss
and the gradient of every encoder parameter within 1e-5 relative of PEFT's in
a training step (the packed pass, the learned prefix in front of each row's
keys), eval logits [B, T, V] as PEFT returns them, training under gradient
checkpointing (which PEFT refuses) with the gradients of PEFT's pass without
it, greedy and beam ids equal to PEFT's intended generation path
(``base.generate(input_ids, past_key_values=get_prompt(B))``: PEFT's own
``generate`` fails on BLOOM and OPT under transformers 5), and adapter files
both ways.
"""

import peft
import pytest
import torch
from models import FAMILIES, padded_batch, pair, tiny_causal_lm
from peft import PeftModel, PrefixTuningConfig, TaskType
from tolerance import assert_within_reference_error, rel_err

from fastprompt import FastPromptModel

VOCAB = 512
VIRTUAL = 6
NEW_TOKENS = 6


def prefix_config(projection=False):
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL, prefix_projection=projection, encoder_hidden_size=32
    )


def prefix_pair(family, projection=False, **model_kwargs):
    return pair(lambda: tiny_causal_lm(family, VOCAB, **model_kwargs), prefix_config(projection))


def loss_and_grads(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_step(ours, ref, inputs):
    got, grads = loss_and_grads(ours, **inputs)
    want, want_grads = loss_and_grads(ref, **inputs)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in want_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert rel_err(grads[name], grad) < 1e-5, name
    return got


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fp32_loss_and_prefix_grads_match_peft_in_the_packed_pass(family, projection, side):
    ours, ref = prefix_pair(family, projection)
    assert ours.fast_path is not None
    ids, mask, labels = padded_batch(3, 10, VOCAB, side=side, lengths=[10, 7, 4])
    got = assert_same_step(ours, ref, dict(input_ids=ids, attention_mask=mask, labels=labels))
    assert ours.last_call.run == "packed" and ours.last_call.reason is None
    assert got.logits is None  # the label-only loss


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_logits_match_peft_over_the_tokens(family):
    ours, ref = prefix_pair(family, projection=True)
    ours.eval()
    ref.eval()
    ids, mask, labels = padded_batch(3, 9, VOCAB, side="left")
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        got = ours(**inputs)
        assert ours.last_call.run == "shared"
        want = ref(**inputs)
    assert got.logits.shape == want.logits.shape == (3, 9, VOCAB)
    assert rel_err(got.logits, want.logits) < 1e-5
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_training_logits_when_asked_and_one_row(family):
    """``return_logits=True`` and a one-row batch take the tokens' pass with
    the prefix as their cache: PEFT's numbers too."""
    ours, ref = prefix_pair(family)
    ids, mask, labels = padded_batch(3, 8, VOCAB, side="right")
    got = assert_same_step(ours, ref, dict(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True))
    with torch.no_grad():
        assert rel_err(got.logits, ref(input_ids=ids, attention_mask=mask).logits) < 1e-5
    ours.zero_grad()
    ref.zero_grad()
    assert_same_step(ours, ref, dict(input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt", "bloom"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_trains_under_gradient_checkpointing_which_peft_refuses(family, use_reentrant):
    base = tiny_causal_lm(family, VOCAB)
    base.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        peft.get_peft_model(base, prefix_config())
    torch.manual_seed(0)
    ours = FastPromptModel.from_peft(peft.get_peft_model(tiny_causal_lm(family, VOCAB), prefix_config()))
    _, ref = prefix_pair(family)  # same seed: same encoder; PEFT's pass without checkpointing
    ours.get_base_model().gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    ours.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in ours.get_base_model().modules())
    ids, mask, labels = padded_batch(3, 10, VOCAB, side="left", lengths=[10, 7, 4])
    assert_same_step(ours, ref, dict(input_ids=ids, attention_mask=mask, labels=labels))
    assert ours.last_call.run == "packed"


def test_a_checkpointed_model_gets_and_loads_a_prefix_adapter_prepared_as_peft_prepares(tmp_path):
    import fastprompt

    base = tiny_causal_lm("llama", VOCAB)
    base.gradient_checkpointing_enable()
    model = fastprompt.get_peft_model(base, prefix_config())
    assert all(m.gradient_checkpointing for m in model.get_base_model().model.layers)
    ids = torch.tensor([[5, 6, 7]])
    assert model.get_input_embeddings()(ids).requires_grad  # PEFT's preparation for checkpointing ran
    model.save_pretrained(tmp_path)
    other = tiny_causal_lm("llama", VOCAB)
    other.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        PeftModel.from_pretrained(other, str(tmp_path))
    loaded = FastPromptModel.from_pretrained(other, str(tmp_path))
    assert loaded.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_the_encoder_runs_once_and_rows_read_one_stride_0_prefix(family):
    ours, ref = prefix_pair(family)
    ours.eval()
    seen = {"ours": [], "peft": []}
    for name, model in (("ours", ours), ("peft", ref)):
        model.prompt_encoder["default"].register_forward_hook(
            lambda module, args, output, name=name: seen[name].append(tuple(args[0].shape))
        )
    ids, mask, _ = padded_batch(4, 7, VOCAB)
    kv_strides = []
    path = ours.paths.own or ours.paths.generic
    original = path.prefill if family == "bloom" else path.tokens

    def spy(input_ids, key_mask, prefix, adapter_of_row):
        kv_strides.append(prefix.kv[0][0].stride(0))
        return original(input_ids, key_mask, prefix, adapter_of_row)

    setattr(path, "prefill" if family == "bloom" else "tokens", spy)
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
        ref(input_ids=ids, attention_mask=mask)
    assert seen == {"ours": [(1, VIRTUAL)], "peft": [(4, VIRTUAL)]}
    assert len(kv_strides) == 1  # one batch-1 prefix, expanded (stride 0) by the pass, never copied per row


def peft_intended(ref, ids, mask, **kwargs):
    """PEFT's intended generation for prefix tuning (what its
    ``prepare_inputs_for_generation`` sets up): the base model's generate with
    ``get_prompt`` as the cache and the virtual tokens' ones in the mask. A
    cache passed in is not expanded to the rows generate runs (each input
    times its beams, or its returned samples): it is made for those rows."""
    rows = ids.shape[0]
    beams = kwargs.get("num_beams", 1)
    copies = beams if beams > 1 else kwargs.get("num_return_sequences", 1)
    with torch.no_grad():
        return ref.get_base_model().generate(
            input_ids=ids,
            attention_mask=torch.cat([mask.new_ones(rows, VIRTUAL), mask], dim=1),
            past_key_values=ref.get_prompt(rows * copies),
            **kwargs,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_match_peft_intended_generation(family):
    ours, ref = prefix_pair(family, projection=True, lively=True)
    ours.eval()
    ref.eval()
    ids, mask, _ = padded_batch(3, 8, VOCAB, side="left", lengths=[8, 5, 3])
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    want = peft_intended(ref, ids, mask, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_beam_search_and_sampling_match_peft_intended_generation(family):
    ours, ref = prefix_pair(family, lively=True)
    ours.eval()
    ref.eval()
    ids, mask, _ = padded_batch(2, 6, VOCAB, side="left", lengths=[6, 4])
    for kwargs in (
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=20, temperature=0.9),
    ):
        torch.manual_seed(3)
        with torch.no_grad():
            got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **kwargs)
        torch.manual_seed(3)
        want = peft_intended(ref, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs)
        assert torch.equal(got, want), kwargs


def test_generate_without_a_cache_is_refused_in_one_line():
    ours, _ = prefix_pair("llama")
    ids, mask, _ = padded_batch(2, 5, VOCAB)
    with pytest.raises(ValueError, match="prefix tuning generates with a cache"):
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, use_cache=False)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_adapter_files_both_ways(family, tmp_path):
    ours, ref = prefix_pair(family, projection=True)
    ids, mask, labels = padded_batch(2, 6, VOCAB)
    loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels)
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    for directory, model in (("ours", ours), ("peft", ref)):
        by_peft = PeftModel.from_pretrained(tiny_causal_lm(family, VOCAB), str(tmp_path / directory)).eval()
        by_us = FastPromptModel.from_pretrained(tiny_causal_lm(family, VOCAB), str(tmp_path / directory)).eval()
        with torch.no_grad():
            want = peft.PeftModelForCausalLM.forward(model.eval(), input_ids=ids, attention_mask=mask).logits
            assert rel_err(by_peft(input_ids=ids, attention_mask=mask).logits, want) < 1e-5
            assert rel_err(by_us(input_ids=ids, attention_mask=mask).logits, want) < 1e-5
            assert by_us.last_call.path is not None


@pytest.mark.parametrize("family", ["llama", "bloom", "opt"])
def test_flattened_documents_are_served_per_document(family):
    from test_flattened_documents import LENGTHS, documents, flattened, per_document

    ours, ref = prefix_pair(family, lively=True)
    batch = flattened(documents(), "position_ids")
    want, _ = per_document(ref, batch["input_ids"], batch["labels"])
    want.backward()
    got = ours(**batch).loss
    got.backward()
    assert ours.last_call.run == "packed"
    assert rel_err(got, want) <= 1e-5
    weight = "prompt_encoder.default.embedding.weight"
    assert rel_err(dict(ours.named_parameters())[weight].grad, dict(ref.named_parameters())[weight].grad) <= 1e-5
    with torch.no_grad():
        _, doc_logits = per_document(ref, batch["input_ids"], batch["labels"])
        logits = ours(**batch).logits
    assert logits.shape == (1, sum(LENGTHS), VOCAB)
    assert rel_err(logits, torch.cat(doc_logits, dim=1)) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "bloom", "gemma2"])
def test_bf16_within_tolerance_rule_of_peft(family):
    """bf16 against PEFT in fp32 on the same weights, allowed twice PEFT-in-bf16's error (design.md)."""
    torch.manual_seed(0)
    exact = peft.get_peft_model(tiny_causal_lm(family, VOCAB), prefix_config())
    ours, ref = prefix_pair(family, dtype=torch.bfloat16)
    state = exact.prompt_encoder.state_dict()
    ours.prompt_encoder.load_state_dict(state)
    ref.prompt_encoder.load_state_dict(state)
    ids, mask, labels = padded_batch(3, 10, VOCAB, side="left", lengths=[10, 7, 4])
    steps = [loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels) for model in (ours, ref, exact)]
    assert ours.last_call.run == "packed"
    losses = [out.loss for out, _ in steps]
    assert_within_reference_error(*losses, atol=1e-4 * losses[2].item(), name="loss")
    grads = [next(iter(g.values())) for _, g in steps]
    assert_within_reference_error(*grads, atol=2e-2 * grads[2].abs().max().item(), name="prefix grad")


def test_a_prefix_adapter_of_another_depth_is_named_before_loading(tmp_path):
    ours, _ = prefix_pair("llama")
    ours.save_pretrained(tmp_path)
    layers = ours.get_base_model().config.num_hidden_layers
    deeper = tiny_causal_lm("llama", VOCAB, num_hidden_layers=layers + 1)
    with pytest.raises(ValueError, match=f"has num_layers {layers}, but the model has {layers + 1} layers"):
        FastPromptModel.from_pretrained(deeper, str(tmp_path))


def test_gpt2_upcast_attention_trains_on_peft_s_pass():
    """GPT-2's ``reorder_and_upcast_attn`` bypasses the configured attention
    function, which the packed pass hands the prefix through: a training step
    there runs the tokens with the prefix as their cache, PEFT's numbers."""
    ours, ref = pair(
        lambda: tiny_causal_lm("gpt2", VOCAB, reorder_and_upcast_attn=True, attn_implementation="eager"),
        prefix_config(),
    )
    ids, mask, labels = padded_batch(3, 8, VOCAB, side="right")
    assert_same_step(ours, ref, dict(input_ids=ids, attention_mask=mask, labels=labels))
    assert ours.last_call.run == "shared"


def test_checkpointing_the_packed_pass_cannot_serve_is_refused_in_one_line():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ours, _ = prefix_pair("llama")
    layers = ours.get_base_model().model.layers
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer)
    ours.train()
    ids, mask, labels = padded_batch(2, 6, VOCAB)
    with pytest.raises(ValueError, match="prefix tuning under gradient checkpointing needs fastprompt's packed pass"):
        ours(input_ids=ids, attention_mask=mask, labels=labels)
