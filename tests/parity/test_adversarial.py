"""Cases outside the shapes the parity tests cover, each against real PEFT (or PEFT's intended generation path).

Each fast path must compute PEFT's number, or take PEFT's path and say so in
``last_call`` and one log line. Eligibility is decided from what the model
does: random draws, frequencies that depend on the sequence length, hooks on a
module a fast path calls differently from PEFT.
"""

import math

import pytest
import torch
from models import (
    FAMILIES,
    force_training_pass,
    padded_batch,
    pair,
    peft_prompt,
    prompt_config,
    tiny_causal_lm,
)
from tolerance import rel_err

from fastprompt.paths import DRAWS_RANDOM

ROTARY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]


def close(a, b):
    """fp32 results within 1e-5 of PEFT's, relative (an all-zero reference: equal)."""
    return torch.equal(a, b) if not b.any() else rel_err(a, b) < 1e-5


def loss_and_grad(model, ids, mask, labels, seed=0):
    peft_prompt(model).grad = None
    torch.manual_seed(seed)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), peft_prompt(model).grad.clone()


def peft_intended(ref, ids, mask, **kwargs):
    """PEFT's generate as it is meant: the base model's generate on cat(prompt, embed(ids))."""
    embeds = ref.word_embeddings(ids)
    prompt = peft_prompt(ref).detach().to(embeds.dtype).expand(ids.shape[0], -1, -1)
    with torch.no_grad():
        return ref.get_base_model().generate(
            inputs_embeds=torch.cat([prompt, embeds], dim=1),
            attention_mask=torch.cat([mask.new_ones(ids.shape[0], prompt.shape[1]), mask], dim=1),
            **kwargs,
        )


# ----------------------------------------------------------------- random draws
def noisy(model):
    """A block that draws random numbers in training mode, written neither as a
    dropout module nor with a "dropout" attribute, nor as a wrapper or hook:
    the first block's class gains noise on its output."""
    block = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]

    class NoisyBlock(type(block)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if self.training:
                hidden = hidden + 0.1 * torch.randn_like(hidden)
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    block.__class__ = NoisyBlock
    return model


RANDOM_MODELS = {
    "opt-layerdrop": lambda: tiny_causal_lm("opt", layerdrop=0.5),
    **{
        f"{family}-noise": (lambda family=family: noisy(tiny_causal_lm(family)))
        for family in ("llama", "gpt2", "bloom")
    },
}


@pytest.mark.parametrize("name", list(RANDOM_MODELS))
@pytest.mark.parametrize("training_pass", ["packed", "two passes"])
@pytest.mark.parametrize("rows,tokens", [(24, 20), (4, 12), (1, 9)])
def test_random_draws_in_training_are_drawn_as_in_peft(monkeypatch, name, training_pass, rows, tokens):
    ours, ref = pair(RANDOM_MODELS[name], prompt_config(8))
    force_training_pass(monkeypatch, ours, "own decoder" if name.startswith("bloom") else training_pass)
    ours.train()
    ref.train()
    ids, mask, labels = padded_batch(rows, tokens, 512)
    for seed in (3, 4):  # the first call finds the draws, the second starts from what it learnt
        loss, grad = loss_and_grad(ours, ids, mask, labels, seed)
        want_loss, want_grad = loss_and_grad(ref, ids, mask, labels, seed)
        assert close(loss, want_loss) and close(grad, want_grad)
        assert ours.last_call.run == "whole" and ours.last_call.reason == DRAWS_RANDOM
    ours.eval()
    ref.eval()
    loss, grad = loss_and_grad(ours, ids, mask, labels)
    assert rel_err(loss, loss_and_grad(ref, ids, mask, labels)[0]) < 1e-5
    assert rows == 1 or ours.last_call.run != "whole"  # in eval mode nothing draws: the fast pass again


def test_the_draws_are_undone_before_pefts_pass_runs(caplog):
    """After a fast attempt that drew, the generators are where they were:
    what follows the call sees the same random numbers as after PEFT's call."""
    ours, ref = pair(RANDOM_MODELS["llama-noise"], prompt_config(8))
    ours.train()
    ref.train()
    ids, mask, labels = padded_batch(4, 10, 512)
    after = []
    for model in (ours, ref):
        torch.manual_seed(7)
        model(input_ids=ids, attention_mask=mask, labels=labels)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])
    assert sum(DRAWS_RANDOM in record.getMessage() for record in caplog.records) == 1


