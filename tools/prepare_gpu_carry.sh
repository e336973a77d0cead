#!/usr/bin/env bash
# Run where pip works (not on the GPU machine): fills .device/ (git-ignored) with what tools/gpu_check.sh needs
# on a GPU machine that has torch, CUDA 13 and no package index (this workplace's lent machines):
#   .device/ort/  onnxruntime-gpu, only the cubins of sm_$ARCH kept (tools/pack_onnxruntime_gpu.py), as xz parts
#                 of 25 MiB, so that it travels in two calls of at most 64 MiB each (the repository included)
#   .device/whl/  the export side's pure-Python packages at this venv's versions (transformers, diffusers, and
#                 importlib_metadata, which diffusers needs)
# Then it prints the four calls (docs/gpu.md, "Verifying on a lent GPU").
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
parts=(.device/ort/*.part*)
first=$(printf '"%s", ' "${parts[@]:0:2}")
rest=$(printf '"%s", ' "${parts[@]:2}")
cat <<MSG

Four calls on the GPU machine, each within the last one's warm period (what a call carried, and the
unpacked onnxruntime in /tmp, stay there while the machine does):
  1. carry [${first%, }]            command: bash tools/gpu_check.sh kernel
  2. carry [${rest}".device/whl"]   command: bash tools/gpu_check.sh runtime
  3. carry nothing more                                    command: bash tools/gpu_check.sh bench
  4. carry nothing more                                    command: bash tools/gpu_check.sh demo
MSG
