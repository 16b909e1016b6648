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
only the head has gradients (VQT's query tokens pass through the frozen blocks, with gradients for them).
When the training features fit in memory they are computed once and kept (the first window of every clip),
otherwise (or with --no-cache) streamed. On your own data (--task generic) --select auto holds out a part of
the training set and trains until the score there stops improving, for a small lr grid (bat.selection).
Under torchrun the processes share the encoder passes and average the head's gradients; rank 0 writes
DIR/config.json, probe.safetensors (bat.load_probe), metrics.json and, for cgp and lcgp, gates.png; with
--fold all also each fold's in DIR/foldK/, which a re-run of an interrupted run reads back.
On a fixed schedule (REF's tasks, --select none) the clip probes also write a training state, DIR/state.pt
(bat.probe_state), every --checkpoint-every steps and on SIGINT/SIGTERM, and a re-run of the same command
resumes from it on the batches an uninterrupted run takes; --select auto and the frame-wise tasks retrain.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from tqdm import tqdm

from bat import selection
from bat.audio import AudioError
from bat.baseline import logmel_floor_of, mean_floor
from bat.checkpoint import CheckpointError, load_encoder
from bat.cli import FlagError, check_flags, error_exit
from bat.data import SkipLog, default_workers
from bat.distributed import average_gradients, print0, share_skips
from bat.features import score_clips
from bat.files import check_writable, claim_out, file_sha256, fingerprint as settings_fingerprint
from bat.finetuning import Progress, check_state
from bat.frontend import Frontend
from bat.heads import build_head
from bat.listing import DataError
from bat.losses import classification_loss
from bat.metrics import Best, classification_metrics, combine_folds
from bat.optim import param_groups, set_lr
from bat.precision import autocast, set_default as set_precision
from bat.probe_data import frame_probe_parts, training_source
from bat.probe_outputs import run_line, write_config, write_fold, write_frame_outputs, write_outputs
from bat.probe_state import Checkpoints, refuse_stop_after, state_path
from bat.probes import Probe, read_finished_run
from bat.run_control import exit_interrupted, exit_on_ctrl_c, run_processes
from bat.tasks import (TaskError, TaskName, clip_geometry, config_with_task, datasets, frontend_config,
                       parse_with_task, plan_runs, resolve_task, training_data, warmup_steps)


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
    """test data; default: the data set's own split (Speech Commands' list, ESC-50 --fold), else a stratified
    --test-fraction of --train"""
    fold: str | None = None
    """ESC-50 test fold 1-5, or "all" for REF's 5-fold cross-validation (mean and std)"""
    task: TaskName = "auto"
    """REF recipe: audioset (AS-20k), as2m, esc50, scv2, generic (your data), dcase2016 (sound event detection:
    a HEAR task folder or an event CSV), librispeech (ASR probe: a path,text CSV or LibriSpeech folders), hsn
    (BirdSet HSN, 32 kHz); auto: esc50 / scv2 / dcase2016 / librispeech for those layouts, else generic"""
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
    """optimiser steps (under --select auto: the cap of each learning rate's run)"""
    batch_size: int = 48
    """clips per step, of all processes together under torchrun (each takes batch_size / processes)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    precision: Literal["cuda-bf16", "auto", "fp32", "bf16"] = "cuda-bf16"
    """the frozen encoder's feature pass: cuda-bf16 = bf16 on CUDA, float32 on the CPU; auto = bf16 also on CPUs
    with native bf16 (AVX512_BF16/AMX; 2.62x for base on a 2-core EPYC). Not the default: the saved probe and
    the exported tagger score in float32, where a head fitted on bf16 features scores a little differently"""
    lr: float = 1e-3
    """peak learning rate (AdamW 0.9, 0.999); under --select auto the smallest of the default --lr-grid"""
    select: Literal["auto", "none"] = "auto"
    """auto: on your own data (--task generic, no validation split) hold out a stratified --held-out share of the
    training set, train each --lr-grid value until the held-out score stops improving (--patience; --steps caps),
    test only the head best there, report its held-out score beside the test score (HEAR's protocol); REF's
    tasks (esc50, audioset, scv2, ...) keep REF's fixed schedule. none: --lr for --steps, test the final head"""
    lr_grid: tuple[float, ...] = ()
    """--select auto: the peak learning rates tried, each from the same init and batch order; default --lr x
    (1, 3, 10)"""
    held_out: float = 0.2
    """--select auto: share of every class of the training set held out for the selection (never the test split)"""
    patience: int = 20
    """--select auto: stop a learning rate's run after this many held-out evaluations (every epoch, at least 10
    steps apart) without improvement, counted from the end of the warm-up"""
    baseline: Literal["none", "logmel"] = "none"
    """logmel: also fit logistic regression on log-mel mean/std statistics on the same split (L2 picked on a
    held-out part of train): metrics.json's baseline.logmel, the floor a probe should beat"""
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
    head_norm: bool = True
    """LayerNorm before the Linear of LP, LCGP, Head2Toe and VQT (REF: on, except AS-20k's VQT)"""
    use_cls: bool = True
    """CGP pools [min, CLS, max]; --no-use-cls pools [min, mean, max] (encoders without a CLS token)"""
    val_every: int = 0
    """evaluate on the validation split (Speech Commands' list; --select auto: the held-out part, default every
    epoch) every N steps and test the head best there (REF SCV2: 500); 0: test the final head"""
    balanced: bool = False
    """class-balanced sampling (REF AudioSet-2M): clip weight = mean inverse frequency of its labels"""
    balance_by: Literal["labels", "first-label"] = "labels"
    """what --balanced weighs: all of a clip's labels, or only its first listed one (REF HSN)"""
    epoch_clips: int | None = None
    """clips per balanced epoch (default REF's: 200 000, with replacement from a smaller set; first-label: as many as the training set)"""
    target_frames: int | None = None
    """spectrogram frames (multiple of 16); default: the task's (AudioSet 1024, ESC-50 512, SCV2 112; generic:
    the longest training clip rounded up to 16 frames)"""
    max_seconds: float = 10.23
    """generic task: longest clip length used (longer: a random window in training, the first in evaluation)"""
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
    workers: int = default_workers()
    """DataLoader worker processes (0: load in the main process; default: up to 4, within this process's CPU share)"""
    test_fraction: float = 0.2
    """held-out share when neither --test nor a predefined split exists"""
    checkpoint_every: int = 1000
    """write the training state every N steps (and at the end, and on SIGINT/SIGTERM); not --select auto, frame-wise"""
    stop_after: int | None = None
    """save the training state and stop after this step, as if interrupted (re-run without it to resume)"""


# The Ctrl-C line outside the resumable training steps (feature caching, testing, --select auto, frame-wise).
STOPPED = ("the probe was not saved; a re-run goes on from its last training state (DIR/state.pt) where one "
           "was written, and with --fold all keeps finished folds")
# Settings that do not change a run's result: a re-run with other values resumes its training state, and a
# re-run of --fold all keeps finished folds.
REUSABLE = {"out", "workers", "device", "strict", "allow_pickle", "checkpoint_every", "stop_after"}


def parse_config(argv=None) -> Config:
    """The CLI: defaults are the recipe of --task (auto: recognised from --train's layout)."""
    return parse_with_task(Config, "probe", argv)


def config(**values) -> Config:
    """A Config from Python with the task's recipe for every value not given (like the CLI)."""
    return config_with_task(Config, "probe", **values)


def check(cfg):
    check_flags(cfg, at_least=dict(steps=1, batch_size=1, prototypes=1, warmup_steps=0, val_every=0, epoch_clips=1,
                                   workers=0, target_frames=16, queries=1, patience=1, min_lr=0, weight_decay=0,
                                   lasso_weight=0, checkpoint_every=1, stop_after=0),
                positive=("lr", "max_seconds"), fractions=("warmup_share", "dropout", "test_fraction", "held_out"))
    if any(not lr > 0 for lr in cfg.lr_grid):
        raise FlagError(f"--lr-grid values must be > 0, got {' '.join(map(str, cfg.lr_grid))}")
    if cfg.lr_grid and cfg.min_lr > min(cfg.lr_grid):
        raise FlagError(f"--min-lr must not exceed the --lr-grid values, got --min-lr {cfg.min_lr} and {min(cfg.lr_grid)}")
    for name in ("dropout", "held_out"):  # 1: every feature dropped / the whole training set held out
        if getattr(cfg, name) == 1:
            raise FlagError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(cfg, name)}")
    if not 0 < cfg.test_fraction < 1:  # 0 or 1: nothing to test on or nothing to train on
        raise FlagError(f"--test-fraction must lie in (0, 1), got {cfg.test_fraction}")
    if cfg.cache_features and cfg.no_cache:
        raise FlagError("--cache-features and --no-cache contradict each other; pick one")
    if cfg.probe == "vqt" and cfg.cache_features:
        raise FlagError("--probe vqt runs its query tokens through the encoder every step: no --cache-features")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.batch_size % world:
        raise FlagError(f"--batch-size {cfg.batch_size} is the batch of all {world} processes together: it must be "
                        f"divisible by {world}")


def train_probe(cfg, task, encoder, run, device, skips, rank=0, world=1, checkpoints=None):
    """Train a head on run.train and test it on run.test, validating on run.val (REF's SCV2) or, under
    --select auto, on a held-out part of run.train (bat.selection). Returns (Probe, metrics), or None when
    stopped early; the fixed schedule saves and resumes its training state in `checkpoints`' file, --select
    auto (small data) retrains."""
    classes, kind, full_train = run.train.classes, run.train.task, run.train
    select = selection.applies(cfg.select, task, run)
    if select:  # only the training list is split: the test clips stay unseen until the chosen head's test
        run = selection.carve_held_out(run, cfg.held_out, cfg.seed)
        select = len(run.val) > 0  # a single clip per class: nothing to hold out, the fixed schedule
    checkpoints = None if select else checkpoints
    clip_samples, frames = clip_geometry(task, full_train, cfg.target_frames, cfg.max_seconds)
    fcfg = frontend_config(encoder.frontend_config, task, frames)
    frontend = Frontend.from_config(fcfg).to(device)
    use_cls = cfg.use_cls and getattr(encoder, "has_cls", True)  # BEATs: CGP pools [min, mean, max] (REF)

    def new_head():  # the same init on every process and for every learning rate
        torch.manual_seed(cfg.seed)
        head = build_head(cfg.probe, encoder.cfg.dim, encoder.cfg.depth, len(classes), cfg.prototypes, cfg.dropout,
                          use_cls, lasso_weight=cfg.lasso_weight, num_queries=cfg.queries, norm=cfg.head_norm).to(device)
        if rank:
            torch.manual_seed(cfg.seed * 1000 + rank)  # dropout: each process draws its own
        return head

    head = new_head()
    val = run.val if (select or cfg.val_every) and run.val is not None and len(run.val) else None
    every = (cfg.val_every or selection.eval_every(len(run.train), cfg.batch_size)) if select else cfg.val_every
    lrs = (cfg.lr_grid or tuple(cfg.lr * f for f in selection.GRID)) if select else (cfg.lr,)
    split = "held_out" if select else "val"
    print0(run_line(cfg, task, run, val, split, head, clip_samples, frames, world, lrs if select else None, every))
    data = lambda items, train=False: datasets(task, items, classes, clip_samples, fcfg, train)  # noqa: E731
    score = lambda h, source: score_clips(h, source, device, 2 * cfg.batch_size, skips, rank, world)  # noqa: E731
    cache, val_source, batches = training_source(cfg, task, encoder, frontend, head, run, val, data, clip_samples,
                                                 frames, device, skips, rank, world)
    key = "accuracy" if kind == "multiclass" else "mAP"

    def validator(h):  # head h's (score, history record) on the validation or held-out clips
        def validate():
            m = classification_metrics(*score(h, val_source), kind)
            return m[key], {"split": split, **m}
        return validate if val_source is not None else None

    loss = lambda logits, y: classification_loss(logits, y, kind, cfg.asymmetric_loss)  # noqa: E731
    tried, heads = {}, {}
    for lr in lrs:  # each lr from the same init and batch order; only the chosen head is ever tested
        heads[lr] = head = head if not heads else new_head()
        plan = Fit(run.name + (f" lr {lr:g}" if len(lrs) > 1 else ""), functools.partial(batches, head), loss,
                   validator(head), key, patience=cfg.patience if select else 0)
        tried[lr] = fit(dataclasses.replace(cfg, lr=lr, val_every=every), head, plan, device, rank, checkpoints)
        if tried[lr] is None:  # stopped early, the state saved
            return None
    chosen = selection.pick_lr({lr: t["selected"]["val_" + key] for lr, t in tried.items()}) if select else lrs[0]
    head = heads[chosen]

    logits, targets = score(head, (encoder, frontend, data(run.test), cfg.workers))
    share_skips(skips)  # the report counts every process's unreadable files
    metrics = classification_metrics(logits, targets, kind, classes)
    # clips actually trained on: every listed training item whose file was readable (not the held-out part)
    used = int(cache[1].shape[0]) if cache is not None else sum(f not in skips.seen for f in run.train.files)
    metrics.update(num_train=used, num_test=int(targets.shape[0]), target_frames=frames, clip_samples=clip_samples,
                   **skips.report(run.train.files, training_data(cfg.train, run)),
                   **{k: v for k, v in tried[chosen].items() if k != "stopped_at"})
    metrics.update(skips.untrained_classes(run.train, model="the head"))
    if select:  # held-out clips scored: the readable ones, cached or streamed alike
        held = len(val_source[1]) if cache is not None else sum(f not in skips.seen for f in val.files)
        metrics["held_out"], metrics["selection"] = selection.report(tried, chosen, key, cfg.patience, every, held)
    if cfg.baseline == "logmel":  # the floor on the same train/test split (its own held-out part picks L2)
        metrics["baseline"] = {"logmel": logmel_floor_of(data(full_train), data(run.test), frontend, kind, classes,
                                                         2 * cfg.batch_size, cfg.workers, skips, device, cfg.seed)}
    return Probe(encoder, head.eval(), frontend.cpu(), classes, kind, clip_samples), metrics


# ------------------------------------------------------------------------------------- the training loop


@dataclass
class Fit:
    """What one kind of head brings to the training loop: clip heads (train_probe), the frame-wise SED heads
    and the ASR head (probe_frames); their data and scoring come from bat/ (features, sed, asr)."""
    name: str  # of the run, in messages
    batches: Callable  # (Progress) -> endless (features, targets, rows), from progress.consumed batches in;
    # rows = this process's rows of the step's batch
    loss: Callable  # (head output, targets) -> scalar
    validate: Callable | None = None  # () -> (score, history record); None: the final head is kept
    metric: str = "mAP"  # what validate scores
    lower: bool = False  # lower is better (WER)
    patience: int = 0  # stop after this many evaluations without improvement (bat.selection); 0: run --steps


def fit(cfg, head, plan, device, rank=0, checkpoints: Checkpoints | None = None):
    """The one training loop of every probe (REF's recipe: AdamW 0.9/0.999, linear warm-up, cosine decay to
    --min-lr over --steps). Every --val-every steps and at the end the head is scored on the validation split
    and the best one is kept (REF); with plan.patience it stops once that score stops improving. Under torchrun
    every process holds the same head, steps with the whole batch's gradient and sees the same score. With
    `checkpoints` (the fixed schedule of the clip probes) it resumes from a saved training state and saves one
    (bat.probe_state). Returns the selection, validation history, stop step and gate weights, the head holding
    the kept weights; None when stopped early (the state is saved)."""
    opt = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    warmup = warmup_steps(cfg)
    if checkpoints is not None:
        progress = checkpoints.restore(head, opt, plan.name, plan.metric, plan.lower)
    else:
        progress = Progress(best=Best(plan.metric, plan.lower))
    best, history = progress.best, progress.history
    stop = selection.EarlyStop(plan.patience, plan.lower, start=warmup) if plan.patience else None
    batches = plan.batches(progress)  # started at the batches a resumed run already took
    head.train()
    pbar = tqdm(range(progress.step, cfg.steps), initial=progress.step, total=cfg.steps, desc=f"probe {plan.name}",
                unit="step", dynamic_ncols=True, disable=rank != 0)
    with checkpoints or contextlib.nullcontext():  # resumable: SIGINT/SIGTERM save at the next step boundary
        for step in pbar:
            lr = set_lr(opt, step, cfg.lr, warmup, cfg.steps, cfg.min_lr)
            loss = train_step(head, opt, plan, next(batches), device, step)
            progress.step = step + 1
            if step % 10 == 0 or step == cfg.steps - 1:
                pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if plan.validate is not None and cfg.val_every and (progress.step % cfg.val_every == 0
                                                                or progress.step == cfg.steps):
                score, record = plan.validate()
                history.append({"step": progress.step, **record})
                best.update(progress.step, score, head.state_dict())
                if rank == 0 and stop is None:  # early stopping evaluates every epoch: too many lines to print
                    pbar.write(f"[{plan.name}] step {progress.step}: {record['split']} {plan.metric} {100 * score:.2f}")
                if stop is not None and stop.update(progress.step, score):
                    break
            if checkpoints is not None and checkpoints.step_done(progress, head, opt, cfg.steps, plan.name):
                pbar.close()
                return None
    pbar.close()
    record = {}
    if best.state is not None:  # REF: test the head that was best on the validation split
        head.load_state_dict(best.state)
        record.update(selected=best.selected(), history=history)
        print0(f"[{plan.name}] {'stopped at' if stop is not None else 'ran'} step {progress.step}; kept the best "
               f"{history[-1]['split']} head (step {best.step}, {plan.metric} {100 * best.score:.2f})")
    if stop is not None:
        record["stopped_at"] = progress.step
    gates = head.gate_weights()
    record["gate_weights"] = None if gates is None else gates.detach().float().cpu().tolist()
    return record


def train_step(head, opt, plan, batch, device, step):
    """One optimiser step of the head on this process's rows of the batch; returns the loss."""
    feats, targets, rows = batch
    opt.zero_grad(set_to_none=True)
    loss = torch.zeros(())
    if rows:  # a process may get no row of a batch smaller than the number of processes
        with autocast(device, "cuda-bf16"):  # the head: bf16 on CUDA (REF), float32 on the CPU
            out = head(feats)
        loss = plan.loss(out, targets)
        if head.penalty() is not None:  # Head2Toe's group lasso
            loss = loss + head.penalty()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{plan.name}] loss is {loss.item()} at step {step + 1}: non-finite encoder "
                                     "outputs or too high --lr")
        loss.backward()
    average_gradients(head.parameters(), rows)  # torchrun: the whole batch's gradient everywhere
    opt.step()
    return loss


