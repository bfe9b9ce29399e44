"""PEFT's own method comparison, mirrored: its model shape, batch, sequence
lengths and adapter configs, with fastprompt beside PEFT for each method it runs.

PEFT's benchmark (github.com/huggingface/peft, ``method_comparison/MetaMathQA``:
``default_training_params.json`` and ``experiments/{prompt_tuning/llama-3.2-3B-lr_0.001,
ptuning/llama-3.2-3B-default, lora/llama-3.2-3B-rank32,
prefixtuning/llama-3.2-3B-lr_0.001}/adapter_config.json``)
trains Llama-3.2-3B in bf16 on MetaMathQA, batch 4, max_seq_length 768, with
``Question: {query} Think step by step.\\nAnswer:`` samples of 210 tokens on
average (its results files: 4,198,051 train tokens over 20,000 samples).
Here, without the hub or the data set:

* the model: Llama-3.2-3B's layer and vocabulary shape with random weights
  (``model_shapes.SHAPES["llama-3.2-3b"]``), all 28 layers on a GPU, fewer on a
  CPU (``FASTPROMPT_BENCH_MC_LAYERS``; ``setting()``), or the quick shape
  ``llama-3.2-3b-quick`` (``FASTPROMPT_BENCH_MC_MODEL``) for a smoke test;
* the data: random token ids in rows of ``sample_lengths``' lengths, right-padded
  to the longest row of each batch of 4, labels on every real token;
* the contenders, in pairs: fastprompt's and PEFT's run of each method that
  fastprompt runs (``FASTPROMPT_METHODS``; the same config and seed, so their
  losses must agree every round), PEFT's alone for the others. Prompt tuning:
  200 virtual tokens, RANDOM init. P-tuning: PEFT's experiment's encoder (MLP,
  encoder_hidden_size the hidden size, dropout 0) at prompt tuning's 200 virtual
  tokens, so that the two methods' ratios compare on one case (PEFT's
  experiment trains 20). Prefix tuning: 200 virtual tokens, no projection. LoRA:
  r 32, alpha 64, dropout 0 on q_proj and v_proj (PEFT's experiment leaves
  target_modules unset, which on Llama is PEFT's default, these two). All train
  with the same AdamW (lr 1e-3) on copies of one frozen base that share its
  weights.
"""

from __future__ import annotations

import copy
import itertools
import math
import os

import model_shapes
import torch

MODEL_ENV = "FASTPROMPT_BENCH_MC_MODEL"
LAYERS_ENV = "FASTPROMPT_BENCH_MC_LAYERS"
# Decoder layers a CPU run keeps unless told otherwise: a full-width Llama-3.2-3B layer costs a
# CPU step tens of seconds at these lengths; the FLOP bound is also given at full depth.
CPU_LAYERS = 2

BATCH = 4
VIRTUAL = 200
MAX_LENGTH = 768
# Sequence lengths: a log-normal (median exp(MU), shape SIGMA) rounded, cut to [MIN_LENGTH,
# MAX_LENGTH] as PEFT's max_seq_length truncates. PEFT's results give the mean (210) but not the
# spread; SIGMA 0.45 is an assumption (half the samples within about x/÷1.35 of the median, one in a
# thousand above 768), MU sets the mean to 210.
MEAN_LENGTH = 210
SIGMA = 0.45
MU = math.log(MEAN_LENGTH) - SIGMA**2 / 2
MIN_LENGTH = 16
DATA_SEED = 0
LORA = dict(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

# PEFT's methods compared, in table order (the names flop_count.method_step counts).
METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "lora")
# The methods fastprompt runs: each gets a "fastprompt_<method>" contender beside "peft_<method>", its loss
# checked against that one's every round and its speedup also given over it.
FASTPROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
CONTENDERS = tuple(
    f"{runner}_{method}"
    for method in METHODS
    for runner in ("fastprompt", "peft")
    if runner == "peft" or method in FASTPROMPT_METHODS
)
# Each fastprompt contender's PEFT counterpart.
PAIRS = {f"fastprompt_{method}": f"peft_{method}" for method in FASTPROMPT_METHODS}
REFERENCE = "peft_prompt_tuning"

# PEFT's published figures for three of its contenders, for a full-depth bf16 GPU run to be set
# beside (a different GPU: compare ratios between methods, not absolute rates). From PEFT's
# results files method_comparison/MetaMathQA/results/{prompt_tuning--llama-3.2-3B-lr_0.001,
# lora--llama-3.2-3B-rank32, prefixtuning--llama-3.2-3B-lr_0.001}.json, NVIDIA L40S, PEFT 0.15.2.dev0,
# torch 2.7.1: "tokens / sec" (4.5k-4.7k over its 20 intervals for prompt tuning, 6.6k-6.9k for
# LoRA) and the step-wide peak "accelerator_memory_max" / "cuda_memory_max" (24,408,752,128 B and
# 22,273,851,392 B). Prefix tuning's rate as the PEFT method-comparison table reports it; its memory
# is not quoted here. P-tuning is left out: PEFT's run (ptuning--llama-3.2-3B-default.json: 7.1k-7.4k
# tokens/s, 20.9 GB) trains 20 virtual tokens, this one 200.
PUBLISHED_GPU = "NVIDIA L40S"
PUBLISHED = {
    "peft_prompt_tuning": {"tokens_per_s": 4.6e3, "peak_GB": 24.4},
    "peft_lora": {"tokens_per_s": 6.8e3, "peak_GB": 22.3},
    "peft_prefix_tuning": {"tokens_per_s": 7.7e3, "peak_GB": None},
}


