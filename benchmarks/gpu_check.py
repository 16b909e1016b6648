"""Every check that needs a GPU, in one command that fits a short GPU loan (at most 8 minutes).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu        # full size, on CUDA (else all skipped)
    python benchmarks/gpu_check.py --out /tmp/gc --smoke                # toy sizes on whatever device exists
    bash benchmarks/gpu_check.sh [DIR]                                  # the command to hand a lent GPU machine

Writes DIR/gpu_check.json, rewritten after every check (a run cut short keeps what it measured):
    {"device", "torch", "onnxruntime", "providers", "mode", "plan", "seconds",
     "checks": {NAME: {"status": "ok" | "skipped" | "failed", "reason", figures...}}}
and exits non-zero only when a check failed (skipped is fine: no CUDA, no CUDA execution provider, a
missing package). Each check runs in its own try/except and time box; `reason` is the last line of
the error.

The checks (full size: base encoder, pretrain.py's base preset, 10-s clips):
  pretrain_step     one pretraining step of pretrain.py (teacher targets, student on the kept patches of
                    every view, decoder, loss, backward, AdamW, EMA) at REF's per-GPU load, bf16 autocast:
                    steps/s, clips/s, peak memory, MFU = analytic model FLOPs per step / time / the GPU's
                    dense bf16 peak (see model_flops_pretrain; a profiler count is given beside it)
  pretrain_compile  the same step with torch.compile (student and teacher, as pretrain.py --compile), and
                    the compile time (the first step)
  sdpa_backend      which attention kernel F.scaled_dot_product_attention can use (each backend forced in
                    turn) and which one the encoder really runs (the profiler's aten op), for the encoder's
                    shapes: full clip, the student's kept patches, chunked input with a key mask
  probe_features    frozen feature extraction (encoder.forward_layers on spectrograms) in fp32 and bf16:
                    clips/s each, and how far bf16 is from fp32 (max abs diff, CLS cosine, top-1
                    agreement of a random linear head)
  probe_step        probe_cgp.py's CGP training step on cached features (10,000 prototypes, bf16): steps/s and
                    peak memory with bat.heads' sparse min/max backward and with autograd's dense one, and
                    how far their prototype gradients are apart
  finetune_step     one fine-tuning step (encoder with drop-path + LayerNorm/Linear head, BCE, AdamW, bf16):
                    steps/s, clips/s, peak memory, MFU
  scripts           pretrain.py, probe_cgp.py and finetune.py as a user runs them (--device cuda), 3 steps
                    each on the built-in demo sounds: exit status and wall time (device set-up, loaders,
                    feature cache, checkpoints: what the step checks leave out)
  export_parity     export.py's fp32 and fp16 ONNX graphs on the CUDA execution provider against fp32
                    PyTorch: max abs diff (fp32 fails above 1e-3), embedding cosine (fp16 fails below
                    0.999), top-1 agreement of a random linear head (reported), and where ORT placed
                    the nodes (a float node on the CPU provider is a fallback and fails the check)
  tagger_latency    batch 1 and 32 of 10-s clips, fp32 and fp16: onnxruntime with I/O binding against
                    PyTorch eager on the same device (ms per batch, speed-up)

--smoke runs them all at toy size (tiny encoder, a few clips, one or two timed steps) on whatever device
exists: on 2 CPU cores in about a minute, a third of it export.py's own export. What only exists on CUDA
(the CUDA provider, fp16 graphs) is then "skipped" with the reason; torch.compile uses the "eager" backend
(the same graph capture; inductor would spend minutes compiling C++ on a CPU). tests/test_gpu_check.py runs it.

This file is the entry: the plan of sizes, the check runner (time boxes, statuses), the environment and
the JSON. The checks live beside it: gpu_checks_train.py (pretrain_step, pretrain_compile, sdpa_backend,
probe_features, finetune_step), gpu_checks_scripts.py (scripts), gpu_checks_onnx.py (export_parity,
tagger_latency), and what they share (Context, timing, memory, MFU, model FLOPs) in gpu_checks_common.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bat/ and the scripts, from any working directory
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the check modules beside this file (no package)
from gpu_checks_common import Context, Skip, TimeBox, free_memory, last_line  # noqa: E402
from gpu_checks_scripts import check_scripts  # noqa: E402
from gpu_checks_onnx import check_export_parity, check_tagger_latency, onnxruntime  # noqa: E402
from gpu_checks_train import (check_finetune_step, check_pretrain_compile, check_pretrain_step,  # noqa: E402
                              check_probe_features, check_probe_step, check_sdpa_backend)


# ------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Sizes of every check. FULL is what a GPU run measures; SMOKE exercises the same code in seconds."""

    model: str = "base"  # encoder of probe_features, finetune_step, export_parity, tagger_latency
    pretrain_model: str = "base"  # pretrain.py --model: its preset sets views, crop length, decoder
    pretrain_batch: int | None = None  # clips per GPU; None: REF's per-GPU share of the preset's batch
    pretrain_views: int | None = None  # None: the preset's
    pretrain_frames: int | None = None  # None: the preset's
    compile_backend: str = "inductor"
    attention_batch: int = 16  # clips in sdpa_backend's shapes
    probe_batch: int = 64  # clips of 10 s per forward pass
    probe_step_batch: int = 48  # probe_cgp.py's --batch-size
    prototypes: int = 10000  # probe_cgp.py's --prototypes
    finetune_batch: int = 48  # finetune.py's --batch-size on one GPU (REF's AS-20k recipe)
    finetune_frames: int = 1024
    classes: int = 527  # AudioSet's, for every random head
    clip_seconds: float = 10.0
    # (clips, seconds) of export_parity's inputs: 16 clips of 10 s for the agreement, 25 s chunked and ragged
    parity_batches: tuple = ((8, 10.0), (8, 10.0), (2, 25.0))
    tagger_batches: tuple = (1, 32)
    warmup: int = 2  # untimed calls before timing (allocations, autotuning)
    timed_calls: int = 20  # at most; also stops after timed_seconds
    timed_seconds: float = 8.0
    script_steps: int = 3  # training steps of each script in the scripts check
    script_workers: int = 1  # their data-loader workers
    # Time box of each check, seconds: a bound for a check that hangs or crawls, not its expected time (a
    # few seconds to a minute each on a GPU). Their sum exceeds gpu_check.sh's 540 s; the JSON is written
    # after every check and the compile runs last, so a run cut short loses only what had not run.
    time_boxes: dict = field(default_factory=lambda: dict(
        sdpa_backend=20, pretrain_step=45, probe_features=40, probe_step=30, finetune_step=35, scripts=90,
        export_parity=130, tagger_latency=45, pretrain_compile=150))


