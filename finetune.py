"""Fine-tune an audio encoder end to end with a linear head (spec/BAT.md §7).

    python finetune.py --encoder runs/pretrain/encoder.safetensors --train data/sfx/train --test data/sfx/test \
        --out runs/ft
    python finetune.py --encoder BAT_base.pt --train ESC-50-master --fold all --out runs/esc50     # 5-fold CV
    python finetune.py --encoder BAT_base.pt --train speech_commands_v0.02 --out runs/scv2
    python finetune.py --encoder BAT_base.pt --train as20k_train.csv --test as_eval.csv --task audioset --out runs/as20k
    torchrun --nproc_per_node 4 finetune.py ...                                        # DDP, same flags

Model: the encoder (drop-path 0.1, linear over depth) -> last block's CLS -> LayerNorm -> dropout -> Linear,
i.e. bat.probes.LinearProbe, saved with save_probe so `bat.load_probe` and export.py open the result.
Optimiser: AdamW (0.9, 0.95), weight decay 0.05 (not on biases, norms and the CLS token), layer-wise LR
decay 0.75 (REF's param_groups_lrd), linear warm-up then cosine to 1e-6. Augmentations (bat/augment.py)
run batched on the device. `--task` picks REF's per-task recipe; every value can still be overridden,
and `--task X --help` shows the defaults it picks. `--task auto` (default) picks esc50 / scv2 for those
layouts and otherwise `generic`, which is REF's AudioSet-20k recipe with the spectrogram length taken
from the data (REF's AudioSet-20k: `--task audioset`, 1024 frames).

Writes DIR/config.json, DIR/model.safetensors, DIR/metrics.json and DIR/log.jsonl; with --fold all one
sub-folder per fold too. The training state (DIR/state.pt, written atomically every
--checkpoint-every steps and on SIGINT/SIGTERM) makes a re-run of the same command resume; on the CPU
with --workers 0 a resumed run reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from bat import augment as A
from bat.audio import SAMPLE_RATE, AudioError
from bat.checkpoint import CheckpointError, load_encoder
from bat.data import (AudioDataset, DataError, SkipLog, collate, detect_source, durations, list_dataset,
                      stratified_split)
from bat.frontend import Frontend, fix_frames
from bat.metrics import classification_metrics, summarise
from bat.model import Encoder
from bat.probes import LinearProbe, Probe, asymmetric_loss, save_probe
from bat.sampler import BalancedSampler, EpochBatches
from bat.train import (StopFlag, TqdmStream, all_gather_object, cleanup_distributed, load_state, param_groups_lrd,
                       print0, remove_stale_temporaries, rng_state, save_state, set_lr, set_rng_state,
                       setup_distributed, write_json)


@dataclass
class Config:
    """Fine-tune an encoder with a linear head. Defaults: REF's AudioSet-20k recipe, or the --task preset."""

    encoder: str
    """encoder.safetensors / model.safetensors of this project, a REF (.pt/.pth/.ckpt), EAT or SSLAM
    checkpoint, or random:tiny|small|base (random init, a baseline)"""
    train: str
    """training data: folder, CSV manifest, ESC-50 or Speech Commands v2 root"""
    test: str | None = None
    """test data; default: the data set's own split (SCV2 test list, ESC-50 --fold), else a stratified
    --test-fraction of --train"""
    fold: str | None = None
    """ESC-50 test fold 1-5, or "all" for 5-fold cross-validation (mean and std)"""
    out: str = "runs/finetune"
    """output folder (config.json, model.safetensors, metrics.json, log.jsonl, training state)"""
    seed: int = 0
    """seed of the head's init, data order and augmentations (and of random:* encoders)"""
    steps: int = 40000
    """optimiser steps"""
    batch_size: int = 48
    """clips per optimiser step, in total over processes and --accum-steps"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ... (under torchrun: each process's local GPU)"""
    task: Literal["auto", "audioset", "esc50", "scv2", "generic"] = "auto"
    """recipe preset: REF's settings for AudioSet-20k, ESC-50, Speech Commands v2; generic: AudioSet-20k's
    with the spectrogram length from the data; auto: esc50/scv2 for those layouts, else generic"""

    lr: float = 5e-5
    """peak learning rate (of the top layer group; lower groups get lr * layer_decay^k)"""
    min_lr: float = 1e-6
    """floor of the cosine decay (scaled per layer group like the peak)"""
    warmup_steps: int = 4000
    """linear warm-up from 0 to --lr"""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms and the CLS token)"""
    layer_decay: float = 0.75
    """layer-wise LR decay: block i trains at layer_decay^(depth - i), the patch embedding and CLS token
    at layer_decay^(depth + 1), the head at 1; 1.0 turns it off"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    drop_path: float = 0.1
    """stochastic depth of the last block; block i gets drop_path * i / (depth - 1)"""
    head_dropout: float = 0.2
    """dropout between the head's LayerNorm and Linear"""
    label_smoothing: float = 0.0
    """cross-entropy label smoothing (multi-class only)"""
    accum_steps: int = 1
    """gradient accumulation: micro-batches per optimiser step"""

    augment: bool = True
    """master switch: --no-augment turns every augmentation below off"""
    mixup: bool = True
    """mixup with the reversed batch, soft labels"""
    mixup_prob: float = 0.9
    """share of the examples that get mixed"""
    mixup_beta: float = 0.8
    """mixing weight ~ Beta(mixup_beta, mixup_beta)"""
    specaug: bool = True
    """SpecAugment: frequency and time masks, independent per example"""
    freq_mask: int = 16
    """SpecAugment: widest frequency mask (mel bins)"""
    time_mask: int = 64
    """SpecAugment: widest time mask (frames)"""
    mask_repeats: int = 2
    """SpecAugment: masks per axis and example"""
    noise: bool = False
    """coloured noise, power-law exponent U(-2, 2), SNR U(5, 25) dB"""
    noise_prob: float = 0.3
    """share of the examples that get coloured noise"""
    time_roll: bool = True
    """circular roll of each spectrogram by a random number of frames (REF rolls every AudioSet training
    waveform in its data set, and the ESC-50 and SCV2 spectrograms)"""
    gain: bool = False
    """random gain 0.5 + Beta(10, 10) (a no-op for the BAT front-end; for EAT/SSLAM/BEATs)"""

    target_frames: int | None = None
    """spectrogram frames (multiple of 16); default: the longest training clip (capped at --max-seconds)
    rounded up to 16 frames; presets: audioset 1024, esc50 512, scv2 112"""
    max_seconds: float = 10.23
    """longest clip the default target length allows (longer clips: random window in training, first
    window in evaluation)"""
    test_fraction: float = 0.2
    """held-out share when neither --test nor a predefined split exists"""
    balanced: bool = False
    """class-balanced sampling (REF AudioSet-2M): clip weight = mean inverse frequency of its labels"""
    epoch_clips: int | None = None
    """clips per epoch drawn without replacement with --balanced (REF AudioSet-2M: 200000); default all"""
    workers: int = min(4, os.cpu_count() or 1)
    """DataLoader worker processes (0: load in the main process; exact resume on the CPU needs 0)"""
    strict: bool = False
    """stop at the first unreadable audio file instead of skipping it"""

    eval_every: int = 0
    """also evaluate on the test set every N steps (0: only at the end)"""
    val_every: int = 0
    """evaluate on the validation split (SCV2's list) every N steps and test the best model (REF SCV2: 500)"""
    eval_batch_size: int | None = None
    """default: 2 x the per-process batch"""
    checkpoint_every: int = 1000
    """write the training state every N steps (and at the end, and on SIGINT/SIGTERM)"""
    log_every: int = 10
    """progress-bar and log.jsonl interval in steps"""
    stop_after: int | None = None
    """save the training state and stop after this step, as if interrupted (re-run to resume)"""
    allow_pickle: bool = False
    """allow checkpoints that need pickle (only for files you trust)"""


