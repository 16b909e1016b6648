"""What a probe_cgp.py run leaves behind: DIR/probe.safetensors (with the metadata export.py reads),
metrics.json, gates.png and the summary on stdout, for clip probes (one run or ESC-50's folds) and for the
frame-wise SED and ASR probes.
"""
from __future__ import annotations

import dataclasses
import os

from bat import selection
from bat.files import lock_out, write_json
from bat.metrics import summarise
from bat.plots import save_gates_png, text_bars
from bat.probes import save_probe
from bat.tasks import warmup_steps


def file_metadata(cfg, metrics, run_name):
    """What export.py and users read from probe.safetensors besides the weights: the task recipe and the
    model's input window (clip_samples waveform samples -> target_frames spectrogram frames)."""
    return {"trained_by": "probe_cgp.py", "task_name": cfg.task, "clip_samples": metrics["clip_samples"],
            "target_frames": metrics["target_frames"], "run": run_name}


def run_line(cfg, task, run, val, split, head, clip_samples, frames, world, lrs=None, every=0):
    """The line a clip probe prints before it trains: data, geometry, head, schedule (and the selection)."""
    line = (f"[{run.name}] task {task.name}: {run.train.task}, {len(run.train.classes)} classes, {len(run.train)} "
            f"train / {len(val) if val is not None else 0} {split} / {len(run.test)} test clips, clips "
            f"{clip_samples / task.sample_rate:.2f} s -> {frames} frames, {cfg.probe} head "
            f"{sum(p.numel() for p in head.parameters()):,} parameters, {cfg.steps} steps x {cfg.batch_size}"
            f"{f' over {world} processes' if world > 1 else ''}, warm-up {warmup_steps(cfg)}, weight decay "
            f"{cfg.weight_decay}")
    if lrs:
        line += (f"; lr {', '.join(f'{lr:g}' for lr in lrs)}, each until the held-out score has not improved for "
                 f"{cfg.patience} evaluations (every {every} steps; --steps is the cap)")
    return line


def write_config(cfg, device, encoder, **extra):
    """DIR/config.json: the run's settings, device and encoder, and what the run adds (classes, front-end, ...).
    Locks DIR first: a second copy of the same command stops instead of writing beside this one."""
    lock_out(cfg.out)
    write_json(os.path.join(cfg.out, "config.json"), {"written_by": "probe_cgp.py", **dataclasses.asdict(cfg),
                                                      "device": str(device), "model_config": encoder.cfg.to_dict(),
                                                      **extra})


def write_fold(cfg, run_name, probe, metrics):
    """--fold all: each fold's probe and metrics in DIR/<fold>/ (the top level holds mean and std)."""
    fold_dir = os.path.join(cfg.out, run_name)
    os.makedirs(fold_dir, exist_ok=True)
    save_probe(os.path.join(fold_dir, "probe.safetensors"), probe, file_metadata(cfg, metrics, run_name))
    write_json(os.path.join(fold_dir, "metrics.json"), {"task": probe.task, **metrics})


def print_summary(title, metrics, std=None):
    print(f"\n{title}:")
    print("\n".join([summarise(metrics, std), *selection.summary_lines(metrics)]))
    if metrics.get("gate_weights"):
        print("gate weights (softmax over layers):\n" + text_bars(metrics["gate_weights"]))


def write_outputs(cfg, task, results, metrics, std, skips, seconds):
    """DIR/probe.safetensors (the last run's head), metrics.json, gates.png, and the summary on stdout."""
    save_probe(os.path.join(cfg.out, "probe.safetensors"), results[-1][1],
               file_metadata(cfg, results[-1][2], results[-1][0]))
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    written = ["config.json", "probe.safetensors", "metrics.json"]
    if metrics["gate_weights"] is not None:  # LP and ProtoBin have no gate: no chart
        name = os.path.basename(cfg.encoder.rstrip("/"))
        title = f"{cfg.probe.upper()} layer weights: {name} on {task.name} ({os.path.basename(cfg.train.rstrip('/'))}" \
                f"{', mean of ' + str(len(results)) + ' folds' if len(results) > 1 else ''})"
        save_gates_png(os.path.join(cfg.out, "gates.png"), metrics["gate_weights"], title,
                       metrics.get("gate_weights_std"))
        written.append("gates.png")
    if skips.count:
        print(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
    print_summary(f"{cfg.probe.upper()} on {cfg.train}, task {task.name} ({len(results)} run(s), {seconds:.0f} s)",
                  metrics, std)
    print(f"wrote {cfg.out}/{', '.join(written)}")


def write_frame_outputs(cfg, probe, metrics, extra, depth):
    """The SED and ASR probes' DIR/probe.safetensors, metrics.json, gates.png (a one-hot chart for the ASR
    head, which reads the last layer) and summary."""
    kind = probe.task if probe.task == "asr" else "sed"
    save_probe(os.path.join(cfg.out, "probe.safetensors"), probe,
               {"trained_by": "probe_cgp.py", "task_name": cfg.task, **extra})
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    gates = metrics["gate_weights"] or [0.0] * (depth - 1) + [1.0]
    save_gates_png(os.path.join(cfg.out, "gates.png"), gates,
                   f"{kind.upper()} {cfg.probe if kind == 'sed' else 'asr'} layer weights")
    print_summary(f"{'ASR' if kind == 'asr' else cfg.probe.upper() + ' frame-wise'} probe on {cfg.train}, task "
                  f"{cfg.task}", metrics)
    print(f"wrote {cfg.out}/config.json, probe.safetensors, metrics.json, gates.png")
