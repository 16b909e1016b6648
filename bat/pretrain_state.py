"""A pretraining run's state (DIR/state.pt, DIR/encoder.safetensors): written at every checkpoint, read back
so that a re-run of the same command resumes exactly where the last checkpoint left it.

state.pt keeps REF's trainer layout (encoder, decoder, ema_encoder, optimized_steps), so REF's loaders and
`bat.load_encoder` read it, plus what an exact resumption needs: the optimiser, every RNG, the resolved
configuration, the process layout and the files skipped so far.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from bat.checkpoint import save_encoder
from bat.distributed import all_gather_object, print0
from bat.files import load_state, remove_stale_temporaries, save_state, truncate_jsonl
from bat.frontend import Frontend
from bat.optim import lr_at
from bat.run_control import rng_state, set_rng_state


class PretrainError(ValueError):
    """A configuration or resume problem; the message is one line."""


def fingerprint_diff(cfg, saved: dict, resumable: set) -> list[str]:
    """The settings that differ between a Config and a checkpoint's, other than those in `resumable`."""
    now = dataclasses.asdict(cfg)
    return [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in resumable and saved.get(k) != now[k]]


class LossWatch:
    """Stops a run before a checkpoint can hold a broken state. Every step's loss is watched on the device
    (`update` makes no host sync: an `.item()` per step would stall a GPU), while logs and checkpoints come at
    other steps; `check`, at log and checkpoint time, raises on the first non-finite loss since the start."""

    def __init__(self, cfg, device, start: int):
        self.cfg = cfg
        self.first = torch.tensor([math.inf, 0.0], dtype=torch.float64, device=device)  # (step, loss); inf: none
        self.saved = start  # the step of the last checkpoint on disk, a good one (0: none yet)

    def update(self, step: int, loss: torch.Tensor) -> None:
        """Remember optimiser step `step` (1-based, as logged) and its loss if this is the first non-finite one."""
        new = torch.isinf(self.first[0]) & ~torch.isfinite(loss)
        self.first = torch.where(new, torch.stack([torch.full_like(self.first[0], step), loss.double()]), self.first)

    def check(self, step: int, weights=()) -> None:
        """Raise FloatingPointError on every process alike (none is left waiting in a collective) when a loss up
        to `step` was not finite, or `weights` (the modules a checkpoint is about to save) hold NaN or Inf."""
        bad, loss = min(tuple(first) for first in all_gather_object(self.first.tolist()))
        if math.isfinite(bad):
            lr = lr_at(int(bad) - 1, self.cfg.lr, self.cfg.warmup_steps, self.cfg.steps, self.cfg.min_lr)
            raise FloatingPointError(f"loss is {loss} at step {int(bad)} (lr {lr:.3g}); {self.last_good()}")
        params = [p for module in weights for p in module.parameters()]
        if params and not torch.stack([torch.isfinite(p).all() for p in params]).all():
            raise FloatingPointError(f"the weights are not finite after step {step}, with every loss finite "
                                     f"(an overflowing gradient?); {self.last_good()}")

    def last_good(self) -> str:
        if not self.saved:
            return "no checkpoint was written yet"
        return f"the last good checkpoint, of step {self.saved}, is left as it is"


def save_checkpoint(out: Path, cfg, step, student, teacher, optimizer, skips, world, micro, device, rank):
    """REF's trainer layout (encoder / decoder / ema_encoder / optimized_steps) plus what exact resumption
    needs. Called by every process after sync_skips; rank 0 writes."""
    if rank != 0:
        return
    save_encoder(out / "encoder.safetensors", student.encoder, Frontend("bat").config(),
                 {"trained_by": "pretrain.py", "optimized_steps": step})
    save_state(out / "state.pt", {
        "format": "bat.pretrain_state", "encoder": student.encoder.state_dict(),
        "decoder": student.decoder.state_dict(), "ema_encoder": teacher.state_dict(), "optimized_steps": step,
        "optimizer": optimizer.state_dict(), "rng": rng_state(device), "config": dataclasses.asdict(cfg),
        "world_size": world, "micro_batch_size": micro, "skipped": [[p, r] for p, r in skips.seen.items()]})


def resume(cfg, out: Path, student, teacher, optimizer, skips, device, rank, resumable: set) -> int:
    """Load DIR/state.pt when it exists (every process reads it: --out must be on a shared disk) and
    return the number of optimiser steps it holds (0 for a fresh run). Rank 0 clears what a killed run may
    have left: half-written files and log lines past the checkpoint. `resumable`: the settings a resumed run
    may change."""
    state_path = out / "state.pt"
    try:
        state = load_state(state_path) if state_path.exists() else None
    except ValueError as e:
        raise PretrainError(str(e)) from None
    found = all_gather_object(None if state is None else state["optimized_steps"])
    if len(set(found)) > 1:
        raise PretrainError(f"processes see different checkpoints in {state_path.parent} ({found}): --out must be "
                            "a folder every node reads and writes (a shared file system)")
    diff = [] if state is None else fingerprint_diff(cfg, state["config"], resumable)
    if diff:
        raise PretrainError(f"{state_path.parent} holds a run with other settings ({'; '.join(diff)}); "
                            "use another --out, or the same settings to resume")
    if rank == 0:
        for path in (state_path, out / "encoder.safetensors"):
            remove_stale_temporaries(path)
        truncate_jsonl(out / "log.jsonl", 0 if state is None else state["optimized_steps"])
    if state is None:
        return 0
    student.encoder.load_state_dict(state["encoder"])
    student.decoder.load_state_dict(state["decoder"])
    teacher.load_state_dict(state["ema_encoder"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], device)
    skips.seen.update({p: r for p, r in state["skipped"]})
    if state["config"]["steps"] != cfg.steps:
        print0(f"note: --steps changed {state['config']['steps']} -> {cfg.steps}: the cosine LR schedule "
               "is recomputed for the new end")
    return state["optimized_steps"]
