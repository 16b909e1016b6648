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
sub-folder per fold too. A DIR holding such files that finetune.py did not write is refused (a run never
overwrites files it did not create). The training state (DIR/state.pt, written atomically every
--checkpoint-every steps and on SIGINT/SIGTERM) makes a re-run of the same command resume. On the CPU a resumed
run (every task, dcase2016's sound event detection included) reproduces an uninterrupted one exactly, with any
--workers and as many processes: a clip's random roll, window and noise (a recording's noise) are seeded by its place in the stream of
batches, not by the loader worker that reads it, the stream starts at the first batch not yet trained on
(nothing is loaded twice), and the augmentations on the device go on from the RNG state the training state saves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bat import sed
from bat.audio import AudioError
from bat.checkpoint import CheckpointError, load_encoder
from bat.cli import FlagError, TqdmStream, check_flags, error_exit
from bat.data import SkipLog, default_workers
from bat.distributed import print0, share_skips
from bat.files import (append_jsonl, check_writable, claim_out, fingerprint as settings_fingerprint, lock_out,
                       write_json)
from bat.finetuning import (check_state, file_metadata, finished_run, out_files, run_folder, save_progress, setup_clips,
                            setup_frames, test_best)
from bat.listing import DataError
from bat.metrics import combine_folds, summarise
from bat.optim import set_lr
from bat.precision import autocast
from bat.probes import save_probe
from bat.run_control import StopFlag, exit_interrupted, run_processes
from bat.tasks import TaskError, TaskName, config_with_task, parse_with_task, plan_runs, resolve_task, warmup_steps


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
    """REF recipe: audioset (AS-20k), as2m, esc50, scv2, hsn (BirdSet HSN, 32 kHz), dcase2016 (sound event
    detection), generic (your data); auto: esc50 / scv2 / dcase2016 for those layouts, else generic"""
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
    asymmetric_loss: bool = True
    """multi-label: REF's asymmetric loss (AudioSet); --no-asymmetric-loss: plain BCE (REF HSN)"""
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
    """circular roll of the spectrograms in time (REF ESC-50, SCV2, HSN: BAT one shift per batch, EAT/SSLAM/BEATs per clip)"""
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
    balance_by: Literal["labels", "first-label"] = "labels"
    """what --balanced weighs: all of a clip's labels, or only its first listed one (REF HSN)"""
    epoch_clips: int | None = None
    """clips per balanced epoch (default REF's: 200 000, with replacement from a smaller set; first-label: as many as the training set)"""
    workers: int = default_workers()
    """DataLoader worker processes (0: the main process loads; default: up to 4, in its CPU share)"""
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
    """save the training state and stop after this step, as if interrupted (re-run without it to resume)"""


RESULTS = ("model.safetensors", "metrics.json")  # a finished run's, which another run's settings must not overwrite
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
                fractions=("mixup_prob", "noise_prob", "warmup_share", "label_smoothing", "test_fraction",
                           "layer_decay"))
    if not (cfg.min_lr >= 0 and cfg.weight_decay >= 0):  # also refuses NaN
        raise FlagError("--min-lr and --weight-decay must be >= 0")
    for name in ("drop_path", "head_dropout"):  # at 1 nothing passes: a NaN loss (drop-path), an untrained head
        if not 0 <= getattr(cfg, name) < 1:
            raise FlagError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(cfg, name)}")
    if not 0 < cfg.test_fraction < 1:  # 0 or 1: nothing to test on or nothing to train on
        raise FlagError(f"--test-fraction must lie in (0, 1), got {cfg.test_fraction}")


def fingerprint(cfg):
    """Hash of the settings a training state depends on (RESUMABLE_CHANGES may differ on resume)."""
    return settings_fingerprint(dataclasses.asdict(cfg), RESUMABLE_CHANGES)


def train_step(cfg, p, device, world):
    """One optimiser step over --accum-steps micro-batches. Returns (mean loss, lr, clips used)."""
    lr = set_lr(p.opt, p.progress.step, cfg.lr, warmup_steps(cfg), cfg.steps, cfg.min_lr)  # x lr_scale per group
    loss_sum, clips = 0.0, 0
    for micro in range(cfg.accum_steps):
        spec, targets, n = p.next_batch()
        with (contextlib.nullcontext() if micro == cfg.accum_steps - 1 or world == 1 else p.ddp.no_sync()):
            with autocast(device, "cuda-bf16"):
                logits = p.ddp(spec)
            loss = p.loss(logits, targets)
            (loss / cfg.accum_steps).backward()
        loss_sum += loss.item()
        clips += n
    p.opt.step()
    p.opt.zero_grad(set_to_none=True)
    p.progress.step += 1
    return loss_sum / cfg.accum_steps, lr, clips


