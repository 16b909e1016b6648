#!/usr/bin/env bash
# The whole chain on built-in demo data, on a CPU, in a few minutes:
# install -> pretrain a tiny BAT -> CGP-probe it -> export the probe to ONNX -> tag demo clips.
#   bash demo.sh [OUT]      (default OUT: runs/demo)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
STEPS=${DEMO_STEPS:-300}

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -r requirements.txt
# One thread: DataLoader workers share the two cores, and oversubscribed OpenMP threads spin-wait (10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/5 pretrain a tiny BAT on the built-in demo sounds ($STEPS steps)"
python pretrain.py --model tiny --steps "$STEPS" --warmup-steps 50 --checkpoint-every 100 --out "$OUT/pretrain"

echo "== 2/5 write a small labelled demo set (class-per-folder wav files)"
python -m bat.demo --out "$OUT/data" --clips-per-class 16 --test-clips-per-class 6

echo "== 3/5 Convex Gated Probing of the frozen encoder"
python probe_cgp.py --encoder "$OUT/pretrain/encoder.safetensors" --train "$OUT/data/train" --test "$OUT/data/test" \
    --out "$OUT/probe" --prototypes 256 --steps 300 --batch-size 32 --cache-features

echo "== 4/5 export the probe (front-end + encoder + head) to ONNX"
python export.py --checkpoint "$OUT/probe/probe.safetensors" --out "$OUT/tagger.onnx"

echo "== 5/5 tag a few test clips with onnxruntime (no PyTorch in that process)"
python -m bat.tag "$OUT/tagger.onnx" $(ls "$OUT"/data/test/*/*_000.wav) --top-k 2

cat <<MSG

Artefacts:
  $OUT/pretrain/encoder.safetensors   pretrained encoder (log: $OUT/pretrain/log.jsonl)
  $OUT/probe/metrics.json             CGP test metrics; layer weights in $OUT/probe/gates.png
  $OUT/probe/probe.safetensors        the probe with its encoder
  $OUT/tagger.onnx                    the exported tagger: python -m bat.tag $OUT/tagger.onnx FILE...
MSG
