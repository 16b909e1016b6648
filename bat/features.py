"""Frozen-encoder features for probes: one encoder pass per batch, and an in-memory cache of them.

A probe's encoder is frozen, so its features can be computed once per clip and kept (`build_cache`) when
they fit in memory (`cache_size` says how much they take); probe_cgp.py decides with `available_bytes`.
"""
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from bat import precision
from bat.data import make_loader, processes_on_this_node
from bat.distributed import all_gather_object, all_reduce_mean, gather_in_order, print0, share_skips
from bat.heads import Features
from bat.listing import DataError
from bat.model import eval_mode
from bat.tasks import model_inputs


def encode(encoder, frontend, head, batch, device, grad=False):
    """Waveform batch -> the Features the head reads (all layers in one pass of the frozen encoder).
    grad=True keeps gradients for heads that train through the encoder (VQT's query tokens)."""
    with torch.set_grad_enabled(grad and not head.cacheable):
        spec = model_inputs(frontend, batch, device)
        with precision.autocast(device):  # --precision (bat.precision): bf16 on CUDA and native-bf16 CPUs
            f = head.features(encoder, spec)
        # bf16 features on the CPU: the head trains and scores in float32 there (no autocast around it)
        return f.to(device, torch.float32) if device.type == "cpu" and precision.resolve(device) == "bf16" else f


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def cache_size(head, encoder, num_clips, target_frames, dtype):
    layers = encoder.cfg.depth if head.all_layers else 1
    tokens = int(head.reads_cls) + (target_frames // 16) * 8 * int(head.reads_tokens)
    return num_clips * layers * tokens * encoder.cfg.dim * torch.finfo(dtype).bits // 8, layers, tokens


def build_cache(encoder, frontend, head, dataset, batch_size, workers, device, skips, desc="caching features",
                what="the training data", rank=0, world=1):
    """Encode every clip of `dataset` once -> (Features with B = usable clips, targets on `device`, their
    positions in `dataset`), rows in data-set order. The cache is allocated once at full size and filled in
    place (no second copy while concatenating). Under torchrun (world > 1) each process encodes every
    world-th clip and the shares are then exchanged, so every process ends with the cache one process would have built."""
    part = dataset if world == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    n_max, filled = len(part), 0
    cls = tokens = targets = f = None
    index = torch.empty(n_max, dtype=torch.long)
    loader = make_loader(part, batch_size, workers=min(workers, n_max))
    for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False, disable=rank != 0):
        skips.add(batch.skipped)
        if len(batch) == 0:
            continue
        skips.mark_read(what, len(dataset), batch.indices)  # `what` names the data set in errors and reports
        f = encode(encoder, frontend, head, batch, device)
        if targets is None:
            alloc = lambda t: None if t is None else t.new_empty(t.shape[0], n_max, *t.shape[2:])  # noqa: E731
            cls, tokens = alloc(f.cls), alloc(f.tokens)
            targets = batch.targets.new_empty(n_max, *batch.targets.shape[1:]).to(device)
        rows = slice(filled, filled + len(batch))
        for dst, src in ((cls, f.cls), (tokens, f.tokens)):
            if dst is not None:
                dst[:, rows] = src
        targets[rows] = batch.targets.to(device)
        index[rows] = batch.indices  # positions in `dataset` (Subset passes them through)
        filled += len(batch)
    trim = lambda t: None if t is None else t[:, :filled]  # noqa: E731  (skipped clips leave rows unused)
    local = None if targets is None else (trim(cls), trim(tokens), targets[:filled], index[:filled], f.time_patches)
    if world > 1:
        share_skips(skips)  # every process can then name every unreadable file
        local = gather_cache(local, device)
    if local is None:
        raise skips.nothing_usable(dataset.items.files, what)
    cls, tokens, targets, rows, time_patches = local
    return Features(cls, tokens, time_patches), targets, rows.cpu()


