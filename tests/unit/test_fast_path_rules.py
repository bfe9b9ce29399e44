"""When the fast path is taken, when it steps aside, and that it says so.

Dropout, hooks and device maps must behave exactly as on PEFT's path; rows
with different soft prompts in one batch must equal each adapter run alone.
"""

import logging
from pathlib import Path

import pytest
import torch
from models import (
    FAMILIES,
    TRAINING_PASSES,
    force_training_pass,
    padded_batch,
    pair,
    peft_prompt,
    prompt_config,
    random_bloom,
    tiny_causal_lm,
)
from tolerance import rel_err

import fastprompt


# ------------------------------------------------------------------ reporting
@pytest.mark.parametrize("family", FAMILIES)
def test_every_listed_family_reports_its_fast_path(family):
    model, _ = pair(lambda: tiny_causal_lm(family), prompt_config(4))
    assert model.fast_path == ("bloom" if family == "bloom" else f"generic:{family}")


def test_a_family_without_fast_path_runs_pefts_code_and_says_so(caplog):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def make_base():
        torch.manual_seed(0)
        config = GPTNeoXConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        return GPTNeoXForCausalLM(config).requires_grad_(False).eval()

    with caplog.at_level(logging.WARNING, logger="fastprompt"):
        ours, ref = pair(make_base, prompt_config(5))
    assert ours.fast_path is None
    assert "GPTNeoXForCausalLM has no fast path" in caplog.text
    ids, mask, labels = padded_batch(2, 7, 512)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)


@pytest.mark.parametrize(
    "call, reason",
    [
        ({"output_hidden_states": True}, "output_hidden_states=True"),
        ({"output_attentions": True}, "output_attentions=True"),
        ({"logits_to_keep": 1}, "extra arguments ['logits_to_keep']"),
    ],
)
def test_calls_leaving_the_fast_path_say_why_once_and_match_peft(caplog, call, reason):
    ours, ref = pair(lambda: tiny_causal_lm("llama"), prompt_config(4))
    ids, mask, _ = padded_batch(2, 6, 512)
    with caplog.at_level(logging.WARNING, logger="fastprompt"):
        got = ours(input_ids=ids, attention_mask=mask, **call)
        ours(input_ids=ids, attention_mask=mask, **call)
    assert caplog.text.count(f"not the fast path: {reason}") == 1
    want = ref(input_ids=ids, attention_mask=mask, **call)
    assert torch.equal(got.logits, want.logits)


def test_inputs_embeds_take_pefts_path():
    ours, ref = pair(lambda: tiny_causal_lm("bloom"), prompt_config(4))
    ids, mask, _ = padded_batch(2, 6, 512)
    embeds = ref.get_input_embeddings()(ids)
    assert torch.equal(
        ours(inputs_embeds=embeds, attention_mask=mask).logits, ref(inputs_embeds=embeds, attention_mask=mask).logits
    )


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("family", ["bloom", "llama", "opt"])
def test_training_with_dropout_draws_per_row_exactly_as_peft(family):
    """Dropout 0.1 in train mode: every row gets its own sample, as in PEFT;
    with the same seed the very same sample, so loss and gradient are equal."""
    rates = {
        "bloom": dict(hidden_dropout=0.1, attention_dropout=0.1),
        "llama": dict(attention_dropout=0.1),
        "opt": dict(dropout=0.1, attention_dropout=0.1),
    }[family]
    ours, ref = pair(lambda: tiny_causal_lm(family, **rates), prompt_config(8))
    ours.train()
    ref.train()
    ids, mask, labels = padded_batch(4, 10, 512, side="left")
    torch.manual_seed(5)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.manual_seed(5)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    got.loss.backward()
    want.loss.backward()
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5
    # The draws are real: another seed gives another loss.
    torch.manual_seed(6)
    assert ours(input_ids=ids, attention_mask=mask, labels=labels).loss.item() != got.loss.item()


# ------------------------------------------------------------------ hooks
def scale_block_output(module, args, output):
    """A hook that edits the block's hidden states in place."""
    output[0].mul_(1.5)


