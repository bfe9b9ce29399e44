#!/usr/bin/env bash
# The one prepared GPU call: correctness first, then speed, then one summary.
#
#   bash bench/gpu_check.sh            on a CUDA machine: under 8 minutes on one H200 (the step
#                                      limits below add up to 7.4 minutes)
#   bash bench/gpu_check.sh --dry-run  the same steps, scripts and summary on CPU as a plumbing test
#                                      (tests/e2e/test_gpu_check.py): a tiny model, one round, one case
#                                      per benchmark suite, small test selections. About 50 CPU-seconds,
#                                      nearly all of it ten interpreters importing torch (most of them
#                                      transformers and peft too): its wall time on a 2-core machine
#                                      is that plus whatever else the machine runs meanwhile
#
# Results land in $OUT (default ./gpu_out): a log, JUnit XML or benchmark JSON per step, env.json,
# and summary.md + summary.json (bench/gpu_summary.py). Every step runs even if an earlier one
# failed (a failed kernel test must not cost the benchmark numbers); the script exits non-zero if
# any failed. The GPU image has no bitsandbytes (the 8-bit steps): carry its wheel in .whl/, made with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Without it the 8-bit steps are skipped, one line each, and recorded as skipped (not failed).
#
#   GPU_CHECK_STEPS="env training_int8"  runs only the named steps (and the summary), e.g. to rerun
#                                      one step within a device budget
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
: > "$OUT/steps.tsv"

# The benchmark cases a run selects per step (a pytest -k expression); none on the GPU: every case.
declare -A BENCH_CASES=()
if [[ "${1:-}" == "--dry-run" ]]; then
    DEVICE=cpu MODEL=bloom-tiny
    # The limits are the GPU run's budget. On CPU a step's time is mostly interpreter, torch and
    # peft start-up (seconds per step), which a busy CI machine stretches: the dry run tests
    # plumbing, not the budget, so it allows three times more.
    LIMIT_SCALE=3
    export FASTPROMPT_BENCH_ROUNDS=1 FASTPROMPT_BENCH_DEMO_DATA=1
    # Tiny shapes gain nothing from a second thread, and on a busy 2-core machine one waiting for
    # the other made decode steps and tiny tests 10 to 50 times slower.
    export FASTPROMPT_BENCH_THREADS=1  # the tests run one thread (tests/conftest.py)
    # No per-contender peak-memory probe processes (bench/peak_memory.py; the GPU measures in-process).
    export FASTPROMPT_BENCH_MEMORY_PROBE=0
    # The static-cache contender runs its step uncompiled: inductor's first compile on a CPU takes
    # half a minute. The compiled step's tokens are tested in tests/parity/test_generation.py.
    export TORCH_COMPILE_DISABLE=1
    BENCH_CASES=([op_bandwidth]="cpu-float32-A1P20B8T64H512V46145K512" [training_bf16]="tutorial or method_comparison"
                 [training_int8]="tutorial" [generation_bf16]="P8-T64-B1" [generation_int8]="P8-T64-B1")
    # The method comparison's plumbing at a tiny width (its quick shape takes a busy CPU 30-80 s).
    export FASTPROMPT_BENCH_MC_MODEL=llama-tiny
    KERNEL_TESTS=(tests/unit/ops/test_ops_pack_embed.py -k "bad_inputs")
    PARITY_TESTS=(tests/parity/test_parity_peft.py -k "fp32 and bloom and 3-8-12-left")
    GENERATION_TESTS=(tests/parity/test_generation.py -k "equal_the_peft_intended_path and bloom")
else
    DEVICE=cuda MODEL=bloom-1b4-zh
    LIMIT_SCALE=1
    export FASTPROMPT_TEST_CUDA=1
    KERNEL_TESTS=(tests/unit/ops/test_ops_pack_embed.py)
    # 8-bit steps cost seconds each here: the ragged alpaca case runs in bf16 only.
    BENCH_CASES=([training_int8]="not alpaca-ragged")
    PARITY_TESTS=(tests/parity/test_parity_peft.py -k "fp32 or bf16 or int8 or holes")
    GENERATION_TESTS=(tests/parity/test_generation.py -k "peft_intended or bf16 or int8 or own_loop or static")
fi
export FASTPROMPT_TEST_DEVICE=$DEVICE FASTPROMPT_BENCH_DEVICE=$DEVICE FASTPROMPT_BENCH_MODEL=$MODEL

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="${PWD}:${PWD}/bench:${PYTHONPATH:-}"

# Why the 8-bit steps cannot run here, or empty (find_spec: whether it is there, without importing it).
NO_BITSANDBYTES=""
if ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("bitsandbytes") is None)'; then
    NO_BITSANDBYTES="bitsandbytes is not installed (carry its wheel in .whl/)"
