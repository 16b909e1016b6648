"""The demo's own table over seeds: runs `bash demo.sh` once per seed (DEMO_SEED) exactly as a user runs it,
then prints, mean ± std over seeds, what the demo prints for one: test accuracy of the log-mel floor, the
random-init encoder and the pretrained one under CGP and the linear probe, the online ridge probe at step 0
(the random init) and at the last step, whether a collapse warning fired, and the demo's wall time.

    python benchmarks/demo_seeds.py --out runs/demo_seeds --seeds 0 1 2
    python benchmarks/demo_seeds.py --out runs/demo_seeds --table     # only the table of OUT/demo_seeds.json

Every number comes from the files the demo writes (probe_*/metrics.json, pretrain/log.jsonl) and its log.
A seed whose folder already holds a finished demo is not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out: str, seed: int, steps: int | None) -> dict:
    """One `bash demo.sh OUT/seed_K` run -> its figures (wall time measured here, around the whole script)."""
    folder = os.path.join(out, f"seed_{seed}")
    log = folder + ".log"
    env = {**os.environ, "DEMO_SEED": str(seed), **({"DEMO_STEPS": str(steps)} if steps else {})}
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), folder], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT).returncode
    if rc:
        return {"seed": seed, "failed": f"demo.sh exited {rc}; see {log}"}
    return {"seed": seed, "seconds": time.time() - t0, **figures(folder, open(log).read())}


def figures(folder: str, log_text: str) -> dict:
    def acc(name):
        return 100 * json.load(open(os.path.join(folder, f"probe_{name}", "metrics.json")))["accuracy"]

    floor = json.load(open(os.path.join(folder, "probe_pretrained_cgp", "metrics.json")))["baseline"]["logmel"]
    curve = [(r["step"], 100 * r["probe_acc"]) for r in map(json.loads, open(os.path.join(folder, "pretrain", "log.jsonl")))
             if "probe_acc" in r]
    return {"floor": 100 * floor["accuracy"], "random_cgp": acc("random_cgp"), "pretrained_cgp": acc("pretrained_cgp"),
            "random_lp": acc("random_lp"), "pretrained_lp": acc("pretrained_lp"), "online_probe": curve,
            "collapse_warning": "may be collapsing" in log_text}


def mean_std(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def print_table(rows: list[dict]) -> None:
    rows = [r for r in rows if "failed" not in r]
    if not rows:
        print("no finished seed")
        return
    seeds = " ".join(str(r["seed"]) for r in rows)
    print(f"seeds {seeds}; test accuracy %, mean ± sample std over seeds (gain: per seed)\n")
    print("| probe | log-mel floor | random init | pretrained | gain | per seed |")
    print("|---|---|---|---|---|---|")
    for kind, name in (("cgp", "CGP"), ("lp", "linear probe")):
        gain = [r[f"pretrained_{kind}"] - r[f"random_{kind}"] for r in rows]
        print(f"| {name} | {mean_std([r['floor'] for r in rows])} | {mean_std([r[f'random_{kind}'] for r in rows])} | "
              f"{mean_std([r[f'pretrained_{kind}'] for r in rows])} | {mean_std(gain)} | "
              f"{' / '.join(f'{g:+.1f}' for g in gain)} |")
    first = [r["online_probe"][0][1] for r in rows]
    last = [r["online_probe"][-1][1] for r in rows]
    print(f"\nonline ridge probe: step 0 (random init) {mean_std(first)}, step {rows[0]['online_probe'][-1][0]} "
          f"{mean_std(last)} (per seed {' / '.join(f'{b - a:+.1f}' for a, b in zip(first, last))})")
    print(f"collapse warnings: {sum(r['collapse_warning'] for r in rows)} of {len(rows)} runs; "
          f"demo wall time {mean_std([r['seconds'] for r in rows])} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo_seeds")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="DEMO_STEPS (default: the demo's own)")
    p.add_argument("--table", action="store_true", help="only print the table of OUT/demo_seeds.json")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "demo_seeds.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    if not args.table:
        for seed in args.seeds:
            if any(r["seed"] == seed and "failed" not in r for r in rows):
                continue
            row = run_demo(args.out, seed, args.steps)
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if r["seed"] != seed] + [row]
            with open(path, "w") as f:
                json.dump(rows, f, indent=1)
    print_table(sorted(rows, key=lambda r: r["seed"]))


if __name__ == "__main__":
    sys.exit(main())
