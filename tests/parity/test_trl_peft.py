"""TRL's SFTTrainer on a fastprompt model, against the real peft and trl packages.

SFTTrainer patches the base model with TRL's fused LM head and calls the model
with ``fused_lm_head=True`` on every step (trl_head.py serves it on the fast
path). fp32 throughout (SFTConfig's default bf16 autocast would compare
roundings): each step's loss, gradient norm, entropy and token accuracy equal
PEFT's under the same trainer; with ``padding_free`` or ``packing`` each
document is its own example behind the prompt, as PEFT gives it when run on
each document alone (PEFT itself lets the documents attend to each other).
"""

import pytest
import torch
from models import padded_batch, pair, peft_prompt, prompt_config, tiny_causal_lm
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model
from tolerance import rel_err

import fastprompt
from fastprompt.model import FastPromptModel

trl = pytest.importorskip("trl")

P = 6
BATCH = 4
STEPS = 3


@pytest.fixture(scope="module")
def tokenizer(tiny_bloom_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bloom_dir)


def dataset(count=12, seed=0):
    """Pre-tokenised examples of uneven length (tiny-bloom's 512-token vocabulary)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (count,), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(4, 512, (n,), generator=gen).tolist() for n in lengths]})


def base(family, tiny_bloom_dir):
    if family == "tiny-bloom":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, dtype=torch.float32)
    return tiny_causal_lm(family, 512)


def sft_config(tmp_path, **settings):
    return trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=settings.pop("learning_rate", 1e-2),
        bf16=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        **settings,
    )


def train(model, tokenizer, tmp_path, **settings):
    """Each step's logged record, each step's (batch, num_items_in_batch) as compute_loss saw them, the trainer."""
    trainer = trl.SFTTrainer(
        model=model, args=sft_config(tmp_path, **settings), train_dataset=dataset(), processing_class=tokenizer
    )
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, num_items_in_batch))
        return compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = recording
    trainer.train()
    return [record for record in trainer.state.log_history if "loss" in record], seen, trainer


@pytest.mark.parametrize("family", ["tiny-bloom", "llama"])
def test_sft_trainer_steps_equal_peft(family, tokenizer, tiny_bloom_dir, tmp_path):
    torch.manual_seed(0)
    ours = fastprompt.get_peft_model(base(family, tiny_bloom_dir), prompt_config(P))
    torch.manual_seed(0)
    ref = peft_get_peft_model(base(family, tiny_bloom_dir), prompt_config(P))
    got, _, trainer = train(ours, tokenizer, tmp_path)
    assert ours.last_call.path is not None and ours.last_call.run == "packed", ours.last_call
    got.append(trainer.evaluate(dataset(seed=1)))  # without gradients: the prefix cache's route
    assert ours.last_call.path is not None, ours.last_call
    want, _, trainer = train(ref, tokenizer, tmp_path)
    want.append(trainer.evaluate(dataset(seed=1)))
    assert len(got) == len(want) == STEPS + 1
    for step, (mine, theirs) in enumerate(zip(got, want)):
        evaluation = step == STEPS
        for key in ("eval_loss", "eval_entropy") if evaluation else ("loss", "grad_norm", "entropy"):
            assert abs(mine[key] - theirs[key]) <= 1e-5 * abs(theirs[key]), (step, key, mine, theirs)
        key = "eval_mean_token_accuracy" if evaluation else "mean_token_accuracy"
        assert mine[key] == theirs[key], (step, mine, theirs)


def with_trl_head(model):
    """``model`` with TRL's fused head on its base model, as SFTTrainer adds it."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    return model


