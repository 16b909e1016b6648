"""Training utilities shared by the training scripts (pretrain.py, finetune.py, ...).

- schedules: REF's warm-up + cosine learning rate (`lr_at`, RiseRunDecay) and EMA decay
  (`EmaSchedule`, EMA_Scheduler), value for value;
- `ema_update`: the teacher's exponential moving average;
- AdamW parameter groups: `param_groups` (no weight decay on biases, norms and tokens) and
  `param_groups_lrd` (REF's layer-wise LR decay for fine-tuning);
- distributed set-up (`setup_distributed`, `print0`, `all_reduce_mean`) and data-parallel helpers
  (`gather_in_order`, `share_skips`, `average_gradients`), seeding and RNG state;
- run control: `StopFlag` (SIGINT / SIGTERM -> checkpoint, then exit), `TqdmStream`, `check_flags`.

The files a run writes (atomic writes, training states, JSON) are bat.files.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from bat.files import unlock_all

# ------------------------------------------------------------------------------------- schedules


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 1e-6, lr_scale: float = 1.0,
          constant: int = 0) -> float:
    """Learning rate that optimiser step `step` (0-based) uses: REF's RiseRunDecay.

    factor = step / warmup up to `warmup` (so step 0 trains at min_lr), 1 for `constant` more steps,
    then a half cosine from 1 to 0 at `total`; lr = max(min_lr * lr_scale, peak * factor * lr_scale).
    The floor is scaled by the group's lr_scale too, as in REF. Past `total` the factor stays 0
    (REF's cosine would rise again; no REF run goes there).
    """
    plateau_end = warmup + constant
    if warmup > 0 and step <= warmup:
        factor = step / warmup
    elif step <= plateau_end:
        factor = 1.0
    elif total <= plateau_end:
        factor = 0.0
    else:
        factor = 0.5 * (1 + math.cos(math.pi * min(step - plateau_end, total - plateau_end) / (total - plateau_end)))
    return max(min_lr * lr_scale, peak * factor * lr_scale)


def set_lr(optimizer: torch.optim.Optimizer, step: int, peak: float, warmup: int, total: int,
           min_lr: float = 1e-6) -> float:
    """Set every group's lr for optimiser step `step` (each scaled by its `lr_scale`); returns the
    unscaled value (the lr of a scale-1 group)."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, peak, warmup, total, min_lr, g.get("lr_scale", 1.0))
    return lr_at(step, peak, warmup, total, min_lr)


class EmaSchedule:
    """REF's EMA_Scheduler: decay used by the EMA update after optimiser step k (0-based).

    A table of `anneal_steps` values evenly spaced from start to end, computed in float32 (so the
    first value is float32(0.9998) = 0.9998000264167786, and many neighbours are equal), then `end`
    itself from step anneal_steps on. Kept as REF computes it: the teacher is sensitive to the
    decay (1 - decay is tiny), and reproducing REF runs needs the same numbers.
    """

    def __init__(self, start: float = 0.9998, end: float = 0.99999, anneal_steps: int = 100_000):
        self.table = np.linspace(start, end, anneal_steps, dtype=np.float32).tolist() + [end]
        self.anneal_steps = anneal_steps

    def __call__(self, k: int) -> float:
        return float(self.table[min(max(k, 0), self.anneal_steps)])


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for parameters and float buffers.

    One fused lerp per tensor list (no Python arithmetic per element). lerp leaves equal tensors
    exactly equal, so fixed buffers (the sin-cos table) never drift by rounding over 400 k steps.
    """
    t = list(teacher.parameters()) + [b for b in teacher.buffers() if b.is_floating_point()]
    s = list(student.parameters()) + [b for b in student.buffers() if b.is_floating_point()]
    if len(t) != len(s):
        raise ValueError(f"teacher and student differ in structure ({len(t)} vs {len(s)} tensors)")
    torch._foreach_lerp_(t, [x.detach() for x in s], 1.0 - decay)


# ----------------------------------------------------------------------------- parameter groups


def _is_no_decay(name: str, p: torch.Tensor, extra: tuple[str, ...]) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in extra


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay_names: tuple[str, ...] = ("cls_token", "mask_token", "pos_embed")) -> list[dict]:
    """Two AdamW groups: with weight decay (matrices, conv kernels) and without (every 1-D parameter,
    i.e. biases and LayerNorm weights, the learned tokens/tables named in no_decay_names, and those the
    module names in its own `no_decay`: a probe head's gate logits, prototypes or queries, as REF).

    Decaying a LayerNorm gain or a bias towards 0 only fights the normalisation; this is the usual
    MAE / timm practice. Each group lists its parameter names (for tests and inspection).
    """
    exempt = tuple(no_decay_names) + tuple(getattr(model, "no_decay", ()))
    decay, no_decay = {"params": [], "names": [], "weight_decay": weight_decay}, \
        {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = no_decay if _is_no_decay(name, p, exempt) else decay
            g["params"].append(p)
            g["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def layer_id(name: str, depth: int) -> int:
    """REF's get_layer_id_for_vit: 0 for cls_token / pos_embed / patch_embed, i + 1 for blocks.i, and
    depth + 1 for everything else (the head, and also the encoder's pre_norm, which REF's rule does not
    list)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: torch.nn.Module, weight_decay: float, layer_decay: float, depth: int | None = None,
                     strip_prefix: str = "encoder.",
                     no_decay_names: tuple[str, ...] = ("cls_token", "pos_embed")) -> list[dict]:
    """REF's param_groups_lrd: one AdamW group per (layer, decay or not) with
    lr_scale = layer_decay ** (depth + 1 - layer_id); no weight decay on 1-D parameters and
    no_decay_names. Names are matched after removing `strip_prefix` (a model that holds the ViT as
    `.encoder` gets REF's ViT names). `depth` defaults to the number of `blocks.i` found.
    Use with `set_lr`, which multiplies each group's lr (and the min_lr floor) by its lr_scale.
    """
    named = [(n[len(strip_prefix):] if strip_prefix and n.startswith(strip_prefix) else n, n, p)
             for n, p in model.named_parameters() if p.requires_grad]
    if depth is None:
        depth = 1 + max((int(n.split(".")[1]) for n, _, _ in named if n.startswith("blocks.")), default=-1)
    groups: dict[tuple[int, bool], dict] = {}
    for short, full, p in named:
        no_decay = p.ndim == 1 or short in no_decay_names
        lid = layer_id(short, depth)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [], "layer_id": lid,
                                                "lr_scale": layer_decay ** (depth + 1 - lid),
                                                "weight_decay": 0.0 if no_decay else weight_decay})
        g["params"].append(p)
        g["names"].append(full)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------------------------- distributed