def test_hooks_on_blocks_fire_as_on_pefts_path():
    ours, ref = pair(lambda: random_bloom(vocab=512), prompt_config(6))
    seen = {"ours": [], "peft": []}
    for name, model in (("ours", ours), ("peft", ref)):
        blocks = model.get_base_model().transformer.h
        blocks[0].register_forward_pre_hook(lambda module, args, name=name: seen[name].append(("pre", args[0].shape)))
        blocks[1].mlp.register_forward_hook(
            lambda module, args, output, name=name: seen[name].append(("mlp", output.shape))
        )
        blocks[1].register_forward_hook(scale_block_output)
    ids, mask, labels = padded_batch(3, 8, 512, side="left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen["ours"] == seen["peft"] and len(seen["ours"]) == 2
    assert rel_err(got.logits, want.logits) < 1e-5
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()


def test_hooks_on_blocks_see_the_peft_intended_generation():
    ours, ref = pair(lambda: tiny_causal_lm("llama", lively=True), prompt_config(5))
    seen = {"ours": [], "peft": []}
    for name, model in (("ours", ours), ("peft", ref)):
        model.get_base_model().model.layers[0].register_forward_pre_hook(
            lambda module, args, name=name: seen[name].append(tuple(args[0].shape))
        )
    ids, mask, _ = padded_batch(2, 6, 512, side="left")
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    embeds = ref.word_embeddings(ids)
    prompt = peft_prompt(ref).detach().expand(2, -1, -1)
    want = ref.get_base_model().generate(
        inputs_embeds=torch.cat([prompt, embeds], 1),
        max_new_tokens=4,
        attention_mask=torch.cat([mask.new_ones(2, 5), mask], 1),
    )
    assert torch.equal(got[:, 6:], want)
    assert seen["ours"] == seen["peft"] == [(2, 11, 64)] + [(2, 1, 64)] * 3


def test_accelerate_device_map_with_disk_offload_matches_peft(tmp_path):
    """Blocks placed by accelerate (one offloaded to disk: its weights exist
    only inside the hooked call) give PEFT's logits, loss and gradient."""
    random_bloom(vocab=512).save_pretrained(tmp_path / "base")
    device_map = {
        "transformer.word_embeddings": "cpu",
        "transformer.word_embeddings_layernorm": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }

    def make_base():
        from transformers import AutoModelForCausalLM

        return (
            AutoModelForCausalLM.from_pretrained(
                tmp_path / "base", device_map=device_map, offload_folder=str(tmp_path / "offload")
            )
            .requires_grad_(False)
            .eval()
        )

    ours, ref = pair(make_base, prompt_config(6))
    assert ours.fast_path != "bloom"  # accelerate's hooks keep BLOOM's own decoder out
    ids, mask, labels = padded_batch(3, 8, 512, side="left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(got.logits, want.logits) < 1e-5
    got.loss.backward()
    want.loss.backward()
    assert rel_err(peft_prompt(ours).grad, peft_prompt(ref).grad) < 1e-5
    generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert generated.shape == (3, 12)


def test_a_bidirectional_gemma3_runs_pefts_code():
    # With use_bidirectional_attention the virtual tokens see the real ones, so
    # their states differ per row: there is no prefix to share.
    ours, ref = pair(lambda: tiny_causal_lm("gemma3_text", use_bidirectional_attention=True), prompt_config(4))
    assert ours.fast_path is None
    ids, mask, labels = padded_batch(3, 8, 512, side="left")
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)


# ------------------------------------------------------------------ packed training pass
@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_packing_is_taken_at_every_shape_but_not_under_flash_attention(shape):
    """The packed pass computes no pair between segments, so no shape makes it
    cost more than the two passes: it is taken from the classify (P100 B8 T32)
    to the long (B32 T256) shapes. A flash implementation takes no mask: never packed."""
    import copy
    import sys

    from transformers import AutoModelForCausalLM

    from fastprompt.paths.generic import GenericPath

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from model_shapes import SHAPES

    with torch.device("meta"):  # the real shape, without its weights
        model = AutoModelForCausalLM.from_config(copy.deepcopy(SHAPES[shape].config))
    path = GenericPath(model, model.get_input_embeddings())
    assert path.packs(100, 32) and path.packs(20, 128) and path.packs(20, 256)
    model.config._attn_implementation = "flash_attention_2"
    assert not path.packs(100, 32)


def test_bloom_packs_on_its_own_path_only():
    """The generic path packs with position ids, which BLOOM's ALiBi does not
    read; BLOOM's own path packs a training step with each key's ALiBi position."""
    model, _ = pair(lambda: random_bloom(vocab=512), prompt_config(6))
    _, generic = model.paths
    assert not generic.packs(6, 8)
    ids, mask, labels = padded_batch(2, 6, 512)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert (model.last_call.path, model.last_call.run) == ("bloom", "packed")


# ------------------------------------------------------------------ mixed adapters
@pytest.mark.parametrize(
    "family,training_pass", [case for case in TRAINING_PASSES if case[0] in ("bloom", "llama", "gpt2")]
)
@pytest.mark.parametrize("train", [False, True])
def test_rows_with_different_prompts_equal_each_adapter_alone(monkeypatch, family, training_pass, train):
    model, _ = pair(lambda: tiny_causal_lm(family), prompt_config(6))
    ran = force_training_pass(monkeypatch, model, training_pass)
    model.add_adapter("other", prompt_config(6))
    with torch.no_grad():
        model.prompt_encoder["other"].embedding.weight.normal_(0, 1.0)
    model.train(train)
    ids, mask, labels = padded_batch(4, 9, 512, side="left")
    names = ["other", "default", "other", "default"]
    mixed = model(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        adapter_names=names,
        return_logits=True,
        num_items_in_batch=torch.tensor(1),
    )
    assert ran == {"packed": ["packed"], "two passes": ["tokens"]}.get(training_pass, [])
    mixed.loss.backward()
    grads = {name: model.prompt_encoder[name].embedding.weight.grad.clone() for name in ("default", "other")}
    total = torch.zeros(())
    for name in ("default", "other"):
        model.zero_grad()
        model.set_adapter(name)
        model.prompt_encoder[name].embedding.weight.requires_grad_(True)
        rows = [i for i, n in enumerate(names) if n == name]
        alone = model(
            input_ids=ids[rows],
            attention_mask=mask[rows],
            labels=labels[rows],
            return_logits=True,
            num_items_in_batch=torch.tensor(1),
        )
        assert rel_err(mixed.logits[rows], alone.logits) < 1e-5
        alone.loss.backward()
        assert rel_err(grads[name], model.prompt_encoder[name].embedding.weight.grad) < 1e-5
        total = total + alone.loss.detach()
    assert abs(mixed.loss.item() - total.item()) <= 1e-5 * total.item()


def test_mixed_adapters_of_different_lengths_are_refused():
    model = fastprompt.get_peft_model(random_bloom(vocab=512), prompt_config(6))
    model.add_adapter("long", prompt_config(9))
    ids, mask, _ = padded_batch(2, 5, 512)
    with pytest.raises(ValueError, match="different num_virtual_tokens"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "long"])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "nope"])
