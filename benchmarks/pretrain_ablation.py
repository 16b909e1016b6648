"""Why does small-scale pretraining lose information? Runs pretrain.py in variants of one preset and measures,
for each: the online ridge probe over steps (log.jsonl's probe_acc; step 0 is the random init), and per
layer the spread (std) and effective rank of the frozen encoder's features on labelled clips, pretrained vs
its random twin (the same configuration, weights drawn with the run's seed).

    python benchmarks/pretrain_ablation.py --out runs/ablation --variants preset ema_ref ema_fast --seeds 0
    python benchmarks/pretrain_ablation.py --out runs/ablation --steps 1500 --data POOL.csv --probe-data drums/train

    python benchmarks/pretrain_ablation.py --out runs/ablation --table   # mean ± std over seeds, markdown

Also per block: the same ridge probe on [CLS, mean patch], CLS only, mean patch only, and on all blocks
concatenated (an all-layer readout, like CGP's), for the run and its random twin.
Prints one table row per (variant, seed) and writes OUT/ablation.json. Each variant is a set of
pretrain.py flags on top of `--model tiny --steps N` (the demo: 300 steps, warm-up 50).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bat  # noqa: E402
from bat.demo import DEMO_CLASSES, demo_clip  # noqa: E402
from bat.data import SkipLog  # noqa: E402
from bat.model import Encoder  # noqa: E402
from bat.online_probe import probe_set, ridge_probe_accuracy  # noqa: E402
from bat.pretraining import crop_samples  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer_probe import load as load_encoder_or_teacher  # noqa: E402  (DIR/state.pt:teacher: the EMA teacher)

# REF tuned its knobs for 400k-step runs; each variant changes one of them for a short run.
VARIANTS = {
    "preset": [],
    "ema_ref": ["--ema-start", "0.9998", "--ema-end", "0.99999", "--ema-anneal-steps", "100000"],  # REF's EMA
    "ema_fast": ["--ema-start", "0.99", "--ema-end", "0.999", "--ema-anneal-steps", "{steps}"],
    "ema_slow": ["--ema-start", "0.999", "--ema-end", "0.9999", "--ema-anneal-steps", "{steps}"],
    "lr_low": ["--lr", "1.5e-4"],
    "lr_high": ["--lr", "1.5e-3"],
    "warmup_long": ["--warmup-steps", "{steps_third}"],
    "mask_0.6": ["--mask-ratio", "0.6"],
    "views_8": ["--views", "8"],
    "no_centring": ["--no-center-targets"],
    "crop_0.96s": ["--target-frames", "96"],
    # combinations and a lower lr (2026-12-04, after the seed-0 table above: lr, mask and a slow EMA helped)
    "lr_5e-5": ["--lr", "5e-5"],
    "lr_low_mask_0.6": ["--lr", "1.5e-4", "--mask-ratio", "0.6"],
    "lr_low_ema_slow": ["--lr", "1.5e-4", "--ema-start", "0.999", "--ema-end", "0.9999", "--ema-anneal-steps", "{steps}"],
    "lr_low_mask_ema": ["--lr", "1.5e-4", "--mask-ratio", "0.6", "--ema-start", "0.999", "--ema-end", "0.9999",
                        "--ema-anneal-steps", "{steps}"],
    "lr_5e-5_mask_0.6": ["--lr", "5e-5", "--mask-ratio", "0.6"],
    "lr_low_mask_0.4": ["--lr", "1.5e-4", "--mask-ratio", "0.4"],
    "lr_low_views_8": ["--lr", "1.5e-4", "--views", "8"],
    "lr_low_batch_16": ["--lr", "1.5e-4", "--batch-size", "16"],
    "lr_low_wd_0": ["--lr", "1.5e-4", "--weight-decay", "0"],
}


def run_variant(name, seed, args, out):
    run_dir = os.path.join(out, f"{name}_s{seed}")
    flags = [f.format(steps=args.steps, steps_third=max(1, args.steps // 3)) for f in VARIANTS[name]]
    cmd = [sys.executable, os.path.join(args.repo, "pretrain.py"), "--model", "tiny", "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup), "--seed", str(seed), "--probe-data", args.probe_data,
           "--probe-every", str(max(1, args.steps // 6)), "--checkpoint-every", str(args.steps), "--out", run_dir,
           *(["--data", args.data] if args.data else []), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": args.repo}
    t0 = time.time()
    with open(run_dir + ".log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.repo).returncode
    if rc != 0:
        return {"variant": name, "seed": seed, "failed": f"pretrain.py exited {rc}; see {run_dir}.log"}
    records = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    curve = [(r["step"], r["probe_acc"]) for r in records if "probe_acc" in r]
    return {"variant": name, "seed": seed, "flags": flags, "seconds": time.time() - t0, "probe_curve": curve,
            "encoder": os.path.join(run_dir, "encoder.safetensors")}


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of centred features [N, D] (Roy and Vetterli, 2007)."""
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


