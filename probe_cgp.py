"""Convex Gated Probing (and LCGP / LP / ProtoBin baselines) on a frozen audio encoder.

    python probe_cgp.py --encoder runs/pretrain/encoder.safetensors --train data/sfx/train --test data/sfx/test --out runs/cgp
    python probe_cgp.py --encoder BAT_base.pt --train ESC-50-master --fold all --out runs/esc50
    python probe_cgp.py --encoder random:tiny --train speech_commands_v0.02 --probe lp --out runs/scv2_lp

The encoder is frozen: every step it runs once on the batch under no_grad (bf16 autocast on CUDA) and
returns all layers at once; only the head (bat/probes.py) has gradients. With --cache-features the
encoder runs once per training clip instead (the first window of each clip, no random crops) and the
steps read features from memory. Writes DIR/config.json, DIR/probe.safetensors (head + encoder + labels,
loads with bat.load_probe), DIR/metrics.json and DIR/gates.png. See spec/BAT.md §6 for the method.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

from bat.audio import SAMPLE_RATE, AudioError
from bat.checkpoint import CheckpointError, load_encoder
from bat.data import (AudioDataset, DataError, SkipLog, durations, forever, list_dataset, make_loader,
                      stratified_split)
from bat.frontend import Frontend
from bat.metrics import classification_metrics, summarise
from bat import asr, sed
from bat.probes import Features, Probe, build_head, classification_loss, param_groups, save_probe
from bat.train import lr_at  # REF's RiseRunDecay: linear warm-up, cosine to min_lr


@dataclass
class Config:
    encoder: str
    """encoder.safetensors / model.safetensors of this project, a REF (.pt/.pth/.ckpt), EAT or SSLAM
    checkpoint, or random:tiny|small|base"""
    train: str
    """training data: folder, CSV manifest, ESC-50 or Speech Commands v2 root"""
    test: str | None = None
    """test data; default: the data set's own split (SCV2 test list, ESC-50 --fold), else a stratified
    --test-fraction of --train"""
    fold: str | None = None
    """ESC-50 test fold 1-5, or "all" for 5-fold cross-validation (mean and std)"""
    task: Literal["auto", "dcase2016", "librispeech"] = "auto"
    """dcase2016: frame-wise sound event detection (HEAR task folder or event CSV); librispeech: the ASR
    probe (CSV path,text or LibriSpeech folders)"""
    probe: Literal["cgp", "lcgp", "lp", "protobin"] = "cgp"
    prototypes: int = 10000
    """number of prototypes K (CGP, ProtoBin)"""
    out: str = "runs/probe"
    seed: int = 0
    steps: int = 4000
    batch_size: int = 48
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int | None = None
    """linear warm-up steps; default 10% of --steps (REF ESC-50: 400 of 4000)"""
    weight_decay: float | None = None
    """on the Linear weight only; default 0.05, 0.2 for ESC-50 (REF)"""
    dropout: float = 0.2
    use_cls: bool = True
    """CGP pools [min, CLS, max]; --no-use-cls pools [min, mean, max] (encoders without a CLS token)"""
    target_frames: int | None = None
    """spectrogram frames (multiple of 16); default: the longest training clip (capped at --max-seconds)
    rounded up to 16 frames, e.g. 512 for ESC-50, 112 for Speech Commands"""
    max_seconds: float = 10.23
    """longest clip the default target length allows (10.23 s = 1024 frames, REF's AudioSet length)"""
    cache_features: bool = False
    """keep the frozen training features in memory (size printed first; refused when it does not fit)"""
    asr_hidden: int = 512
    """librispeech: LSTM units per direction of the ASR head (REF: 512)"""
    val_every: int = 0
    """validate every N steps and test the best head (dcase2016, librispeech)"""
    no_cache: bool = False
    """never cache frozen features"""
    strict: bool = False
    """stop at the first unreadable audio file instead of skipping it"""
    workers: int = min(4, os.cpu_count() or 1)
    """DataLoader worker processes"""
    test_fraction: float = 0.2
    """held-out share when neither --test nor a predefined split exists"""


# ------------------------------------------------------------------------------------- helpers


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine")
    return device


def plan_runs(cfg):
    """[(name, train AudioList, test AudioList)]: one run, or five for ESC-50 --fold all."""
    train = list_dataset(cfg.train)
    if cfg.fold is not None:
        folds = sorted(set(train.folds or [])) if cfg.fold == "all" else None
        if folds is None:
            try:
                folds = [int(cfg.fold)]
            except ValueError:
                raise DataError(f"--fold must be a fold number or 'all', got {cfg.fold!r}") from None
        if cfg.test is not None:
            raise DataError("--fold picks the test fold of an ESC-50 --train; leave out --test")
        if not folds:
            raise DataError(f"{cfg.train}: --fold needs ESC-50's layout (meta/esc50.csv)")
        return [(f"fold{k}", *train.fold_split(k)) for k in folds]
    if train.source == "esc50":
        raise DataError(f"{cfg.train} is ESC-50: choose the test fold with --fold 1..5 or --fold all")
    if cfg.test is not None:
        test = list_dataset(cfg.test)
        train = train.split("train") if train.source == "scv2" else train
        test = test.split("test") if test.source == "scv2" else test
        return [("test", train, test)]
    if train.source == "scv2":
        return [("test", train.split("train"), train.split("test"))]
    print(f"note: no --test given; holding out a stratified {cfg.test_fraction:.0%} of {cfg.train} (seed {cfg.seed})")
    return [("test", *stratified_split(train, cfg.test_fraction, cfg.seed))]


def clip_geometry(cfg, train):
    """(clip_samples, target_frames). Waveforms are cut/padded to clip_samples, then the spectrogram is
    padded to target_frames (REF: SCV2 1 s -> 101 frames -> 112, ESC-50 5 s -> 501 -> 512)."""
    if len(train) > 5000:  # file headers only, but millions of them take minutes: a sample is enough
        train = train.subset(np.random.default_rng(0).choice(len(train), 5000, replace=False))
    secs = durations(train)
    longest = np.nanmax(secs) if np.isfinite(secs).any() else 1.0
    samples = int(round(min(longest, cfg.max_seconds) * SAMPLE_RATE))
    if cfg.target_frames is not None:
        if cfg.target_frames <= 0 or cfg.target_frames % 16:
            raise DataError(f"--target-frames must be a positive multiple of 16, got {cfg.target_frames}")
        return min(samples, (cfg.target_frames - 1) * 160), cfg.target_frames
    frames = 1 + samples // 160
    return samples, 16 * math.ceil(frames / 16)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def encode(encoder, frontend, head, batch, device):
    """Waveform batch -> the frozen Features the head reads (all layers in one encoder pass)."""
    wave = batch.waveforms.to(device, non_blocking=True)
    spec = frontend(wave, batch.lengths.to(device))
    with autocast(device):
        layers = encoder.forward_layers(spec)
    return Features.from_layers(layers, head.all_layers, head.reads_cls, head.reads_tokens)


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


def build_cache(encoder, frontend, head, loader, device, skips):
    """Encode every training clip once -> (Features with B = clips, targets). The first window of each
    clip is used (the loader is in evaluation mode), so there are no random crops with a cache. The
    cache is allocated once at full size and filled in place (no second copy while concatenating)."""
    n_max, filled = len(loader.dataset), 0
    cls = tokens = targets = None
    for batch in tqdm(loader, desc="caching features", unit="batch", dynamic_ncols=True):
        skips.add(batch.skipped)
        if len(batch) == 0:
            continue
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
        raise DataError("no usable training clips (every file was skipped)")
    trim = lambda t: None if t is None else t[:, :filled]  # noqa: E731  (skipped clips leave rows unused)
    return Features(trim(cls), trim(tokens), f.time_patches), targets[:filled]


@torch.no_grad()
def evaluate(encoder, frontend, head, loader, device, skips):
    """Logits (float32, CPU) and targets for every usable clip of a loader."""
    head.eval()
    logits, targets = [], []
    for batch in tqdm(loader, desc="evaluating", unit="batch", dynamic_ncols=True, leave=False):
        skips.add(batch.skipped)
        if len(batch) == 0:
            continue
        with autocast(device):
            logits.append(head(encode(encoder, frontend, head, batch, device)).float().cpu())
        targets.append(batch.targets)
    if not logits:
        raise DataError("no usable test clips (every file was skipped)")
    return torch.cat(logits), torch.cat(targets)


def text_bars(values, width=40):
    top = max(values) or 1.0
    return "\n".join(f"  layer {i + 1:2d} {v:6.3f} {'#' * max(1, round(width * v / top))}" for i, v in enumerate(values))


def save_gates_png(path, gates, title, std=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(gates) + 2), 3.2))
    layers = np.arange(1, len(gates) + 1)
    ax.bar(layers, gates, yerr=std, color="#3b75af", capsize=3)
    ax.axhline(1 / len(gates), color="grey", lw=0.8, ls="--", label="uniform 1/L")
    ax.set(xlabel="encoder layer (block)", ylabel="gate weight (softmax)", title=title, xticks=layers)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- one run


