"""bench/flop_count.py on cases small enough to count by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import flop_count  # noqa: E402
from flop_count import Dims  # noqa: E402

# One layer, one head of size 2, hidden 2, MLP 2 -> 8 -> 2, vocabulary 10.
# Weights per position: Q and output 2*2 each, K and V 2*2 each, MLP 2*2*8 = 48.
TINY = Dims(hidden=2, layers=1, heads=1, kv_heads=1, head_dim=2, intermediate=8, mlp_matrices=2, vocab=10)
# Training FLOPs of q queries over k keys: weights 2*48 forward, twice that with
# the input gradient = 192 per query; attention 2 products * 2 FLOPs * head_dim 2
# = 8 per (query, key) forward, three times that with both operand gradients = 24.
# lm_head: 2*2*10 = 40 forward, 80 with the input gradient, per row.


def train_body(queries, keys):
    return 192 * queries + 24 * queries * keys


def test_layer_weights_by_hand():
    assert TINY.layer_weights == 48
    assert flop_count.body(TINY, 3, 5, backward=False) == 2 * 3 * 48 + 8 * 3 * 5
    assert flop_count.body(TINY, 3, 5, backward=True) == train_body(3, 5)
    assert flop_count.head(TINY, 7, backward=True) == 7 * 80


def test_training_step_batch_two_by_hand():
    # B 2, P 1, T 2, two labelled positions.
    shape = dict(batch=2, prompt=1, tokens=2, labelled=2)
    # PEFT: 2 rows of 3 positions, each attending to 3 keys; lm_head on all 6.
    peft = train_body(6, 3) + 6 * 80
    assert flop_count.training_step(TINY, "peft", **shape) == peft == 2064
    # fastprompt: the prompt once (1 query, 1 key), 4 token positions over 3 keys, lm_head on 2.
    ours = train_body(1, 1) + train_body(4, 3) + 2 * 80
    assert flop_count.training_step(TINY, "fastprompt", **shape) == ours == 1432
    assert flop_count.training_bound(TINY, [shape]) == pytest.approx(2064 / 1432)


def test_batch_one_saves_only_the_unlabelled_lm_head_rows():
    shape = dict(batch=1, prompt=1, tokens=3, labelled=1)
    body = train_body(4, 4)
    assert flop_count.training_step(TINY, "peft", **shape) == body + 4 * 80
    assert flop_count.training_step(TINY, "fastprompt", **shape) == body + 1 * 80


def test_bound_sums_work_over_steps_and_is_one_without_a_fast_path():
    steps = [dict(batch=2, prompt=1, tokens=2, labelled=2), dict(batch=1, prompt=1, tokens=3, labelled=1)]
    peft = 2064 + train_body(4, 4) + 320
    ours = 1432 + train_body(4, 4) + 80
    assert flop_count.training_bound(TINY, steps) == pytest.approx(peft / ours)
    assert flop_count.training_bound(TINY, steps, fast_path=False) == 1.0


def test_generation_prefill_and_decode_by_hand():
    shape = dict(batch=2, prompt=1, tokens=2)
    forward = lambda queries, keys: 96 * queries + 8 * queries * keys  # noqa: E731
    # lm_head on each row's last position only, 40 FLOPs per row.
    assert flop_count.prefill(TINY, "peft", **shape) == forward(6, 3) + 2 * 40
    assert flop_count.prefill(TINY, "fastprompt", **shape) == forward(4, 3) + 2 * 40
    assert flop_count.prefill(TINY, "fastprompt_cold", **shape) == forward(1, 1) + forward(4, 3) + 2 * 40
    assert flop_count.decode(TINY, batch=2, keys=4) == forward(2, 4) + 2 * 40


def test_dims_from_configs():
    from transformers import BloomConfig, LlamaConfig

    bloom = Dims.from_config(BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=100))
    assert (bloom.layers, bloom.head_dim, bloom.kv_heads) == (3, 16, 4)
    assert bloom.layer_weights == 12 * 64 * 64  # QKV 3H², output H², MLP 8H²
    llama = Dims.from_config(
        LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=96,
            vocab_size=100,
        )
    )
    # Q and output 64x64 each, K and V 64x(2 heads * 8) each, gated MLP 3 * 64x96.
    assert llama.layer_weights == 2 * 64 * 64 + 2 * 64 * 16 + 3 * 64 * 96


# Ragged: B 2, P 1, rows of 3 and 1 real tokens padded to T 3, every real token labelled.
RAGGED = dict(batch=2, prompt=1, tokens=3, labelled=4, lengths=[3, 1])


def test_ragged_batch_fastprompt_counts_real_positions_and_peft_every_padded_one():
    # fastprompt: the prompt once, then each row's real tokens over the prompt and themselves.
    ours = train_body(1, 1) + train_body(3, 4) + train_body(1, 2) + 4 * 80
    assert flop_count.training_step(TINY, "fastprompt", **RAGGED) == ours == 1640
    # PEFT prompt tuning: B·(P+T) = 8 positions over 4 keys, lm_head on all 8.
    peft = train_body(8, 4) + 8 * 80
    assert flop_count.training_step(TINY, "peft", **RAGGED) == peft == 2944
    assert flop_count.training_bound(TINY, [RAGGED]) == pytest.approx(2944 / 1640)
    # Rows of equal length count as before (no lengths given).
    equal = dict(batch=2, prompt=1, tokens=2, labelled=2)
    assert flop_count.training_step(TINY, "fastprompt", **equal, lengths=[2, 2]) == 1432


def test_lora_and_prefix_tuning_by_hand():
    # LoRA rank 1 on q (2 -> 2) and v (2 -> 2): x·A then ·B, 2·(2+2) FLOPs each per position,
    # three times in a step (forward, input gradient, A's and B's gradients): 48 per position.
    assert flop_count.lora_extra(TINY, positions=1, rank=1) == 48
    lora = train_body(6, 3) + 6 * 48 + 6 * 80  # B·T = 6 positions over T keys, lm_head on all
    assert flop_count.method_step(TINY, "peft_lora", **RAGGED, rank=1) == lora == 2352
    prefix = train_body(6, 4) + 6 * 80  # the same positions, each over P more keys
    assert flop_count.method_step(TINY, "peft_prefix_tuning", **RAGGED) == prefix == 2208
    assert flop_count.method_step(TINY, "peft_prompt_tuning", **RAGGED) == 2944
    assert flop_count.method_step(TINY, "fastprompt_prompt_tuning", **RAGGED) == 1640
    for unknown in ("peft_ia3", "fastprompt_lora", "lora"):
        with pytest.raises(ValueError, match="unknown"):
            flop_count.method_step(TINY, unknown, **RAGGED)


def test_fastprompt_prefix_tuning_as_planned_by_hand():
    # The real tokens only, each row over the P stored keys and its own tokens: row of 3 over 1 + 3
    # keys, row of 1 over 1 + 1; lm_head on the 4 labelled positions. No projection: no encoder FLOPs.
    ours = train_body(3, 4) + train_body(1, 2) + 4 * 80
    assert flop_count.method_step(TINY, "fastprompt_prefix_tuning", **RAGGED) == ours == 1424
    # With a projection of width 3: 2 -> 3 -> 1 layer * 2 (K and V) * 2 = 4 per virtual token,
    # 2·(2·3 + 3·4) = 36 FLOPs forward, 108 in a step; PEFT runs it per row (2), fastprompt once.
    assert flop_count.prompt_encoder(TINY, "prefix_tuning", 1, encoder_hidden=3) == 108
    assert flop_count.method_step(TINY, "peft_prefix_tuning", **RAGGED, encoder_hidden=3) == 2208 + 2 * 108
    assert flop_count.method_step(TINY, "fastprompt_prefix_tuning", **RAGGED, encoder_hidden=3) == 1424 + 108


def test_p_tuning_runs_its_encoder_once_a_step_in_both():
    # MLP 2 -> 2 -> 2 -> 2 (PEFT's default width: the hidden size), 2·12 FLOPs forward per virtual
    # token, 72 in a step; PEFT's get_prompt runs it on one row and repeats the output, as fastprompt.
    assert flop_count.prompt_encoder(TINY, "p_tuning", 1) == 72
    assert flop_count.prompt_encoder(TINY, "p_tuning", 1, encoder_hidden=4) == 3 * 2 * (8 + 16 + 8)
    assert flop_count.method_step(TINY, "peft_p_tuning", **RAGGED) == 2944 + 72
    assert flop_count.method_step(TINY, "fastprompt_p_tuning", **RAGGED) == 1640 + 72
    assert flop_count.training_bound(TINY, [RAGGED], method="p_tuning") == pytest.approx(3016 / 1712)
    assert flop_count.training_bound(TINY, [RAGGED], fast_path=False, method="p_tuning") == 1.0


def test_multitask_prompts_per_row_in_peft_per_distinct_task_in_fastprompt():
    # Rank 1: the task's [1, 1] x [1, 2] product, 2·2 FLOPs forward, 12 in a step, per prompt.
    assert flop_count.prompt_encoder(TINY, "multitask_prompt_tuning", 1) == 12
    # Both rows of different tasks: PEFT pays the product per row; fastprompt runs both prompts
    # through the body (1 query over 1 key each) and computes each once.
    two_tasks = dict(RAGGED, prompts=2)
    assert flop_count.method_step(TINY, "peft_multitask_prompt_tuning", **two_tasks) == 2944 + 2 * 12
    assert (
        flop_count.method_step(TINY, "fastprompt_multitask_prompt_tuning", **two_tasks)
        == 1640 + train_body(1, 1) + 2 * 12
    )
    # One task for both rows: fastprompt's pass as prompt tuning's.
    assert flop_count.method_step(TINY, "fastprompt_multitask_prompt_tuning", **RAGGED) == 1640 + 12
