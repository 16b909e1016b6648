"""Converged probes: does --select auto (held-out early stopping + a 3-value lr grid) beat a fixed short
schedule, within the wall time of the default schedule? random:tiny encoder, CGP, real audio, 3 seeds.

    python benchmarks/converged_probes.py                                   # sfx, seeds 0 1 2
    python benchmarks/converged_probes.py --sets sfx drums --default-seeds 0

Per seed and set it runs probe_cgp.py as a user would (features cached):
  400      --select none --steps 400   (the short fixed schedule)
  default  --select none               (today's default: 4,000 steps; the wall-time budget), --default-seeds only
  auto     the default --select auto with --baseline logmel (the log-mel + logistic-regression floor of the
           same split comes from the same run)
and prints one JSON line per run, then a markdown table of test accuracy (mean ± std over seeds), the
held-out score the selection saw, and wall seconds. The sets are the class-per-folder train/ and test/
folders that benchmarks/real_audio.py's data tool builds (DATA/sfx, DATA/drums) or benchmarks/voices_set.py
(DATA/voices, 15 espeak-ng speakers). Clips are cut to
--max-seconds 3 and CGP uses --prototypes 256 (defaults 10.23 s and 10 000 take ~2 s a step on 2 CPU cores,
which would make 3 seeds of the 4,000-step default take hours); every arm uses the same geometry.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"400": ["--select", "none", "--steps", "400"], "default": ["--select", "none"],
        "auto": ["--baseline", "logmel"]}


def probe(args, data: Path, arm: str, seed: int, out: Path) -> dict:
    """One probe_cgp.py run; returns its metrics.json plus the wall seconds (skipped when it exists)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    cmd = [sys.executable, str(ROOT / "probe_cgp.py"), "--encoder", "random:tiny", "--train", str(data / "train"),
           "--test", str(data / "test"), "--out", str(out), "--seed", str(seed), "--cache-features",
           "--max-seconds", str(args.max_seconds), "--prototypes", str(args.prototypes), "--workers", "1",
           "--device", "cpu", *ARMS[arm]]
    t = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (see {out / 'log.txt'})")
    m = json.loads((out / "metrics.json").read_text())
    r = {"arm": arm, "seed": seed, "wall_s": time.time() - t, "accuracy": m["accuracy"],
         "held_out": (m.get("held_out") or {}).get("accuracy"), "selection": m.get("selection"),
         "floor": ((m.get("baseline") or {}).get("logmel") or {}).get("accuracy"), "load": os.getloadavg()[0]}
    (out / "result.json").write_text(json.dumps(r))
    return r


def ms(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "real_audio" / "data")
    p.add_argument("--sets", nargs="+", default=["sfx"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "converged_probes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--default-seeds", type=int, nargs="*", default=[0],
                   help="seeds of the 4,000-step default (its wall time is the budget; the slowest arm)")
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--prototypes", type=int, default=256)
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    for name in args.sets:
        for seed in args.seeds:
            for arm in ("400", "auto") + (("default",) if seed in args.default_seeds else ()):
                r = {"set": name, **probe(args, args.data / name, arm, seed, args.out / name / f"{arm}_seed{seed}")}
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "selection"}), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| set | arm | test accuracy % | held-out % | log-mel floor % | wall s | seeds |\n|---|---|---|---|---|---|---|")
    for name in args.sets:
        for arm, label in (("400", "400 steps"), ("default", "4,000 steps (default)"), ("auto", "--select auto")):
            rs = [r for r in rows if r["set"] == name and r["arm"] == arm]
            if rs:
                pct = lambda k: [None if r[k] is None else 100 * r[k] for r in rs]  # noqa: E731
                print(f"| {name} | {label} | {ms(pct('accuracy'))} | {ms(pct('held_out'))} | {ms(pct('floor'))} | "
                      f"{ms([r['wall_s'] for r in rs])} | {len(rs)} |")
    for r in rows:
        if r["selection"]:
            print(f"{r['set']} seed {r['seed']}: lr {r['selection']['lr']:g} step {r['selection']['step']}, "
                  f"held-out per lr {r['selection']['lr_grid']}, stopped at {r['selection']['stopped_at']}")


if __name__ == "__main__":
    main()
