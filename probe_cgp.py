"""Convex Gated Probing (and LCGP / LP / ProtoBin baselines) on a frozen audio encoder.

    python probe_cgp.py --encoder runs/pretrain/encoder.safetensors --train data/sfx/train --test data/sfx/test --out runs/cgp
    python probe_cgp.py --encoder BAT_base.pt --train ESC-50-master --fold all --out runs/esc50
    python probe_cgp.py --encoder EAT-base_epoch10_pt.pt --allow-pickle --train speech_commands_v0.02 --out runs/scv2
    python probe_cgp.py --task audioset --encoder BAT_base.pt --train as20k_train.csv --test as_eval.csv --out runs/as20k
    python probe_cgp.py --task hsn --encoder BEATs_iter3_plus_AS2M.pt --train hsn_train.csv --test hsn_test_5s.csv --out runs/hsn

CGP is the probe of "BAT: Better Audio Transformer Guided by Convex Gated Probing" (ICML 2026,
arxiv.org/abs/2602.16305; reference code github.com/houtan-ghaffari/BAT_ICML2026): a softmax gate over the
frozen encoder's layers, K prototypes, [min, CLS, max] similarity pooling, a linear classifier.

--task picks the reference implementation's recipe for a benchmark (input geometry, steps, batch, warm-up,
weight decay, validation); `--task X --help` shows its values, and every one is a flag. The encoder is
frozen: each step it runs once on the batch under no_grad (bf16 autocast on CUDA) and returns all layers;
only the head has gradients (VQT's query tokens pass through the frozen blocks, with gradients for them). When the training features fit in memory they are computed once and kept
(the first window of every clip: no random roll), otherwise (or with --no-cache) streamed.
Under torchrun the processes share the encoder passes (each encodes every N-th clip) and average the
head's gradients; rank 0 writes. Writes DIR/config.json, DIR/probe.safetensors (loads with bat.load_probe), DIR/metrics.json, and for
gated probes (cgp, lcgp) DIR/gates.png.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from bat.audio import AudioError
from bat.checkpoint import CheckpointError, load_encoder
from bat.data import DataError, SkipLog, collate, make_loader, next_usable
from bat.frontend import Frontend
from bat.metrics import classification_metrics, combine_folds, summarise
from bat import asr, sed
from bat.features import autocast, available_bytes, build_cache, cache_size, encode, human  # noqa: F401
from bat.probes import Features, Probe, build_head, classification_loss, param_groups, save_probe
from bat.sampler import batch_stream, epoch_sampler
from bat.tasks import (TaskError, TaskName, clip_geometry, config_with_task, datasets, frontend_config,
                       parse_with_task, plan_runs, resolve_task, training_data, warmup_steps)
from bat.train import (FlagError, all_reduce_mean, average_gradients, check_flags, close_progress_bars, error_exit,
                       gather_in_order, kill_worker_processes, lr_at, print0, run_processes, share_skips, write_json)


@dataclass
class Config:
    """Train a probe on a frozen encoder. Defaults: the --task recipe (REF's configs)."""

    encoder: str
    """encoder.safetensors / model.safetensors of this project, a BAT reference checkpoint (.pt/.pth/.ckpt),
    an EAT or SSLAM fairseq checkpoint (needs --allow-pickle), or random:tiny|small|base (a baseline)"""
    train: str
    """training data: a folder (one subfolder per class), a CSV (path,label or path,labels), an ESC-50 or
    Speech Commands v2 root"""
    test: str | None = None
    """test data; default: the data set's own split (Speech Commands' test list, ESC-50 --fold), else a
    stratified --test-fraction of --train"""
    fold: str | None = None
    """ESC-50 test fold 1-5, or "all" for REF's 5-fold cross-validation (mean and std)"""
    task: TaskName = "auto"
    """REF recipe: audioset (AS-20k), as2m, esc50, scv2, generic (your data), dcase2016 (sound event
    detection: a HEAR task folder or an event CSV, frame-wise probe), librispeech (the ASR probe: a CSV
    path,text or LibriSpeech folders), hsn (BirdSet HSN at 32 kHz); auto: esc50 / scv2 / dcase2016 /
    librispeech for those layouts, else generic"""
    probe: Literal["cgp", "lcgp", "lp", "protobin", "h2t", "vqt"] = "cgp"
    """cgp (the paper's probe), lcgp (gated sum of CLS vectors), lp (last CLS, linear), protobin, h2t
    (Head2Toe: all layers' CLS, group lasso), vqt (learned query tokens per block; trains through the frozen
    encoder, no feature cache)"""
    prototypes: int = 10000
    """number of prototypes K (cgp, protobin)"""
    lasso_weight: float = 1e-4
    """h2t: weight of the group-lasso penalty (REF 1e-4)"""
    queries: int = 10
    """vqt: query tokens per block (REF 10)"""
    asymmetric_loss: bool = True
    """multi-label: REF's asymmetric loss (AudioSet); --no-asymmetric-loss: plain BCE (REF HSN)"""
    out: str = "runs/probe"
    """output folder (config.json, probe.safetensors, metrics.json, gates.png)"""
    seed: int = 0
    """seed of the head's init, the data order (and of random:* encoders)"""
    steps: int = 4000
    """optimiser steps"""
    batch_size: int = 48
    """clips per step"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    lr: float = 1e-3
    """peak learning rate (AdamW 0.9, 0.999)"""
    min_lr: float = 1e-6
    """floor of the cosine decay"""
    warmup_share: float = 0.1
    """linear warm-up as a share of --steps (REF: 500 of 20 000 steps for AudioSet, 10 % elsewhere)"""
    warmup_steps: int | None = None
    """linear warm-up steps; overrides --warmup-share"""
    weight_decay: float = 0.05
    """on the Linear weight only (REF: 0.2 for ESC-50)"""
    dropout: float = 0.2
    """dropout before the Linear"""
    use_cls: bool = True
    """CGP pools [min, CLS, max]; --no-use-cls pools [min, mean, max] (encoders without a CLS token)"""
    val_every: int = 0
    """evaluate on the validation split (Speech Commands' list) every N steps and test the head that was
    best there (REF SCV2: 500); 0: test the final head"""
    balanced: bool = False
    """class-balanced sampling (REF AudioSet-2M): clip weight = mean inverse frequency of its labels"""
    epoch_clips: int | None = None
    """clips per balanced epoch (default REF's 200 000; drawn with replacement from a smaller set)"""
    target_frames: int | None = None
    """spectrogram frames (multiple of 16); default: the task's (AudioSet 1024, ESC-50 512, SCV2 112;
    generic: the longest training clip rounded up to 16 frames)"""
    max_seconds: float = 10.23
    """generic task: longest clip length used (longer clips: a random window in training, the first window
    in evaluation)"""
    cache_features: bool = False
    """always keep the frozen training features in memory (an error when they do not fit)"""
    no_cache: bool = False
    """never cache: run the encoder on every training batch (REF's random roll/window of AudioSet clips)"""
    asr_hidden: int = 512
    """librispeech: LSTM units per direction of the ASR head (REF: 512)"""
    allow_pickle: bool = False
    """allow checkpoints that need pickle, such as EAT/SSLAM fairseq files (only for files you trust)"""
    strict: bool = False
    """stop at the first unreadable audio file instead of skipping it"""
    workers: int = min(4, os.cpu_count() or 1)
    """DataLoader worker processes (0: load in the main process)"""
    test_fraction: float = 0.2
    """held-out share when neither --test nor a predefined split exists"""


def parse_config(argv=None) -> Config:
    """The CLI: defaults are the recipe of --task (auto: recognised from --train's layout)."""
    return parse_with_task(Config, "probe", argv)


def config(**values) -> Config:
    """A Config from Python with the task's recipe for every value not given (like the CLI)."""
    return config_with_task(Config, "probe", **values)


def check(cfg):
    check_flags(cfg, at_least=dict(steps=1, batch_size=1, prototypes=1, warmup_steps=0, val_every=0, epoch_clips=1,
                                   workers=0, target_frames=16, queries=1),
                positive=("lr", "max_seconds"), fractions=("warmup_share", "dropout", "test_fraction"))
    if cfg.min_lr < 0 or cfg.weight_decay < 0:
        raise FlagError("--min-lr and --weight-decay must be >= 0")
    if cfg.cache_features and cfg.no_cache:
        raise FlagError("--cache-features and --no-cache contradict each other; pick one")
    if cfg.lasso_weight < 0:
        raise FlagError("--lasso-weight must be >= 0")
    if cfg.probe == "vqt" and cfg.cache_features:
        raise FlagError("--probe vqt runs its query tokens through the encoder every step: no --cache-features")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.batch_size % world:
        raise FlagError(f"--batch-size {cfg.batch_size} is the batch of all {world} processes together: it must be "
                        f"divisible by {world}")


def decide_cache(cfg, head, encoder, clips, target_frames, device, task, clip_samples):
    """Cache the frozen features when they fit in memory (--cache-features: must; --no-cache: never)."""
    if cfg.no_cache or not head.cacheable:
        return False
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    need, layers, tokens = cache_size(head, encoder, clips, target_frames, dtype)
    have = available_bytes(device)
    fits = need <= (0.8 if cfg.cache_features else 0.5) * have
    fits = all_reduce_mean([float(fits)], device)[0] == 1.0  # under torchrun: cache only if it fits everywhere
    print0(f"feature cache: {clips} clips x {layers} layers x {tokens} tokens x {encoder.cfg.dim} x "
          f"{torch.finfo(dtype).bits // 8} B = {human(need)} ({human(have)} available on {device.type}): "
          f"{'caching' if fits else 'streaming (does not fit)'}")
    if cfg.cache_features and not fits:
        raise DataError(f"--cache-features: the features need {human(need)} but only {human(have)} are available "
                        f"on {device.type}; run without --cache-features")
    if fits and task.random_window:
        print0(f"note: cached features are the unrolled first {clip_samples} samples of each training clip; "
              f"task {task.name}'s random roll and window of training clips need --no-cache")
    return fits


@torch.no_grad()
def evaluate(head, source, device, batch_size, skips, rank=0, world=1):
    """Logits (float32, CPU) and targets (CPU) of every usable clip, in data-set order. `source`: cached
    (Features, targets; every process holds them all), or (encoder, frontend, dataset, workers) to stream:
    under torchrun each process then scores every world-th clip and the scores are gathered."""
    head.eval()
    if isinstance(source[0], Features):
        feats, y = source
        with autocast(device):
            logits = [head(feats.index(rows)).float().cpu()
                      for rows in torch.arange(y.shape[0], device=y.device).split(batch_size)]
        head.train()
        return torch.cat(logits), y.cpu()
    encoder, frontend, dataset, workers = source
    shard = dataset if world == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    logits, targets, index = [], [], []
    for batch in tqdm(make_loader(shard, batch_size, workers=min(workers, len(shard))), desc="evaluating",
                      unit="batch", dynamic_ncols=True, leave=False, disable=rank != 0):
        skips.add(batch.skipped)
        if len(batch):
            with autocast(device):
                logits.append(head(encode(encoder, frontend, head, batch, device)).float().cpu())
            targets.append(batch.targets)
            index.append(batch.indices)
    head.train()
    rows = gather_in_order(index, logits, targets)
    if rows is None:  # no process found a usable clip: say why, naming every process's files
        share_skips(skips)
        raise skips.nothing_usable(dataset.items.files, "the evaluation data")
    return rows[1], rows[2]


# ------------------------------------------------------------------------------------- one run


def training_source(cfg, task, encoder, frontend, head, run, val, data, clip_samples, frames, device, skips, rank,
                    world):
    """(cache, validation source, endless training batches). With a cache (features of every usable training
    clip, and (features, targets) of the validation clips) the batches are row indices into it; otherwise they
    are waveform batches the encoder runs on, and validation streams too.

    Under torchrun the batches are this process's part of each step's batch: with a cache, every process
    draws the same batch of rows and takes every world-th row of it (so the step equals one process's);
    streaming, each process draws its own batch_size / world clips (a distributed shuffle, as finetune.py)."""
    eval_bs, clips = 2 * cfg.batch_size, len(run.train) + (len(val) if val is not None else 0)
    cache = val_source = None
    if decide_cache(cfg, head, encoder, clips, frames, device, task, clip_samples):
        cache = build_cache(encoder, frontend, head, data(run.train), eval_bs, cfg.workers, device, skips,
                            what=training_data(cfg.train, run), rank=rank, world=world)
        if val is not None:
            val_source = build_cache(encoder, frontend, head, data(val), eval_bs, cfg.workers, device, skips,
                                     "caching validation features", "the validation data", rank, world)
    elif val is not None:
        val_source = (encoder, frontend, data(val), cfg.workers)
    n, classes = (len(run.train) if cache is None else cache[1].shape[0]), run.train.classes
    labels = None
    if cfg.balanced:
        labels = torch.as_tensor(run.train.targets(classes)) if cache is None else cache[1].cpu()
    if cache is not None:
        sampler = epoch_sampler(n, labels, cfg.balanced, cfg.epoch_clips, len(classes), seed=cfg.seed)
        rows, _ = batch_stream(range(n), sampler, cfg.batch_size, 0, cfg.seed)
        return cache, val_source, (b[rank::world] for b in rows)
    sampler = epoch_sampler(n, labels, cfg.balanced, cfg.epoch_clips, len(classes), world, rank, cfg.seed)
    batches, _ = batch_stream(data(run.train, train=True), sampler, cfg.batch_size // world, cfg.workers, cfg.seed,
                              collate_fn=collate)
    return cache, val_source, batches


def train_probe(cfg, task, encoder, run, device, skips, rank=0, world=1):
    """Train one head on run.train (validating on run.val), test it on run.test. Returns (Probe, metrics).
    Under torchrun every process holds the same head; gradients are averaged over processes each step."""
    if run.train.task not in ("multiclass", "multilabel") or run.train.task != run.test.task:
        raise DataError(f"train is {run.train.task} but test is {run.test.task}; both need the same labelled task")
    classes, kind = run.train.classes, run.train.task
    clip_samples, frames = clip_geometry(task, run.train, cfg.target_frames, cfg.max_seconds)
    fcfg = frontend_config(encoder.frontend_config, task, frames)
    frontend = Frontend.from_config(fcfg).to(device)
    torch.manual_seed(cfg.seed)  # the head's init: the same on every process
    use_cls = cfg.use_cls and getattr(encoder, "has_cls", True)  # BEATs: CGP pools [min, mean, max] (REF)
    head = build_head(cfg.probe, encoder.cfg.dim, encoder.cfg.depth, len(classes), cfg.prototypes, cfg.dropout,
                      use_cls, lasso_weight=cfg.lasso_weight, num_queries=cfg.queries).to(device)
    if rank:
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout: each process draws its own
    warmup = warmup_steps(cfg)
    opt = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    val = run.val if cfg.val_every and run.val is not None and len(run.val) else None
    print0(f"[{run.name}] task {task.name}: {kind}, {len(classes)} classes, {len(run.train)} train / "
           f"{len(val) if val is not None else 0} val / {len(run.test)} test clips, clips {clip_samples / task.sample_rate:.2f} s "
           f"-> {frames} frames, {cfg.probe} head {sum(p.numel() for p in head.parameters()):,} parameters, "
           f"{cfg.steps} steps x {cfg.batch_size}{f' over {world} processes' if world > 1 else ''}, warm-up {warmup}, "
           f"weight decay {cfg.weight_decay}")
    data = lambda items, train=False: datasets(task, items, classes, clip_samples, fcfg, train)  # noqa: E731
    score = lambda source: evaluate(head, source, device, 2 * cfg.batch_size, skips, rank, world)  # noqa: E731

    cache, val_source, batches = training_source(cfg, task, encoder, frontend, head, run, val, data, clip_samples,
                                                 frames, device, skips, rank, world)
    best, history = None, []
    head.train()
    pbar = tqdm(range(cfg.steps), desc=f"probe {run.name}", unit="step", dynamic_ncols=True, disable=rank != 0)
    for step in pbar:
        lr = lr_at(step, cfg.lr, warmup, cfg.steps, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        if cache is not None:
            idx = next(batches).to(device)
            feats, targets = cache[0].index(idx), cache[1][idx]
        else:
            batch, _ = next_usable(batches, skips, run.train.files, training_data(cfg.train, run))
            feats, targets = encode(encoder, frontend, head, batch, device, grad=True), batch.targets.to(device)
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        if len(targets):  # a process may get no row of a batch smaller than the number of processes
            with autocast(device):
                logits = head(feats)
            loss = classification_loss(logits, targets, kind, cfg.asymmetric_loss)
            if head.penalty() is not None:  # Head2Toe's group lasso
                loss = loss + head.penalty()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{run.name}] loss is {loss.item()} at step {step + 1}: non-finite encoder "
                                         "outputs or too high --lr")
            loss.backward()
        average_gradients(head.parameters(), len(targets))  # torchrun: the whole batch's gradient everywhere
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if val_source is not None and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
            m = classification_metrics(*score(val_source), kind)
            key = "accuracy" if kind == "multiclass" else "mAP"
            history.append({"step": step + 1, "split": "val", **m})
            if best is None or m[key] >= best["score"]:  # ties: the later head, as REF
                best = {"step": step + 1, "score": m[key], "metric": key,
                        "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
            if rank == 0:
                pbar.write(f"[{run.name}] step {step + 1}: val {key} {100 * m[key]:.2f}")
    pbar.close()

    if best is not None:  # REF (SCV2): test the head that was best on the validation split
        head.load_state_dict(best["head"])
        print0(f"[{run.name}] testing the best validation head (step {best['step']}, {best['metric']} "
               f"{100 * best['score']:.2f})")
    logits, targets = score((encoder, frontend, data(run.test), cfg.workers))
    share_skips(skips)  # the report counts every process's unreadable files
    metrics = classification_metrics(logits, targets, kind, classes)
    # clips actually used: every listed training item whose file was readable
    metrics.update(num_train=int(cache[1].shape[0]) if cache is not None else sum(f not in skips.seen
                                                                                  for f in run.train.files),
                   num_test=int(targets.shape[0]), target_frames=frames, clip_samples=clip_samples,
                   **skips.report(run.train.files, training_data(cfg.train, run)))
    if best is not None:
        metrics["selected"] = {"step": best["step"], "val_" + best["metric"]: best["score"]}
        metrics["history"] = history
    gates = head.gate_weights()
    metrics["gate_weights"] = None if gates is None else gates.detach().float().cpu().tolist()
    return Probe(encoder, head.eval(), frontend.cpu(), classes, kind, clip_samples), metrics


# ------------------------------------------------------------------------------------- outputs


def text_bars(values, width=40):
    top = max(values) if values and np.isfinite(values).all() and max(values) > 0 else 1.0
    return "\n".join(f"  layer {i + 1:2d} {v:6.3f} {'#' * max(1, round(width * v / top)) if np.isfinite(v) else '?'}"
                     for i, v in enumerate(values))


def save_gates_png(path, gates, title, std=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(gates) + 2), 3.2))
    layers = np.arange(1, len(gates) + 1)
    ax.bar(layers, gates, yerr=std, color="#3b75af", capsize=3)
    ax.axhline(1 / len(gates), color="grey", lw=0.8, ls="--", label="uniform 1/L")
    ax.set(xlabel="encoder layer (block)", ylabel="gate weight (softmax)", xticks=layers)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def file_metadata(cfg, metrics, run_name):
    """What export.py and users read from probe.safetensors besides the weights: the task recipe and the
    model's input window (clip_samples waveform samples -> target_frames spectrogram frames)."""
    return {"trained_by": "probe_cgp.py", "task_name": cfg.task, "clip_samples": metrics["clip_samples"],
            "target_frames": metrics["target_frames"], "run": run_name}


def probe_frames(cfg, encoder, device):
    """--task dcase2016: a frame-wise probe for sound event detection (bat/sed.py); --task librispeech: the
    ASR probe (bat/asr.py). Same outputs as the clip tasks, with the task's own metrics."""
    skips = SkipLog(strict=cfg.strict)
    torch.manual_seed(cfg.seed)
    common = dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr, warmup=warmup_steps(cfg),
                  weight_decay=cfg.weight_decay, val_every=cfg.val_every, seed=cfg.seed, workers=cfg.workers, skips=skips)
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
        frames = cfg.target_frames or sed.recording_frames(train)
        common.update(target_frames=frames, cache=decide_cache(cfg, head, encoder, len(train), frames, device,
                                                                resolve_task(cfg.task), None))
        extra = {"frame_wise": True, "patch_seconds": sed.PATCH_SECONDS, "threshold": sed.THRESHOLD,
                 "median_filter_patches": sed.MEDIAN_PATCHES}
    write_json(os.path.join(cfg.out, "config.json"), {**dataclasses.asdict(cfg), "device": str(device), "task": cfg.task,
               "classes": labels, "model_config": encoder.cfg.to_dict(), "frontend_config": frontend.config()})
    fit = asr.fit_asr_probe if kind == "asr" else sed.fit_sed_probe
    metrics = {"task": kind, **fit(encoder, head, train, valid, test, device, **common), **skips.report()}
    probe = Probe(encoder, head.eval(), frontend, labels, "asr" if kind == "asr" else "multilabel")
    save_probe(os.path.join(cfg.out, "probe.safetensors"), probe,
               {"trained_by": "probe_cgp.py", "task_name": cfg.task, **extra})
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    gates = metrics["gate_weights"] or [0.0] * (encoder.cfg.depth - 1) + [1.0]
    save_gates_png(os.path.join(cfg.out, "gates.png"), gates, f"{kind.upper()} {cfg.probe if kind == 'sed' else 'asr'} layer weights")
    print(f"\n{'ASR' if kind == 'asr' else cfg.probe.upper() + ' frame-wise'} probe on {cfg.train}, task {cfg.task}:")
    print(summarise(metrics))
    if metrics["gate_weights"]:
        print("gate weights (softmax over layers):\n" + text_bars(metrics["gate_weights"]))
    print(f"wrote {cfg.out}/config.json, probe.safetensors, metrics.json, gates.png")
    return metrics