# REF's per-task settings (configs/*/..._finetune_config.yaml). Anything not listed keeps the Config
# default above, which is REF's AudioSet-20k recipe.
PRESETS = {
    "generic": {},
    "audioset": dict(target_frames=1024),
    "esc50": dict(steps=4000, warmup_steps=400, mixup=False, time_mask=32, mask_repeats=1, noise=True,
                  target_frames=512),
    "scv2": dict(steps=10000, batch_size=256, warmup_steps=1000, head_dropout=0.0, mixup=False, time_mask=32,
                 mask_repeats=1, noise=True, target_frames=112, val_every=500),
}
# Settings a resumed run may change without invalidating its training state.
RESUMABLE_CHANGES = {"device", "workers", "eval_every", "eval_batch_size", "checkpoint_every", "log_every",
                     "stop_after", "strict", "allow_pickle"}


def parse_config(argv=None) -> Config:
    """tyro CLI whose defaults are the preset of --task (auto: detected from --train's layout)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="auto")
    pre.add_argument("--train", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.task not in ("auto", *PRESETS):
        print(f"error: --task must be one of auto, {', '.join(PRESETS)}; got {known.task!r}", file=sys.stderr)
        sys.exit(2)
    task = resolve_task(known.task, known.train)
    defaults = Config(encoder=tyro.MISSING, train=tyro.MISSING, **{**PRESETS.get(task, {}), "task": task})
    return tyro.cli(Config, default=defaults, args=argv)


def resolve_task(task, train):
    """--task auto: the ESC-50 / Speech Commands recipe for those layouts, else generic."""
    if task != "auto":
        return task
    try:
        source = detect_source(train) if train else None
    except DataError:  # a missing path is reported later, by the data listing
        source = None
    return source if source in ("esc50", "scv2") else "generic"


def autocast(device):
    """bf16 autocast on CUDA (REF runs BAT in bf16), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ------------------------------------------------------------------------------ model and loss


