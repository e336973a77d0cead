#!/usr/bin/env bash
# Issue 5's GPU checks, on a machine with an NVIDIA GPU, each stage short enough for one call (< 10 minutes):
#   bash tools/gpu_check.sh kernel    the sampling kernel: nvcc build, parity with the numpy sampler, bans,
#                                     CFG rows, chi-square, timing (tests/test_cuda_kernel.py -m gpu)
#   bash tools/gpu_check.sh runtime   onnxruntime's CUDA provider: tests/test_gpu_runtime.py -m gpu (device
#                                     buffers, CUDA graphs, the kernel in the decode loops)
#   bash tools/gpu_check.sh bench     benchmarks/gpu_decode.py: fp16 / int4 decode against eager and
#                                     onnxruntime-genai-cuda (a second run), roofline
#   bash tools/gpu_check.sh demo      ILLUME-nano exported fp16, the demo (understanding, generation, editing)
#                                     on CUDA with CUDA graphs and the kernel, then on the CPU: the answers and
#                                     timings side by side
#   bash tools/gpu_check.sh prebuild  starts the bench's export + int4 quantization and onnxruntime-genai's
#                                     model builder (CPU work, minutes) in the background, in its own process
#                                     session, into $BENCH_WORK, so that it runs on while the other stages
#                                     run; the bench stage then waits for it and reuses the models
#   bash tools/gpu_check.sh split     where a decode step's time goes: the bench's engines (built here at
#                                     LAYERS, default 8, unless $BENCH_WORK has them), then
#                                     tools/gpu_step_split.py (llm run vs the kernel's pick, device busy
#                                     time, the host's profile)
#   bash tools/gpu_check.sh all       kernel, runtime, bench and demo in turn
# BENCH_RUNS picks the bench's runs (default "ours genai": ours and eager, then the same with
# onnxruntime-genai-cuda in the rounds); BENCH_ARGS adds options to both (e.g. --step-ab). DEMOS picks the demo runs (default "cuda default cpu"). NANO=DIR uses an ILLUME-nano fp16 engine exported
# here and carried (else the demo stage exports one there).
# PACK=FILE at the end writes $OUT's logs, the demo's outputs and the background build's log into one .tar.gz
# (the device tool brings back at most 8 files from $OUT).
# Packages the machine lacks come from .device/ (tools/prepare_gpu_carry.sh): onnxruntime-gpu unpacked from
# its parts into $SITE (kept there for the next call while the machine stays up), wheels installed there.
# Each step runs under a time limit, so that a hang still returns the other logs. Logs, JUnit XML and the
# bench JSON go to $OUT (default benchmarks/results/gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-benchmarks/results/gpu-check}
SITE=${SITE:-/tmp/illume-site}
PY=${PY:-python3}
mkdir -p "$OUT" "$SITE"
status=0

BENCH_WORK=${BENCH_WORK:-/tmp/illume-gpu-bench}
if [ "$stage" != kernel ]; then  # onnxruntime-gpu and the wheels (onnxruntime-genai-cuda loads onnxruntime's)
  if [ ! -d "$SITE/onnxruntime" ] && compgen -G ".device/ort/*.part*" >/dev/null; then
    cat .device/ort/*.part* | xz -d | tar -x -C "$SITE" \
      || { echo "onnxruntime-gpu parts incomplete: carry every .device/ort part (tools/prepare_gpu_carry.sh)"; exit 2; }
  fi
  if compgen -G ".device/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .device/whl/*.whl || exit 2
  fi
fi
# pycuda (tools/build_pycuda_wheel.sh), the kernel's first-choice binding, in every stage where it was carried
if compgen -G ".device/pycuda/pycuda-*.whl" >/dev/null && [ ! -d "$SITE/pycuda" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .device/pycuda/*.whl \
    || echo "pycuda wheels not installed: the kernel falls back to cuda-python"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# onnxruntime's CUDA provider loads libcudart / libcublas / libcudnn by name: the CUDA 13 libraries of the
# nvidia-* packages that torch brought
nvlibs=$("$PY" -c "import glob, nvidia; print(':'.join(sorted({p for b in nvidia.__path__ for p in glob.glob(b + '/**/lib', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ILLUME_EDGE_GPU=1 PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" - <<'PY'
import platform, torch, onnxruntime as ort
try:
    import pycuda
    pyc = pycuda.VERSION_TEXT
except ImportError as e:
    pyc = f"not importable ({e})"
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| onnxruntime", ort.__version__, ort.get_available_providers(), "| pycuda", pyc)
PY
} 2>&1 | tee "$OUT/environment-$stage.txt"

run() {  # name, seconds, command...: tee the output to $OUT/<name>.log, remember a failure or a timeout
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
  [ "$rc" = 0 ] || status=1
}
# a test still running after 90 s dumps every thread's stack (pytest's faulthandler), so that a slow or hung
# test says where it is even when the stage's time limit then kills it; --durations=0 times every test
PYTEST_GPU=(-q -rs -p no:cacheprovider -o faulthandler_timeout=90 --durations=0 -m gpu)
nano=${NANO:-/tmp/illume-nano-fp16}
ensure_nano() {  # ILLUME-nano exported fp16 (carried with NANO=DIR, else exported here; 30 s on the 2-core VM)
  [ -f "$nano/manifest.json" ] || run export-nano-fp16 300 "$PY" -m illume_edge.cli export \
    --checkpoint models/illume-nano --precision fp16 --out "$nano"
}
if [ "$stage" = prebuild ]; then
  mkdir -p "$BENCH_WORK"
  setsid nohup timeout 900 "$PY" -m benchmarks.gpu_decode --layers "${LAYERS:-8}" --workdir "$BENCH_WORK" \
    --build-only >"$BENCH_WORK/build.log" 2>&1 </dev/null &
  echo $! >"$BENCH_WORK/build.pid"
  echo "== prebuild: started (pid $(cat "$BENCH_WORK/build.pid")), log $BENCH_WORK/build.log"
