"""Fine-tune an audio encoder end to end with a linear head, with the reference implementation's recipes.

    python finetune.py --encoder runs/pretrain/encoder.safetensors --train data/sfx/train --test data/sfx/test \
        --out runs/ft
    python finetune.py --encoder BAT_base.pt --train ESC-50-master --fold all --out runs/esc50     # 5-fold CV
    python finetune.py --encoder EAT-base_epoch10_pt.pt --allow-pickle --train speech_commands_v0.02 --out runs/scv2
    python finetune.py --task audioset --encoder BAT_base.pt --train as20k_train.csv --test as_eval.csv --out runs/as20k
    torchrun --nproc_per_node 4 finetune.py ...                                        # DDP, same flags

Reference: "BAT: Better Audio Transformer Guided by Convex Gated Probing" (ICML 2026, arxiv.org/abs/2602.16305),
code github.com/houtan-ghaffari/BAT_ICML2026 (REF below). Model: the encoder (drop-path, linear over depth)
-> last block's CLS -> LayerNorm -> dropout -> Linear, saved like a probe so `bat.load_probe` and export.py
open it. Optimiser: AdamW, no weight decay on biases, norms and the CLS token, REF's layer-wise LR decay,
linear warm-up then cosine to --min-lr. Augmentations run batched on the device (bat/augment.py).

--task picks REF's recipe for a benchmark (input geometry, steps, batch, augmentations, validation); `--task X
--help` shows its values and every one is a flag. --task auto recognises ESC-50 and Speech Commands layouts,
else `generic` (AS-20k's recipe, clip length from the data).

Writes DIR/config.json, DIR/model.safetensors, DIR/metrics.json and DIR/log.jsonl; with --fold all one
sub-folder per fold too. The training state (DIR/state.pt, written atomically every --checkpoint-every steps
and on SIGINT/SIGTERM) makes a re-run of the same command resume; on the CPU with --workers 0 a resumed run
reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from bat import augment as A
from bat import sed
from bat.audio import SAMPLE_RATE, AudioError
from bat.checkpoint import CheckpointError, load_encoder
from bat.data import DataError, SkipLog, collate, forever, next_usable
from bat.frontend import Frontend, fix_frames
from bat.metrics import classification_metrics, combine_folds, summarise
from bat.model import Encoder
from bat.probes import LinearProbe, Probe, asymmetric_loss, save_probe
from bat.sampler import batch_stream, epoch_sampler
from bat.tasks import (TaskError, TaskName, clip_geometry, config_with_task, datasets, frontend_config, parse_with_task,
                       plan_runs, resolve_task, training_data, warmup_steps)
from bat.train import (FlagError, StopFlag, TqdmStream, all_gather_object, check_flags, error_exit, gather_in_order,
                       load_state, param_groups_lrd, print0, remove_stale_temporaries, rng_state, run_processes,
                       save_state, set_lr, set_rng_state, share_skips, write_json)


@dataclass
class Config:
    """Fine-tune an encoder with a linear head. Defaults: the --task recipe (REF's configs)."""

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
    task: TaskName = "auto"
    """REF recipe: audioset (AS-20k), as2m, esc50, scv2, generic (your data); auto: esc50 / scv2 for those
    layouts, else generic"""
    allow_pickle: bool = False
    """allow checkpoints that need pickle, such as EAT/SSLAM fairseq files (only for files you trust)"""

    lr: float = 5e-5
    """peak learning rate (of the top layer group; lower groups get lr * layer_decay^k)"""
    min_lr: float = 1e-6
    """floor of the cosine decay (scaled per layer group like the peak)"""
    warmup_share: float = 0.1
    """linear warm-up as a share of --steps (REF: 10 % in every fine-tuning recipe)"""
    warmup_steps: int | None = None
    """linear warm-up steps from 0 to --lr; overrides --warmup-share"""
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
    """master switch: --no-augment turns every augmentation below off, and the random roll and window
    the data loader applies to AudioSet and generic training clips (REF)"""
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
    time_roll: bool = False
    """circular roll of each spectrogram by a random number of frames (REF: ESC-50 and SCV2; AudioSet and
    generic clips are rolled as waveforms by the data loader instead)"""
    gain: bool = False
    """random gain 0.5 + Beta(10, 10) (a no-op for the BAT front-end; for EAT/SSLAM/BEATs)"""

    target_frames: int | None = None
    """spectrogram frames (multiple of 16); default: the task's (AudioSet 1024, ESC-50 512, SCV2 112;
    generic: the longest training clip rounded up to 16 frames)"""
    max_seconds: float = 10.23
    """generic task: longest clip length used (longer clips: a random window in training, the first window
    in evaluation)"""
    test_fraction: float = 0.2
    """held-out share when neither --test nor a predefined split exists"""
    balanced: bool = False
    """class-balanced sampling (REF AudioSet-2M): clip weight = mean inverse frequency of its labels"""
    epoch_clips: int | None = None
    """clips per balanced epoch (default REF's 200 000; drawn with replacement from a smaller set)"""
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


# Settings a resumed run may change without invalidating its training state.
RESUMABLE_CHANGES = {"device", "workers", "eval_every", "eval_batch_size", "checkpoint_every", "log_every",
                     "stop_after", "strict", "allow_pickle"}


def parse_config(argv=None) -> Config:
    """The CLI: defaults are the recipe of --task (auto: recognised from --train's layout)."""
    return parse_with_task(Config, "finetune", argv)


def config(**values) -> Config:
    """A Config from Python with the task's recipe for every value not given (like the CLI)."""
    return config_with_task(Config, "finetune", **values)


def check(cfg):
    check_flags(cfg, at_least=dict(steps=1, batch_size=1, accum_steps=1, checkpoint_every=1, log_every=1,
                                   eval_every=0, val_every=0, warmup_steps=0, epoch_clips=1, workers=0,
                                   eval_batch_size=1, freq_mask=0, time_mask=0, mask_repeats=0, stop_after=0),
                positive=("lr", "max_seconds", "mixup_beta"),
                fractions=("mixup_prob", "noise_prob", "warmup_share", "drop_path", "head_dropout",
                           "label_smoothing", "test_fraction", "layer_decay"))
    if cfg.min_lr < 0 or cfg.weight_decay < 0:
        raise FlagError("--min-lr and --weight-decay must be >= 0")


def autocast(device):
    """bf16 autocast on CUDA (REF runs BAT in bf16), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ------------------------------------------------------------------------------ model, loss, inputs


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


def training_inputs(cfg, raw_frontend, target_frames, wave, lengths, targets, num_classes, task):
    """Waveforms (cut to the task's length by the data loader) -> augmented spectrograms and (soft)
    targets, batched on the device (REF's order: gain, noise | front-end | roll, pad, mixup, SpecAugment)."""
    aug = cfg.augment
    if aug and cfg.gain:
        wave = A.random_gain(wave)
    if aug and cfg.noise:
        wave = A.coloured_noise(wave, cfg.noise_prob, lengths=lengths)
    spec = raw_frontend(wave, centred=True)  # EAT/SSLAM clips were centred by the data loader
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
        spec = model.frontend(batch.waveforms.to(device), centred=True)
        with autocast(device):
            logits.append(model(spec).float().cpu())
        targets.append(batch.targets)
        index.append(batch.indices)  # positions in `dataset` (Subset passes them through)
    model.train()
    rows = gather_in_order(index, logits, targets)
    if rows is None:  # every process got here: share what each found, then say why nothing was usable
        share_skips(skips)
        raise skips.nothing_usable(dataset.items.files, "the evaluation data")
    return rows[1], rows[2]


def fingerprint(cfg):
    """Hash of the settings a training state depends on (RESUMABLE_CHANGES may differ on resume)."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ one run


@dataclass
class Progress:
    """What a training state holds besides weights: the position in the run and the validation record."""
    step: int = 0
    consumed: int = 0  # batches taken from the training stream (resume restarts it there)
    history: list = dataclasses.field(default_factory=list)
    best: dict | None = None  # {"step", "score", "metric", "model"}: best validation model so far


def restore(cfg, state_path, model, opt, skips, rank, device, name):
    """Progress of an interrupted run from its training state (weights, optimiser and RNG restored), or a
    fresh one."""
    if rank == 0:
        remove_stale_temporaries(state_path)
    if not os.path.exists(state_path):
        torch.manual_seed(cfg.seed * 1000 + rank)  # different augmentation draws on every process
        return Progress()
    state = load_state(state_path)
    if state["fingerprint"] != fingerprint(cfg):
        raise DataError(f"{state_path} was written with other settings (see its config.json); "
                        "use another --out or delete it")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], device)
    skips.load(state.get("skips", {"seen": state.get("skipped", {})}))
    print0(f"[{name}] resuming from {state_path} at step {state['step']}")
    return Progress(state["step"], state["consumed"], state["history"], state["best"])


def save_progress(cfg, state_path, model, opt, progress, skips, rank, device):
    states = all_gather_object(rng_state(device))  # every process's RNG: each draws its own augmentations
    if rank == 0:
        save_state(state_path, {"fingerprint": fingerprint(cfg), "model": model.state_dict(),
                                "optimizer": opt.state_dict(), "step": progress.step, "consumed": progress.consumed,
                                "history": progress.history, "best": progress.best, "rng": states,
                                "skips": skips.state()})
    if dist.is_initialized():
        dist.barrier()


def track_validation(progress, metrics, model, task):
    """Record a validation result; keep the model if it is the best so far (ties: the later, as REF)."""
    key = "accuracy" if task == "multiclass" else "mAP"
    progress.history.append({"step": progress.step, "split": "val", **metrics})
    if progress.best is None or metrics[key] >= progress.best["score"]:
        progress.best = {"step": progress.step, "score": metrics[key], "metric": key,
                         "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return f"val {key} {100 * metrics[key]:.2f}"


@dataclass
class Parts:
    """Everything one fine-tuning run builds before its first step."""
    model: Probe
    ddp: torch.nn.Module  # the model, wrapped for DDP under torchrun
    opt: torch.optim.Optimizer
    progress: Progress
    batches: object  # endless iterator of training batches
    train_files: list  # the run's training files: next_usable gives up once all of them are unreadable
    train_name: str  # how errors and metrics.json name them
    raw_frontend: Frontend  # front-end without time padding (augmentations come between)
    frames: int
    test_ds: object
    val_ds: object | None
    eval_bs: int


def setup_run(cfg, task, base, run, run_dir, rank, world, device, skips):
    """Data, model, optimiser and (resumed) progress of one run, with a one-line summary."""
    if run.train.task not in ("multiclass", "multilabel") or run.test.task != run.train.task:
        raise DataError(f"train is {run.train.task} but test is {run.test.task}; both need the same labelled task")
    classes, kind = run.train.classes, run.train.task
    per_proc, rem = divmod(cfg.batch_size, world * cfg.accum_steps)
    if rem or per_proc == 0:
        raise DataError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --accum-steps "
                        f"= {world * cfg.accum_steps}")
    clip_samples, frames = clip_geometry(task, run.train, cfg.target_frames, cfg.max_seconds)
    fcfg = frontend_config(base.frontend_config, task, frames)
    data = lambda items, train=False: datasets(task, items, classes, clip_samples, fcfg, train)  # noqa: E731
    val_ds = data(run.val) if run.val is not None and len(run.val) else None
    if cfg.val_every and val_ds is None:
        print0(f"note: [{run.name}] no validation split; --val-every ignored (the final model is tested)")

    torch.manual_seed(cfg.seed)  # the head's init and dropout/drop-path draws; + rank below
    model = build_model(cfg, base, classes, kind, fcfg, device).train()
    model.clip_samples = clip_samples  # the training window: Probe.predict and export.py score windows of it
    # REF's layer-wise LR decay: patch embedding and CLS token in the lowest group, block i in group i + 1,
    # the head (and pre_norm, as in REF) at the full rate; each group's lr_scale is applied by set_lr
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, depth=base.cfg.depth)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2))
    # No buffer sync per forward: the only buffers are the fixed positional table and front-end constants.
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False) \
        if world > 1 else model
    progress = restore(cfg, os.path.join(run_dir, "state.pt"), model, opt, skips, rank, device, run.name)
    labels = torch.as_tensor(run.train.targets(classes)) if cfg.balanced else None
    sampler = epoch_sampler(len(run.train), labels, cfg.balanced, cfg.epoch_clips, len(classes), world, rank, cfg.seed)
    batches, stream = batch_stream(data(run.train, train=cfg.augment), sampler, per_proc, cfg.workers, cfg.seed,
                                   progress.consumed, collate)
    print0(f"[{run.name}] task {task.name}: {kind}, {len(classes)} classes, {len(run.train)} train / "
           f"{len(val_ds) if val_ds else 0} val / {len(run.test)} test clips; clips {clip_samples / SAMPLE_RATE:.2f} s "
           f"-> {frames} frames; {world} process(es) x {per_proc} clips x {cfg.accum_steps} accumulation = "
           f"{cfg.batch_size} per step; warm-up {warmup_steps(cfg)} of {cfg.steps} steps; "
           f"{sum(p.numel() for p in model.parameters()):,} parameters; {stream.per_epoch} batches per epoch")
    return Parts(model, ddp, opt, progress, batches, run.train.files, training_data(cfg.train, run),
                 Frontend.from_config({**fcfg, "target_frames": None}).to(device), frames, data(run.test), val_ds,
                 cfg.eval_batch_size or 2 * per_proc)


def train_step(cfg, p, device, skips, world):
    """One optimiser step over --accum-steps micro-batches. Returns (mean loss, lr, clips used)."""
    lr = set_lr(p.opt, p.progress.step, cfg.lr, warmup_steps(cfg), cfg.steps, cfg.min_lr)  # x lr_scale per group
    loss_sum, clips = 0.0, 0
    for micro in range(cfg.accum_steps):
        batch, taken = next_usable(p.batches, skips, p.train_files, p.train_name)
        p.progress.consumed += taken
        with torch.no_grad():
            spec, targets = training_inputs(cfg, p.raw_frontend, p.frames, batch.waveforms.to(device, non_blocking=True),
                                            batch.lengths.to(device), batch.targets.to(device), len(p.model.labels),
                                            p.model.task)
        with (contextlib.nullcontext() if micro == cfg.accum_steps - 1 or world == 1 else p.ddp.no_sync()):
            with autocast(device):
                logits = p.ddp(spec)
            loss = loss_fn(logits, targets, p.model.task, cfg.label_smoothing)
            (loss / cfg.accum_steps).backward()
        loss_sum += loss.item()
        clips += len(batch)
    p.opt.step()
    p.opt.zero_grad(set_to_none=True)
    p.progress.step += 1
    return loss_sum / cfg.accum_steps, lr, clips


def finetune(cfg, task, base, run, run_dir, rank, world, device, skips, stop):
    """Train one model; returns (probe on CPU, metrics dict), or None when stopped early."""
    p = setup_run(cfg, task, base, run, run_dir, rank, world, device, skips)
    model, progress, state_path = p.model, p.progress, os.path.join(run_dir, "state.pt")
    metrics_on = lambda ds, desc="evaluating": classification_metrics(  # noqa: E731
        *evaluate(model, ds, p.eval_bs, cfg.workers, device, skips, rank, world, desc), model.task, model.labels)
    log = open(os.path.join(run_dir, "log.jsonl"), "a") if rank == 0 else None
    pbar = tqdm(total=cfg.steps, initial=progress.step, desc=f"finetune {run.name}", unit="step",
                dynamic_ncols=True, disable=rank != 0)
    t0, clips_seen = time.time(), 0
    while progress.step < cfg.steps:
        loss, lr, clips = train_step(cfg, p, device, skips, world)
        step, clips_seen = progress.step, clips_seen + clips
        pbar.update(1)
        if not np.isfinite(loss):
            raise FloatingPointError(f"[{run.name}] loss is {loss} at step {step}; lower --lr or check the data")
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = clips_seen * world / max(time.time() - t0, 1e-9)
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
            if log:
                log.write(json.dumps({"step": step, "loss": loss, "lr": lr, "clips_per_s": rate}) + "\n")
                log.flush()
        if p.val_ds is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            msg = track_validation(progress, metrics_on(p.val_ds, "validating"), model, model.task)
            if rank == 0:
                pbar.write(f"[{run.name}] step {step}: {msg}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m = metrics_on(p.test_ds)
            progress.history.append({"step": step, "split": "test", **m})
            if rank == 0:
                pbar.write(f"[{run.name}] step {step}: " + ", ".join(f"test {k} {100 * v:.2f}" for k, v in m.items()
                                                                     if isinstance(v, float)))
        stopping = stop.any() or (cfg.stop_after is not None and cfg.stop_after <= step < cfg.steps)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
            save_progress(cfg, state_path, model, p.opt, progress, skips, rank, device)
        if stopping:
            print0(f"\n[{run.name}] stopped at step {step}; run the same command again to resume")
            break
    pbar.close()
    if log:
        log.close()
    return None if progress.step < cfg.steps else test_model(cfg, p, run, device, skips, rank, world)


def test_model(cfg, p, run, device, skips, rank, world):
    """(model, metrics) on the test set, of the best validation model where there was validation."""
    best = p.progress.best
    if best is not None:  # REF (SCV2): test the model that was best on the validation split
        p.model.load_state_dict(best["model"])
        print0(f"[{run.name}] testing the best validation model (step {best['step']}, {best['metric']} "
               f"{100 * best['score']:.2f})")
    logits, targets = evaluate(p.model, p.test_ds, p.eval_bs, cfg.workers, device, skips, rank, world)
    metrics = classification_metrics(logits, targets, p.model.task, p.model.labels)
    metrics.update(num_train=sum(f not in skips.seen for f in run.train.files), num_test=int(targets.shape[0]),
                   gate_weights=None, steps=p.progress.step, target_frames=p.frames,
                   clip_samples=p.test_ds.clip_samples)
    if best is not None:
        metrics["selected"] = {"step": best["step"], "val_" + best["metric"]: best["score"]}
    if p.progress.history:
        metrics["history"] = p.progress.history
    return p.model.eval(), metrics


# ------------------------------------------------------------------------------ main


def main(cfg: Config):
    check(cfg)
    return run_processes(_main, cfg)


def _main(cfg, rank, world, device):
    task = resolve_task(cfg.task, cfg.train)
    cfg = dataclasses.replace(cfg, task=task.name)
    if task.name == "librispeech":
        raise FlagError("--task librispeech: fine-tuning with the ASR head is not available; "
                        "probe_cgp.py --task librispeech trains the ASR probe")
    if task.frame_wise:
        return finetune_frames(cfg, device, world)
    if cfg.label_smoothing and cfg.augment and cfg.mixup:
        print0("note: label smoothing applies on top of mixup's soft targets")
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    base = load_encoder(cfg.encoder, allow_pickle=cfg.allow_pickle)
    runs = plan_runs(cfg.train, cfg.test, cfg.fold, cfg.test_fraction, cfg.seed, log=print0)
    skips = SkipLog(strict=cfg.strict, stream=TqdmStream())
    for r in runs:
        skips.add(r.train.skipped + r.test.skipped + (r.val.skipped if r.val is not None else []))
    if rank == 0:
        write_json(os.path.join(cfg.out, "config.json"),
                   {**dataclasses.asdict(cfg), "device": str(device), "world_size": world, "warmup": warmup_steps(cfg),
                    "data_task": runs[0].train.task, "classes": runs[0].train.classes, "runs": [r.name for r in runs],
                    "model_config": base.cfg.to_dict(), "frontend_config": base.frontend_config,
                    "fingerprint": fingerprint(cfg)})

    t0 = time.time()
    with StopFlag() as stop:
        results = train_runs(cfg, task, base, runs, rank, world, device, skips, stop)
    if results is None:
        return None
    metrics, std = combine_folds(results, "model.safetensors")
    metrics.update(skips.report())  # every fold's unreadable files, once
    if rank == 0:
        if len(results) > 1:
            save_probe(os.path.join(cfg.out, "model.safetensors"), results[-1][1],
                       file_metadata(cfg, results[-1][2], results[-1][0]), fmt="bat.finetuned")
            write_json(os.path.join(cfg.out, "metrics.json"), {**metrics, "fingerprint": fingerprint(cfg)})
        if skips.count:
            print(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
        print(f"\nfine-tuned {cfg.encoder} on {cfg.train}, task {task.name} ({len(results)} run(s), "
              f"{time.time() - t0:.0f} s):")
        print(summarise(metrics, std))
        print(f"wrote {cfg.out}/config.json, model.safetensors, metrics.json")
    return metrics


def finetune_frames(cfg, device, world):
    """--task dcase2016: encoder + frame-wise head (REF configs/dcase2016_task2/sed_finetune_config.yaml: last
    layer's patch tokens averaged over frequency per 160 ms, LayerNorm, dropout, Linear; binary cross-entropy;
    mixup and SpecAugment on the spectrograms), trained on whole recordings padded to the longest, the model
    with the best validation frame mAP kept, whole test recordings scored with onset F1 and frame mAP.
    Not yet here: REF's coloured noise on the waveform (the event loader yields spectrograms), and resuming."""
    if world > 1:
        raise FlagError(f"--task {cfg.task}: fine-tuning runs in one process; start it without torchrun")
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    base = load_encoder(cfg.encoder, allow_pickle=cfg.allow_pickle)
    train, valid, test = sed.plan_splits(cfg.train, cfg.test)
    classes, skips = train.classes, SkipLog(strict=cfg.strict, stream=TqdmStream())
    encoder = Encoder(base.cfg, drop_path=cfg.drop_path)
    encoder.load_state_dict(base.state_dict())
    encoder.frontend_config = base.frontend_config
    frontend = sed.event_frontend(encoder)
    head = LinearProbe(base.cfg.dim, len(classes), mode="frame", norm=True, dropout=cfg.head_dropout)
    model = Probe(encoder, head, frontend, classes, "multilabel").to(device).train()
    frames = cfg.target_frames or sed.recording_frames(train)
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, depth=base.cfg.depth)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2))
    loader = sed._loader(sed.EventDataset(train, classes, frontend, frames), cfg.batch_size, True, cfg.workers, cfg.seed)
    write_json(os.path.join(cfg.out, "config.json"), {**dataclasses.asdict(cfg), "device": str(device), "classes": classes,
               "model_config": base.cfg.to_dict(), "frontend_config": frontend.config(), "warmup": warmup_steps(cfg)})
    print(f"SED fine-tune: {len(classes)} classes, {len(train)} train / {len(valid) if valid else 0} valid / "
          f"{len(test)} test recordings, inputs {frames} frames, {cfg.steps} steps x {cfg.batch_size}")
    best, history, batches = None, [], forever(loader)
    for step in (pbar := tqdm(range(cfg.steps), desc="SED fine-tune", unit="step", dynamic_ncols=True)):
        set_lr(opt, step, cfg.lr, warmup_steps(cfg), cfg.steps, cfg.min_lr)
        spec, y, _, skipped = next(batches)
        skips.add(skipped)
        if spec is None:
            if skips.all_unreadable(train.files):
                raise skips.nothing_usable(train.files, "the training recordings")
            continue
        spec, y = spec.to(device), y.to(device)
        if cfg.augment and cfg.mixup:
            spec, y, _ = A.mixup(spec, y, cfg.mixup_prob, cfg.mixup_beta)
        if cfg.augment and cfg.specaug:
            spec = A.spec_augment(spec, cfg.freq_mask, cfg.time_mask, cfg.mask_repeats)
        with autocast(device):
            logits = model(spec)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)  # REF: use_asymmetric_loss false
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}")
        if valid is not None and cfg.val_every and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
            encoder.eval()
            score = sed.valid_frame_map(encoder, head, valid, classes, device, cfg.workers, skips)
            encoder.train()
            history.append({"step": step + 1, "split": "valid", "frame_mAP": score})
            if best is None or score >= best["score"]:  # ties: the later model, as REF
                best = {"step": step + 1, "score": score,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            pbar.write(f"step {step + 1}: valid frame mAP {100 * score:.2f}")
    pbar.close()
    if best is not None:
        model.load_state_dict(best["state"])
    model.eval()
    metrics = {"task": "sed", **sed.test_sed(encoder, head, test, classes, device, cfg.workers, skips),
               "num_train": sum(f not in skips.seen for f in train.files), "target_frames": frames, **skips.report()}
    if best is not None:
        metrics.update(selected={"step": best["step"], "val_frame_mAP": best["score"]}, history=history)
    save_probe(os.path.join(cfg.out, "model.safetensors"), model,
               {"trained_by": "finetune.py", "task_name": cfg.task, "frame_wise": True, "patch_seconds": sed.PATCH_SECONDS,
                "threshold": sed.THRESHOLD, "median_filter_patches": sed.MEDIAN_PATCHES}, fmt="bat.finetuned")
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    print(f"\nfine-tuned {cfg.encoder} on {cfg.train}, task {cfg.task}:\n{summarise(metrics)}")
    print(f"wrote {cfg.out}/config.json, model.safetensors, metrics.json")
    return metrics


def file_metadata(cfg, metrics, run_name):
    """What export.py and users read from model.safetensors besides the weights: the task recipe and the
    model's input window (clip_samples waveform samples -> target_frames spectrogram frames)."""
    return {"trained_by": "finetune.py", "task_name": cfg.task, "clip_samples": metrics["clip_samples"],
            "target_frames": metrics["target_frames"], "fold": run_name, "fingerprint": fingerprint(cfg)}


def train_runs(cfg, task, base, runs, rank, world, device, skips, stop):
    """Train every planned run (one, or one per fold), writing each run's model and metrics; completed
    runs of an interrupted --fold all are read back instead of retrained. None when stopped early."""
    results = []
    for run in runs:
        run_dir = cfg.out if len(runs) == 1 else os.path.join(cfg.out, run.name)
        os.makedirs(run_dir, exist_ok=True)
        done = _finished(run_dir, cfg)
        if done is not None:
            print0(f"[{run.name}] already finished ({run_dir}/metrics.json)")
            results.append((run.name, *done))
            continue
        out = finetune(cfg, task, base, run, run_dir, rank, world, device, skips, stop)
        if out is None:
            return None
        model, metrics = out
        model = model.cpu()
        share_skips(skips)  # every process's skipped and read files, counted once
        metrics.update(skips.report(run.train.files, training_data(cfg.train, run)))
        if rank == 0:
            save_probe(os.path.join(run_dir, "model.safetensors"), model, file_metadata(cfg, metrics, run.name),
                       fmt="bat.finetuned")
            write_json(os.path.join(run_dir, "metrics.json"), {"task": model.task, **metrics,
                                                               "fingerprint": fingerprint(cfg)})
            state_path = os.path.join(run_dir, "state.pt")
            if os.path.exists(state_path):  # the outputs are written: the bulky training state can go
                os.remove(state_path)
        results.append((run.name, model, metrics))
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
    try:
        main(parse_config())
    except (DataError, AudioError, CheckpointError, TaskError, FlagError, FloatingPointError,
            OSError) as e:  # OSError: e.g. --out on a read-only or full disk
        error_exit(e)
