# illume-edge: the two commands a new user needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= tiny-plus
CKPT    ?= engines/checkpoints/$(PRESET)
ENGINE  ?= engines/$(PRESET)
PYTEST_ARGS ?=

.PHONY: setup test export demo bench clean info kernels

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# A random checkpoint of $(PRESET) in the release layout, then its engine folder.
$(CKPT)/illume_edge.json: | setup
	$(BIN)/illume-edge make-tiny --preset $(PRESET) --out $(CKPT)

$(ENGINE)/manifest.json: $(CKPT)/illume_edge.json
	$(BIN)/illume-edge export --checkpoint $(CKPT) --out $(ENGINE)

export: $(ENGINE)/manifest.json
	$(BIN)/illume-edge info $(ENGINE)

info:
	$(BIN)/illume-edge info $(ENGINE)

# Until the trained ILLUME-nano ships (issue 3) the default engine is the random tiny-plus model:
# the demo exercises every stage end to end, but its answers and images are noise.
demo: export
	$(BIN)/illume-edge demo --engine $(ENGINE) --out outputs

# LLM decode at the Qwen2.5-0.5B shape: our fp32/int8/int4 engines vs transformers eager and
# onnxruntime-genai, same weights, same run (docs/performance.md). The other stages are not benched yet.
bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.llm_decode

# The CUDA sampling kernel's cubins for sm_87 / sm_89 / sm_90 (needs nvcc; NVRTC covers other archs at run time).
kernels: setup
	$(BIN)/python -m illume_edge.runtime.cuda.build --out illume_edge/runtime/cuda/prebuilt

clean:
	rm -rf engines/checkpoints $(filter-out engines/README.md,$(wildcard engines/*)) outputs .pytest_cache
