"""Does the pipeline learn on real audio? Random init vs a short BAT pretraining, on two real sets.

Builds the `sfx` (13 sound-event classes) and `drums` (8 drum-hit classes, kit-disjoint split) sets
with the project's data tool `make_audio_sets.py` (it lives outside this repository, in the shared
folder next to it: pass its location with --sets-tool), pretrains a tiny BAT on their training audio
(labels unused), then reports test accuracy of CGP, linear probing and fine-tuning for a random-init
encoder and for the pretrained one, as a markdown table and JSON (DIR/results.json, DIR/results.md).

    python benchmarks/real_audio.py --sets-tool ../shared/data/make_audio_sets.py --out runs/real_audio

Everything runs the repository's own scripts as a user would (pretrain.py, probe_cgp.py,
finetune.py), so the numbers come from exactly the code paths the README documents. All seeds are
fixed (--seed); re-running gives the same table up to thread-level float nondeterminism.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = ("sfx", "drums")


def run(cmd: list[str], log: Path) -> float:
    """Run one of the project's scripts, log its output, return wall seconds; fail loudly."""
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- last lines of {log}:\n"
                 + "".join(open(log).readlines()[-20:]))
    return time.time() - t


def build_sets(tool: Path, data: Path) -> None:
    for name in SETS:
        if not (data / name / "train.csv").exists():
            run([sys.executable, str(tool), name, "--out", str(data / name)], data / f"build_{name}.log")


def pretraining_manifest(data: Path, out: Path) -> Path:
    """One CSV listing the training audio of both sets (absolute paths; test audio never used)."""
    path = out / "pretrain_audio.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        for name in SETS:
            for row in csv.DictReader(open(data / name / "train.csv")):
                w.writerow([str((data / name / row["path"]).resolve())])
    return path


def accuracy(metrics_file: Path) -> float:
    return float(json.load(open(metrics_file))["accuracy"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets-tool", type=Path, default=ROOT.parent / "shared" / "data" / "make_audio_sets.py")
    p.add_argument("--data", type=Path, default=None, help="where the sets are built (default OUT/data)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real_audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--probe-steps", type=int, default=1000)
    p.add_argument("--finetune-steps", type=int, default=600)
    p.add_argument("--finetune-lr", type=float, default=5e-4, help="REF's 5e-5 is for base models and 40k steps")
    p.add_argument("--prototypes", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--clip-seconds", type=float, default=5.0, help="probe/fine-tune window (first seconds in eval)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    out, data = args.out.resolve(), (args.data or args.out / "data").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    if not args.sets_tool.exists():
        sys.exit(f"make_audio_sets.py not found at {args.sets_tool}; pass --sets-tool PATH")
    build_sets(args.sets_tool.resolve(), data)

    py, seed, dev = sys.executable, str(args.seed), args.device
    timings = {}
    pre_dir = out / "pretrain"
    timings["pretrain"] = run([py, "pretrain.py", "--model", "tiny", "--data", str(pretraining_manifest(data, out)),
                               "--out", str(pre_dir), "--steps", str(args.pretrain_steps), "--seed", seed,
                               "--device", dev], out / "pretrain.log")
    encoders = {"random init": "random:tiny", "BAT pretrained": str(pre_dir / "encoder.safetensors")}

    rows = []
    for name in SETS:
        train, test = str(data / name / "train"), str(data / name / "test")
        for enc_name, enc in encoders.items():
            tag = f"{name}-{'random' if enc.startswith('random') else 'pretrained'}"
            row = {"set": name, "encoder": enc_name}
            for probe in ("cgp", "lp"):
                d = out / f"{tag}-{probe}"
                timings[d.name] = run([py, "probe_cgp.py", "--encoder", enc, "--train", train, "--test", test,
                                       "--out", str(d), "--probe", probe, "--prototypes", str(args.prototypes),
                                       "--steps", str(args.probe_steps), "--batch-size", str(args.batch_size),
                                       "--seed", seed, "--device", dev, "--cache-features",
                                       "--max-seconds", str(args.clip_seconds)], d.with_suffix(".log"))
                row[probe] = accuracy(d / "metrics.json")
            d = out / f"{tag}-finetune"
            timings[d.name] = run([py, "finetune.py", "--encoder", enc, "--train", train, "--test", test,
                                   "--out", str(d), "--task", "generic", "--steps", str(args.finetune_steps),
                                   "--lr", str(args.finetune_lr), "--warmup-steps", str(max(1, args.finetune_steps // 10)),
                                   "--batch-size", str(args.batch_size), "--seed", seed, "--device", dev,
                                   "--max-seconds", str(args.clip_seconds)],
                                  d.with_suffix(".log"))
            row["finetune"] = accuracy(d / "metrics.json")
            rows.append(row)
            print(json.dumps(row), flush=True)

    table = ["| set | encoder | CGP acc | linear probe acc | fine-tune acc |", "|---|---|---|---|---|"]
    table += [f"| {r['set']} | {r['encoder']} | {100 * r['cgp']:.1f} | {100 * r['lp']:.1f} | {100 * r['finetune']:.1f} |"
              for r in rows]
    result = {"rows": rows, "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": timings}
    json.dump(result, open(out / "results.json", "w"), indent=2)
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
