"""PEFT's method comparison with fastprompt beside it (``method_comparison.py``):
PEFT's prompt tuning, P-tuning, prefix tuning and LoRA r32, and fastprompt's run
of each method it runs (``method_comparison.FASTPROMPT_METHODS``), one training
step each per round, alternated (``harness.py``); each fastprompt contender's
loss checked against its PEFT counterpart's every round (``loss_check``).

``extra_info["contenders"]`` holds one row per contender (``report.py`` prints
them as a table): real tokens/s; the median step; its speedup over PEFT prompt
tuning (ratio of totals, same rounds); its FLOPs per step and PEFT prompt
tuning's FLOPs over its own (the FLOP bound of that speedup), at the depth run
and at the model's full depth; for a fastprompt contender also its speedup over
PEFT's run of the same method, that pair's FLOP bound and the largest loss
difference between them (the ``pair_`` columns); peak memory
(``peak_memory.py``) and, for a fastprompt contender, its ratio to its PEFT
counterpart's (``pair_memory_ratio``); and, on a full-depth
bf16 run, PEFT's published figures (``method_comparison.PUBLISHED``).

    FASTPROMPT_BENCH_MC_LAYERS=2 python -m pytest bench/bench_method_comparison.py \\
        --benchmark-json=bench/results/method_comparison.json

The quick setting (``FASTPROMPT_BENCH_MC_MODEL=llama-3.2-3b-quick``) is the smoke
test; ``bench/gpu_check.sh`` runs all 28 layers in bf16 on CUDA.
"""

from __future__ import annotations

import gc

import harness
import method_comparison as mc
import model_shapes
import peak_memory
from training_cases import loss_check, trained_tokens

RUN = mc.setting()
QUICK = model_shapes.SHAPES[RUN["model"]].quick
# A round is four steps: seconds on a GPU or at the quick shape, minutes on a CPU at full width.
ROUNDS = 4 if QUICK or RUN["device"].startswith("cuda") else 2
# fp32: each fastprompt contender's loss within 1e-5 of its PEFT counterpart's, every round (the packing
# issue's acceptance; prompt tuning measured 1.05e-7 at the quick shape, round 1). Other dtypes: the shared
# bounds.
LOSS_REL = 1e-5 if RUN["dtype"] == "float32" else None


def test_method_comparison(benchmark):
    rounds = harness.rounds(ROUNDS)
    base = mc.build_base(RUN)
    contenders = {name: mc.make_contender(name, mc.sharing_weights(base)) for name in mc.CONTENDERS}
    del base
    batches = mc.make_batches(rounds + 1, model_shapes.SHAPES[RUN["model"]].config.vocab_size, RUN["device"])
    on_cuda = RUN["device"].startswith("cuda")

    def step(name, index):
        model, optimizer = contenders[name]
        loss = model(**batches[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    contest = harness.Alternation(
        {name: (lambda index, name=name: step(name, index)) for name in contenders},
        reference=mc.REFERENCE,
        check=loss_check(RUN["dtype"], LOSS_REL),
        checked=mc.PAIRS,
        sync=harness.device_sync(RUN["device"]),
    )
    contest.run(benchmark, rounds)
    timed = [batches[index] for index in contest.timed_rounds]
    tokens = sum(trained_tokens(b) for b in timed)

    if on_cuda:
        memory = {name: peak_memory.cuda_peak_bytes(*pair, batches[0]) for name, pair in contenders.items()}
    elif peak_memory.cpu_probes():
        contenders.clear()  # the probes build their own models
        gc.collect()
        memory = {name: peak_memory.measure("method-comparison", name, RUN, harness.THREADS) for name in mc.CONTENDERS}
    else:
        memory = None

    dims = model_shapes.dims(RUN["model"], RUN["layers"])
    full = model_shapes.dims(RUN["model"])
    flops = {name: sum(mc.step_flops(dims, name, b) for b in timed) for name in mc.CONTENDERS}
    full_flops = {name: sum(mc.step_flops(full, name, b) for b in timed) for name in mc.CONTENDERS}  # at full depth
    published = RUN["layers"] == full.layers and RUN["dtype"] == "bfloat16" and on_cuda
    rows = {}
    for name in mc.CONTENDERS:
        row = {
            "tokens_per_s": tokens / contest.total(name),
            "step_s": contest.median(name),
            "speedup": contest.speedup(name),
            "tflop_per_step": flops[name] / len(timed) / 1e12,
            "flop_bound": flops[mc.REFERENCE] / flops[name],
        }
        if dims.layers < full.layers:
            row[f"flop_bound_{full.layers}_layers"] = full_flops[mc.REFERENCE] / full_flops[name]
        counterpart = mc.PAIRS.get(name)
        if counterpart is not None:  # fastprompt against PEFT's run of the same method
            row["pair_speedup"] = contest.speedup(name, over=counterpart)
            row["pair_flop_bound"] = flops[counterpart] / flops[name]
            if dims.layers < full.layers:
                row[f"pair_flop_bound_{full.layers}_layers"] = full_flops[counterpart] / full_flops[name]
            row["pair_max_loss_difference"] = contest.max_difference(name)
        if memory is not None:
            row["peak_mib"] = memory[name] / 2**20
            if counterpart is not None:
                row["pair_memory_ratio"] = memory[name] / memory[counterpart]
        if published and name in mc.PUBLISHED:
            row["published_tokens_per_s"] = mc.PUBLISHED[name]["tokens_per_s"]
            row["published_peak_GB"] = mc.PUBLISHED[name]["peak_GB"]
        rows[name] = row

    benchmark.extra_info.update(
        model=mc.label(RUN),
        data=mc.data_source(),
        memory_method=(peak_memory.CUDA_METHOD if on_cuda else peak_memory.CPU_METHOD)
        if memory is not None
        else peak_memory.NOT_MEASURED,
        rounds=len(contest.timed_rounds),
        # Each fastprompt contender vs its PEFT counterpart, relative loss difference, every checked round.
        max_difference=contest.max_difference(),
        tokens_per_step=tokens / len(timed),
        padded_positions_per_step=sum(b["input_ids"].numel() for b in timed) / len(timed),
        contenders=rows,
    )
    if published:
        benchmark.extra_info["published"] = f"PEFT's method comparison on an {mc.PUBLISHED_GPU}"