def build_model(cfg, base, classes, task, frontend_config, device):
    """Probe(encoder with drop-path, LinearProbe head). The encoder is rebuilt with drop-path because
    load_encoder returns an inference encoder; the weights are copied exactly."""
    encoder = Encoder(base.cfg, drop_path=cfg.drop_path)
    encoder.load_state_dict(base.state_dict())
    encoder.frontend_config = frontend_config
    head = LinearProbe(base.cfg.dim, len(classes), mode="cls", norm=True, dropout=cfg.head_dropout)
    return Probe(encoder, head, Frontend.from_config(frontend_config), classes, task).to(device)


def loss_fn(logits, targets, task, label_smoothing=0.0):
    """Asymmetric BCE (gamma_neg 1, gamma_pos 0, REF) for multi-label; cross-entropy for multi-class,
    with integer or soft (mixup) targets. In float32 whatever the autocast dtype."""
    logits = logits.float()
    if task == "multilabel":
        return asymmetric_loss(logits, targets.float())
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------ data


def plan_runs(cfg):
    """[(name, train, val or None, test)]: one run, or one per fold for ESC-50 --fold all."""
    train = list_dataset(cfg.train)
    if cfg.fold is not None:
        if cfg.test is not None:
            raise DataError("--fold picks the test fold of an ESC-50 --train; leave out --test")
        if train.folds is None:
            raise DataError(f"{cfg.train}: --fold needs ESC-50's layout (meta/esc50.csv), "
                            f"this is a {train.source} data set")
        if cfg.fold == "all":
            folds = sorted(set(train.folds))
        else:
            try:
                folds = [int(cfg.fold)]
            except ValueError:
                raise DataError(f"--fold must be a fold number or 'all', got {cfg.fold!r}") from None
        return [(f"fold{k}", tr, None, te) for k in folds for tr, te in [train.fold_split(k)]]
    if train.source == "esc50":
        raise DataError(f"{cfg.train} is ESC-50: choose the test fold with --fold 1..5 or --fold all")
    if train.source == "scv2":
        val = train.split("val")
        test = train.split("test") if cfg.test is None else _test_split(list_dataset(cfg.test))
        return [("test", train.split("train"), val, test)]
    if cfg.test is not None:
        return [("test", train, None, _test_split(list_dataset(cfg.test)))]
    print0(f"note: no --test given; holding out a stratified {cfg.test_fraction:.0%} of {cfg.train} (seed {cfg.seed})")
    train, test = stratified_split(train, cfg.test_fraction, cfg.seed)
    return [("test", train, None, test)]


def _test_split(items):
    return items.split("test") if items.source == "scv2" else items


