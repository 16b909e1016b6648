"""Frozen-encoder features for probes: one encoder pass per batch, and an in-memory cache of them.

A probe's encoder is frozen, so its features can be computed once per clip and kept (`build_cache`) when
they fit in memory (`cache_size` says how much they take); probe_cgp.py decides with `available_bytes`.
"""
import os

import torch
from tqdm import tqdm

from bat.data import make_loader
from bat.probes import Features
from bat.tasks import model_inputs


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def encode(encoder, frontend, head, batch, device, grad=False):
    """Waveform batch -> the Features the head reads (all layers in one pass of the frozen encoder).
    grad=True keeps gradients for heads that train through the encoder (VQT's query tokens)."""
    with torch.set_grad_enabled(grad and not head.cacheable):
        spec = model_inputs(frontend, batch, device)
        with autocast(device):
            return head.features(encoder, spec)


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
                what="the training data"):
    """Encode every clip of `dataset` once -> (Features with B = usable clips, targets on `device`). The
    cache is allocated once at full size and filled in place (no second copy while concatenating)."""
    n_max, filled = len(dataset), 0
    cls = tokens = targets = f = None
    loader = make_loader(dataset, batch_size, workers=workers)
    for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False):
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
        filled += len(batch)
    if targets is None:
        raise skips.nothing_usable(dataset.items.files, what)
    trim = lambda t: None if t is None else t[:, :filled]  # noqa: E731  (skipped clips leave rows unused)
    return Features(trim(cls), trim(tokens), f.time_patches), targets[:filled]
