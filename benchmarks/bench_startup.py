"""Start-up of a balanced multi-label run at AudioSet scale: time and memory of each stage before the first step.

    python benchmarks/bench_startup.py --clips 200000            # a tenth of AudioSet-2M; prints JSON
    python benchmarks/bench_startup.py --clips 2000000 --out runs/startup

Writes a synthetic AudioSet-like manifest (527 classes, Speech and Music dominating, 1-10 labels per clip,
paths that need not exist: listing a CSV opens no audio) and runs what probe_cgp.py and finetune.py do with
`--task as2m` before training: list the manifest (plan_runs), the balanced-sampling labels and weights, the
training and test data sets, the first epoch's first batch. Each stage reports seconds and the process's
resident memory before, after and at its peak (Linux /proc; the peak is reset per stage).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bat.sampler import EpochBatches, epoch_sampler  # noqa: E402
from bat.tasks import clip_geometry, datasets, plan_runs, resolve_task  # noqa: E402


def rss_gib(field="VmRSS") -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 2**20


class Stage:
    """with Stage(name, report): seconds and resident memory (before, after, peak) of the block."""

    def __init__(self, name, report):
        self.name, self.report = name, report

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM, the peak
            fh.write("5")
        self.before, self.t0 = rss_gib(), time.perf_counter()

    def __exit__(self, *exc):
        row = {"stage": self.name, "seconds": round(time.perf_counter() - self.t0, 3), "rss_before_gib":
               round(self.before, 3), "rss_after_gib": round(rss_gib(), 3), "peak_gib": round(rss_gib("VmHWM"), 3)}
        self.report.append(row)
        print(f"{row['stage']:38s} {row['seconds']:7.2f} s  rss {row['rss_before_gib']:6.2f} -> "
              f"{row['rss_after_gib']:6.2f} GiB (peak {row['peak_gib']:6.2f})", file=sys.stderr, flush=True)


def write_manifest(path, clips, seed=0):
    """An AudioSet-like `path,labels` manifest: 527 class names, a long-tailed label distribution."""
    rng = random.Random(seed)
    classes = [f"class {i:03d}" for i in range(527)]
    weights = [1.0 / (r + 1) ** 1.1 for r in range(527)]
    weights[0] = weights[1] = 8 * weights[2]  # Speech and Music dominate AudioSet
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "labels"])
        for i in range(clips):
            labels = sorted(set(rng.choices(classes, weights, k=min(10, 1 + int(rng.expovariate(0.55))))))
            w.writerow([f"/data/audioset/unbalanced_train_segments/Y{i:011d}.wav", ";".join(labels)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=200_000, help="training clips (AudioSet-2M: about 2,000,000)")
    p.add_argument("--test-clips", type=int, default=20_000)
    p.add_argument("--out", default=None, help="folder for the manifests (default: a temporary one)")
    a = p.parse_args(argv)
    folder = a.out or tempfile.mkdtemp(prefix="bat_startup_")
    os.makedirs(folder, exist_ok=True)
    train, test = os.path.join(folder, "train.csv"), os.path.join(folder, "test.csv")
    write_manifest(train, a.clips, seed=0)
    write_manifest(test, a.test_clips, seed=0)  # the training manifest's first rows: only classes it holds
    task, report = resolve_task("as2m"), []
    with Stage("list the manifests (plan_runs)", report):
        run = plan_runs(train, test, log=lambda *_: None)[0]
    classes = run.train.classes
    with Stage("balanced-sampling labels", report):
        labels = run.train.sampling_labels(classes)
    with Stage("balanced sampler (weights)", report):
        sampler = epoch_sampler(len(run.train), labels, True, None, len(classes))
    clip_samples, _ = clip_geometry(task, run.train)
    with Stage("training data set", report):
        data = datasets(task, run.train, classes, clip_samples, {"kind": "bat"}, train=True)
    with Stage("test data set", report):
        datasets(task, run.test, classes, clip_samples, {"kind": "bat"})
    with Stage("first epoch's draw and first batch", report):
        next(iter(EpochBatches(sampler, 48, draws=(0, 0))))
    print(json.dumps({"clips": a.clips, "classes": len(classes), "training_items": len(data),
                      "max_rss_gib": round(max(r["peak_gib"] for r in report), 3),
                      "stages": report}, indent=1))


if __name__ == "__main__":
    main()
