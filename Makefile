# illume-edge: the two commands a new user needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= tiny-plus
CKPT    ?= engines/checkpoints/$(PRESET)
ENGINE  ?= engines/$(PRESET)
PYTEST_ARGS ?=
# onnxruntime's flavour: cpu (onnxruntime) or gpu (onnxruntime-gpu, tensorrt, pycuda); never both in one venv
ORT_EXTRA   ?= cpu
NANO_CKPT   := models/illume-nano
NANO_ENGINE := engines/illume-nano

.PHONY: setup test export demo bench bench-full bench-gpu clean info kernels wheel nano eval-nano eval-nano-ablation

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(ORT_EXTRA),export,dev]'
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

# The demo runs ILLUME-nano, the model this project trains (docs/nano.md); its checkpoint ships in
# models/illume-nano, so the demo exports it and never trains.
$(NANO_ENGINE)/manifest.json: $(NANO_CKPT)/illume_edge.json | setup
	$(BIN)/illume-edge export --checkpoint $(NANO_CKPT) --out $(NANO_ENGINE)

demo: $(NANO_ENGINE)/manifest.json
	$(BIN)/illume-edge demo --engine $(NANO_ENGINE) --out outputs

# Retrain ILLUME-nano from scratch (fixed seeds, ~40 min on 2 cores): every stage of the recipe, then the
# checkpoint in the release formats under $(NANO_CKPT). Intermediate engines and the ablation go to build/nano.
nano: setup
	$(BIN)/python -m illume_edge.nano.recipe --out $(NANO_CKPT) --work build/nano

# Held-out task accuracy through the runtime (fp32, int8, int4 engines) and the torch reference.
$(NANO_ENGINE)-int8/manifest.json: $(NANO_ENGINE)/manifest.json
	$(BIN)/illume-edge quantize --engine $(NANO_ENGINE) --out $(NANO_ENGINE)-int8 --precision int8

$(NANO_ENGINE)-int4/manifest.json: $(NANO_ENGINE)/manifest.json
	$(BIN)/illume-edge quantize --engine $(NANO_ENGINE) --out $(NANO_ENGINE)-int4 --precision int4

eval-nano: $(NANO_ENGINE)/manifest.json $(NANO_ENGINE)-int8/manifest.json $(NANO_ENGINE)-int4/manifest.json
	$(BIN)/python -m illume_edge.nano.evaluate --engine $(NANO_ENGINE) --engine $(NANO_ENGINE)-int8 \
	    --engine $(NANO_ENGINE)-int4 --checkpoint $(NANO_CKPT) --json benchmarks/results/nano-eval.json
	$(BIN)/python -m illume_edge.nano.evaluate --decoder-fidelity $(NANO_CKPT)

# The self-enhancing ablation (exists after `make nano`: build/nano/ablation_checkpoint), same evaluation.
eval-nano-ablation: | setup
	$(BIN)/illume-edge export --checkpoint build/nano/ablation_checkpoint --out $(NANO_ENGINE)-ablation
	$(BIN)/python -m illume_edge.nano.evaluate --engine $(NANO_ENGINE)-ablation \
	    --json benchmarks/results/nano-eval-ablation.json

# LLM decode at the Qwen2.5-0.5B shape (our fp32/int8/int4 engines vs transformers eager and
# onnxruntime-genai), then every stage of the pipeline at an ILLUME+-layout CPU preset vs PyTorch eager; same
# weights on every side, results under benchmarks/results/ (docs/performance.md).
# On a machine with an NVIDIA GPU (and onnxruntime-gpu: `.[gpu]`), `make bench` also runs bench-gpu.
bench: setup
	@if $(BIN)/python -c "import importlib.metadata as m; m.version('onnxruntime-gpu')" 2>/dev/null; then \
	    $(BIN)/pip install -q -e '.[bench-gpu]'; else $(BIN)/pip install -q -e '.[bench]'; fi
	$(BIN)/python -m benchmarks.llm_decode
	$(BIN)/python -m benchmarks.stages
	@if [ -e /dev/nvidia0 ]; then $(MAKE) bench-gpu; fi

# LLM decode on the GPU at the ILLUME+ 3B shape (8 of its layers): fp16 and int4-over-fp16 engines with and
# without CUDA graphs vs onnxruntime-genai-cuda and PyTorch eager fp16, against the device's bandwidth
# roofline (docs/gpu.md). Needs a venv with onnxruntime-gpu in place of onnxruntime.
bench-gpu: setup
	@$(BIN)/python -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in \
	    o.get_available_providers() else 'bench-gpu: no CUDA provider in this venv: ' \
	    'rm -rf $(VENV) and make setup ORT_EXTRA=gpu (onnxruntime-gpu in place of onnxruntime)')"
	$(BIN)/pip install -q -e '.[bench-gpu]'
	$(BIN)/python -m benchmarks.gpu_decode --graph-ab

# The long protocol (~25 minutes): int8 decode too, both LLM graphs in the decode A/B, prompts up to 1024
# tokens, every stage's repetitions in full, and the fp32 engine end to end too.
bench-full: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.llm_decode --precisions fp32 int8 int4 --llm-graphs fused portable
	$(BIN)/python -m benchmarks.stages --full

# The CUDA sampling kernel's cubins for sm_87 / sm_89 / sm_90 (needs nvcc; NVRTC covers other archs at run time).
kernels: setup
	$(BIN)/python -m illume_edge.runtime.cuda.build --out illume_edge/runtime/cuda/prebuilt

# A wheel with the cubins inside (package data; nvcc needed for the kernels step).
wheel: kernels
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf build/nano engines/checkpoints $(filter-out engines/README.md,$(wildcard engines/*)) outputs .pytest_cache