def main(cfg: Config):
    """Run the probe; under torchrun (WORLD_SIZE > 1) as data-parallel processes of which rank 0 writes."""
    check(cfg)
    return run_processes(_main, cfg)


def _main(cfg, rank, world, device):
    task = resolve_task(cfg.task, cfg.train)
    cfg = dataclasses.replace(cfg, task=task.name)
    if task.frame_wise and world > 1:
        raise FlagError(f"--task {task.name}: the frame-wise probe runs in one process; start it without torchrun")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    encoder = load_encoder(cfg.encoder, allow_pickle=cfg.allow_pickle).to(device).eval().requires_grad_(False)
    if task.frame_wise:  # dcase2016, librispeech: bat/sed.py, bat/asr.py
        return probe_frames(cfg, encoder, device)
    runs = plan_runs(cfg.train, cfg.test, cfg.fold, cfg.test_fraction, cfg.seed, log=print0)
    skips = SkipLog(strict=cfg.strict)
    for r in runs:
        skips.add(r.train.skipped + r.test.skipped + (r.val.skipped if r.val is not None else []))
    if rank == 0:
        write_json(os.path.join(cfg.out, "config.json"),
                   {**dataclasses.asdict(cfg), "device": str(device), "world_size": world,
                    "data_task": runs[0].train.task, "classes": runs[0].train.classes, "runs": [r.name for r in runs],
                    "warmup": warmup_steps(cfg), "model_config": encoder.cfg.to_dict(),
                    "frontend_config": encoder.frontend_config})

    t0, results = time.time(), []
    for run in runs:
        probe, metrics = train_probe(cfg, task, encoder, run, device, skips, rank, world)
        results.append((run.name, probe, metrics))
        if len(runs) > 1 and rank == 0:  # per-fold outputs; the top level holds mean and std
            fold_dir = os.path.join(cfg.out, run.name)
            os.makedirs(fold_dir, exist_ok=True)
            save_probe(os.path.join(fold_dir, "probe.safetensors"), probe, file_metadata(cfg, metrics, run.name))
            write_json(os.path.join(fold_dir, "metrics.json"), {"task": probe.task, **metrics})

    metrics, std = combine_folds(results, "probe.safetensors")
    metrics.update(skips.report())  # every fold's unreadable files, once
    if rank == 0:
        write_outputs(cfg, task, results, metrics, std, skips, time.time() - t0)
    return metrics


