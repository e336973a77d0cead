#!/usr/bin/env bash
# Builds a pycuda wheel here, on a machine with no GPU and no libcuda, for a GPU machine that has no package
# index (this workplace's lent machines): the kernel's first-choice binding (docs/design.md) otherwise never
# runs there. Called by tools/prepare_gpu_carry.sh; writes the wheel and its pure-Python dependencies into
# $DEST (default .device/pycuda).
#   PY312  a Python of the GPU machine's minor version (default: pyenv's 3.12, else python3.12)
#   CUDA_ROOT  the CUDA toolkit whose headers pycuda compiles against (default /usr/local/cuda)
# pycuda links libcuda, the driver, which only a GPU machine has. Here it links a stub libcuda.so whose
# soname is libcuda.so.1 (as the toolkit's own stubs do): the wheel then names libcuda.so.1 as NEEDED and the
# loader binds its cu* symbols to the real driver on the GPU machine. LDFLAGS=-Wl,--no-as-needed goes before
# the libraries on the link line (distutils puts the environment's LDFLAGS there), so that the stub, which
# defines none of the symbols, is still recorded; -s strips the symbols (19 MB -> 1.9 MB, so that it fits a
# call's 64 MiB with the onnxruntime-gpu parts).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.device/pycuda}
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
PY=${PY:-.venv/bin/python}
PYV=${PYV:-3.12}
if [ -z "${PY312:-}" ]; then
  v=$(pyenv versions --bare 2>/dev/null | grep -E "^${PYV//./\\.}(\.|$)" | tail -1 || true)
  PY312=$([ -n "$v" ] && echo "$(pyenv root)/versions/$v/bin/python" || command -v "python$PYV" || true)
fi
[ -x "$PY312" ] || { echo "no Python $PYV here (set PY312): pycuda not built"; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY312" -m venv "$work/venv"
"$work/venv/bin/pip" install -q numpy setuptools wheel
"$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation pycuda -d "$work"
tar -xzf "$work"/pycuda-*.tar.gz -C "$work"
src=$(ls -d "$work"/pycuda-*/)
echo 'void illume_edge_libcuda_stub(void) {}' >"$work/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so" "$work/stub.c"
# curand off: the toolkit here has no libcurand, and the kernel does not use it
(cd "$src" && "$work/venv/bin/python" configure.py --cuda-root="$CUDA_ROOT" --cudadrv-lib-dir="$work" >/dev/null \
  && sed -i 's/^CUDA_ENABLE_CURAND = .*/CUDA_ENABLE_CURAND = False/' siteconf.py)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
LDFLAGS="-Wl,--no-as-needed -s" "$work/venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$DEST" "$src"
whl=$(realpath "$DEST"/pycuda-*.whl)
(cd "$work" && "$work/venv/bin/python" -m zipfile -e "$whl" unpacked)
readelf -d "$work"/unpacked/pycuda/_driver*.so | grep -q 'NEEDED.*libcuda\.so\.1' \
  || { echo "$whl does not name libcuda.so.1 as NEEDED: it would not load on the GPU machine"; exit 1; }
"$PY" -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST" pytools platformdirs mako
echo "pycuda for Python $PYV: $(ls "$DEST" | tr '\n' ' ')"
