# Set-up is part of every user-facing target, so each works on a fresh machine.
# torch==2.13.0 is named explicitly: on the project's CPU machines pip takes it
# from local disk in seconds, where a bare `torch` would pull a multi-GB CUDA build. -qq: pip's
# warnings about the machine's own index configuration are not ours to print; errors still show.
PYTHON ?= python
NATIVE_BUILD_DIR ?= build/native
NATIVE_CMAKE_ARGS ?=
BENCH_RESULTS ?= bench/results

.PHONY: install demo test lint format bench native clean-native

install:
	$(PYTHON) -m pip install -qq "torch==2.13.0" -e ".[dev]"

# The README's main command: trains, saves, reloads with PEFT, generates.
demo: install
	fastprompt demo

# The README's test command; .ci/run calls it. Two pytest-xdist workers, one torch thread each
# (tests/conftest.py): the tests' models are tiny, so two processes use two cores far better than
# one process with two threads. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: install native
	$(PYTHON) -m pytest tests -n $(TEST_WORKERS)

# Style: ruff's linter and formatter, as configured in pyproject.toml; CI runs `make lint`.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# fastprompt vs PEFT, contenders alternated round by round (bench/harness.py). Results and the
# scaling plot go to $(BENCH_RESULTS)/<model>/, then the tables are printed. The tutorial case
# needs ../shared/data/alpaca_zh_demo.json; FASTPROMPT_BENCH_DEMO_DATA=1 runs it on the bundled
# demo data instead (and says so in the results). FASTPROMPT_BENCH_ROUNDS=1: a smoke run.
BENCH_PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider
BENCH_FULL_MODEL ?= bloom-1b4-zh

# The other prompt methods the training suite runs (FASTPROMPT_BENCH_METHOD, bench/training_cases.py),
# each on the classify case beside the prompt-tuning run of every case.
BENCH_METHODS ?= p_tuning multitask_prompt_tuning prefix_tuning

