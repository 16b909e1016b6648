#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package index, made here and copied along with the checkout.
#   bash benchmarks/gpu_wheels.sh                 # .whl/: tyro, soundfile, soxr and their needs (~2 MB)
#   bash benchmarks/gpu_wheels.sh --ort-gpu [MB]  # also onnxruntime-gpu (~255 MB), in parts of MB (default 45)
#                                                 # under .ortgpu/, for transfers limited in size
# For a machine image with Python 3.12, PyTorch with CUDA and the CPU onnxruntime, but none of the above.
# benchmarks/gpu_check.sh installs what it finds there into /tmp/bat_site (nothing else is touched) and
# puts the parts of onnxruntime-gpu back together, checking its SHA-256; without every part the checks on
# onnxruntime's CUDA provider are skipped, the PyTorch ones still run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps "${PY[@]}" -d .whl tyro docstring-parser typeguard typing-extensions \
  soundfile cffi pycparser soxr
if [ "${1:-}" = "--ort-gpu" ]; then
  mb=${2:-45}
  rm -rf .ortgpu /tmp/bat_ortgpu && mkdir -p .ortgpu /tmp/bat_ortgpu
  python3 -m pip download -q --no-deps "${PY[@]}" -d /tmp/bat_ortgpu onnxruntime-gpu
  wheel=$(cd /tmp/bat_ortgpu && ls onnxruntime_gpu-*.whl)
  (cd /tmp/bat_ortgpu && sha256sum "$wheel") > .ortgpu/SHA256
  split -b "${mb}m" -d -a 2 "/tmp/bat_ortgpu/$wheel" .ortgpu/part.
  rm -rf /tmp/bat_ortgpu
fi
du -sh .whl .ortgpu/* 2>/dev/null