def setup_distributed(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """(rank, world, local_rank, device). Under torchrun (WORLD_SIZE > 1) initialises the process
    group: NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is used, gloo on the CPU.
    Single- and multi-node alike: torchrun provides RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":  # with its index: set_device refuses a bare "cuda", and DDP needs cuda:LOCAL_RANK
        if world > 1 and local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA device(s); start "
                             "at most that many processes per node (torchrun --nproc_per_node)")
        index = local if world > 1 else dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # Before the group exists: torch.distributed.nn.functional's ten collectives take `group=group.WORLD`
        # as a default argument, evaluated at import. Imported after init_process_group (torch._dynamo imports
        # it when an optimiser first steps), those defaults hold the default group, so destroy_process_group
        # cannot free it and its gloo worker threads live on into the interpreter's shutdown. A worker that
        # has not yet dropped the last collective's tensors then takes the GIL during finalisation:
        # std::terminate, SIGABRT (seen in the process that exits right after its last collective).
        # (import_module, not an import statement: that would make `torch` a local name of this whole function)
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return rank, world, local, dev


def data_parallel(model: torch.nn.Module, device: torch.device, **kwargs):
    """DDP over the process group, one device per process. The model's buffers (the fixed positional table,
    front-end constants) are the same on every rank, so they are not re-sent before every forward: torch
    2.13 says so with forward_sync_buffers; releases before it know only broadcast_buffers (which also skips
    the start-up copy of the same buffers), and a GPU cluster's torch is often not the pinned one."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DDP(model, device_ids=[device] if device.type == "cuda" else None, **{no_sync: False}, **kwargs)