def train_probe(cfg, encoder, train_items, test_items, device, skips, name="test"):
    """Train one head on train_items, evaluate on test_items. Returns (Probe, metrics, test logits)."""
    if train_items.task != test_items.task:
        raise DataError(f"train is {train_items.task} but test is {test_items.task}")
    classes, task = train_items.classes, train_items.task
    clip_samples, target_frames = clip_geometry(cfg, train_items)
    frontend = Frontend.from_config({**encoder.frontend_config, "target_frames": target_frames}).to(device)
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.probe, encoder.cfg.dim, encoder.cfg.depth, len(classes), cfg.prototypes, cfg.dropout,
                      cfg.use_cls).to(device)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.2 if train_items.source == "esc50" else 0.05)
    opt = torch.optim.AdamW(param_groups(head, wd), lr=cfg.lr, betas=(0.9, 0.999))
    print(f"[{name}] {task}, {len(classes)} classes, {len(train_items)} train / {len(test_items)} test clips, "
          f"clips {clip_samples / SAMPLE_RATE:.2f} s -> {target_frames} frames, {cfg.probe} head "
          f"{sum(p.numel() for p in head.parameters()):,} parameters, warm-up {warmup}, weight decay {wd}")

    train_ds = AudioDataset(train_items, classes, clip_samples, train=not cfg.cache_features)
    test_ds = AudioDataset(test_items, classes, clip_samples, train=False)
    test_loader = make_loader(test_ds, 2 * cfg.batch_size, workers=cfg.workers)

    if cfg.cache_features:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        need, layers, tokens = cache_size(head, encoder, len(train_items), target_frames, dtype)
        have = available_bytes(device)
        print(f"feature cache: {len(train_items)} clips x {layers} layers x {tokens} tokens x {encoder.cfg.dim} "
              f"x {torch.finfo(dtype).bits // 8} B = {human(need)} ({human(have)} available on {device.type})")
        if need > 0.8 * have:
            raise DataError(f"--cache-features: the training features need {human(need)} but only {human(have)} "
                            f"are available on {device.type}; run without --cache-features")
        cache, cache_targets = build_cache(encoder, frontend, head, make_loader(train_ds, 2 * cfg.batch_size,
                                           workers=cfg.workers), device, skips)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = cache_targets.shape[0]
        order = iter(())
    else:
        batches = forever(make_loader(train_ds, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed))

    head.train()
    pbar = tqdm(range(cfg.steps), desc=f"probe {name}", unit="step", dynamic_ncols=True)
    for step in pbar:
        lr = lr_at(step, cfg.lr, warmup, cfg.steps, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        if cfg.cache_features:  # random order, epoch after epoch, from memory
            idx = next(order, None)
            if idx is None:
                order = iter(torch.randperm(n, generator=gen).to(device).split(cfg.batch_size))
                idx = next(order)
            feats, targets = cache.index(idx), cache_targets[idx]
        else:
            batch = next(batches)
            skips.add(batch.skipped)
            while len(batch) == 0:  # every clip of this batch was unreadable
                batch = next(batches)
                skips.add(batch.skipped)
            feats, targets = encode(encoder, frontend, head, batch, device), batch.targets.to(device)
        with autocast(device):
            logits = head(feats)
        loss = classification_loss(logits, targets, task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
    pbar.close()

    logits, targets = evaluate(encoder, frontend, head, test_loader, device, skips)
    metrics = classification_metrics(logits, targets, task)
    # clips actually used: the listed ones minus those found unreadable during this run
    metrics.update(num_train=sum(f not in skips.seen for f in train_items.files), num_test=int(targets.shape[0]))
    gates = head.gate_weights()
    metrics["gate_weights"] = None if gates is None else gates.detach().float().cpu().tolist()
    probe = Probe(encoder, head.eval(), frontend, classes, task)
    return probe, metrics, logits


# ------------------------------------------------------------------------------------- main


def summarise_probe(metrics, std=None):
    text = summarise(metrics, std)
    if metrics.get("gate_weights"):
        text += "\ngate weights (softmax over layers):\n" + text_bars(metrics["gate_weights"])
    return text


def probe_frames(cfg, encoder, device, warmup):
    """--task dcase2016: a frame-wise probe for sound event detection (bat/sed.py); --task librispeech: the
    ASR probe (bat/asr.py). Same outputs as the clip tasks, with the task's own metrics."""
    skips = SkipLog(strict=cfg.strict)
    torch.manual_seed(cfg.seed)
    common = dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr, warmup=warmup,
                  weight_decay=0.05 if cfg.weight_decay is None else cfg.weight_decay, val_every=cfg.val_every, seed=cfg.seed, workers=cfg.workers, skips=skips)
    if cfg.task == "librispeech":
        train, valid, test = asr.plan_splits(cfg.train, cfg.test)
        head = asr.ASRHead(encoder.cfg.dim, encoder.cfg.depth, hidden=cfg.asr_hidden, dropout=cfg.dropout).to(device)
        labels, kind, frontend, extra = list(asr.CHARS), "asr", asr.speech_frontend(encoder), {}
        common.update(cache=cfg.cache_features)  # REF streams: cached utterances are encoded unpadded
    else:
        train, valid, test = sed.plan_splits(cfg.train, cfg.test)
        head = sed.frame_head(cfg.probe, encoder.cfg.dim, encoder.cfg.depth, len(train.classes), cfg.prototypes,
                              cfg.dropout).to(device)
        labels, kind, frontend = train.classes, "sed", sed.event_frontend(encoder)
        common.update(target_frames=cfg.target_frames, cache=not cfg.no_cache)
        extra = {"frame_wise": True, "patch_seconds": sed.PATCH_SECONDS, "threshold": sed.THRESHOLD,
                 "median_filter_patches": sed.MEDIAN_PATCHES}
    write_json(os.path.join(cfg.out, "config.json"), {**dataclasses.asdict(cfg), "device": str(device), "task": cfg.task,
               "classes": labels, "model_config": encoder.cfg.to_dict(), "frontend_config": frontend.config()})
    fit = asr.fit_asr_probe if kind == "asr" else sed.fit_sed_probe
    metrics = {"task": kind, **fit(encoder, head, train, valid, test, device, **common), "skipped_files": skips.count}
    probe = Probe(encoder, head.eval(), frontend, labels, "asr" if kind == "asr" else "multilabel")
    save_probe(os.path.join(cfg.out, "probe.safetensors"), probe,
               {"trained_by": "probe_cgp.py", "task_name": cfg.task, **extra})
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    gates = metrics["gate_weights"] or [0.0] * (encoder.cfg.depth - 1) + [1.0]
    save_gates_png(os.path.join(cfg.out, "gates.png"), gates, f"{kind.upper()} {cfg.probe if kind == 'sed' else 'asr'} layer weights")
    print(f"\n{cfg.task} probe on {cfg.train}:\n{summarise_probe(metrics)}")
    return metrics


def main(cfg: Config):
    device = resolve_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    encoder = load_encoder(cfg.encoder).to(device).eval().requires_grad_(False)
    if cfg.task in ("dcase2016", "librispeech"):
        return probe_frames(cfg, encoder, device, cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10)
    runs = plan_runs(cfg)
    skips = SkipLog(strict=cfg.strict)
    for _, tr, te in runs:
        skips.add(tr.skipped + te.skipped)

    resolved = {**dataclasses.asdict(cfg), "device": str(device), "task": runs[0][1].task,
                "classes": runs[0][1].classes, "runs": [r[0] for r in runs],
                "model_config": encoder.cfg.to_dict(), "frontend_config": encoder.frontend_config}
    write_json(os.path.join(cfg.out, "config.json"), resolved)

    t0 = time.time()
    results = []
    for name, train_items, test_items in runs:
        probe, metrics, _ = train_probe(cfg, encoder, train_items, test_items, device, skips, name)
        results.append((name, probe, metrics))
        if len(runs) > 1:  # per-fold outputs; the top level holds mean and std
            fold_dir = os.path.join(cfg.out, name)
            os.makedirs(fold_dir, exist_ok=True)
            save_probe(os.path.join(fold_dir, "probe.safetensors"), probe, {"fold": name})
            write_json(os.path.join(fold_dir, "metrics.json"), {"task": probe.task, **metrics, "skipped_files": skips.count})

    probe = results[-1][1]
    keys = [k for k in ("accuracy", "mAP", "macro_f1") if k in results[0][2]]
    if len(results) == 1:
        metrics, std = {"task": probe.task, **results[0][2]}, None
    else:
        per = {k: np.array([m[k] for _, _, m in results]) for k in keys + ["num_train", "num_test"]}
        std = {k: float(per[k].std()) for k in keys}
        gates = [m["gate_weights"] for _, _, m in results]
        metrics = {"task": probe.task, **{k: float(per[k].mean()) for k in keys},
                   "std": std, "num_train": float(per["num_train"].mean()), "num_test": float(per["num_test"].mean()),
                   "gate_weights": None if gates[0] is None else np.mean(gates, 0).tolist(),
                   "folds": {name: m for name, _, m in results},
                   "note": "mean and population std over folds; num_train/num_test are per-fold means; "
                           "probe.safetensors is the last fold's, every fold's is in its own folder"}
    metrics["skipped_files"] = skips.count
    for _, _, m in results:
        m["skipped_files"] = skips.count
    save_probe(os.path.join(cfg.out, "probe.safetensors"), probe)
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)

    gates = metrics["gate_weights"]
    if gates is None:  # LP and ProtoBin read the last layer only: show that as a one-hot bar chart
        gates = [0.0] * (encoder.cfg.depth - 1) + [1.0]
    gate_std = np.std([m["gate_weights"] for _, _, m in results], 0) if std and metrics["gate_weights"] else None
    save_gates_png(os.path.join(cfg.out, "gates.png"), gates,
                   f"{cfg.probe.upper()} layer weights ({os.path.basename(cfg.encoder.rstrip('/'))})", gate_std)

    if skips.count:
        print(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
    print(f"\n{cfg.probe.upper()} on {cfg.train} ({len(runs)} run(s), {time.time() - t0:.0f} s):")
    print(summarise_probe(metrics, std))
    print(f"wrote {cfg.out}/config.json, probe.safetensors, metrics.json, gates.png")
    return metrics


if __name__ == "__main__":
    config = tyro.cli(Config)
    try:
        main(config)
    except (DataError, AudioError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
