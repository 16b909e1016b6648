"""A training script's run from start to end: processes, seeds, signals.

- `run_processes`: the script's main in this process (one of torchrun's, or the only one), with torch's
  threads within the CPUs it may use, and the loader workers, process group and folder lock always cleaned up;
- seeding and RNG state (saved in checkpoints, so a resumed run draws what the uninterrupted one would);
- `StopFlag` (SIGINT / SIGTERM -> checkpoint at the next step, then exit), `exit_on_ctrl_c` for scripts with
  nothing to save, `kill_worker_processes`.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from bat.cli import FlagError, close_progress_bars
from bat.cpu import usable_cpus
from bat.distributed import cleanup_distributed, setup_distributed
from bat.files import unlock_all


def run_processes(main, cfg):
    """main(cfg, rank, world, device) in this process: under torchrun one of the data-parallel processes
    (process group set up here), else the only one. Loader workers and the group are always cleaned up,
    so an error never leaves the exit path waiting on them."""
    fit_threads_to_cpus()
    try:
        rank, world, _, device = setup_distributed(cfg.device)
    except ValueError as e:  # e.g. --device cuda without CUDA
        raise FlagError(str(e)) from None
    try:
        return main(cfg, rank, world, device)
    finally:
        kill_worker_processes()
        cleanup_distributed()
        unlock_all()


def fit_threads_to_cpus() -> None:
    """Keep torch's CPU threads within the CPUs this process may use. torch starts one thread per core of
    the machine, a container's CPU quota notwithstanding (Kubernetes `limits.cpu: 2` on a 64-core node: 32
    threads on 2 CPUs of time, throttled every scheduling period). OMP_NUM_THREADS, when set, is the user's
    choice and stays."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable_cpus():
        torch.set_num_threads(usable_cpus())


# ------------------------------------------------------------------------------ seeding and RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # all devices


def rng_state(device: torch.device | None = None) -> dict:
    """The global RNG states as tensors (loadable with weights_only=True): torch CPU and CUDA."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------- stopping


class StopFlag:
    """Set by SIGINT / SIGTERM; the training loop saves a checkpoint at the next step boundary and
    exits. A context manager: the previous handlers come back afterwards. A second signal raises
    KeyboardInterrupt at once (an atomic write in progress still leaves the old file intact)."""

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        # The flag is shared every step. Over NCCL that would be a GPU sync per step; a CPU (gloo)
        # group keeps the check off the GPU's queue. (new_group is collective: every process enters.)
        self.group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.group is not None:  # one per run (a probe's folds and lr grid are many runs): free its threads
            dist.destroy_process_group(self.group)
            self.group = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: saving a checkpoint at the end of this step", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def at_once(self):
        """Within: SIGINT raises KeyboardInterrupt at once and SIGTERM ends the process (a phase after the last
        checkpoint, such as the final test, has nothing to save: waiting for a step boundary would ignore it)."""
        old = {sig: signal.signal(sig, handler) for sig, handler in
               ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def any(self) -> int:
        """The signal number if any process got one (0 if none); every process stops at the same step."""
        if not dist.is_initialized():
            return self.signum or 0
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def kill_worker_processes() -> None:
    """SIGKILL every child process started through multiprocessing (DataLoader workers) and reap them.

    Called on the way out of a training script. Its workers ignore SIGINT / SIGTERM (so that Ctrl-C or
    a scheduler's SIGTERM reaches the main process, which saves a checkpoint first), so after an error
    Python's exit path - SIGTERM the workers, then wait for them - would wait forever.
    """
    import multiprocessing

    children = multiprocessing.active_children()
    if not children:
        return
    # The DataLoader's SIGCHLD handler would turn these deaths into a "worker killed" error of its own.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=10)


def exit_on_ctrl_c(what: str) -> None:
    """Make Ctrl-C end the script at once with one line ("interrupted (Ctrl-C): <what>"), for a script
    with nothing to save. The handler kills the loader workers before the main process stops reading
    from them (a worker whose reader went away mid-transfer prints a traceback of its own), then ends
    there instead of raising KeyboardInterrupt: an exception raised while Python runs a callback
    (logging's at-fork hook when a DataLoader starts a worker, a __del__) is printed as "Exception
    ignored" and swallowed, and the run went on without its workers (a hang, or a "worker exited
    unexpectedly" error)."""
    def handler(signum, frame):
        kill_worker_processes()
        exit_interrupted(what)

    signal.signal(signal.SIGINT, handler)


def exit_interrupted(what: str) -> None:
    close_progress_bars()
    print(f"\ninterrupted (Ctrl-C): {what}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without running finalisers: a DataLoader iterator the interrupt cut off mid-construction would
    # print an "Exception ignored" traceback from its __del__ after the line above. Nothing is left to save.
    os._exit(130)
