#!/usr/bin/env bash
# GPU check: run on a CUDA machine from anywhere in the repo; logs and JSON land in $OUT.
# Budget: under 8 minutes on one H100 (the step limits below add up to 8). Every step runs even if an earlier one failed (a failed
# kernel test must not cost us the benchmark numbers); the script exits non-zero if any failed.
# To add a check, append one `step NAME SECONDS COMMAND...` line at the end of the list below.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
failed=()

# The GPU image lacks bitsandbytes (8-bit steps): install any wheels carried in .whl/, made with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="${PWD}:${PYTHONPATH:-}"

step() {
    local name=$1 seconds=$2
    shift 2
    echo "=== ${name} (limit ${seconds}s): $*"
    local start=$SECONDS
    if timeout "${seconds}" "$@" 2>&1 | tee "${OUT}/${name}.log"; then
        echo "=== ${name}: ok in $((SECONDS - start))s"
    else
        echo "=== ${name}: FAILED (exit $?) after $((SECONDS - start))s"
        failed+=("${name}")
    fi
}

step env 30 bash -c 'nvidia-smi && python -c "
import torch, triton
from fastprompt.ops import backend_info
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
print(backend_info())
"'
step test_ops_embed_concat 60 env FASTPROMPT_TEST_CUDA=1 python -m pytest tests/test_ops_embed_concat.py -q
step bench_ops 60 python -m pytest bench/bench_ops.py -q --benchmark-json="${OUT}/bench_ops.json"
# Training step vs PEFT on Langboat/bloom-1b4-zh's shape (random weights): bf16, then 8-bit.
# bitsandbytes is not in the GPU image: carry its wheel in .whl (see bench/README.md).
step bench_training_bf16 80 env FASTPROMPT_BENCH_DEVICE=cuda FASTPROMPT_BENCH_DTYPE=bfloat16 \
    FASTPROMPT_BENCH_MODEL=bloom-1b4-zh python -m pytest bench/bench_training.py -q \
    --benchmark-json="${OUT}/bench_training_bf16.json"
step bench_training_int8 90 env FASTPROMPT_BENCH_DEVICE=cuda FASTPROMPT_BENCH_DTYPE=int8 \
    FASTPROMPT_BENCH_MODEL=bloom-1b4-zh python -m pytest bench/bench_training.py -q \
    --benchmark-json="${OUT}/bench_training_int8.json"
# Generation vs the PEFT-intended path on the same shape; compare decode tok/s with the batch-1
# bandwidth bound in design.md (<= 2,400 tok/s int8 on an H100).
step bench_generation_bf16 60 env FASTPROMPT_BENCH_DEVICE=cuda FASTPROMPT_BENCH_DTYPE=bfloat16 \
    FASTPROMPT_BENCH_MODEL=bloom-1b4-zh python -m pytest bench/bench_generation.py -q \
    --benchmark-json="${OUT}/bench_generation_bf16.json"
step bench_generation_int8 80 env FASTPROMPT_BENCH_DEVICE=cuda FASTPROMPT_BENCH_DTYPE=int8 \
    FASTPROMPT_BENCH_MODEL=bloom-1b4-zh python -m pytest bench/bench_generation.py -q \
    --benchmark-json="${OUT}/bench_generation_int8.json"
step report 20 bash -c "python bench/report.py ${OUT}/*.json"

if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed; logs in ${OUT}"