@torch.no_grad()
def layer_stats(encoder, spec):
    """Per block: std over clips of the CLS + mean-patch features, and their effective rank."""
    layers = encoder.forward_layers(spec)  # (L, N, 1 + P, D)
    feats = torch.cat([layers[:, :, 0], layers[:, :, 1:].mean(2)], -1)
    return [{"std": float(f.std(0).mean()), "effective_rank": effective_rank(f)} for f in feats]


@torch.no_grad()
def layer_probes(encoder, probe):
    """Ridge probe accuracy (the online probe's) per block on [CLS, mean patch], CLS only, mean patch only,
    and on every block's [CLS, mean patch] concatenated (an all-layer readout, as CGP reads all blocks)."""
    specs, labels, is_test = probe
    layers = torch.cat([encoder.forward_layers(c.float()) for c in specs.split(32)], dim=1)  # (L, M, 1+P, D)
    cls, mean = layers[:, :, 0], layers[:, :, 1:].mean(2)

    def acc(x):
        return ridge_probe_accuracy(x[~is_test], labels[~is_test], x[is_test], labels[is_test], int(labels.max()) + 1)

    both = torch.cat([cls, mean], -1)
    return {"cls_mean": [acc(f) for f in both], "cls": [acc(f) for f in cls], "mean": [acc(f) for f in mean],
            "all_layers": acc(both.permute(1, 0, 2).reshape(both.shape[1], -1))}


def demo_spectrograms(n, target_frames, seed=99):
    x = np.stack([demo_clip(i, seed=seed, seconds=1.0)[0] for i in range(n)])
    return bat.spectrogram(torch.from_numpy(x), target_frames=target_frames)


_PROBES = {}


def online_probe_set(target_frames):
    """pretrain.py's --probe-data demo set for the tiny preset (300 clips, 70 % fit / 30 % scored)."""
    if target_frames not in _PROBES:
        _PROBES[target_frames] = probe_set("demo", 300, crop_samples(target_frames), target_frames, SkipLog())
    return _PROBES[target_frames]


_HELD_OUT = {}


def held_out_set(target_frames, clips=1200):
    """A larger, separate scoring set than the online probe's (90 scored clips, 1.1 points each): `clips` demo
    clips drawn with another generator seed than the pretraining pool's, a random half fitted, half scored."""
    if target_frames not in _HELD_OUT:
        labels = torch.tensor([i % len(DEMO_CLASSES) for i in range(clips)])
        is_test = torch.from_numpy(np.random.default_rng(0).random(clips) < 0.5)
        _HELD_OUT[target_frames] = (demo_spectrograms(clips, target_frames, seed=77), labels, is_test)
    return _HELD_OUT[target_frames]


def held_out_probes(row, enc, twin):
    """Ridge probe on the last block and on all blocks, on held_out_set: student, EMA teacher, random twin."""
    data = held_out_set(enc.cfg.chunk_patches * 16)
    teacher = load_encoder_or_teacher(os.path.join(os.path.dirname(row["encoder"]), "state.pt:teacher"))
    row["held_out"] = {}
    for name, model in (("student", enc), ("teacher", teacher), ("twin", twin)):
        p = layer_probes(model, data)
        row["held_out"][name] = {"last": p["cls_mean"][-1], "all_layers": p["all_layers"]}
    return row


def summarise(row, spec):
    enc = bat.load_encoder(row["encoder"]).eval()
    torch.manual_seed(row["seed"])
    twin = Encoder(enc.cfg)
    twin.init_pretraining_weights()
    twin.eval()
    if "layer_probe" not in row:
        probe = online_probe_set(enc.cfg.chunk_patches * 16)
        row["layers"] = layer_stats(enc, spec)
        row["layers_random_twin"] = layer_stats(twin, spec)
        row["layer_probe"] = layer_probes(enc, probe)
        row["layer_probe_random_twin"] = layer_probes(twin, probe)
    return held_out_probes(row, enc, twin)