# ------------------------------------------------------------------------------------- outputs


def probe_frames(cfg, encoder, device):
    """--task dcase2016: a frame-wise probe for sound event detection (bat/sed.py); --task librispeech: the
    ASR probe (bat/asr.py). Same outputs as the clip tasks, with the task's own metrics."""
    skips = SkipLog(strict=cfg.strict)
    head, labels, kind, frontend, extra, cache, (train, valid, test), parts = frame_probe_parts(cfg, encoder, device,
                                                                                                skips)
    write_config(cfg, device, encoder, classes=labels, frontend_config=frontend.config())
    print(f"{kind.upper()} probe: {len(labels)} labels, {len(train)} train / {len(valid) if valid else 0} valid / "
          f"{len(test)} test recordings, {cfg.steps} steps x {cfg.batch_size}, warm-up {warmup_steps(cfg)}, head "
          f"{sum(p.numel() for p in head.parameters()):,} parameters, features {'cached' if cache else 'streamed'}")
    batches, loss, validate, test_ = parts()
    # never resumed (no training state for the frame-wise heads): the stream from its start, whatever `progress` says
    plan = Fit(kind, lambda progress: batches, loss, validate if cfg.val_every else None,
               "wer" if kind == "asr" else "frame_mAP", lower=kind == "asr")
    record = fit(cfg, head, plan, device)
    metrics = {"task": kind, **test_(), **record, **skips.report()}
    probe = Probe(encoder, head.eval(), frontend, labels, "asr" if kind == "asr" else "multilabel")
    write_frame_outputs(cfg, probe, metrics, extra, encoder.cfg.depth)
    return metrics


