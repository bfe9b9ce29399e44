# Set-up is part of every user-facing target, so each works on a fresh machine.
# torch==2.13.0 is named explicitly: on the project's CPU machines pip takes it
# from local disk in seconds, where a bare `torch` would pull a multi-GB CUDA build.
PYTHON ?= python
NATIVE_BUILD_DIR ?= build/native
NATIVE_CMAKE_ARGS ?=
BENCH_RESULTS ?= bench/results

.PHONY: install demo test bench native clean-native

install:
	$(PYTHON) -m pip install -q "torch==2.13.0" -e ".[dev]"

# The README's main command: trains, saves, reloads with PEFT, generates.
demo: install
	fastprompt demo

# The README's test command; .ci/run calls it.
test: install native
	$(PYTHON) -m pytest tests

# fastprompt vs PEFT, both in one run per suite; prints the table.
bench: install native
	mkdir -p $(BENCH_RESULTS)
	$(PYTHON) -m pytest bench/bench_training.py -q --benchmark-json=$(BENCH_RESULTS)/training.json
	$(PYTHON) -m pytest bench/bench_generation.py -q --benchmark-json=$(BENCH_RESULTS)/generation.json
	$(PYTHON) -m pytest bench/bench_native.py bench/bench_ops.py -q --benchmark-json=$(BENCH_RESULTS)/ops.json
	$(PYTHON) bench/report.py $(BENCH_RESULTS)/*.json

# Native backend of the fused embed_concat op; see kernels/README.md.
native: install
	cmake -S . -B $(NATIVE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DPython3_EXECUTABLE="$$($(PYTHON) -c 'import sys; print(sys.executable)')" $(NATIVE_CMAKE_ARGS)
	cmake --build $(NATIVE_BUILD_DIR) --parallel

clean-native:
	rm -rf $(NATIVE_BUILD_DIR) fastprompt/_native/*.so