# ------------------------------------------------------- length-dependent RoPE
def dynamic_rope(family):
    return lambda: tiny_causal_lm(
        family, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16, lively=True
    )


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
@pytest.mark.parametrize("training_pass", ["packed", "two passes"])
def test_length_dependent_rope_matches_peft(monkeypatch, family, training_pass):
    ours, ref = pair(dynamic_rope(family), prompt_config(8))
    force_training_pass(monkeypatch, ours, training_pass)
    ids, mask, labels = padded_batch(3, 20, 512)
    loss, grad = loss_and_grad(ours, ids, mask, labels)
    want_loss, want_grad = loss_and_grad(ref, ids, mask, labels)
    assert close(loss, want_loss) and close(grad, want_grad)
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        assert rel_err(logits, ref(input_ids=ids, attention_mask=mask).logits) < 1e-5
    assert ours.last_call.reason == "rotary positions depend on the sequence length"


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_length_dependent_rope_generation_matches_the_peft_intended_path(family):
    ours, ref = pair(dynamic_rope(family), prompt_config(8))
    ids, mask, _ = padded_batch(2, 12, 512, side="left")
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got[:, 12:], peft_intended(ref, ids, mask, max_new_tokens=6))


def test_fixed_rope_still_shares_the_prefix():
    """The probe finds no dependence where there is none, and leaves the rotary state as it was."""
    ours, _ = pair(lambda: tiny_causal_lm("llama"), prompt_config(8))
    rotary = ours.get_base_model().model.rotary_emb
    before = {name: (buffer.data_ptr(), buffer._version) for name, buffer in rotary.named_buffers()}
    ids, mask, labels = padded_batch(3, 20, 512)
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
    assert ours.last_call.run == "shared"
    assert before == {name: (buffer.data_ptr(), buffer._version) for name, buffer in rotary.named_buffers()}