def gather_cache(local, device):
    """Every process's share of a feature cache (cls, tokens, targets, index, time_patches; None: no usable
    clip) -> the whole cache on every process, rows sorted by data-set index. Each share travels by one
    broadcast per tensor into a cache allocated once: peak memory is the cache plus one share, not the
    world-fold copy an all_gather would make."""
    spec = lambda t: None if t is None else (tuple(t.shape), t.dtype)  # noqa: E731
    metas = all_gather_object(None if local is None else
                              dict(index=local[3], shapes=[spec(t) for t in local[:3]], time_patches=local[4]))
    shares = [(r, m) for r, m in enumerate(metas) if m is not None]
    if not shares:
        return None
    every = torch.cat([m["index"] for _, m in shares])
    order = every.sort().values
    n, first = every.numel(), shares[0][1]

    def full(s, rows_dim):  # the whole cache's tensor: a share's shape with n rows
        shape = list(s[0])
        shape[rows_dim] = n
        return torch.empty(shape, dtype=s[1], device=device)

    out = [None if s is None else full(s, 0 if k == 2 else 1) for k, s in enumerate(first["shapes"])]
    for r, m in shares:
        where = torch.searchsorted(order, m["index"]).to(device)
        for k, s in enumerate(m["shapes"]):
            if s is None:
                continue
            buf = local[k].contiguous() if r == dist.get_rank() else torch.empty(s[0], dtype=s[1], device=device)
            dist.broadcast(buf, src=r)
            out[k].index_copy_(1 if k < 2 else 0, where, buf)
    return (*out, order, first["time_patches"])


def decide_cache(head, encoder, clips, target_frames, device, task, clip_samples, must=False, never=False):
    """Whether to cache the frozen features of `clips` clips: when they fit in memory (must: or fail, the
    probe's --cache-features; never: --no-cache). Under torchrun only if they fit on every process."""
    if never or not head.cacheable:
        return False
    if task.probe_streams and not must:  # REF's random window of every clip at every step (bat.tasks)
        print0(f"feature cache: off for task {task.name} (REF trains on a new random window of each clip every "
               "step): streaming; --cache-features caches one fixed window instead")
        return False
    # float32 on CUDA too: every block ends in a LayerNorm, which bf16 autocast runs (and returns) in float32.
    dtype = torch.float32
    need, layers, tokens = cache_size(head, encoder, clips, target_frames, dtype)
    # torchrun's processes on one node share its memory on the CPU (on CUDA each has a GPU of its own)
    sharing = processes_on_this_node() if device.type == "cpu" else 1
    have = available_bytes(device) // sharing
    share = f" to each of {sharing} processes" if sharing > 1 else ""
    fits = need <= (0.8 if must else 0.5) * have
    fits = all_reduce_mean([float(fits)], device)[0] == 1.0  # under torchrun: cache only if it fits everywhere
    print0(f"feature cache: {clips} clips x {layers} layers x {tokens} tokens x {encoder.cfg.dim} x "
          f"{torch.finfo(dtype).bits // 8} B = {human(need)} ({human(have)} available{share} on {device.type}): "
          f"{'caching' if fits else 'streaming (does not fit)'}")
    if must and not fits:
        raise DataError(f"--cache-features: the features need {human(need)} but only {human(have)} are available{share} "
                        f"on {device.type}; run without --cache-features")
    if fits and task.random_window:
        draws = ("random roll and " if task.roll else "random ") + "window" + (" and noise" if task.noise_std else "")
        print0(f"note: cached features are the unrolled first {clip_samples} samples of each training clip; "
               f"task {task.name}'s {draws} of training clips need --no-cache")
    return fits


@torch.no_grad()
def score_clips(head, source, device, batch_size, skips, rank=0, world=1):
    """Logits (float32, CPU) and targets (CPU) of every usable clip, in data-set order. `source`: cached
    (Features, targets; every process holds them all), or (encoder, frontend, dataset, workers) to stream:
    under torchrun each process then scores every world-th clip and the scores are gathered."""
    with eval_mode(head):  # the head is handed over training (a probe mid-run) or not (a loaded one)
        if isinstance(source[0], Features):
            feats, y = source
            with precision.autocast(device, "cuda-bf16"):  # the head: as it trains
                logits = [head(feats.index(rows)).float().cpu()
                          for rows in torch.arange(y.shape[0], device=y.device).split(batch_size)]
            return torch.cat(logits), y.cpu()
        encoder, frontend, dataset, workers = source
        shard = dataset if world == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
        logits, targets, index = [], [], []
        for batch in tqdm(make_loader(shard, batch_size, workers=min(workers, len(shard))), desc="evaluating",
                          unit="batch", dynamic_ncols=True, leave=False, disable=rank != 0):
            skips.add(batch.skipped)
            if len(batch):
                feats = encode(encoder, frontend, head, batch, device)
                with precision.autocast(device, "cuda-bf16"):
                    logits.append(head(feats).float().cpu())
                targets.append(batch.targets)
                index.append(batch.indices)
    rows = gather_in_order(index, logits, targets)
    if rows is None:  # no process found a usable clip: say why, naming every process's files
        share_skips(skips)
        raise skips.nothing_usable(dataset.items.files, "the evaluation data")
    return rows[1], rows[2]
