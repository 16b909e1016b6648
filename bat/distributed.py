"""Data parallelism under torchrun, one device per process, and the collectives the scripts use.

`setup_distributed` / `cleanup_distributed` (NCCL on GPUs, gloo on the CPU), `data_parallel` (DDP),
`print0` (rank 0 speaks), `all_reduce_mean`, `all_gather_object`, `gather_in_order` (rows held in pieces,
back in data-set order), `share_skips` / `sync_skips` (every process learns every unreadable file) and
`average_gradients` (data parallelism without a wrapper). Without torchrun each is the one-process case.
"""
from __future__ import annotations

import importlib
import inspect
import os

import torch
import torch.distributed as dist


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