def fold_fingerprint(cfg):
    """What a finished fold's result depends on: every setting but REUSABLE's, and the encoder file's bytes
    (a checkpoint retrained under the same name is another encoder)."""
    weights = file_sha256(cfg.encoder) if os.path.isfile(cfg.encoder) else cfg.encoder
    return settings_fingerprint({**dataclasses.asdict(cfg), "encoder_sha256": weights}, REUSABLE)


def main(cfg: Config):
    """Run the probe; under torchrun (WORLD_SIZE > 1) as data-parallel processes of which rank 0 writes. Returns
    the metrics, None when --stop-after stopped the run, 128 + N when signal N did (the state is saved either way)."""
    check(cfg)
    return run_processes(_main, cfg)


def _main(cfg, rank, world, device):
    set_precision(cfg.precision)  # read by the feature pass (bat.features.encode)
    task = resolve_task(cfg.task, cfg.train)
    cfg = dataclasses.replace(cfg, task=task.name)
    if task.frame_wise and world > 1:
        raise FlagError(f"--task {task.name}: the frame-wise probe runs in one process; start it without torchrun")
    if task.frame_wise and cfg.fold is not None:  # its data has its own splits (HEAR, LibriSpeech)
        raise FlagError(f"--task {task.name}: --fold picks an ESC-50 test fold; this data has its own splits")
    if task.frame_wise:
        refuse_stop_after(cfg, f"--task {task.name}")
    if rank == 0:
        names = ("config.json", "probe.safetensors", "metrics.json", "gates.png", "state.pt")
        claim_out(cfg.out, "probe_cgp.py", names, legacy_key="prototypes", settings=dataclasses.asdict(cfg),
                  may_change=REUSABLE, results=("probe.safetensors", "metrics.json"))
        check_writable(cfg.out)  # not made yet: a run refused for its input leaves no empty folder
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    encoder = load_encoder(cfg.encoder, allow_pickle=cfg.allow_pickle).to(device).eval().requires_grad_(False)
    if task.frame_wise:  # dcase2016, librispeech: bat/sed.py, bat/asr.py
        return probe_frames(cfg, encoder, device)
    runs = plan_runs(cfg.train, cfg.test, cfg.fold, cfg.test_fraction, cfg.seed, log=print0)
    if any(selection.applies(cfg.select, task, r) for r in runs):
        refuse_stop_after(cfg, "--select auto")
    skips = SkipLog(strict=cfg.strict)
    for r in runs:
        skips.add(r.train.skipped + r.test.skipped + (r.val.skipped if r.val is not None else []))
    key = fold_fingerprint(cfg)  # of a finished fold's result, and of a training state
    for r in runs:  # a state of other settings is refused before config.json is rewritten with these
        check_state(state_path(cfg, r.name, len(runs)), key)
    if rank == 0:
        if len(runs) > 1:  # --fold all: each fold's files in DIR/<fold>/
            folds = [f"{r.name}/{n}" for r in runs for n in ("probe.safetensors", "metrics.json")]
            claim_out(cfg.out, "probe_cgp.py", folds + [f"{r.name}/state.pt" for r in runs], legacy_key="prototypes",
                      settings=dataclasses.asdict(cfg), may_change=REUSABLE, results=folds)
        write_config(cfg, device, encoder, world_size=world, data_task=runs[0].train.task,
                     classes=runs[0].train.classes, runs=[r.name for r in runs], warmup=warmup_steps(cfg),
                     frontend_config=encoder.frontend_config)

    t0 = time.time()
    results = train_runs(cfg, task, encoder, runs, device, skips, rank, world, key)
    if isinstance(results, int):  # stopped early, the state saved: 128 + N for signal N (a scheduler's requeue)
        return results or None
    metrics, std = combine_folds(results, "probe.safetensors")
    metrics.update(skips.report())  # every fold's unreadable files, once
    if len(results) > 1 and all("baseline" in m for _, _, m in results):  # --fold all: the floor's mean too
        metrics["baseline"] = {"logmel": mean_floor([m["baseline"]["logmel"] for _, _, m in results])}
    if rank == 0:
        write_outputs(cfg, task, results, metrics, std, skips, time.time() - t0)
        if len(runs) == 1 and os.path.exists(state_path(cfg, runs[0].name, 1)):  # the outputs are written
            os.remove(state_path(cfg, runs[0].name, 1))
    return metrics


