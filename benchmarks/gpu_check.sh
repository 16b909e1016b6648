#!/usr/bin/env bash
# The command to hand a lent GPU machine: every GPU check, at most 9 minutes, -> ${1:-benchmarks/results/gpu}/gpu_check.json.
#   bash benchmarks/gpu_check.sh [DIR]
# Python: .venv's where its torch sees a GPU, else the machine's python3. Wheels made by benchmarks/gpu_wheels.sh
# and copied along (.whl/, onnxruntime-gpu in parts under .ortgpu/) are installed into /tmp/bat_site first;
# without them, missing requirements come from requirements.txt where a package index is reachable.
cd "$(dirname "$0")/.." || exit 1
if [ -x .venv/bin/python ] && .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
then . .venv/bin/activate
fi
site=/tmp/bat_site
mkdir -p "$site"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
if [ -f .ortgpu/SHA256 ]; then  # onnxruntime-gpu in parts: put back together only when every byte checks out
  wheel=$(awk '{print $2}' .ortgpu/SHA256)
  mkdir -p /tmp/bat_ortgpu && cat .ortgpu/part.* > "/tmp/bat_ortgpu/$wheel" 2>/dev/null
  if (cd /tmp/bat_ortgpu && sha256sum --status -c "$OLDPWD/.ortgpu/SHA256"); then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "/tmp/bat_ortgpu/$wheel"
  else
    echo "gpu_check.sh: .ortgpu/ holds $(ls .ortgpu/part.* 2>/dev/null | wc -l) part(s) of $wheel that do not add" \
         "up to it; the onnxruntime CUDA-provider checks use what is installed" >&2
  fi
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import tyro, soundfile, soxr, onnxruntime, safetensors" 2>/dev/null; then
  python3 -m pip install -q --retries 0 --timeout 10 -r requirements.txt ||
    echo "gpu_check.sh: requirements not installed; the checks that need them are skipped" >&2
fi
PYTHONUNBUFFERED=1 exec timeout 540 python3 benchmarks/gpu_check.py --out "${1:-benchmarks/results/gpu}"