def setting() -> dict:
    """Model shape, layers, dtype and device of a run: dtype and device as every
    suite's (``model_shapes.setting_from_env``); the model from
    FASTPROMPT_BENCH_MC_MODEL (default llama-3.2-3b), its depth from
    FASTPROMPT_BENCH_MC_LAYERS (default: all of them on CUDA, CPU_LAYERS on a CPU)."""
    common = model_shapes.setting_from_env()
    model = os.environ.get(MODEL_ENV, "llama-3.2-3b")
    if model not in model_shapes.SHAPES:
        raise ValueError(f"{MODEL_ENV}={model!r}: choose one of {', '.join(model_shapes.SHAPES)}")
    full = model_shapes.dims(model).layers
    default = full if common["device"].startswith("cuda") else min(CPU_LAYERS, full)
    layers = int(os.environ.get(LAYERS_ENV, default))
    if not 1 <= layers <= full:
        raise ValueError(f"{LAYERS_ENV}={layers}: {model} has {full} layers")
    return {"model": model, "dtype": common["dtype"], "device": common["device"], "layers": layers}


def label(run: dict) -> str:
    return f"{model_shapes.label(run['model'], run['layers'])}, {run['dtype']} on {run['device']}"


def data_source() -> str:
    return (
        f"random token ids (seed {DATA_SEED}), {BATCH} rows per batch right-padded to the longest, labels on every "
        f"real token; row lengths log-normal (median {math.exp(MU):.0f}, sigma {SIGMA}, mean {MEAN_LENGTH}) cut "
        f"to [{MIN_LENGTH}, {MAX_LENGTH}]"
    )


def sample_lengths(count: int, seed: int = DATA_SEED) -> list[int]:
    """``count`` MetaMathQA-like sequence lengths (see MU, SIGMA)."""
    normal = torch.randn(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lengths = torch.exp(MU + SIGMA * normal).round().clamp(MIN_LENGTH, MAX_LENGTH)
    return [int(length) for length in lengths]


def make_batches(count: int, vocab_size: int, device="cpu", seed: int = DATA_SEED) -> list[dict]:
    """``count`` batches of BATCH rows, each right-padded to its longest row
    (pad id 0, attention mask 0, label -100)."""
    lengths = sample_lengths(count * BATCH, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        rows = lengths[index * BATCH : (index + 1) * BATCH]
        ids = torch.randint(4, vocab_size, (BATCH, max(rows)), generator=gen)
        real = torch.arange(max(rows)) < torch.tensor(rows)[:, None]
        tensors = {
            "input_ids": ids.masked_fill(~real, 0),
            "attention_mask": real.long(),
            "labels": ids.masked_fill(~real, -100),
        }
        batches.append({key: value.to(device) for key, value in tensors.items()})
    return batches


def build_base(run: dict):
    return model_shapes.build_base(run["model"], run["dtype"], run["device"], layers=run["layers"])


def sharing_weights(base):
    """A copy of ``base`` whose modules are its own (an adapter may wrap or
    replace them) but whose frozen weights and buffers are ``base``'s: every
    contender in the memory of one model."""
    memo = {id(tensor): tensor for tensor in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def method_of(name: str) -> str:
    """The method of contender ``name`` ("fastprompt_p_tuning" -> "p_tuning")."""
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}: choose one of {', '.join(CONTENDERS)}")
    return name.partition("_")[2]


def adapter_config(method: str):
    """PEFT's config of ``method`` in this comparison (the same for fastprompt's run of it)."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType
    from training_cases import prompt_config

    if method in ("prompt_tuning", "p_tuning"):
        # Prompt tuning: RANDOM init. P-tuning: an MLP encoder, encoder_hidden_size unset (PEFT's default, the
        # hidden size: its experiment's 3072, Llama-3.2-3B's), dropout 0.
        return prompt_config(method, VIRTUAL)
    if method == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA)
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL, prefix_projection=False)
    raise ValueError(f"unknown method {method!r}")


def make_contender(name: str, base):
    """(model, optimizer) of contender ``name`` on ``base`` (modified in place:
    pass ``sharing_weights(base)``), seed 0 like ``training_cases.make_contender``."""
    import peft

    import fastprompt

    method = method_of(name)
    factory = fastprompt.get_peft_model if name.startswith("fastprompt_") else peft.get_peft_model
    torch.manual_seed(0)
    model = factory(base, adapter_config(method))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-3)


def step_flops(dims, name: str, batch: dict) -> int:
    """FLOPs of one training step of contender ``name`` on ``batch``, each
    method counting the positions it computes (``flop_count.method_step``;
    the P-tuning encoder's width and prefix tuning's lack of a projection are
    method_step's defaults, as in ``adapter_config``)."""
    import flop_count
    from training_cases import step_shape

    return flop_count.method_step(dims, name, **step_shape(batch, VIRTUAL), rank=LORA["r"])