def run_processes(main, cfg):
    """main(cfg, rank, world, device) in this process: under torchrun one of the data-parallel processes
    (process group set up here), else the only one. Loader workers and the group are always cleaned up,
    so an error never leaves the exit path waiting on them."""
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (flushed, so torchrun's interleaved output stays readable)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of a few scalars over processes (one collective)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(index: list, *parts: list):
    """Rows that processes hold in pieces -> all of them on every process, in data-set order.

    index: int64 tensors (data-set positions of the rows); parts: lists of tensors with the same rows.
    Returns (index, *parts) concatenated over processes and sorted by index, or None when no process
    has a row. One collective (pickled: meant for logits and targets, not for features)."""
    pieces = all_gather_object((index, *parts))
    index = [t for p in pieces for t in p[0]]
    if not index:
        return None
    order = torch.cat(index).argsort()
    return (torch.cat(index)[order], *(torch.cat([t for p in pieces for t in p[k + 1]])[order]
                                       for k in range(len(parts))))


def share_skips(skips) -> None:
    """Merge every process's unreadable files and read flags (a bat.data.SkipLog) into each process's log,
    so reports and errors name them all."""
    if dist.is_initialized():
        for state in all_gather_object(skips.state()):
            skips.load(state)


def sync_skips(skips, shared: set) -> int:
    """Share the unreadable files each process found since the last call (`shared`: those already shared);
    returns the global count. Every process then knows every skipped file (so each is warned about once and
    counted once). Cheaper than share_skips when called every logged step of a long run."""
    new = {p: r for p, r in skips.seen.items() if p not in shared}
    for part in all_gather_object(new):
        skips.seen.update(part)
        shared.update(part)
    return skips.count


def average_gradients(params, rows: int) -> None:
    """Data parallelism without a wrapper: each process back-propagated the mean loss of its `rows` rows
    of the batch; weight each by its share of the rows and sum over processes, so every process steps
    with the gradient of the whole batch (what one process would compute). A process with no rows (or
    a parameter without a gradient) contributes zeros. One collective per step: the gradients times
    their row counts and the count itself travel in one flat buffer."""
    if not dist.is_initialized():
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None and rows else torch.zeros_like(p)).reshape(-1) * rows
                      for p in params] + [torch.tensor([float(rows)], device=params[0].device)])
    dist.all_reduce(flat)
    total, offset = max(flat[-1].item(), 1.0), 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).div_(total).to(p.dtype)
        offset += p.numel()


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


# ------------------------------------------------------------------------------ run control


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


def close_progress_bars() -> None:
    """Close every open tqdm bar, so that an error printed next gets a line of its own (a bar still open
    when the script ends would redraw itself below the error)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def error_exit(error, code: int = 2):
    """End a script on a user-facing error: close the progress bars, print `error: ...` as the last
    line on stderr (an OSError as "path: reason") and exit with `code`."""
    close_progress_bars()
    if isinstance(error, BrokenPipeError):  # the reader went away (`--help | head`): nothing left to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(141)  # 128 + SIGPIPE, what a shell tool cut off by `head` returns
    if isinstance(error, OSError) and error.filename:
        error = f"{error.filename}: {error.strerror or error}"
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


class TqdmStream:
    """stderr through tqdm.write, so a warning printed while a progress bar runs gets its own line."""

    def write(self, text):
        if text.strip():
            from tqdm import tqdm

            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self):
        sys.stderr.flush()


class FlagError(ValueError):
    """A command-line value out of its range; the message is one line naming the flag."""


# The largest --seed: the scripts derive generator seeds from it (bat/sampler.py: seed * 1_000_003 + epoch) that
# torch refuses from 2**64 on; 2**32 - 1 is also numpy's legacy seed range (seed_everything).
MAX_SEED = 2**32 - 1


def check_flags(cfg, at_least=None, positive=(), fractions=()):
    """Refuse out-of-range values at parse time, one line each (None means "use the default" and passes):
    at_least {name: minimum} for counts, positive: names that must be > 0, fractions: names in [0, 1].
    Fields the training scripts share are checked whenever the config has them, whatever the lists say:
    seed in [0, MAX_SEED], adam_beta1/2 in [0, 1) (AdamW refuses 1), min_lr not above lr."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    seed = getattr(cfg, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise FlagError(f"--seed must lie in [0, {MAX_SEED}], got {seed}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(cfg, name, None)
        if v is not None and not 0 <= v < 1:
            raise FlagError(f"{flag(name)} must lie in [0, 1), got {v}")
    for name, low in (at_least or {}).items():
        v = getattr(cfg, name)
        if v is not None and v < low:
            raise FlagError(f"{flag(name)} must be >= {low}, got {v}")
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise FlagError(f"{flag(name)} must be > 0, got {v}")
    for name in fractions:
        v = getattr(cfg, name)
        if v is not None and not 0 <= v <= 1:
            raise FlagError(f"{flag(name)} must lie in [0, 1], got {v}")
    lr, min_lr = getattr(cfg, "lr", None), getattr(cfg, "min_lr", None)
    if lr is not None and min_lr is not None and min_lr > lr:  # after --lr's own check: a bad --lr is named as such
        raise FlagError(f"--min-lr must not exceed --lr, got --min-lr {min_lr} and --lr {lr}")