fi
if [ "$stage" = kernel ] || [ "$stage" = all ]; then
  run gpu-kernel-tests "${KERNEL_LIMIT:-480}" "$PY" -m pytest "${PYTEST_GPU[@]}" tests/test_cuda_kernel.py \
    --junitxml "$OUT/gpu-kernel-tests.xml"
fi
if [ "$stage" = runtime ] || [ "$stage" = bench ] || [ "$stage" = demo ] || [ "$stage" = split ] || [ "$stage" = all ]; then
  # the kernel's cubins where the runtime's GpuSampler() looks for them (else it compiles with NVRTC)
  [ -f illume_edge/runtime/cuda/prebuilt/manifest.json ] \
    || run kernels 120 "$PY" -m illume_edge.runtime.cuda.build --out illume_edge/runtime/cuda/prebuilt
fi
if [ "$stage" = runtime ] || [ "$stage" = all ]; then
  # the fused graph's placement: no Memcpy node, or it cannot be captured as a CUDA graph
  ensure_nano
  run placement 90 "$PY" tools/ort_placement.py "$nano/llm.onnx"
  run gpu-runtime-tests "${RUNTIME_LIMIT:-420}" "$PY" -m pytest "${PYTEST_GPU[@]}" tests/test_gpu_runtime.py \
    --junitxml "$OUT/gpu-runtime-tests.xml"
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  if [ -f "$BENCH_WORK/build.pid" ]; then  # a prebuild still running: wait for it (its stamp decides reuse)
    pid=$(cat "$BENCH_WORK/build.pid")
    for _ in $(seq "${BUILD_WAIT:-300}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    echo "== prebuild: $(kill -0 "$pid" 2>/dev/null && echo 'still running' || echo done)"
    tail -3 "$BENCH_WORK/build.log"
  fi
  # ours and eager first (kept: --keep), then again with onnxruntime-genai-cuda in the same process and
  # rounds: two onnxruntime copies (the module's and the one genai loads) in one process have not been seen
  # together on a GPU yet, and a crash there must not take the first table with it
  runs=" ${BENCH_RUNS:-ours genai} "
  [[ $runs == *" ours "* ]] && run gpu-decode "${BENCH_LIMIT:-480}" "$PY" -m benchmarks.gpu_decode --layers "${LAYERS:-8}" --graph-ab \
    --reps "${REPS:-5}" --workdir "$BENCH_WORK" --skip-genai --keep --out "$OUT/gpu-decode.json" ${BENCH_ARGS:-}
  [[ $runs == *" genai "* ]] && run gpu-decode-genai "${BENCH_LIMIT:-480}" "$PY" -m benchmarks.gpu_decode --layers "${LAYERS:-8}" --graph-ab \
    --reps "${REPS:-5}" --workdir "$BENCH_WORK" --keep --out "$OUT/gpu-decode-genai.json" ${BENCH_ARGS:-}
fi
if [ "$stage" = split ]; then
  [ -f "$BENCH_WORK/built.json" ] || run split-build 300 "$PY" -m benchmarks.gpu_decode --layers "${LAYERS:-8}" \
    --workdir "$BENCH_WORK" --build-only --skip-genai
  run step-split "${SPLIT_LIMIT:-180}" "$PY" tools/gpu_step_split.py "$BENCH_WORK"
fi
if [ "$stage" = demo ] || [ "$stage" = all ]; then
  ensure_nano
  demos=" ${DEMOS:-cuda default cpu} "
  [[ $demos == *" cuda "* ]] && run demo-cuda "${DEMO_LIMIT:-150}" "$PY" -m illume_edge.cli demo --engine "$nano" \
    --out /tmp/demo-cuda --device cuda --cuda-graph
  # no flags: onnxruntime-gpu's CUDA provider, the fused cache moved to the GPU by the runtime itself
  [[ $demos == *" default "* ]] && run demo-default "${DEMO_LIMIT:-150}" "$PY" -m illume_edge.cli demo \
    --engine "$nano" --out /tmp/demo-default
  [[ $demos == *" cpu "* ]] && ILLUME_EDGE_PROVIDERS=CPUExecutionProvider run demo-cpu "${DEMO_LIMIT:-150}" "$PY" \
    -m illume_edge.cli demo --engine "$nano" --out /tmp/demo-cpu
fi
if [ -n "${PACK:-}" ]; then
  extra=()
  for f in /tmp/demo-cuda /tmp/demo-default /tmp/demo-cpu "$BENCH_WORK/build.log"; do [ -e "$f" ] && extra+=("$f"); done
  tar -czf "$PACK" "$OUT" "${extra[@]}" 2>/dev/null; echo "== packed into $PACK"
fi
exit $status