def finetune(cfg, p, run_dir, rank, world, device, skips, stop):
    """The one fine-tuning loop (clip and frame-level targets): train p.model to --steps, validating every
    --val-every steps (the best model is tested, REF) and checkpointing every --checkpoint-every steps.
    Returns (model, metrics), or None when stopped early."""
    progress, state_path = p.progress, os.path.join(run_dir, "state.pt")
    pbar = tqdm(total=cfg.steps, initial=progress.step, desc=f"finetune {p.name}", unit="step",
                dynamic_ncols=True, disable=rank != 0)
    t0, clips_seen, stopping = time.time(), 0, False
    while progress.step < cfg.steps:
        loss, lr, clips = train_step(cfg, p, device, world)
        step, clips_seen = progress.step, clips_seen + clips
        pbar.update(1)
        if not np.isfinite(loss):
            raise FloatingPointError(f"[{p.name}] loss is {loss} at step {step}; lower --lr or check the data")
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = clips_seen * world / max(time.time() - t0, 1e-9)
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
            if rank == 0:
                append_jsonl(os.path.join(run_dir, "log.jsonl"),
                             {"step": step, "loss": loss, "lr": lr, "clips_per_s": rate})
        if p.validate is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            score, record = p.validate()
            progress.history.append({"step": step, **record})
            progress.best.update(step, score, p.model.state_dict())  # ties: the later, as REF
            if rank == 0:
                pbar.write(f"[{p.name}] step {step}: val {progress.best.metric} {100 * score:.2f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m = p.test()
            progress.history.append({"step": step, "split": "test", **m})
            if rank == 0:
                pbar.write(f"[{p.name}] step {step}: " + ", ".join(f"test {k} {100 * v:.2f}" for k, v in m.items()
                                                                   if isinstance(v, float)))
        stopping = stop.any() or (cfg.stop_after is not None and cfg.stop_after <= step < cfg.steps)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
            save_progress(fingerprint(cfg), state_path, p.model, p.opt, progress, skips, rank, device)
        if stopping:
            print0(f"\n[{p.name}] stopped at step {step}; run the same command again to resume")
            break
    pbar.close()
    if stopping or progress.step < cfg.steps or stop.any():  # a signal in the last step or before stops the test too
        return None
    with stop.at_once():  # the final state is saved: Ctrl-C during the test stops now (a re-run tests again)
        return test_best(p, skips)


# ------------------------------------------------------------------------------ main


def main(cfg: Config):
    """Fine-tune; under torchrun as data-parallel processes of which rank 0 writes. Returns the metrics,
    None when --stop-after stopped the run, 128 + N when signal N did (the state is saved either way)."""
    check(cfg)
    return run_processes(_main, cfg)


def _main(cfg, rank, world, device):
    task = resolve_task(cfg.task, cfg.train)
    cfg = dataclasses.replace(cfg, task=task.name)
    if task.name == "librispeech":
        raise FlagError("--task librispeech: fine-tuning with the ASR head is not available; "
                        "probe_cgp.py --task librispeech trains the ASR probe")
    if task.frame_wise and world > 1:
        raise FlagError(f"--task {cfg.task}: fine-tuning runs in one process; start it without torchrun")
    if task.frame_wise and cfg.fold is not None:  # its data has its own splits (HEAR, LibriSpeech)
        raise FlagError(f"--task {task.name}: --fold picks an ESC-50 test fold; this data has its own splits")
    if cfg.label_smoothing and cfg.augment and cfg.mixup:
        print0("note: label smoothing applies on top of mixup's soft targets")
    check_writable(cfg.out)  # not made yet: a run refused for its input leaves no empty folder
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    base = load_encoder(cfg.encoder, allow_pickle=cfg.allow_pickle)
    skips = SkipLog(strict=cfg.strict, stream=TqdmStream())
    if task.frame_wise:  # dcase2016: one run on the task's own splits (bat/sed.py)
        train, valid, test = sed.plan_splits(cfg.train, cfg.test)
        runs = [("sed", lambda run_dir: setup_frames(cfg, base, train, valid, test, run_dir, device, skips,
                                                     fingerprint(cfg)))]
        info = {"classes": train.classes, "frontend_config": sed.event_frontend(base).config()}
    else:
        planned = plan_runs(cfg.train, cfg.test, cfg.fold, cfg.test_fraction, cfg.seed, log=print0)
        for r in planned:
            skips.add(r.train.skipped + r.test.skipped + (r.val.skipped if r.val is not None else []))
        runs = [(r.name, lambda run_dir, r=r: setup_clips(cfg, task, base, r, run_dir, rank, world, device, skips,
                                                          fingerprint(cfg)))
                for r in planned]
        info = {"data_task": planned[0].train.task, "classes": planned[0].train.classes,
                "runs": [r.name for r in planned], "frontend_config": base.frontend_config}
    # Refuse before anything is written (config.json included): another's files, a state that cannot resume.
    names = [name for name, _ in runs]
    claim_out(cfg.out, "finetune.py", out_files(names), legacy_key="fingerprint", settings=dataclasses.asdict(cfg),
              may_change=RESUMABLE_CHANGES | {"out"}, results=[f for f in out_files(names) if f.endswith(RESULTS)])
    for name in names:
        check_state(os.path.join(run_folder(cfg, name, len(names)), "state.pt"), fingerprint(cfg))
    if rank == 0:
        lock_out(cfg.out)  # before a resumed run's log is cut back to its checkpoint
        write_json(os.path.join(cfg.out, "config.json"),
                   {"written_by": "finetune.py", **dataclasses.asdict(cfg), "device": str(device), "world_size": world,
                    "warmup": warmup_steps(cfg), "model_config": base.cfg.to_dict(), **info,
                    "fingerprint": fingerprint(cfg)})

    t0 = time.time()
    with StopFlag() as stop:
        results = train_runs(cfg, runs, rank, world, device, skips, stop)
        signum = stop.any() if results is None else 0  # every process stopped at the same step
    if results is None:  # the state is saved; a signal's exit code tells a scheduler the run is not done
        return 128 + signum if signum else None
    metrics, std = combine_folds(results, "model.safetensors")
    metrics.update(skips.report())  # every fold's unreadable files, once
    if rank == 0:
        if len(results) > 1:
            save_probe(os.path.join(cfg.out, "model.safetensors"), results[-1][1],
                       file_metadata(cfg, results[-1][2], results[-1][0], fingerprint(cfg)), fmt="bat.finetuned")
            write_json(os.path.join(cfg.out, "metrics.json"), {**metrics, "fingerprint": fingerprint(cfg)})
        if skips.count:
            print(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
        print(f"\nfine-tuned {cfg.encoder} on {cfg.train}, task {task.name} ({len(results)} run(s), "
              f"{time.time() - t0:.0f} s):")
        print(summarise(metrics, std))
        print(f"wrote {cfg.out}/config.json, model.safetensors, metrics.json")
    return metrics


def train_runs(cfg, runs, rank, world, device, skips, stop):
    """Train every planned run ((name, setup(run_dir) -> Parts): one, or one per fold), writing each run's
    model and metrics; completed runs of an interrupted --fold all are read back instead of retrained. None
    when stopped early."""
    results = []
    for name, setup in runs:
        run_dir = run_folder(cfg, name, len(runs))
        os.makedirs(run_dir, exist_ok=True)
        done = finished_run(run_dir, fingerprint(cfg))
        if done is not None:
            print0(f"[{name}] already finished ({run_dir}/metrics.json)")
            results.append((name, *done))
            continue
        p = setup(run_dir)
        out = finetune(cfg, p, run_dir, rank, world, device, skips, stop)
        if out is None:
            return None
        model, metrics = out
        model = model.cpu()
        share_skips(skips)  # every process's skipped and read files, counted once
        metrics.update(p.report())
        if rank == 0:
            save_probe(os.path.join(run_dir, "model.safetensors"), model,
                       file_metadata(cfg, metrics, name, fingerprint(cfg)), fmt="bat.finetuned")
            write_json(os.path.join(run_dir, "metrics.json"), {"task": model.task, **metrics,
                                                               "fingerprint": fingerprint(cfg)})
            state_path = os.path.join(run_dir, "state.pt")
            if os.path.exists(state_path):  # the outputs are written: the bulky training state can go
                os.remove(state_path)
        results.append((name, model, metrics))
        if dist.is_initialized():
            dist.barrier()
    return results


if __name__ == "__main__":
    try:
        result = main(parse_config())
        sys.exit(result if isinstance(result, int) else 0)  # 128 + N: stopped by signal N, state saved
    except (DataError, AudioError, CheckpointError, TaskError, FlagError, FloatingPointError,
            OSError) as e:  # OSError: e.g. --out on a read-only or full disk
        error_exit(e)
    except KeyboardInterrupt:  # outside the training loop (starting, testing): its states are kept
        exit_interrupted("re-run the same command to go on from the last saved state")