def train_runs(cfg, task, encoder, runs, device, skips, rank, world, key):
    """[(name, probe, metrics)] of every planned run (one, or one per fold; finished folds of an interrupted
    --fold all are read back), or, when a run stopped early with its state saved, 128 + the signal's number
    (0: --stop-after)."""
    results = []
    for run in runs:
        path = state_path(cfg, run.name, len(runs))
        done = read_finished_run(os.path.dirname(path), "probe.safetensors", key) if len(runs) > 1 else None
        if done is not None:  # an interrupted --fold all goes on after its finished folds
            print0(f"[{run.name}] already finished ({os.path.dirname(path)}/metrics.json)")
            if rank == 0 and os.path.exists(path):  # killed between writing the fold and removing its state
                os.remove(path)
            done[0].encoder = encoder  # the same weights (the fingerprint holds them): one copy in memory
            results.append((run.name, *done))
            continue
        checkpoints = Checkpoints(path, key, cfg.checkpoint_every, cfg.stop_after, skips, cfg.seed, rank, device)
        out = train_probe(cfg, task, encoder, run, device, skips, rank, world, checkpoints)
        if out is None:
            return 128 + checkpoints.signum if checkpoints.signum else 0
        results.append((run.name, *out))
        if len(runs) > 1 and rank == 0:  # per-fold outputs; the top level holds mean and std
            write_fold(cfg, run.name, out[0], {**out[1], "fingerprint": key})
            checkpoints.remove()  # the fold's outputs are written: its state can go
    return results


if __name__ == "__main__":
    # Outside the resumable training steps (which save their state on SIGINT/SIGTERM) Ctrl-C ends the run at once.
    exit_on_ctrl_c(STOPPED)
    try:
        result = main(parse_config())
        sys.exit(result if isinstance(result, int) else 0)  # 128 + N: stopped by signal N, the state saved
    except (DataError, AudioError, CheckpointError, TaskError, FlagError, FloatingPointError,
            OSError) as e:  # OSError: e.g. --out on a read-only or full disk
        error_exit(e)
    except KeyboardInterrupt:  # before the handler was installed, or a second Ctrl-C in the training steps
        exit_interrupted(STOPPED)
