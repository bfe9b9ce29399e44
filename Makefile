# Native backend of the fused embed_concat op; see kernels/README.md.
PYTHON ?= python
NATIVE_BUILD_DIR ?= build/native
NATIVE_CMAKE_ARGS ?=

.PHONY: native clean-native

native:
	cmake -S . -B $(NATIVE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DPython3_EXECUTABLE="$$($(PYTHON) -c 'import sys; print(sys.executable)')" $(NATIVE_CMAKE_ARGS)
	cmake --build $(NATIVE_BUILD_DIR) --parallel

clean-native:
	rm -rf $(NATIVE_BUILD_DIR) fastprompt/_native/*.so
