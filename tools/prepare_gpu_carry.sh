#!/usr/bin/env bash
# Run where pip works (not on the GPU machine): fills .device/ (git-ignored) with what tools/gpu_check.sh needs
# on a GPU machine that has torch, CUDA 13 and no package index (this workplace's lent machines):
#   .device/ort/  onnxruntime-gpu, only the cubins of sm_$ARCH kept (tools/pack_onnxruntime_gpu.py), as xz parts
#                 of 25 MiB, so that it travels in two calls of at most 64 MiB each (the repository included)
#   .device/whl/  the export side's pure-Python packages at this venv's versions (transformers, diffusers, and
#                 importlib_metadata, which diffusers needs)
# It exports ILLUME-nano fp16 and builds the kernel's cubins here too, then prints the two calls (docs/gpu.md,
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
wheel=$(ls -t .device/dl/onnxruntime_gpu-*.whl | head -1)
"$PY" tools/pack_onnxruntime_gpu.py "$wheel" --arch "$ARCH" --out .device/ort --part-mib 25
# what the demo and the runtime stage use, made here so that the GPU's device time is not spent on it
"$PY" -m illume_edge.runtime.cuda.build --out illume_edge/runtime/cuda/prebuilt
[ -f engines/illume-nano-fp16/manifest.json ] || "$PY" -m illume_edge.cli export --checkpoint models/illume-nano \
  --precision fp16 --out engines/illume-nano-fp16
parts=(.device/ort/*.part*)
q() { printf '"%s", ' "$@"; }
first=$(q "${parts[@]:2}" .device/whl engines/illume-nano-fp16 illume_edge/runtime/cuda/prebuilt)
second=$(q "${parts[@]:0:2}")
cat <<MSG

Two calls on the GPU machine, the second at once after the first (a machine goes back 30 s after a call;
docs/gpu.md, "Verifying on a lent GPU"):
  1. carry [${first%, }]
     command: mkdir -p /tmp/keep && cp ${parts[*]:2} /tmp/keep/ && cp -r engines/illume-nano-fp16 /tmp/ && OUT=/tmp/gc1 bash tools/gpu_check.sh prebuild && PACK=\$OUT/call1.tar.gz OUT=/tmp/gc1 KERNEL_LIMIT=200 bash tools/gpu_check.sh kernel
  2. carry [${second%, }]
     command: cp /tmp/keep/* .device/ort/; export PACK=\$OUT/call2.tar.gz OUT=/tmp/gc2 NANO=/tmp/illume-nano-fp16; RUNTIME_LIMIT=240 bash tools/gpu_check.sh runtime; DEMO_LIMIT=45 bash tools/gpu_check.sh demo; BUILD_WAIT=150 BENCH_LIMIT=150 bash tools/gpu_check.sh bench
MSG
