"""The scripts check of benchmarks/gpu_check.py: pretrain.py, probe_cgp.py and finetune.py run as a user runs
them, a few steps each on this run's device (--device cuda on a GPU), on the built-in demo sounds: their own
processes, command lines, device set-up, data loaders with pinned memory, feature cache and checkpoints. The
step checks time the training steps themselves; this one catches what lies around them, and records each
script's exit status, wall time (the three run side by side) and, when it fails, its last line."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from gpu_checks_common import ROOT, Context


def script_commands(ctx: Context) -> dict:
    """name -> argv of each script's short run. Independent of each other (the probe and the fine-tuning
    take a random encoder), so they run side by side."""
    plan, device, s = ctx.plan, ctx.device.type, ctx.scratch / "scripts"
    frames = "256" if ctx.cuda else "64"  # 2.56-s crops on a GPU, 0.64 s at toy size
    steps, workers = str(plan.script_steps), str(plan.script_workers)
    data = ["--train", str(s / "demo" / "train"), "--test", str(s / "demo" / "test"), "--device", device,
            "--workers", workers, "--max-seconds", "1", "--steps", steps, "--batch-size", "8",
            "--encoder", f"random:{plan.model}"]
    return {
        "pretrain": ["pretrain.py", "--model", plan.pretrain_model, "--steps", steps, "--batch-size", "4", "--views",
                     "2", "--target-frames", frames, "--demo-clips", "16", "--checkpoint-every", steps,
                     "--log-every", "1", "--workers", workers, "--device", device, "--out", str(s / "pretrain")],
        "probe_cgp": ["probe_cgp.py", *data, "--select", "none", "--prototypes", "16", "--out", str(s / "probe")],
        "finetune": ["finetune.py", *data, "--out", str(s / "finetune")]}


def parse_commands(commands: dict) -> None:
    """Each command line through its script's own parser, in this process: a flag that no longer exists
    fails here, before any run (parse_config exits on an unknown flag: that becomes an error)."""
    import importlib
    for name, argv in commands.items():
        module = importlib.import_module(argv[0].removesuffix(".py"))
        try:
            module.parse_config(argv[1:])
        except SystemExit as e:
            raise RuntimeError(f"{argv[0]} refuses the check's flags (exit {e.code}): {' '.join(argv[1:])}") from None


def finished(name: str, proc: subprocess.Popen, logs: Path, seconds: float) -> dict:
    out = {"status": "ok" if proc.returncode == 0 else "failed", "exit": proc.returncode, "seconds": round(seconds, 1)}
    if proc.returncode:
        text = (logs / f"{name}.err").read_text().strip() or (logs / f"{name}.out").read_text().strip()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        out["reason"] = f"{name} exited {proc.returncode}: " + (lines[-1][:400] if lines else "no output")
    return out


def check_scripts(ctx: Context) -> dict:
    logs = ctx.scratch / "scripts"
    commands = script_commands(ctx)
    parse_commands(commands)
    out = {"device_flag": ctx.device.type}
    if not ctx.cuda:  # toy size: pretrain.py shows the machinery works; the test suite runs every script on the CPU
        out.update({name: {"status": "skipped", "reason": "--smoke runs pretrain.py only; this command line was parsed"}
                    for name in commands if name != "pretrain"})
        commands = {"pretrain": commands["pretrain"]}
    logs.mkdir(parents=True, exist_ok=True)
    if set(commands) - {"pretrain"}:  # a labelled set for the probe and the fine-tuning (pretrain.py makes its own)
        made = subprocess.run([sys.executable, "-m", "bat.demo", "--out", str(logs / "demo"), "--clips-per-class", "4",
                               "--test-clips-per-class", "2"], capture_output=True, text=True, cwd=ROOT)
        if made.returncode:
            raise RuntimeError(f"python -m bat.demo exited {made.returncode}: {made.stderr.strip()[-300:]}")
    procs, t = {}, time.perf_counter()
    try:
        for name, argv in commands.items():  # side by side; output into files (a full pipe would stall them)
            with open(logs / f"{name}.out", "w") as o, open(logs / f"{name}.err", "w") as e:
                procs[name] = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=o, stderr=e)
        while procs:
            for name, proc in list(procs.items()):
                if proc.poll() is not None:
                    out[name] = finished(name, proc, logs, time.perf_counter() - t)
                    del procs[name]
            time.sleep(0.2)
    finally:  # the time box (or any error) must not leave a script running
        for proc in procs.values():
            proc.kill()
            proc.wait()
    return out