# The quick run, on bloom-mini: every suite plus the scaling sweep, whose plot is also copied to
# docs/scaling.png for the README.
bench: native
	$(PYTHON) -m pip install -qq "torch==2.13.0" -e ".[dev,bench]"
	mkdir -p $(BENCH_RESULTS)/bloom-mini
	FASTPROMPT_BENCH_MODEL=bloom-mini $(BENCH_PYTEST) bench/bench_training.py \
		--benchmark-json=$(BENCH_RESULTS)/bloom-mini/training.json
	for method in $(BENCH_METHODS); do \
		FASTPROMPT_BENCH_MODEL=bloom-mini FASTPROMPT_BENCH_METHOD=$$method $(BENCH_PYTEST) bench/bench_training.py \
			-k classify --benchmark-json=$(BENCH_RESULTS)/bloom-mini/training-classify-$$method.json || exit 1; \
	done
	FASTPROMPT_BENCH_MODEL=bloom-mini $(BENCH_PYTEST) bench/bench_generation.py \
		--benchmark-json=$(BENCH_RESULTS)/bloom-mini/generation.json
	FASTPROMPT_BENCH_MC_MODEL=llama-3.2-3b-quick $(BENCH_PYTEST) bench/bench_method_comparison.py \
		--benchmark-json=$(BENCH_RESULTS)/bloom-mini/method_comparison-quick.json
	FASTPROMPT_BENCH_MODEL=bloom-mini $(BENCH_PYTEST) bench/bench_ops.py bench/bench_native_step.py \
		--benchmark-json=$(BENCH_RESULTS)/bloom-mini/ops.json
	FASTPROMPT_BENCH_MODEL=bloom-mini $(BENCH_PYTEST) bench/bench_scaling.py \
		--benchmark-json=$(BENCH_RESULTS)/bloom-mini/scaling.json
	FASTPROMPT_BENCH_QUANT_MODEL=bloom-mini $(BENCH_PYTEST) bench/bench_quantized.py \
		--benchmark-json=$(BENCH_RESULTS)/bloom-mini/quantized.json
	$(PYTHON) bench/plot_scaling.py $(BENCH_RESULTS)/bloom-mini/scaling.json \
		$(BENCH_RESULTS)/bloom-mini/scaling.png docs/scaling.png
	$(PYTHON) bench/report.py $(BENCH_RESULTS)/bloom-mini/*.json

# The README's headline numbers: training and generation at a real model's shape (random weights,
# fp32 on CPU, a few alternated rounds). `make bench-full BENCH_FULL_MODEL=llama-3.2-1b` for
# another model of bench/model_shapes.py.
.PHONY: bench-full
bench-full: native
	$(PYTHON) -m pip install -qq "torch==2.13.0" -e ".[dev,bench]"
	mkdir -p $(BENCH_RESULTS)/$(BENCH_FULL_MODEL)
	FASTPROMPT_BENCH_MODEL=$(BENCH_FULL_MODEL) $(BENCH_PYTEST) bench/bench_training.py \
		--benchmark-json=$(BENCH_RESULTS)/$(BENCH_FULL_MODEL)/training.json
	for method in $(BENCH_METHODS); do \
		FASTPROMPT_BENCH_MODEL=$(BENCH_FULL_MODEL) FASTPROMPT_BENCH_METHOD=$$method $(BENCH_PYTEST) \
			bench/bench_training.py -k classify \
			--benchmark-json=$(BENCH_RESULTS)/$(BENCH_FULL_MODEL)/training-classify-$$method.json || exit 1; \
	done
	FASTPROMPT_BENCH_MODEL=$(BENCH_FULL_MODEL) $(BENCH_PYTEST) bench/bench_generation.py \
		--benchmark-json=$(BENCH_RESULTS)/$(BENCH_FULL_MODEL)/generation.json
	$(PYTHON) bench/report.py $(BENCH_RESULTS)/$(BENCH_FULL_MODEL)/*.json

# PEFT's method comparison (bench/method_comparison.py): Llama-3.2-3B's shape with random weights,
# PEFT's prompt tuning, P-tuning, prefix tuning and LoRA r32, each method fastprompt runs also run by
# fastprompt (method_comparison.FASTPROMPT_METHODS) and checked against PEFT's. On a CPU at BENCH_MC_LAYERS of its
# 28 layers (the FLOP bound is also given at full depth); BENCH_MC_DTYPE=bfloat16 as PEFT runs it.
# BENCH_MC_MODEL=llama-3.2-3b-quick: the smoke test (2 narrow layers, seconds a round).
BENCH_MC_MODEL ?= llama-3.2-3b
BENCH_MC_LAYERS ?= 2
BENCH_MC_DTYPE ?= float32
.PHONY: bench-method-comparison
bench-method-comparison: native
	$(PYTHON) -m pip install -qq "torch==2.13.0" -e ".[dev,bench]"
	mkdir -p $(BENCH_RESULTS)/$(BENCH_MC_MODEL)
	FASTPROMPT_BENCH_MC_MODEL=$(BENCH_MC_MODEL) FASTPROMPT_BENCH_MC_LAYERS=$(BENCH_MC_LAYERS) \
		FASTPROMPT_BENCH_DTYPE=$(BENCH_MC_DTYPE) $(BENCH_PYTEST) bench/bench_method_comparison.py \
		--benchmark-json=$(BENCH_RESULTS)/$(BENCH_MC_MODEL)/method_comparison-$(BENCH_MC_LAYERS)-layers-$(BENCH_MC_DTYPE).json
	$(PYTHON) bench/report.py $(BENCH_RESULTS)/$(BENCH_MC_MODEL)/method_comparison-*.json

# TRL's SFTTrainer on a fastprompt model vs on PEFT's (bench/bench_trl.py): B 8, P 100, T 32, STEPS-step
# train() rounds alternated, each step's loss checked equal. BENCH_TRL_MODEL=bloom-tiny: a smoke run in
# seconds; bloom-1b4-zh (or any model of bench/model_shapes.py): a real shape.
BENCH_TRL_MODEL ?= bloom-mini
.PHONY: bench-trl
bench-trl: native
	$(PYTHON) -m pip install -qq "torch==2.13.0" -e ".[dev,bench]"
	mkdir -p $(BENCH_RESULTS)/$(BENCH_TRL_MODEL)
	FASTPROMPT_BENCH_MODEL=$(BENCH_TRL_MODEL) $(BENCH_PYTEST) bench/bench_trl.py \
		--benchmark-json=$(BENCH_RESULTS)/$(BENCH_TRL_MODEL)/trl.json
	$(PYTHON) bench/report.py $(BENCH_RESULTS)/$(BENCH_TRL_MODEL)/trl.json

# Native backend of the packer (the fused pack_embed op); see kernels/README.md.
native: install
	cmake -S . -B $(NATIVE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DPython3_EXECUTABLE="$$($(PYTHON) -c 'import sys; print(sys.executable)')" $(NATIVE_CMAKE_ARGS)
	cmake --build $(NATIVE_BUILD_DIR) --parallel

clean-native:
	rm -rf $(NATIVE_BUILD_DIR) fastprompt/_native/*.so

# Device code of the CUDA backend (kernels/pack_embed_cuda.cu) for each GPU generation, on any
# machine with nvcc: no GPU and no CUDA build of torch needed, as the CPU wheel ships the c10/ATen
# CUDA headers. Fails on a compile error or a register spill (ptxas's spill warning is made an
# error). Each architecture's ptxas report (registers, spills per kernel) is written to
# $(CUDA_CHECK_DIR)/sm_<arch>.log and printed; `make -j` compiles the architectures in parallel.
# tests/e2e/test_cuda_compile_check.py runs it.
NVCC ?= nvcc
CUDA_CHECK_ARCHS ?= 80 86 89 90 120
CUDA_CHECK_DIR ?= build/cuda-compile-check
# The CMake Release build's flags plus the two that torch's CUDA config adds to every CUDA build.
# The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, whose one macro only
# selects Windows DLL exports, so leaving it out changes nothing on Linux.
CUDA_CHECK_FLAGS = -std=c++20 -O3 -DNDEBUG --expt-relaxed-constexpr --expt-extended-lambda \
	-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
# Found without importing torch, which would cost seconds per architecture.
CUDA_CHECK_TORCH_INCLUDE = $(shell $(PYTHON) -c 'import importlib.util, pathlib; \
	print(pathlib.Path(importlib.util.find_spec("torch").origin).parent / "include")' 2>/dev/null)
CUDA_CHECK_TARGETS = $(addprefix cuda-compile-check-sm_,$(CUDA_CHECK_ARCHS))

.PHONY: cuda-compile-check $(CUDA_CHECK_TARGETS)

cuda-compile-check: $(CUDA_CHECK_TARGETS)

$(CUDA_CHECK_TARGETS): cuda-compile-check-sm_%:
	@test -d "$(CUDA_CHECK_TORCH_INCLUDE)/ATen" || { echo "torch headers not found for $(PYTHON)"; exit 1; }
	mkdir -p $(CUDA_CHECK_DIR)
	$(NVCC) $(CUDA_CHECK_FLAGS) -I"$(CUDA_CHECK_TORCH_INCLUDE)" -arch=sm_$* -cubin --resource-usage \
		-Xptxas --warn-on-spills,--warning-as-error kernels/pack_embed_cuda.cu \
		-o $(CUDA_CHECK_DIR)/sm_$*.cubin > $(CUDA_CHECK_DIR)/sm_$*.log 2>&1; \
	status=$$?; cat $(CUDA_CHECK_DIR)/sm_$*.log; exit $$status
