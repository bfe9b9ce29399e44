"""Generation: fastprompt ``generate`` vs the PEFT-intended path, bloom-mini.

The PEFT-intended path is ``base.generate(inputs_embeds=cat(prompt,
embed(ids)), attention_mask=cat(ones, mask))``: what PEFT's own ``generate``
would run if it worked (0.21.2's is broken for prompt tuning on transformers
5). Both decode greedily for exactly 64 tokens (``min_new_tokens`` holds eos
back) and must produce the same ids.

Each round runs both contenders, alternating which goes first, so machine
noise hits both alike; the per-contender medians and their ratios land in
``extra_info`` and in a small table. One call gives all three numbers: a
streamer timestamps the first generated token, so time to first token (TTFT:
prefill + first token), decode per token ((end - first token) / 63) and
end-to-end come from the same run. fastprompt's prefix cache is warm after the
warm-up round, the serving steady state; a cold call (cache emptied, the
prefix computed inside the call) is timed in each round too and reported
separately.

    python -m pytest bench/bench_generation.py --benchmark-json=bench/results/generation.json

GPU runs (bench/gpu_check.sh) pick model, dtype and device from the environment
(``models.setting_from_env``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
from models import build_base, setting_from_env
from peft import PromptTuningConfig, PromptTuningInit, TaskType
from transformers.generation.streamers import BaseStreamer

import fastprompt
from fastprompt.prefix_cache import prefix_cache_of

SHAPES = {
    "P100-T32-B8": dict(virtual=100, length=32, batch=8),
    "P8-T64-B1": dict(virtual=8, length=64, batch=1),
}
NEW_TOKENS = 64
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
ROUNDS = 5
SETTING = setting_from_env()
THREADS = 2  # the same for both contenders
RESULTS = Path(__file__).resolve().parent / "results"


class FirstTokenClock(BaseStreamer):
    """Both paths ``put`` the input first, then each generated token."""

    def __init__(self):
        self.puts = 0
        self.first_token_at = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def run_fastprompt(model, ids, mask, streamer):
    return model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **GREEDY)


def run_fastprompt_cold(model, ids, mask, streamer):
    prefix_cache_of(model).clear()
    return run_fastprompt(model, ids, mask, streamer)


def run_peft_intended(model, ids, mask, streamer):
    base = model.base_model
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
        prompt = model.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        prompt_mask = mask.new_ones(ids.shape[0], prompt.shape[1])
    new = base.generate(
        inputs_embeds=torch.cat([prompt, embeds], dim=1),
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        streamer=streamer,
        **GREEDY,
    )
    return torch.cat([ids, new], dim=1)


CONTENDERS = {"fastprompt": run_fastprompt, "peft_intended": run_peft_intended}


def timed(run, model, ids, mask):
    clock = FirstTokenClock()
    start = time.perf_counter()
    out = run(model, ids, mask, clock)
    end = time.perf_counter()
    ttft = clock.first_token_at - start
    return out, {"ttft_s": ttft, "decode_per_token_s": (end - clock.first_token_at) / (NEW_TOKENS - 1),
                 "end_to_end_s": end - start}


def left_padded_inputs(batch, length, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : row * length // (2 * batch)] = 0  # rows down to half length
    return ids.masked_fill(mask == 0, 3), mask


def write_table(rows):
    lines = [
        "| shape | metric | fastprompt (ms) | PEFT-intended (ms) | speedup |",
        "|---|---|---:|---:|---:|",
    ]
    for shape, median in rows:
        for metric in ("ttft_s", "decode_per_token_s", "end_to_end_s"):
            ours, theirs = median["fastprompt"][metric], median["peft_intended"][metric]
            lines.append(f"| {shape} | {metric[:-2]} | {1e3 * ours:.2f} | {1e3 * theirs:.2f} | {theirs / ours:.2f}x |")
        cold = median["fastprompt_cold"]["ttft_s"]
        lines.append(f"| {shape} | ttft, prefix cache cold | {1e3 * cold:.2f} | "
                     f"{1e3 * median['peft_intended']['ttft_s']:.2f} | "
                     f"{median['peft_intended']['ttft_s'] / cold:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n" + "\n".join(lines))


_TABLE_ROWS = []


@pytest.mark.parametrize("shape", list(SHAPES))
def test_generation(benchmark, shape):
    torch.set_num_threads(THREADS)
    spec = SHAPES[shape]
    base = build_base(**SETTING)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec["virtual"], prompt_tuning_init=PromptTuningInit.RANDOM
    )
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(base, config)
    ids, mask = (t.to(SETTING["device"]) for t in left_padded_inputs(spec["batch"], spec["length"], base.config.vocab_size))

    contenders = dict(CONTENDERS, fastprompt_cold=run_fastprompt_cold)
    times = {name: [] for name in contenders}
    outputs = {}
    state = {"round": 0}

    def one_round():
        order = list(contenders) if state["round"] % 2 == 0 else list(reversed(contenders))
        for name in order:
            outputs[name], sample = timed(contenders[name], model, ids, mask)
            times[name].append(sample)
        state["round"] += 1

    one_round()  # warm-up (and fills fastprompt's prefix cache), not recorded
    for samples in times.values():
        samples.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    for name, out in outputs.items():
        assert out.shape == (spec["batch"], spec["length"] + NEW_TOKENS), name
        if SETTING["dtype"] == "float32":  # lower precisions may split near-ties differently
            assert torch.equal(out, outputs["peft_intended"]), name
    median = {
        name: {metric: statistics.median(s[metric] for s in samples) for metric in samples[0]}
        for name, samples in times.items()
    }
    ours, theirs = median["fastprompt"], median["peft_intended"]
    benchmark.extra_info.update(
        shape=shape, setting=f"{SETTING['model']} {SETTING['dtype']} {SETTING['device']}", threads=THREADS, new_tokens=NEW_TOKENS, rounds=ROUNDS,
        **{f"{name}_{metric}": value for name in CONTENDERS for metric, value in median[name].items()},
        fastprompt_cold_ttft_s=median["fastprompt_cold"]["ttft_s"],
        ttft_speedup=theirs["ttft_s"] / ours["ttft_s"],
        cold_ttft_speedup=theirs["ttft_s"] / median["fastprompt_cold"]["ttft_s"],
        decode_per_token_speedup=theirs["decode_per_token_s"] / ours["decode_per_token_s"],
        end_to_end_speedup=theirs["end_to_end_s"] / ours["end_to_end_s"],
    )
    _TABLE_ROWS.append((shape, median))
    write_table(_TABLE_ROWS)