def mean_std(values):
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def print_table(rows, variants):
    """Markdown: per variant, mean ± std over its seeds (sample std)."""
    print("| variant | change | seeds | probe step 0 | probe step 300 | best block (CLS+mean) | all blocks | "
          "last-block rank | twin: last block / all blocks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        rs = [r for r in rows if r["variant"] == name and "failed" not in r and "layer_probe" in r]
        if not rs:
            continue
        lp = [r["layer_probe"]["cls_mean"] for r in rs]
        best = int(np.argmax(np.mean(lp, 0)))
        print(f"| {name} | {' '.join(rs[0]['flags']) or '(tiny preset)'} | {len(rs)} | "
              f"{mean_std([r['probe_curve'][0][1] for r in rs])} | {mean_std([r['probe_curve'][-1][1] for r in rs])} | "
              f"{best + 1}: {mean_std([x[best] for x in lp])} | {mean_std([r['layer_probe']['all_layers'] for r in rs])} | "
              f"{mean_std([r['layers'][-1]['effective_rank'] for r in rs])} | "
              f"{mean_std([r['layer_probe_random_twin']['cls_mean'][-1] for r in rs])} / "
              f"{mean_std([r['layer_probe_random_twin']['all_layers'] for r in rs])} |")
    print("\nHeld-out ridge probe (600 clips fitted, 600 scored; last block / all blocks):\n")
    print("| variant | steps | seeds | student | EMA teacher | random twin | student - twin |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        rs = [r for r in rows if r["variant"] == name and "held_out" in r]
        if not rs:
            continue
        h = {k: [r["held_out"][k] for r in rs] for k in ("student", "teacher", "twin")}
        cell = lambda k: f"{mean_std([x['last'] for x in h[k]])} / {mean_std([x['all_layers'] for x in h[k]])}"  # noqa: E731
        gain = [s["last"] - t["last"] for s, t in zip(h["student"], h["twin"])]
        gain_all = [s["all_layers"] - t["all_layers"] for s, t in zip(h["student"], h["twin"])]
        print(f"| {name} | {rs[0]['probe_curve'][-1][0]} | {len(rs)} | {cell('student')} | {cell('teacher')} | "
              f"{cell('twin')} | {mean_std(gain)} / {mean_std(gain_all)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per run (the demo: 300)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps (the demo: 50)")
    p.add_argument("--data", default=None, help="pretraining data (default: the built-in demo set)")
    p.add_argument("--probe-data", default="demo", help="labelled set of the online probe (default: demo)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repo", default=ROOT, help="the checkout whose pretrain.py runs")
    p.add_argument("--table", action="store_true", help="only print the mean ± std table of OUT/ablation.json")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    spec = demo_spectrograms(6 * len(DEMO_CLASSES) * 4, 128)
    path = os.path.join(args.out, "ablation.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    if args.table:
        print_table(rows, args.variants)
        return
    stale = [r for r in rows if "failed" not in r and "held_out" not in r and os.path.exists(r["encoder"])]
    for r in stale:  # rows of an older version of this script: add the missing probes (no training)
        summarise(r, spec)
    if stale:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    done = {(r["variant"], r["seed"]) for r in rows if "failed" not in r}
    print(f"{'variant':<12} {'seed':>4} {'probe step 0':>12} {'probe last':>10} {'rank last':>9} {'rank twin':>9} {'s':>6}")
    for seed in args.seeds:
        for name in args.variants:
            if (name, seed) in done:
                continue
            row = run_variant(name, seed, args, args.out)
            if "failed" not in row:
                row = summarise(row, spec)
                c = row["probe_curve"]
                print(f"{name:<12} {seed:>4} {c[0][1]:12.3f} {c[-1][1]:10.3f} {row['layers'][-1]['effective_rank']:9.1f} "
                      f"{row['layers_random_twin'][-1]['effective_rank']:9.1f} {row['seconds']:6.0f}", flush=True)
            else:
                print(f"{name:<12} {seed:>4} {row['failed']}", flush=True)
            rows = [r for r in rows if (r["variant"], r["seed"]) != (name, seed)] + [row]
            with open(path, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
