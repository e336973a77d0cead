#!/usr/bin/env bash
# Issue 5's GPU checks, on a machine with an NVIDIA GPU, each stage short enough for one call (< 10 minutes):
#   bash tools/gpu_check.sh kernel    the sampling kernel: nvcc build, parity with the numpy sampler, bans,
#                                     CFG rows, chi-square, timing (tests/test_cuda_kernel.py -m gpu)
#   bash tools/gpu_check.sh runtime   onnxruntime's CUDA provider: tests/test_gpu_runtime.py -m gpu (device
#                                     buffers, CUDA graphs, the kernel in the decode loops)
#   bash tools/gpu_check.sh bench     benchmarks/gpu_decode.py: fp16 / int4 decode against eager, roofline
#   bash tools/gpu_check.sh demo      ILLUME-nano exported fp16, the demo (understanding, generation, editing)
#                                     on CUDA with CUDA graphs and the kernel, then on the CPU: the answers and
#                                     timings side by side
#   bash tools/gpu_check.sh all       the four in turn
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

if [ "$stage" != kernel ]; then
  if [ ! -d "$SITE/onnxruntime" ] && compgen -G ".device/ort/*.part*" >/dev/null; then
    cat .device/ort/*.part* | xz -d | tar -x -C "$SITE" \
      || { echo "onnxruntime-gpu parts incomplete: carry every .device/ort part (tools/prepare_gpu_carry.sh)"; exit 2; }
  fi
  if compgen -G ".device/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .device/whl/*.whl || exit 2
  fi
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
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| onnxruntime", ort.__version__, ort.get_available_providers())
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
if [ "$stage" = kernel ] || [ "$stage" = all ]; then
  run gpu-kernel-tests 480 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_cuda_kernel.py \
    --junitxml "$OUT/gpu-kernel-tests.xml"
fi
if [ "$stage" = runtime ] || [ "$stage" = bench ] || [ "$stage" = demo ] || [ "$stage" = all ]; then
  # the kernel's cubins where the runtime's GpuSampler() looks for them (else it compiles with NVRTC)
  [ -f illume_edge/runtime/cuda/prebuilt/manifest.json ] \
    || run kernels 120 "$PY" -m illume_edge.runtime.cuda.build --out illume_edge/runtime/cuda/prebuilt
fi
if [ "$stage" = runtime ] || [ "$stage" = all ]; then
  run gpu-runtime-tests 420 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu_runtime.py \
    --junitxml "$OUT/gpu-runtime-tests.xml"
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  run gpu-decode 480 "$PY" -m benchmarks.gpu_decode --layers "${LAYERS:-8}" --graph-ab --reps "${REPS:-5}" \
    --out "$OUT/gpu-decode.json"
fi
if [ "$stage" = demo ] || [ "$stage" = all ]; then
  nano=/tmp/illume-nano-fp16
  [ -f "$nano/manifest.json" ] || run export-nano-fp16 300 "$PY" -m illume_edge.cli export \
    --checkpoint models/illume-nano --precision fp16 --out "$nano"
  run demo-cuda 150 "$PY" -m illume_edge.cli demo --engine "$nano" --out /tmp/demo-cuda --device cuda --cuda-graph
  run demo-cpu 150 "$PY" -m illume_edge.cli demo --engine "$nano" --out /tmp/demo-cpu
fi
exit $status