def write_outputs(cfg, task, results, metrics, std, skips, seconds):
    """DIR/probe.safetensors (the last run's head), metrics.json, gates.png, and the summary on stdout."""
    save_probe(os.path.join(cfg.out, "probe.safetensors"), results[-1][1],
               file_metadata(cfg, results[-1][2], results[-1][0]))
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    written = ["config.json", "probe.safetensors", "metrics.json"]
    if metrics["gate_weights"] is not None:  # LP and ProtoBin have no gate: no chart
        name = os.path.basename(cfg.encoder.rstrip("/"))
        title = f"{cfg.probe.upper()} layer weights: {name} on {task.name} ({os.path.basename(cfg.train.rstrip('/'))}" \
                f"{', mean of ' + str(len(results)) + ' folds' if len(results) > 1 else ''})"
        save_gates_png(os.path.join(cfg.out, "gates.png"), metrics["gate_weights"], title,
                       metrics.get("gate_weights_std"))
        written.append("gates.png")

    if skips.count:
        print(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
    print(f"\n{cfg.probe.upper()} on {cfg.train}, task {task.name} ({len(results)} run(s), {seconds:.0f} s):")
    print(summarise(metrics, std))
    if metrics.get("gate_weights"):
        print("gate weights (softmax over layers):\n" + text_bars(metrics["gate_weights"]))
    print(f"wrote {cfg.out}/{', '.join(written)}")


def stop_on_ctrl_c(signum, frame):
    # Kill the loader workers before the main process stops reading from them: a worker whose reader went
    # away mid-transfer prints a traceback of its own after our one-line message.
    kill_worker_processes()
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stop_on_ctrl_c)
    try:
        config_ = parse_config()
        main(config_)
    except (DataError, AudioError, CheckpointError, TaskError, FlagError, FloatingPointError,
            OSError) as e:  # OSError: e.g. --out on a read-only or full disk
        error_exit(e)
    except KeyboardInterrupt:
        close_progress_bars()
        print("\ninterrupted (Ctrl-C): the probe was not saved", file=sys.stderr)
        sys.exit(130)
