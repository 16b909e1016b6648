#!/usr/bin/env bash
# The whole chain on built-in demo data, on a CPU, in a few minutes:
# install -> pretrain a tiny BAT -> probe it and a random-init encoder side by side -> export the
# probe to ONNX -> tag demo clips.
#   bash demo.sh [OUT]      (default OUT: runs/demo; DEMO_SEED=1 for another seed, DEMO_STEPS=600 for a longer run)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
STEPS=${DEMO_STEPS:-300}
SEED=${DEMO_SEED:-0}  # seed of the pretraining and of the probes (the demo sounds stay the same)

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -r requirements.txt
# One thread: DataLoader workers share the two cores, and oversubscribed OpenMP threads spin-wait (10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/5 pretrain a tiny BAT on the built-in demo sounds ($STEPS steps; online probe in $OUT/pretrain/curves.png)"
# --lr 5e-5: at 300 steps the preset's 5e-4 collapses the last block's features (docs/benchmarks.md, ablation)
python pretrain.py --model tiny --steps "$STEPS" --warmup-steps 50 --lr 5e-5 --checkpoint-every 100 --probe-data demo \
    --probe-every 100 --seed "$SEED" --out "$OUT/pretrain"

echo "== 2/5 write a small labelled demo set (class-per-folder wav files)"
python -m bat.demo --out "$OUT/data" --clips-per-class 16 --test-clips-per-class 6

echo "== 3/5 probe the frozen encoder and a random-init one (CGP, linear probe), beside the log-mel floor"
# --select auto (the default on your own data): 20 % of train held out picks the lr and the stopping step.
for enc in pretrained random; do
    [ $enc = random ] && path=random:tiny || path="$OUT/pretrain/encoder.safetensors"
    for kind in cgp lp; do
        python probe_cgp.py --encoder "$path" --train "$OUT/data/train" --test "$OUT/data/test" --probe $kind \
            --out "$OUT/probe_${enc}_$kind" --prototypes 256 --steps 300 --batch-size 32 --cache-features --seed "$SEED" \
            $([ $enc$kind = pretrainedcgp ] && echo --baseline logmel) \
            > "$OUT/probe_${enc}_$kind.log" 2>&1 || { tail -20 "$OUT/probe_${enc}_$kind.log"; exit 1; }
    done
done
python - "$OUT" <<'PY'
import json, sys
m = lambda d: json.load(open(f"{sys.argv[1]}/probe_{d}/metrics.json"))  # noqa: E731
floor = 100 * m("pretrained_cgp")["baseline"]["logmel"]["accuracy"]
print(f"test accuracy % (same split) {'log-mel floor':>13} {'random init':>12} {'pretrained':>11}")
for kind, name in (("cgp", "CGP"), ("lp", "linear probe")):
    r, p = 100 * m(f"random_{kind}")["accuracy"], 100 * m(f"pretrained_{kind}")["accuracy"]
    print(f"{name:<28} {floor:13.1f} {r:12.1f} {p:11.1f}  ({p - r:+.1f})")
n = m("pretrained_cgp")["num_test"]
print(f"log-mel floor: logistic regression on each mel bin's mean and std over time; {n} test clips: "
      f"one clip is {100 / n:.1f} points, so gaps of a few points are noise")
PY

echo "== 4/5 export the probe (front-end + encoder + head) to ONNX"
python export.py --checkpoint "$OUT/probe_pretrained_cgp/probe.safetensors" --out "$OUT/tagger.onnx"

echo "== 5/5 tag a few test clips with onnxruntime (no PyTorch in that process)"
python -m bat.tag "$OUT/tagger.onnx" $(ls "$OUT"/data/test/*/*_000.wav) --top-k 2

cat <<MSG

Artefacts:
  $OUT/pretrain/encoder.safetensors   pretrained encoder (log: $OUT/pretrain/log.jsonl)
  $OUT/pretrain/curves.png            losses, target/prediction spread, online probe vs steps
  $OUT/probe_pretrained_cgp/          CGP test metrics (metrics.json), layer weights (gates.png), the probe
  $OUT/probe_random_cgp/              the same probe on a random-init encoder (the baseline); *_lp: linear probes
  $OUT/tagger.onnx                    the exported tagger: python -m bat.tag $OUT/tagger.onnx FILE...

Note: $STEPS steps on the synthetic demo set do not reliably beat a random-init encoder (3 seeds: within noise
of it, below it on one; docs/benchmarks.md, "Why short pretraining loses information"). The demo shows the
pipeline; for pretraining that beats random init, see the 3,000-step real-audio run: benchmarks/real_audio.py.
MSG
