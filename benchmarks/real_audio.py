"""Does pretraining beat random initialisation on real audio? Seeds x {random, pretrained} x {CGP, LP}.

Uses two small real labelled sets, `sfx` (13 sound-event classes) and `drums` (8 drum-hit classes,
kit-disjoint split), built by the project's data tool `make_audio_sets.py` (it lives outside this
repository: pass its location with --sets-tool, or point --data at a folder that already holds
sfx/ and drums/). For every seed it pretrains a tiny BAT on the *training* audio of both sets (labels
unused; the drums training set doubles as pretrain.py's --probe-data, so DIR/seedS/pretrain/curves.png
shows the online probe against the random-init start), then probes the random-init encoder and the
pretrained one on each set's test split with probe_cgp.py (CGP and the linear probe). The random-init
encoder has the pretrained one's configuration (the same positional grid, so the same chunk length) and
differs only in its weights. It also scores the classical floor: per-mel-band mean and std over time
with a logistic regression.

    python benchmarks/real_audio.py --data /path/to/sets --out runs/real_audio              # 3 seeds
    python benchmarks/real_audio.py --sets-tool ../shared/data/make_audio_sets.py --seeds 0   # build sets, 1 seed
    python benchmarks/real_audio.py --data DATA --out runs/real_audio --lr-grid 0.001 0.003 0.01 0.03 0.1
                                                           # the same runs, probed with a wider lr grid

Prints one JSON line per probe run as it goes, then a markdown table of mean +- std over seeds and the
pretraining wall time (DIR/results.md, DIR/results.json). Everything runs the repository's scripts as a
user would, so the numbers come from the code paths the README documents. Re-running skips the runs
whose outputs exist (delete DIR to start over).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SETS = ("sfx", "drums")
PROBES = ("cgp", "lp")


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


def build_sets(tool: Path | None, data: Path) -> None:
    for name in SETS:
        if (data / name / "train.csv").exists():
            continue
        if tool is None or not tool.exists():
            sys.exit(f"{data / name}/train.csv not found and no make_audio_sets.py to build it: pass --sets-tool PATH "
                     "or --data DIR holding sfx/ and drums/")
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


def classical_floor(data: Path, seconds: float) -> dict[str, float]:
    """Test accuracy of a logistic regression on each mel band's mean and std over time."""
    from layer_probe import load_split, logreg_accuracy, mel_stats

    out = {}
    for name in SETS:
        tr = load_split(data / name / "train.csv", seconds)
        te = load_split(data / name / "test.csv", seconds, tr[3])
        out[name] = logreg_accuracy(mel_stats(tr[0], tr[1]), tr[2], mel_stats(te[0], te[1]), te[2])
    return out


def pretrain(args, seed: int, manifest: Path, data: Path, out: Path) -> float:
    """One tiny pretraining run; returns its wall seconds (read back from the log when it exists)."""
    d = out / "pretrain"
    if (d / "encoder.safetensors").exists() and (out / "pretrain_seconds.txt").exists():
        return float((out / "pretrain_seconds.txt").read_text())
    cmd = [sys.executable, "pretrain.py", "--model", "tiny", "--data", str(manifest), "--out", str(d),
           "--seed", str(seed), "--device", args.device, "--probe-data", str(data / "drums" / "train.csv"),
           *(["--steps", str(args.pretrain_steps)] if args.pretrain_steps else []), *args.pretrain_args]
    seconds = run(cmd, out / "pretrain.log")
    (out / "pretrain_seconds.txt").write_text(f"{seconds:.1f}")
    return seconds


def random_twin(pretrained: Path, seed: int, path: Path) -> str:
    """The baseline: a random-init encoder with the pretrained one's exact configuration (width, depth,
    positional grid, so the same chunk length on the probe's 3-s inputs) and front-end, drawn with this
    seed. `random:tiny` would not do: its grid is 10.24 s, so it would read the probe's inputs in one
    chunk where the pretrained encoder reads them in chunks of its training crop."""
    if not path.exists():
        import torch

        from bat.checkpoint import load_encoder, save_encoder
        from bat.model import Encoder

        trained = load_encoder(str(pretrained))
        torch.manual_seed(seed)
        twin = Encoder(trained.cfg)
        twin.init_pretraining_weights()
        save_encoder(path, twin, trained.frontend_config)
    return str(path)