FULL = Plan()
SMOKE = Plan(model="tiny", pretrain_model="tiny", pretrain_batch=2, pretrain_views=2, compile_backend="eager",
             attention_batch=2, probe_batch=2, probe_step_batch=2, prototypes=64, finetune_batch=2, finetune_frames=256,
             classes=10, parity_batches=((2, 10.0), (1, 12.0)), tagger_batches=(1, 2), warmup=1, timed_calls=2,
             timed_seconds=2.0, script_steps=1, script_workers=0,
             time_boxes=dict(sdpa_backend=20, pretrain_step=30, probe_features=30, probe_step=20, finetune_step=30,
                             scripts=90, export_parity=90, tagger_latency=30, pretrain_compile=60))


# ---------------------------------------------------------------------------------- running

@contextlib.contextmanager
def time_box(seconds: float):
    """Raise TimeBox in the main thread after `seconds` (SIGALRM: it lands between Python bytecodes, so
    a long CUDA call ends first). Measuring loops also stop on their own well before it."""
    def expire(signum, frame):
        raise TimeBox(f"time box of {seconds:.0f} s exceeded")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Run in this order: the cheap checks first, the compile last (the slowest to start), so a run cut short
# by gpu_check.sh's timeout still has the rest.
CHECKS = {"sdpa_backend": check_sdpa_backend, "pretrain_step": check_pretrain_step,
          "probe_features": check_probe_features, "probe_step": check_probe_step, "finetune_step": check_finetune_step,
          "scripts": check_scripts, "export_parity": check_export_parity, "tagger_latency": check_tagger_latency,
          "pretrain_compile": check_pretrain_compile}


def rollup(figures: dict) -> tuple[str, str | None]:
    """A check's status from its parts (sub-dicts with a status): failed if one failed, ok if one ran."""
    parts = [v for v in figures.values() if isinstance(v, dict) and "status" in v]
    for v in figures.values():
        if isinstance(v, dict) and "status" not in v:  # one level down (tagger rows)
            parts += [w for w in v.values() if isinstance(w, dict) and "status" in w]
    if not parts:
        return "ok", None
    failed = [p["reason"] for p in parts if p["status"] == "failed"]
    if failed:
        return "failed", failed[0]
    if any(p["status"] == "ok" for p in parts):
        return "ok", None
    return "skipped", parts[0].get("reason")


def run_check(name: str, ctx: Context) -> dict:
    """One check in its time box; any error becomes status "failed" with the error's last line."""
    t = time.perf_counter()
    try:
        with time_box(ctx.plan.time_boxes[name]):
            figures = CHECKS[name](ctx)
        status, reason = rollup(figures)
        result = {"status": status, "reason": reason, **figures}
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except ModuleNotFoundError as e:  # a bare GPU machine without the project's requirements
        result = {"status": "skipped", "reason": f"{last_line(e)} (pip install -r requirements.txt)"}
    except Exception as e:  # noqa: BLE001 - one failure must not stop the others
        result = {"status": "failed", "reason": last_line(e)}
    result["seconds"] = round(time.perf_counter() - t, 1)
    free_memory(ctx.device)
    return result


def environment(device: torch.device) -> dict:
    try:
        ort = onnxruntime(cuda=device.type == "cuda")
        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError as e:
        ort_version, providers = None, [last_line(e)]
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"device": name, "torch": torch.__version__, "onnxruntime": ort_version, "providers": providers,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu", help="folder of gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="toy sizes on whatever device exists (the CPU here)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**environment(device), "mode": "smoke" if args.smoke else "full", "plan": dataclasses.asdict(plan),
              "checks": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        ctx = Context(plan, device, Path(scratch))
        for name in args.only or CHECKS:
            if device.type != "cuda" and not args.smoke:
                result = {"status": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is False); "
                                                         "--smoke runs the same code at toy size on the CPU"}
            else:
                print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
                result = run_check(name, ctx)
            report["checks"][name] = ctx.results[name] = result
            report["seconds"] = round(time.perf_counter() - start, 1)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")  # after every check
            print(f"[gpu_check] {name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else "")
                  + f" in {result.get('seconds', 0)} s", file=sys.stderr, flush=True)
    failed = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    print(f"wrote {out / 'gpu_check.json'} in {report['seconds']} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no check failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
