"""The training state of a probe run on a fixed schedule (probe_cgp.py's `fit`): saved every --checkpoint-every
steps, at the last step and on SIGINT/SIGTERM, so that a preempted benchmark run (REF's AudioSet probe: 20 000
steps through a frozen ViT-base) goes on where it stopped instead of starting over.

The file is finetune.py's (bat.finetuning: `save_progress`, `read_state`): the head's and optimiser's state, the
step, the batches taken from the training stream, the best validation head and history, every process's RNG
(the head's dropout draws) and the settings' fingerprint a resumed run must match. A resumed run takes the
same batches as an uninterrupted one: the training stream restarts at the batches consumed
(bat.sampler.batch_stream's `start`), with the clips' random draws keyed on their place in it.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from bat.cli import FlagError
from bat.data import SkipLog
from bat.distributed import print0, share_skips
from bat.finetuning import Progress, load_progress, save_progress
from bat.metrics import Best
from bat.run_control import StopFlag


@dataclass
class Checkpoints:
    """Where and when `fit` saves the training state of one run, and whether it stops there. Used as a context
    manager around the training steps: within, SIGINT/SIGTERM only set a flag (bat.run_control.StopFlag) and
    the run saves at the next step boundary, every process at the same step."""
    path: str  # DIR/state.pt (DIR/<fold>/state.pt with --fold all)
    fingerprint: str  # of the settings the state is valid for (probe_cgp.fold_fingerprint)
    every: int  # --checkpoint-every
    stop_after: int | None  # --stop-after: save and stop after this step, as if interrupted (tests)
    skips: SkipLog  # the unreadable files found so far, saved with the state (the report counts them)
    seed: int
    rank: int
    device: torch.device
    signum: int = 0  # the signal that stopped the run (0: none, or --stop-after)

    def __enter__(self):
        self.flag = StopFlag().__enter__()
        return self

    def __exit__(self, *exc):
        self.flag.__exit__(*exc)
        # A signal after the last step's check (the state is saved): act on it as outside the training steps.
        if exc[0] is None and self.flag.signum and not self.signum:
            signal.raise_signal(self.flag.signum)

    def restore(self, head, opt, name, metric, lower=False) -> Progress:
        """The progress of an interrupted run (head, optimiser and RNG restored from its state), or a fresh one
        (the RNG left as the head's init left it: a fresh run draws as a run without a state does)."""
        best = Best(metric, lower)
        progress = load_progress(self.path, self.fingerprint, head, opt, self.skips, self.rank, self.device, name,
                                 best, self.seed)
        return Progress(best=best) if progress is None else progress

    def step_done(self, progress: Progress, head, opt, steps: int, name: str) -> bool:
        """After step progress.step: save the state when it is due (every --checkpoint-every steps, the last step,
        a stop); True when the run stops here (a signal on any process, or --stop-after)."""
        signum = self.flag.any()  # collective under torchrun: every process stops at the same step
        stopping = bool(signum) or (self.stop_after is not None and self.stop_after <= progress.step < steps)
        if progress.step % self.every == 0 or progress.step == steps or stopping:
            share_skips(self.skips)  # every process's read and unreadable files: the resumed report counts them all
            save_progress(self.fingerprint, self.path, head, opt, progress, self.skips, self.rank, self.device)
        if stopping:
            self.signum = signum
            print0(f"\n[{name}] stopped at step {progress.step}, state saved in {self.path}; run the same command "
                   "again to resume")
        return stopping

    def remove(self):
        """The outputs are written: the training state can go (rank 0)."""
        if self.rank == 0 and os.path.exists(self.path):
            os.remove(self.path)


def state_path(cfg, name, runs):
    """The training state of run `name` of `runs` planned runs: DIR/state.pt, with --fold all DIR/<fold>/state.pt."""
    return os.path.join(cfg.out if runs == 1 else os.path.join(cfg.out, name), "state.pt")


def refuse_stop_after(cfg, what):
    """--stop-after stops a run that saves its state; `what` (--select auto, the frame-wise tasks) retrains."""
    if cfg.stop_after is not None:
        raise FlagError(f"--stop-after: {what} saves no training state (only the fixed schedule of the clip "
                        "probes resumes); leave it out")
