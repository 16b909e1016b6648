#!/usr/bin/env bash
# The command to hand a lent GPU machine: every GPU check, at most 9 minutes, -> ${1:-benchmarks/results/gpu}/gpu_check.json.
#   bash benchmarks/gpu_check.sh [DIR]
# With .venv in the copy it uses that; else the machine's python3, installing the requirements only when some are
# missing: wheels carried in .whl/ first (a lent machine may reach no registry), else requirements.txt.
cd "$(dirname "$0")/.." || exit 1
if [ -d .venv ]; then . .venv/bin/activate
elif ! python3 -c "import tyro, soundfile, soxr, onnxruntime, safetensors" 2>/dev/null; then
  { [ -d .whl ] && python3 -m pip install -q --no-index --no-deps .whl/*.whl; } ||
    python3 -m pip install -q --retries 0 --timeout 10 -r requirements.txt ||
    echo "gpu_check.sh: requirements not installed; the checks that need them are skipped" >&2
fi
PYTHONUNBUFFERED=1 exec timeout 540 python3 benchmarks/gpu_check.py --out "${1:-benchmarks/results/gpu}"