@pytest.mark.parametrize(
    "family,head",
    [("llama", "frozen"), ("gemma2", "frozen"), ("qwen2", "trained")],
    ids=["llama", "gemma2-softcap", "qwen2-trained-head"],
)
def test_fused_head_outputs_equal_peft(family, head):
    """Every field SFTTrainer reads, and the prompt's gradient through the
    log-probabilities, as PEFT's call through TRL's own head gives them (a
    trained head is called as a module, chunk by chunk)."""
    ours, ref = pair(lambda: tiny_causal_lm(family, 512, lively=True), prompt_config(P))
    if head == "trained":
        for model in (ours, ref):
            model.get_output_embeddings().requires_grad_(True)
    ids, mask, labels = padded_batch(3, 10, 512)
    got = with_trl_head(ours)(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    want = with_trl_head(ref)(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert ours.last_call.path is not None, ours.last_call
    assert torch.equal(got.label_mask, want.label_mask)
    assert torch.equal(got.is_top1, want.is_top1)
    for field in ("loss", "log_probs", "entropy"):
        assert rel_err(getattr(got, field), getattr(want, field)) <= 1e-5, field
    got.log_probs.sum().backward()
    want.log_probs.sum().backward()
    assert rel_err(ours.soft_prompt().grad, peft_prompt(ref).grad) <= 1e-5


def prefix_tuning_config():
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)


def test_fused_head_outputs_equal_peft_for_prefix_tuning():
    """A learned prefix has no virtual positions: the fields are [B, T-1], as
    PEFT's call through TRL's head over the T tokens gives them."""
    ours, ref = pair(lambda: tiny_causal_lm("llama", 512, lively=True), prefix_tuning_config())
    ids, mask, labels = padded_batch(3, 10, 512)
    got = with_trl_head(ours)(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    want = with_trl_head(ref)(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert ours.last_call.run == "packed", ours.last_call
    assert got.log_probs.shape == want.log_probs.shape == (3, 9)
    assert torch.equal(got.label_mask, want.label_mask) and torch.equal(got.is_top1, want.is_top1)
    for field in ("loss", "log_probs", "entropy"):
        assert rel_err(getattr(got, field), getattr(want, field)) <= 1e-5, field
    got.log_probs.sum().backward()
    want.log_probs.sum().backward()
    weight = "prompt_encoder.default.embedding.weight"
    assert rel_err(dict(ours.named_parameters())[weight].grad, dict(ref.named_parameters())[weight].grad) <= 1e-5


@pytest.mark.parametrize("family", ["tiny-bloom", "llama"])
def test_sft_trainer_prefix_tuning_with_checkpointing_equals_peft_without(family, tokenizer, tiny_bloom_dir, tmp_path):
    """SFTTrainer checkpoints by default, which drops PEFT's prefix (PEFT refuses it when it
    can tell): fastprompt trains with it on, PEFT with it off, and every step agrees."""
    torch.manual_seed(0)
    ours = fastprompt.get_peft_model(base(family, tiny_bloom_dir), prefix_tuning_config())
    torch.manual_seed(0)
    ref = peft_get_peft_model(base(family, tiny_bloom_dir), prefix_tuning_config())
    got, _, _ = train(ours, tokenizer, tmp_path, gradient_checkpointing=True)
    assert ours.last_call.run == "packed", ours.last_call
    assert any(getattr(m, "gradient_checkpointing", False) for m in ours.get_base_model().modules())
    want, _, _ = train(ref, tokenizer, tmp_path, gradient_checkpointing=False)
    assert len(got) == len(want) == STEPS
    for step, (mine, theirs) in enumerate(zip(got, want)):
        for key in ("loss", "grad_norm", "entropy"):
            assert abs(mine[key] - theirs[key]) <= 1e-5 * abs(theirs[key]), (step, key, mine, theirs)
        assert mine["mean_token_accuracy"] == theirs["mean_token_accuracy"], (step, mine, theirs)


def test_fused_head_with_a_temperature_runs_trls_head():
    """A temperature (GRPO's, RLOO's) is not reproduced by the fast path: PEFT's
    code runs TRL's own head, and the call says why."""
    from trl.trainer.utils import add_fused_lm_head

    ours, ref = pair(lambda: tiny_causal_lm("llama", 512, lively=True), prompt_config(P))
    for model in (ours, ref):
        add_fused_lm_head(model.get_base_model(), temperature=0.7)
    ids, mask, labels = padded_batch(2, 8, 512)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert ours.last_call.path is None and "temperature" in ours.last_call.reason
    want = ref(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert torch.equal(got.log_probs, want.log_probs)


def per_document_reference(ref, batch, num_items_in_batch):
    """TRL's loss over ``batch`` (one flattened row) with each document run by
    PEFT alone: the sum of its labels' cross-entropies over ``num_items_in_batch``."""
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"][0].tolist()
    starts = [i for i, position in enumerate(positions) if position == 0] + [len(positions)]
    total = 0.0
    for start, end in zip(starts, starts[1:]):
        doc_labels = labels[:, start:end]
        labelled = int((doc_labels != -100).sum())
        if labelled:
            total = total + ref(input_ids=ids[:, start:end], labels=doc_labels).loss * labelled
    return total / num_items_in_batch


@pytest.mark.parametrize(
    "settings",
    [dict(padding_free=True, max_length=None), dict(packing=True, max_length=16)],
    ids=["padding_free", "packing"],
)
def test_flattened_documents_per_document(settings, tokenizer, tiny_bloom_dir, tmp_path):
    """learning_rate 0: every step sees the initial prompt, so each step's
    loss and gradient norm are checked against PEFT's on that step's batch."""
    torch.manual_seed(0)
    ours = fastprompt.get_peft_model(base("llama", tiny_bloom_dir), prompt_config(P))
    torch.manual_seed(0)
    ref = peft_get_peft_model(base("llama", tiny_bloom_dir), prompt_config(P))
    records, seen, _ = train(ours, tokenizer, tmp_path, learning_rate=0.0, **settings)
    assert ours.last_call.path is not None and ours.last_call.run != "peft", ours.last_call
    for record, (batch, num_items_in_batch) in zip(records, seen):
        assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) > 1
        ref.zero_grad()
        want = per_document_reference(ref, batch, num_items_in_batch)
        want.backward()
        assert rel_err(torch.tensor(record["loss"]), want.detach()) <= 1e-5
        assert rel_err(torch.tensor(record["grad_norm"]), peft_prompt(ref).grad.norm()) <= 1e-5


def test_flattened_documents_off_the_fast_path_raise(tiny_bloom_dir):
    """fused_lm_head=True without TRL's head on the base model cannot take the
    fast path; on documents flattened into a row that is an error, not PEFT's
    cross-document attention."""
    model = fastprompt.get_peft_model(base("llama", tiny_bloom_dir), prompt_config(P))
    ids = torch.randint(4, 512, (1, 9))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="documents flattened into a row"):
        model(input_ids=ids, labels=ids, position_ids=positions, fused_lm_head=True)


@pytest.fixture
def patched():
    fastprompt.patch_peft()
    fastprompt.patch_peft()  # idempotent
    yield
    fastprompt.unpatch_peft()


def test_patch_peft_makes_sft_trainer_build_fastprompt(patched, tokenizer, tiny_bloom_dir, tmp_path):
    import peft

    trainer = trl.SFTTrainer(
        model=base("tiny-bloom", tiny_bloom_dir),
        args=sft_config(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer,
        peft_config=prompt_config(P),
    )
    assert isinstance(trainer.model, FastPromptModel)
    trainer.train()
    assert trainer.model.last_call.path == "bloom" and trainer.model.last_call.run == "packed"
    lora = peft.get_peft_model(base("tiny-bloom", tiny_bloom_dir), LoraConfig(task_type="CAUSAL_LM"))
    assert isinstance(lora, PeftModel) and not isinstance(lora, FastPromptModel)


def test_unpatch_peft_restores_peft(tokenizer, tiny_bloom_dir, tmp_path):
    import peft.mapping_func
    from trl.trainer import sft_trainer

    original = peft.mapping_func.get_peft_model
    fastprompt.patch_peft()
    fastprompt.patch_peft()
    try:
        assert sft_trainer.get_peft_model is peft.get_peft_model is not original
    finally:
        fastprompt.unpatch_peft()
    fastprompt.unpatch_peft()
    assert sft_trainer.get_peft_model is peft.get_peft_model is peft.mapping_func.get_peft_model is original
    model = peft.get_peft_model(base("tiny-bloom", tiny_bloom_dir), prompt_config(P))
    assert type(model) is peft.PeftModelForCausalLM