def clip_geometry(cfg, train):
    """(clip_samples, target_frames): waveforms are cut/padded to clip_samples (a random window of long
    clips in training, the first in evaluation), spectrograms padded to target_frames (REF: SCV2 1 s ->
    101 frames -> 112, ESC-50 5 s -> 501 -> 512, AudioSet 10 s -> 1001 -> 1024)."""
    secs = durations(train)
    longest = np.nanmax(secs) if np.isfinite(secs).any() else 1.0
    samples = int(round(min(longest, cfg.max_seconds) * SAMPLE_RATE))
    if cfg.target_frames is not None:
        if cfg.target_frames <= 0 or cfg.target_frames % 16:
            raise DataError(f"--target-frames must be a positive multiple of 16, got {cfg.target_frames}")
        return min(samples, (cfg.target_frames - 1) * 160), cfg.target_frames
    return samples, 16 * math.ceil((1 + samples // 160) / 16)


def train_loader(cfg, dataset, items, micro_batch, rank, world, start):
    """One DataLoader for the whole run: epochs of a (balanced or shuffled) distributed sampler, in
    micro-batches, starting `start` batches into the stream (resume)."""
    try:
        if cfg.balanced:
            labels = torch.as_tensor(items.targets(dataset.classes))
            sampler = BalancedSampler(labels, cfg.epoch_clips, num_classes=len(dataset.classes),
                                      num_replicas=world, rank=rank, seed=cfg.seed)
        else:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=cfg.seed)
        batches = EpochBatches(sampler, micro_batch, start)
    except ValueError as e:  # e.g. --epoch-clips larger than the training set
        raise DataError(f"{cfg.train}: {e}") from None
    # Own generator for the worker seeds, so starting a loader draws nothing from the global RNG
    # (a resumed run would otherwise diverge from an uninterrupted one).
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + start)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                                         collate_fn=collate, generator=gen, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=False)
    return iter(loader), batches


def training_inputs(cfg, raw_frontend, target_frames, wave, lengths, targets, num_classes, task):
    """Waveforms -> augmented spectrograms and (soft) targets, all batched on the device (REF's order:
    gain, noise | front-end | roll, pad, mixup, SpecAugment)."""
    aug = cfg.augment
    if aug and cfg.gain:
        wave = A.random_gain(wave)
    if aug and cfg.noise:
        wave = A.coloured_noise(wave, cfg.noise_prob, lengths=lengths)
    spec = raw_frontend(wave, lengths)
    if aug and cfg.time_roll:
        spec = A.time_roll(spec)  # before padding: the clip wraps around, the padding stays at the end
    spec = fix_frames(spec, target_frames)
    if aug and cfg.mixup:
        if task == "multiclass":
            targets = F.one_hot(targets, num_classes).float()
        spec, targets, _ = A.mixup(spec, targets, cfg.mixup_prob, cfg.mixup_beta)
    if aug and cfg.specaug:
        spec = A.spec_augment(spec, cfg.freq_mask, cfg.time_mask, cfg.mask_repeats)
    return spec, targets


@torch.no_grad()
def evaluate(model, dataset, batch_size, workers, device, skips, rank, world, desc="evaluating"):
    """Logits and targets of every usable clip (in data-set order), sharded over processes."""
    model.eval()
    shard = list(range(rank, len(dataset), world))
    # own generator: starting the loader must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                                         collate_fn=collate, num_workers=min(workers, len(shard)),
                                         generator=torch.Generator())
    logits, targets, index = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=rank != 0):
        skips.add(batch.skipped)
        if len(batch) == 0:
            continue
        spec = model.frontend(batch.waveforms.to(device), batch.lengths.to(device))
        with autocast(device):
            logits.append(model(spec).float().cpu())
        targets.append(batch.targets)
        index.append(batch.indices)  # positions in `dataset` (Subset passes them through)
    model.train()
    parts = all_gather_object((logits, targets, index))
    logits = [t for p in parts for t in p[0]]
    if not logits:
        raise DataError("no usable evaluation clips (every file was skipped)")
    order = torch.cat([t for p in parts for t in p[2]]).argsort()
    return torch.cat(logits)[order], torch.cat([t for p in parts for t in p[1]])[order]


# ------------------------------------------------------------------------------ state files


