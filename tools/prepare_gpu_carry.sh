#!/usr/bin/env bash
# Run where pip works (not on the GPU machine): fills .device/ (git-ignored) with what tools/gpu_check.sh needs
# on a GPU machine that has torch, CUDA 13 and no package index (this workplace's lent machines):
#   .device/ort/  onnxruntime-gpu, only the cubins of sm_$ARCH kept (tools/pack_onnxruntime_gpu.py), as xz parts
#                 of 25 MiB, so that it travels in two calls of at most 64 MiB each (the repository included)
#   .device/whl/  the export side's pure-Python packages at this venv's versions (transformers, diffusers, and
#                 importlib_metadata, which diffusers needs), and onnxruntime-genai-cuda (the bench's peer)
# It builds the kernel's cubins here too, then prints the three calls and what the first two carry (docs/gpu.md,
# "Verifying on a lent GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYV=${PYV:-3.12}   # the GPU machine's Python
ARCH=${ARCH:-90}   # H100 / H200; 87 Jetson Orin, 89 L4 / RTX 40
dl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$@"
}
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
mkdir -p .device/dl .device/whl
rm -f .device/whl/*.whl
dl .device/dl onnxruntime-gpu
dl .device/whl "transformers==$(version transformers)" "diffusers==$(version diffusers)" \
  "importlib_metadata==$(version importlib_metadata)"
# the GPU bench's peer, at the CPU peer's version where `make bench` installed one (it needs onnxruntime-gpu
# >= 1.31, which the parts bring)
genai=$(version onnxruntime-genai 2>/dev/null || true)
dl .device/whl "onnxruntime-genai-cuda${genai:+==$genai}"
wheel=$(ls -t .device/dl/onnxruntime_gpu-*.whl | head -1)
"$PY" tools/pack_onnxruntime_gpu.py "$wheel" --arch "$ARCH" --out .device/ort --part-mib 25
# the kernel's cubins, built here so that the GPU's device time is not spent on it
"$PY" -m illume_edge.runtime.cuda.build --out illume_edge/runtime/cuda/prebuilt
# pycuda, the kernel's first-choice binding, built here against a stub libcuda (the GPU machine has no index)
bash tools/build_pycuda_wheel.sh || echo "pycuda not built: the GPU machine's kernel tests use cuda-python only"
parts=(.device/ort/*.part*)
first=("${parts[@]:0:2}")
[ -d .device/pycuda ] && first+=(.device/pycuda)
second=("${parts[@]:2}" .device/whl illume_edge/runtime/cuda/prebuilt)
# what a call carries: the repository's tracked files and these; at most 64 MiB
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
for call in first second; do
  declare -n paths=$call
  bytes=$(( repo + $(du -cb "${paths[@]}" | tail -1 | cut -f1) ))
  echo "call $call: $(( bytes / 1048576 )) MiB with the repository"
  [ "$bytes" -le $(( 64 * 1048576 )) ] || echo "  over the device tool's 64 MiB: the call would be refused"
done
q() { printf '"%s", ' "$@"; }
cat <<MSG

Three calls on the GPU machine, each at once after the last (a machine goes back 30 s after a call, and what
a call carried or unpacked into /tmp stays while it is up; docs/gpu.md, "Verifying on a lent GPU"):
  1. carry [$(q "${first[@]}" | sed 's/, $//')]
     command: mkdir -p /tmp/keep && cp ${parts[*]:0:2} /tmp/keep/ && PACK=\$OUT/call1.tar.gz OUT=/tmp/gc1 KERNEL_LIMIT=200 bash tools/gpu_check.sh kernel
  2. carry [$(q "${second[@]}" | sed 's/, $//')]
     command: cp /tmp/keep/* .device/ort/; export PACK=\$OUT/call2.tar.gz OUT=/tmp/gc2; bash tools/gpu_check.sh prebuild; RUNTIME_LIMIT=240 bash tools/gpu_check.sh runtime; DEMOS=cuda DEMO_LIMIT=60 bash tools/gpu_check.sh demo
  3. carry nothing
     command: export PACK=\$OUT/call3.tar.gz OUT=/tmp/gc2; BUILD_WAIT=200 BENCH_LIMIT=180 BENCH_RUNS=genai BENCH_ARGS=--step-ab bash tools/gpu_check.sh bench; SPLIT_LIMIT=120 bash tools/gpu_check.sh split
MSG