def probe(args, encoder: str, seed: int, name: str, kind: str, data: Path, d: Path) -> float:
    if not (d / "metrics.json").exists():
        run([sys.executable, "probe_cgp.py", "--encoder", encoder, "--train", str(data / name / "train.csv"),
             "--test", str(data / name / "test.csv"), "--out", str(d), "--probe", kind,
             "--prototypes", str(args.prototypes), "--steps", str(args.probe_steps), "--batch-size", str(args.batch_size),
             "--seed", str(seed), "--device", args.device, "--max-seconds", str(args.clip_seconds),
             *(["--lr-grid", *map(str, args.lr_grid)] if args.lr_grid else [])], d.with_suffix(".log"))
    return float(json.load(open(d / "metrics.json"))["accuracy"])


def mean_std(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def table(rows: list[dict], floor: dict, seconds: list[float]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); accuracy % on the test split, mean ± std over seeds; "
             f"pretraining wall time {statistics.mean(seconds) / 60:.1f} min per seed",
             "", "| set | probe | random init | BAT pretrained | gain | classical floor |", "|---|---|---|---|---|---|"]
    for name in SETS:
        for kind in PROBES:
            acc = {enc: [r["accuracy"] for r in rows if (r["set"], r["probe"], r["encoder"]) == (name, kind, enc)]
                   for enc in ("random", "pretrained")}
            gains = [p - r for r, p in zip(acc["random"], acc["pretrained"])]
            lines.append(f"| {name} | {kind.upper()} | {mean_std(acc['random'])} | {mean_std(acc['pretrained'])} | "
                         f"{'+' if statistics.mean(gains) >= 0 else ''}{mean_std(gains)} | {100 * floor[name]:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets-tool", type=Path, default=ROOT.parent / "shared" / "data" / "make_audio_sets.py")
    p.add_argument("--data", type=Path, default=None, help="folder with sfx/ and drums/ (default OUT/data, built)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real_audio")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the tiny preset's")
    p.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                   help="any further pretrain.py flags (last on the line), e.g. --pretrain-args --lr 1e-3")
    p.add_argument("--probe-steps", type=int, default=500)
    p.add_argument("--prototypes", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--clip-seconds", type=float, default=3.0, help="probe window (the first seconds of each clip)")
    p.add_argument("--lr-grid", type=float, nargs="+", default=None,
                   help="probe_cgp.py's --lr-grid for every probe (default: its own); the probes and results files "
                        "get a -lrgrid suffix, so the same pretraining runs can be probed both ways")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    out = args.out.resolve()
    data = (args.data or out / "data").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    build_sets(args.sets_tool.resolve() if args.sets_tool else None, data)
    manifest = pretraining_manifest(data, out)
    floor = classical_floor(data, args.clip_seconds)
    print(json.dumps({"classical_floor": floor}), flush=True)

    tag = "-lrgrid" if args.lr_grid else ""
    rows, seconds = [], []
    for seed in args.seeds:
        sd = out / f"seed{seed}"
        sd.mkdir(exist_ok=True)
        seconds.append(pretrain(args, seed, manifest, data, sd))
        trained = sd / "pretrain" / "encoder.safetensors"
        encoders = {"random": random_twin(trained, seed, sd / "random_init.safetensors"), "pretrained": str(trained)}
        for name in SETS:
            for kind in PROBES:
                for enc, path in encoders.items():
                    folder = sd / f"{name}-{'init' if enc == 'random' else enc}-{kind}{tag}"
                    row = {"seed": seed, "set": name, "probe": kind, "encoder": enc,
                           "accuracy": probe(args, path, seed, name, kind, data, folder)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        md = table(rows, floor, seconds)  # rewritten after every seed: a cut-short run still leaves a table
        (out / f"results{tag}.md").write_text(md + "\n")
        json.dump({"rows": rows, "classical_floor": floor, "pretrain_seconds": seconds,
                   "settings": {k: str(v) for k, v in vars(args).items()}}, open(out / f"results{tag}.json", "w"), indent=2)
    print(md)


if __name__ == "__main__":
    main()