def fingerprint(cfg):
    """Hash of the settings a training state depends on (RESUMABLE_CHANGES may differ on resume)."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ one run


def finetune(cfg, base, name, train_items, val_items, test_items, run_dir, rank, world, device, skips, stop):
    """Train one model; returns (probe on CPU, metrics dict), or None when stopped early."""
    if train_items.task not in ("multiclass", "multilabel"):
        raise DataError(f"{cfg.train}: fine-tuning needs labelled data")
    if test_items.task != train_items.task:
        raise DataError(f"train is {train_items.task} but test is {test_items.task}")
    classes, task = train_items.classes, train_items.task
    per_proc, rem = divmod(cfg.batch_size, world * cfg.accum_steps)
    if rem or per_proc == 0:
        raise DataError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --accum-steps "
                        f"= {world * cfg.accum_steps}")
    clip_samples, target_frames = clip_geometry(cfg, train_items)
    frontend_config = dict(base.frontend_config)
    if frontend_config.get("kind", "bat") != "bat" and cfg.task in ("esc50", "scv2"):
        frontend_config["dataset"] = cfg.task  # REF normalises EAT/SSLAM/BEATs fbanks per task
    frontend_config["target_frames"] = target_frames
    raw_frontend = Frontend.from_config({**frontend_config, "target_frames": None}).to(device)

    torch.manual_seed(cfg.seed)  # the head's init and dropout/drop-path draws; + rank below
    model = build_model(cfg, base, classes, task, frontend_config, device).train()
    # REF's layer-wise LR decay: patch embedding and CLS token in the lowest group, block i in group i + 1,
    # the head (and pre_norm, as in REF) at the full rate; each group's lr_scale is applied by set_lr
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, depth=base.cfg.depth)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2))
    # No buffer sync per forward: the only buffers are the fixed positional table and front-end constants.
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False) \
        if world > 1 else model

    # resume
    state_path = os.path.join(run_dir, "state.pt")
    if rank == 0:
        remove_stale_temporaries(state_path)
    step, consumed, history, best = 0, 0, [], None
    if os.path.exists(state_path):
        state = load_state(state_path)
        if state["fingerprint"] != fingerprint(cfg):
            raise DataError(f"{state_path} was written with other settings (see {run_dir}/config.json); "
                            "use another --out or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, consumed, history, best = state["step"], state["consumed"], state["history"], state["best"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], device)
        skips.seen.update(state.get("skipped", {}))
        print0(f"[{name}] resuming from {state_path} at step {step}")
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # different augmentation draws on every process

    train_ds = AudioDataset(train_items, classes, clip_samples, train=True)
    test_ds = AudioDataset(test_items, classes, clip_samples, train=False)
    val_ds = AudioDataset(val_items, classes, clip_samples, train=False) if val_items is not None else None
    if cfg.val_every and val_ds is None:
        print0(f"note: [{name}] no validation split; --val-every ignored (the final model is tested)")
    eval_bs = cfg.eval_batch_size or 2 * per_proc
    batches, sampler = train_loader(cfg, train_ds, train_items, per_proc, rank, world, consumed)

    def save():
        states = all_gather_object(rng_state(device))  # every process's RNG: each draws its own augmentations
        if rank == 0:
            save_state(state_path, {"fingerprint": fingerprint(cfg), "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "step": step, "consumed": consumed,
                                    "history": history, "best": best, "rng": states, "skipped": dict(skips.seen)})
        if dist.is_initialized():
            dist.barrier()

    def metrics_on(dataset, desc="evaluating"):
        return classification_metrics(*evaluate(model, dataset, eval_bs, cfg.workers, device, skips, rank, world,
                                                desc), task)

    print0(f"[{name}] {task}, {len(classes)} classes, {len(train_items)} train / "
           f"{len(val_items) if val_items is not None else 0} val / {len(test_items)} test clips; clips "
           f"{clip_samples / SAMPLE_RATE:.2f} s -> {target_frames} frames; {world} process(es) x {per_proc} clips x "
           f"{cfg.accum_steps} accumulation = {cfg.batch_size} per step; "
           f"{sum(p.numel() for p in model.parameters()):,} parameters; {sampler.per_epoch} batches per epoch")
    log = open(os.path.join(run_dir, "log.jsonl"), "a") if rank == 0 else None
    pbar = tqdm(total=cfg.steps, initial=step, desc=f"finetune {name}", unit="step", dynamic_ncols=True,
                disable=rank != 0)
    t0, clips_seen = time.time(), 0
    while step < cfg.steps:
        lr = set_lr(opt, step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)  # x lr_scale per group
        loss_sum = 0.0
        for micro in range(cfg.accum_steps):
            batch = next(batches)
            consumed += 1
            skips.add(batch.skipped)
            while len(batch) == 0:  # every clip of this batch was unreadable: take the next one
                batch = next(batches)
                consumed += 1
                skips.add(batch.skipped)
            wave, lengths = batch.waveforms.to(device, non_blocking=True), batch.lengths.to(device)
            with torch.no_grad():
                spec, targets = training_inputs(cfg, raw_frontend, target_frames, wave, lengths,
                                                batch.targets.to(device), len(classes), task)
            sync = micro == cfg.accum_steps - 1 or world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with autocast(device):
                    logits = ddp(spec)
                loss = loss_fn(logits, targets, task, cfg.label_smoothing)
                (loss / cfg.accum_steps).backward()
            loss_sum += loss.item()
            clips_seen += len(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        pbar.update(1)

        loss_avg = loss_sum / cfg.accum_steps
        if not math.isfinite(loss_avg):
            raise FloatingPointError(f"[{name}] loss is {loss_avg} at step {step}; lower --lr or check the data")
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = clips_seen * world / max(time.time() - t0, 1e-9)
            pbar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
            if log:
                log.write(json.dumps({"step": step, "loss": loss_avg, "lr": lr, "clips_per_s": rate}) + "\n")
                log.flush()
        if val_ds is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            m = metrics_on(val_ds, "validating")
            key = "accuracy" if task == "multiclass" else "mAP"
            history.append({"step": step, "split": "val", **m})
            if best is None or m[key] >= best["score"]:  # ties: the later model, as REF
                best = {"step": step, "score": m[key], "metric": key,
                        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if rank == 0:
                pbar.write(f"[{name}] step {step}: val {key} {100 * m[key]:.2f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m = metrics_on(test_ds)
            history.append({"step": step, "split": "test", **m})
            if rank == 0:
                pbar.write(f"[{name}] step {step}: " + ", ".join(f"test {k} {100 * v:.2f}" for k, v in m.items()))
        stopping = stop.any() or (cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
            save()
        if stopping:
            pbar.close()
            if log:
                log.close()
            print0(f"[{name}] stopped at step {step}; run the same command again to resume")
            return None
    pbar.close()
    if log:
        log.close()

    if best is not None:  # REF (SCV2): test the model that was best on the validation split
        model.load_state_dict(best["model"])
        print0(f"[{name}] testing the best validation model (step {best['step']}, {best['metric']} "
               f"{100 * best['score']:.2f})")
    logits, targets = evaluate(model, test_ds, eval_bs, cfg.workers, device, skips, rank, world)
    metrics = classification_metrics(logits, targets, task)
    metrics.update(num_train=len(train_items), num_test=int(targets.shape[0]), gate_weights=None, steps=step,
                   target_frames=target_frames)
    if best is not None:
        metrics["selected"] = {"step": best["step"], "val_" + best["metric"]: best["score"]}
    if history:
        metrics["history"] = history
    return model.eval(), metrics


# ------------------------------------------------------------------------------ main


def main(cfg: Config):
    try:
        rank, world, _, device = setup_distributed(cfg.device)
    except ValueError as e:  # e.g. --device cuda without CUDA
        raise DataError(str(e)) from None
    try:
        return _main(cfg, rank, world, device)
    finally:
        cleanup_distributed()


def _main(cfg, rank, world, device):
    for name in ("steps", "batch_size", "accum_steps", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every < 0 or cfg.val_every < 0:
        raise DataError("--eval-every and --val-every must be >= 0")
    if not (0 <= cfg.mixup_prob <= 1 and 0 <= cfg.noise_prob <= 1):
        raise DataError("--mixup-prob and --noise-prob must lie in [0, 1]")
    if cfg.label_smoothing and cfg.augment and cfg.mixup:
        print0("note: label smoothing applies on top of mixup's soft targets")
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    base = load_encoder(cfg.encoder, allow_pickle=cfg.allow_pickle)
    runs = plan_runs(cfg)
    skips = SkipLog(strict=cfg.strict, stream=TqdmStream())
    for _, tr, va, te in runs:
        skips.add(tr.skipped + te.skipped + (va.skipped if va is not None else []))

    resolved = {**dataclasses.asdict(cfg), "device": str(device), "world_size": world,
                "data_task": runs[0][1].task, "classes": runs[0][1].classes, "runs": [r[0] for r in runs],
                "model_config": base.cfg.to_dict(), "frontend_config": base.frontend_config,
                "fingerprint": fingerprint(cfg)}
    if rank == 0:
        write_json(os.path.join(cfg.out, "config.json"), resolved)

    t0 = time.time()
    with StopFlag() as stop:
        results = train_runs(cfg, base, runs, rank, world, device, skips, stop)
    if results is None:
        return None

    task = results[0][1].task
    keys = [k for k in ("accuracy", "mAP", "macro_f1") if k in results[0][2]]
    if len(results) == 1:
        metrics, std = {"task": task, **results[0][2]}, None
    else:
        per = {k: np.array([m[k] for _, _, m in results]) for k in keys + ["num_train", "num_test"]}
        std = {k: float(per[k].std()) for k in keys}
        metrics = {"task": task, **{k: float(per[k].mean()) for k in keys}, "std": std,
                   "num_train": float(per["num_train"].mean()), "num_test": float(per["num_test"].mean()),
                   "gate_weights": None, "folds": {name: m for name, _, m in results},
                   "note": "mean and population std over folds; num_train/num_test are per-fold means; "
                           "model.safetensors is the last fold's, every fold's is in its own folder"}
        if rank == 0:
            save_probe(os.path.join(cfg.out, "model.safetensors"), results[-1][1],
                       {"trained_by": "finetune.py", "fold": results[-1][0]}, fmt="bat.finetuned")
    metrics["skipped_files"] = skips.count
    if rank == 0:
        if len(results) > 1:
            write_json(os.path.join(cfg.out, "metrics.json"), {**metrics, "fingerprint": fingerprint(cfg)})
        if skips.count:
            print(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
        print(f"\nfine-tuned {cfg.encoder} on {cfg.train} ({len(results)} run(s), {time.time() - t0:.0f} s):")
        print(summarise(metrics, std))
        print(f"wrote {cfg.out}/config.json, model.safetensors, metrics.json")
    return metrics


def train_runs(cfg, base, runs, rank, world, device, skips, stop):
    """Train every planned run (one, or one per fold), writing each run's model and metrics; completed
    runs of an interrupted --fold all are read back instead of retrained. None when stopped early."""
    results = []
    for name, train_items, val_items, test_items in runs:
        run_dir = cfg.out if len(runs) == 1 else os.path.join(cfg.out, name)
        os.makedirs(run_dir, exist_ok=True)
        done = _finished(run_dir, cfg)
        if done is not None:
            print0(f"[{name}] already finished ({run_dir}/metrics.json)")
            results.append((name, *done))
            continue
        out = finetune(cfg, base, name, train_items, val_items, test_items, run_dir, rank, world, device, skips, stop)
        if out is None:
            return None
        model, metrics = out
        model = model.cpu()
        for part in all_gather_object(dict(skips.seen)):  # every process's skipped files, counted once
            skips.seen.update(part)
        metrics["skipped_files"] = skips.count
        if rank == 0:
            save_probe(os.path.join(run_dir, "model.safetensors"), model, fmt="bat.finetuned",
                       metadata={"trained_by": "finetune.py", "fold": name, "fingerprint": fingerprint(cfg)})
            write_json(os.path.join(run_dir, "metrics.json"), {"task": model.task, **metrics,
                                                               "fingerprint": fingerprint(cfg)})
            state_path = os.path.join(run_dir, "state.pt")
            if os.path.exists(state_path):  # the outputs are written: the bulky training state can go
                os.remove(state_path)
        results.append((name, model, metrics))
        if dist.is_initialized():
            dist.barrier()
    return results


def _finished(run_dir, cfg):
    """(model, metrics) of a run of this configuration that already completed in run_dir, else None."""
    mpath, wpath = os.path.join(run_dir, "metrics.json"), os.path.join(run_dir, "model.safetensors")
    if not (os.path.exists(mpath) and os.path.exists(wpath)) or os.path.exists(os.path.join(run_dir, "state.pt")):
        return None
    with open(mpath) as fh:
        metrics = json.load(fh)
    if metrics.get("fingerprint") != fingerprint(cfg) or "folds" in metrics:
        return None
    from bat.probes import load_probe

    metrics.pop("fingerprint")
    return load_probe(wpath), metrics


if __name__ == "__main__":
    config = parse_config()
    try:
        main(config)
    except (DataError, AudioError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