fi

failed=() skipped=()
selected() {  # selected NAME: whether GPU_CHECK_STEPS (when set) names the step; the summary always runs
    [[ -z "${GPU_CHECK_STEPS:-}" || "$1" == summary || " ${GPU_CHECK_STEPS} " == *" $1 "* ]]
}
record() {  # record NAME STATUS SECONDS LIMIT [NOTE]: one line of steps.tsv
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "${OUT}/steps.tsv"
}
step() {
    local name=$1 seconds=$2
    shift 2
    selected "${name}" || return 0
    echo "=== ${name} (limit ${seconds}s): $*"
    local start=$SECONDS status=ok
    if ! timeout "$((seconds * LIMIT_SCALE))" "$@" > "${OUT}/${name}.log" 2>&1; then
        status=FAILED
        failed+=("${name}")
    fi
    tail -n 5 "${OUT}/${name}.log"
    echo "=== ${name}: ${status} in $((SECONDS - start))s"
    record "${name}" "${status}" "$((SECONDS - start))" "${seconds}"
}
skip() {  # skip NAME SECONDS REASON: one line, recorded as skipped (the summary tells it from a failure)
    local name=$1 seconds=$2 reason=$3
    selected "${name}" || return 0
    echo "${name}: skipped: ${reason}" | tee "${OUT}/${name}.log"
    skipped+=("${name}")
    record "${name}" skipped 0 "${seconds}" "${reason}"
}
tests() {  # tests NAME SECONDS PYTEST_ARGS...: JUnit XML for the summary
    local name=$1 seconds=$2
    shift 2
    step "${name}" "${seconds}" python -m pytest -q -p no:cacheprovider --junitxml="${OUT}/${name}.xml" "$@"
}
bench() {  # bench NAME SECONDS DTYPE "SUITE..." [EXTRA_ENV...]: the suites (bench/ files) in one pytest run
    local name=$1 seconds=$2 dtype=$3 suites=()
    read -ra suites <<< "$4"
    shift 4
    if [[ "${dtype}" == int8 && -n "${NO_BITSANDBYTES}" ]]; then
        skip "${name}" "${seconds}" "${NO_BITSANDBYTES}"
        return 0
    fi
    local cases=()
    if [[ -n "${BENCH_CASES[${name}]:-}" ]]; then
        cases=(-k "${BENCH_CASES[${name}]}")
    fi
    step "${name}" "${seconds}" env FASTPROMPT_BENCH_DTYPE="${dtype}" "$@" \
        python -m pytest -q -p no:cacheprovider "${suites[@]/#/bench/}" "${cases[@]}" \
        --benchmark-json="${OUT}/${name}.json"
}

# --- correctness: kernels on the device, then the model against real PEFT on the device
step env 15 python bench/gpu_env.py "${OUT}/env.json" --device "${DEVICE}"
tests kernels 50 "${KERNEL_TESTS[@]}"
tests parity 50 "${PARITY_TESTS[@]}"
tests generation 40 "${GENERATION_TESTS[@]}"

# --- speed vs PEFT, on BLOOM-1b4-zh's shape (random weights); in bf16 also PEFT's method comparison
# (bench_method_comparison.py: Llama-3.2-3B's shape, all 28 layers, PEFT's prompt tuning, P-tuning,
# prefix tuning and LoRA r32, and fastprompt's prompt tuning, P-tuning and prefix tuning), in the same
# interpreter: its seven models share one set of weights, and the step's budget grows by its ~35 steps of a
# 3B model plus one model init (a step there is a fraction of a second: B 4, under 1,000 positions), and alpaca-ragged's
# dozen small steps (15 s, from env, op_bandwidth and generation_int8: 5 s each; estimates: no GPU
# has run these yet). Its table sets PEFT's published figures (an L40S; method_comparison.PUBLISHED,
# which cites PEFT's results files) beside each PEFT method's row.
bench op_bandwidth 25 float32 bench_ops.py
bench training_bf16 80 bfloat16 "bench_training.py bench_method_comparison.py"
bench training_int8 65 int8 bench_training.py
# Eager and compiled (static-cache, CUDA-graph) decode in bf16; 8-bit layers are not compiled.
bench generation_bf16 70 bfloat16 bench_generation.py FASTPROMPT_BENCH_DECODE_VARIANTS=1
bench generation_int8 40 int8 bench_generation.py FASTPROMPT_BENCH_DECODE_VARIANTS=0

step summary 10 python bench/gpu_summary.py "${OUT}"
cat "${OUT}/summary.md"
if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed${skipped[*]:+ (skipped: ${skipped[*]})}; results in ${OUT}"