# ------------------------------------------------------------------ generation
def test_bloom_decode_loop_infers_the_mask_from_the_pad_token_as_transformers_does():
    ours, ref = pair(lambda: tiny_causal_lm("bloom", lively=True, pad_token_id=3), prompt_config(8))
    ids, mask, _ = padded_batch(3, 9, 512, side="left")  # pads are id 3
    own = ours.generate(input_ids=ids, max_new_tokens=6)
    assert ours.last_call.run == "decode loop"
    assert torch.equal(own, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6))
    handle = ours.get_base_model().transformer.h[0].register_forward_hook(lambda *_: None)
    assert torch.equal(own, ours.generate(input_ids=ids, max_new_tokens=6))
    assert ours.last_call.run == "transformers' loop"
    handle.remove()
    assert torch.equal(own[:, 9:], peft_intended(ref, ids, mask, max_new_tokens=6))


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_generate_matches_the_peft_intended_path(family):
    ours, ref = pair(lambda: tiny_causal_lm(family, lively=True), prompt_config(8))
    ids, mask, _ = padded_batch(3, 10, 512, side="right")
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got[:, 10:], peft_intended(ref, ids, mask, max_new_tokens=6))
    beams = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    want = peft_intended(ref, ids, mask, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert torch.equal(beams[:, 10:], want)


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_a_4d_mask_from_the_base_is_made_anew_for_the_virtual_tokens(family):
    # ported from peft tests/test_decoder_models.py::test_prompt_tuning_prepare_inputs_for_generation_4d_attention_mask
    from transformers import DynamicCache

    input_ids = torch.tensor([[5, 6, 7]])
    prepared = []
    for model in pair(lambda: tiny_causal_lm(family), prompt_config(4)):
        model.base_model_prepare_inputs_for_generation = lambda *_, **__: {
            "input_ids": input_ids,
            "attention_mask": torch.ones(1, 1, 3, 3),
            "cache_position": torch.arange(3),
            "past_key_values": DynamicCache(),
        }
        prepared.append(model.prepare_inputs_for_generation(input_ids))
    ours, ref = prepared
    assert ours["input_ids"] is None and ours["inputs_embeds"].shape[1] == 4 + 3
    masks = [ours["attention_mask"], ref["attention_mask"]]
    if isinstance(masks[1], dict):
        assert masks[0].keys() == masks[1].keys()
        masks = [list(masks[0].values()), list(masks[1].values())]
        assert all(m is None or m.shape[-1] == 7 for m in masks[0])
    assert repr(masks[0]) == repr(masks[1])


# ----------------------------------------------------------------------- hooks
def neftune(model):
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = model.get_base_model().get_input_embeddings()
    embedding.neftune_noise_alpha = 5.0
    embedding.register_forward_hook(neftune_post_forward_hook)
    return model


@pytest.mark.parametrize("family", ["bloom", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_neftune_on_the_input_embedding_runs_as_in_peft(family, mode):
    ours, ref = (neftune(model) for model in pair(lambda: tiny_causal_lm(family), prompt_config(8)))
    ours.train(mode == "train")
    ref.train(mode == "train")
    ids, mask, labels = padded_batch(4, 10, 512)
    loss, grad = loss_and_grad(ours, ids, mask, labels, seed=1)
    want_loss, want_grad = loss_and_grad(ref, ids, mask, labels, seed=1)
    assert close(loss, want_loss) and close(grad, want_grad)
    assert ours.last_call.path != "bloom"  # BLOOM's fused op would read the table past the hook


def recorder(calls):
    return lambda module, args, output: calls.append(
        tuple(output[0].shape if isinstance(output, tuple) else getattr(output, "last_hidden_state", output).shape)
    )


@pytest.mark.parametrize("family", ["bloom", "llama", "opt"])
@pytest.mark.parametrize("module", ["body", "final norm", "lm_head"])
def test_a_hooked_module_sees_the_calls_peft_makes(family, module):
    ours, ref = pair(lambda: tiny_causal_lm(family), prompt_config(8))
    ids, mask, labels = padded_batch(3, 10, 512)
    seen = []
    for model in (ours, ref):
        base = model.get_base_model()
        body = getattr(base, base.base_model_prefix)
        norm = [m for name, m in body.named_modules() if name in ("ln_f", "norm", "decoder.final_layer_norm")][0]
        target = {"body": body, "final norm": norm, "lm_head": base.get_output_embeddings()}[module]
        calls = []
        target.register_forward_hook(recorder(calls))
        loss, grad = loss_and_grad(model, ids, mask, labels)
        seen.append((calls, loss, grad))
    (calls, loss, grad), (want_calls, want_loss, want_grad) = seen
    assert calls == want_calls
    assert close(loss, want_loss) and close(grad, want_grad)


# ----------------------------------------------------------------- the outputs
@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_use_cache_and_tuple_outputs_are_pefts(family):
    ours, ref = pair(lambda: tiny_causal_lm(family), prompt_config(8))
    ids, mask, labels = padded_batch(2, 6, 512)
    out, want = (m(input_ids=ids, attention_mask=mask, use_cache=True) for m in (ours, ref))
    assert list(out.keys()) == list(want.keys())
    assert rel_err(out.logits, want.logits) < 1e-5
    cache, want_cache = out[-1], want[-1]
    assert type(cache) is type(want_cache) and cache.get_seq_length() == want_cache.get_seq_length() == 8 + 6
    for kwargs in ({"labels": labels}, {}):
        got, expected = (m(input_ids=ids, attention_mask=mask, return_dict=False, **kwargs) for m in (ours, ref))
        assert [type(x) for x in got] == [type(x) for x in expected]
        assert rel_err(got[0], expected[0]) < 1e-5
    assert ours.last_call.path is None and ours.last_call.run == "peft"


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_an_empty_batch_fails_as_in_peft_and_no_tokens_give_pefts_numbers(family):
    ours, ref = pair(lambda: tiny_causal_lm(family), prompt_config(8))
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(RuntimeError):
        ref(input_ids=empty, attention_mask=torch.ones_like(empty), labels=empty)
    with pytest.raises(ValueError, match="no rows"):
        ours(input_ids=empty, attention_mask=torch.ones_like(empty), labels=empty)
    no_tokens = torch.zeros(2, 0, dtype=torch.long)
    out, want = (
        m(input_ids=no_tokens, attention_mask=torch.ones_like(no_tokens), labels=no_tokens) for m in (ours, ref)
    )
    assert math.isnan(out.loss.item()) and math.isnan(want.loss.item())
    assert out.logits.shape == want.logits.shape == (2, 8, 512)


# ------------------------------------------------------------- the prefix cache
@pytest.mark.parametrize("change", ["rotary buffer", "plain attribute"])
def test_the_prefix_cache_sees_in_place_changes_to_buffers_and_attributes(change):
    family = "llama" if change == "rotary buffer" else "bloom"
    ours, ref = pair(lambda: tiny_causal_lm(family, lively=True), prompt_config(8))
    ids, mask, _ = padded_batch(2, 9, 512, side="left")
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits
        for model in (ours, ref):
            base = model.get_base_model()
            if change == "rotary buffer":
                base.model.rotary_emb.inv_freq.mul_(0.5)
            else:
                for block in base.transformer.h:
                    block.self_attention.inv_norm_factor *= 2
        after = ours(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, after)
    assert rel_err(after, want) < 1e-5
    assert ours.prefix_cache.computations == 2


# ------------------------------------------------------------- what is reported
def test_fast_path_and_last_call_say_what_runs(caplog):
    from peft import CPTConfig, LoraConfig, PrefixTuningConfig, TaskType
    from peft import get_peft_model as peft_get_peft_model

    from fastprompt import FastPromptModel

    prefix = FastPromptModel.from_peft(
        peft_get_peft_model(
            tiny_causal_lm("bloom"), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
        )
    )
    assert prefix.fast_path == "bloom"
    with pytest.raises(TypeError, match="fastprompt serves soft-prompt adapters; this model's are LORA"):
        FastPromptModel.from_peft(peft_get_peft_model(tiny_causal_lm("bloom"), LoraConfig(task_type="CAUSAL_LM")))
    cpt = CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 3])
    other = FastPromptModel.from_peft(peft_get_peft_model(tiny_causal_lm("bloom"), cpt))
    assert other.fast_path is None
    ids, mask, labels = padded_batch(2, 6, 512)
    other(input_ids=ids, attention_mask=mask, labels=labels)
    assert other.last_call.path is None and other.last_call.run == "peft"
    assert "CPT, a method without a fast path" in other.last_call.reason

    ours, ref = pair(lambda: tiny_causal_lm("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), prompt_config(8))
    ours.train()
    ref.train()
    loss, grad = loss_and_grad(ours, ids, mask, labels, seed=2)
    want_loss, want_grad = loss_and_grad(ref, ids, mask, labels, seed=2)
    assert close(loss, want_loss) and close(grad, want_grad)
    assert ours.last_call.run == "whole" and "dropout" in ours.last_call.reason
    assert sum("dropout" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize("trainable", ["modules_to_save", "table"])
def test_bloom_with_a_trainable_embedding_module_matches_peft(trainable):
    """The fused op computes the prompt's gradient only: BLOOM with a trainable
    table or embedding LayerNorm runs the generic path, which calls them as PEFT does."""
    extra = {"modules_to_save": ["word_embeddings_layernorm"]} if trainable == "modules_to_save" else {}
    ours, ref = pair(lambda: tiny_causal_lm("bloom"), prompt_config(8, **extra))
    if trainable == "table":
        for model in (ours, ref):
            model.get_base_model().transformer.word_embeddings.weight.requires_grad_(True)
    ids, mask, labels = padded_batch(3, 10, 512)
    loss, grad = loss_and_grad(ours, ids, mask, labels)
    want_loss, want_grad = loss_and_grad(ref, ids, mask, labels)
    assert close(loss, want_loss) and close(grad, want_grad)
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad and "prompt_encoder" not in n]
    want = dict((n, p) for n, p in ref.named_parameters() if p.requires_grad and "prompt_encoder" not in n)
    assert trained and all(close(p.grad, want[n].grad) for n, p in trained)
    assert ours.last_call.path == "generic:bloom"
