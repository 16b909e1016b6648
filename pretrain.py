"""Pretrain a BAT encoder: masked latent regression with an EMA teacher,
as in the BAT paper and REF (the authors' code).

    python pretrain.py --model tiny --out runs/tiny                    # built-in demo data, CPU-sized
    python pretrain.py --data /data/audioset/unbalanced --out runs/bat_base     # REF's base recipe
    torchrun --nproc_per_node 4 pretrain.py --data ... --out ...       # DDP; multi-node: torchrun's usual flags
    python pretrain.py --data ... --out ... --micro-batch-size 12      # REF's 48 clips on one GPU (4 accumulations)

Each step: a batch of clips (circularly rolled, randomly cropped, zero-padded as waveforms) becomes
spectrograms; the EMA teacher encodes the full clips and its normalised, layer-averaged block outputs
are the targets; every clip is seen in V views with their own inverse block masks (~20% of the
patches kept, in 5x5 blocks); the student encodes the kept patches of each view, the decoder
predicts all positions; loss = MSE(CLS, mean target) + MSE(prediction, target) on masked patches.
AdamW with warm-up + cosine LR, and after every optimiser step the teacher moves towards the student.

Writes DIR/config.json, DIR/log.jsonl (one JSON per logged step), DIR/curves.png (losses, target and
prediction spread, --probe-data accuracy against steps), DIR/encoder.safetensors (the student
encoder, for probe_cgp.py / finetune.py / export.py) and DIR/state.pt (REF's trainer layout plus the
optimiser, so `bat.load_encoder` reads it too), both rewritten atomically at every checkpoint.
Re-running the same command with the same --out resumes; on the CPU the resumed run logs exactly the
losses of an uninterrupted one. SIGINT/SIGTERM save a checkpoint, then exit.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from bat.audio import SAMPLE_RATE, AudioError
from bat.checkpoint import CheckpointError
from bat.cli import FlagError, TqdmStream, check_flags, error_exit, parse_flags
from bat.data import AudioDataset, Loader, SkipLog
from bat.distributed import all_reduce_mean, data_parallel, print0, sync_skips
from bat.files import append_jsonl, check_writable, claim_out, lock_out, read_jsonl, write_json
from bat.frontend import Frontend
from bat.listing import DataError, list_dataset
from bat.masking import num_kept
from bat.model import FREQ_PATCHES, PATCH, count_parameters
from bat.online_probe import probe_accuracy, probe_set, save_curves
from bat.optim import EmaSchedule, ema_update, set_lr
from bat.precision import autocast
from bat.pretrain_state import LossWatch, PretrainError, resume, save_checkpoint
from bat.pretraining import (DemoSource, MaskCollate, PretrainClips, StreamBatches, build_models, build_optimizer,
                             crop_samples, feature_std, ssl_step, unusable_data)
from bat.run_control import StopFlag, exit_interrupted, run_processes, seed_everything


@dataclass
class Config:
    """Pretrain a BAT encoder (masked latent regression with an EMA teacher). Defaults: REF's base
    recipe; --model tiny switches to CPU-sized defaults (see --model tiny --help); every flag overrides."""

    out: str = "runs/pretrain"
    """output folder: config.json, log.jsonl, encoder.safetensors, state.pt; re-run to resume"""
    data: str | None = None
    """unlabelled audio: a folder (every audio file below it), a CSV manifest with a `path` column
    (labels ignored) or WebDataset tar shards ('shards/train-{000000..000127}.tar', see bat.shards);
    default: the built-in synthetic demo set, generated in code"""
    model: Literal["tiny", "small", "base"] = "base"
    """encoder size (tiny: 192 wide, 6 blocks; small: 384, 12; base: 768, 12) and its preset defaults.
    base is REF's recipe (but for no weight decay on biases, norms and tokens: --decay-all is REF's); small is
    base's recipe with a 384-wide decoder (REF trains base only);
    tiny departs from REF (CPU-sized: 1.28-s crops, 4 views, 8 clips, 3,000 steps, faster EMA, centred
    targets; see the comment above PRESETS)"""
    seed: int = 0
    """seed of the initial weights, the data order, crops, rolls and masks"""
    steps: int = 400_000
    """optimiser steps (the cosine LR schedule ends here)"""
    batch_size: int = 48
    """clips per optimiser step, over all processes and accumulation steps (each seen in --views views)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1 (under torchrun: each process's local GPU)"""
    checkpoint_every: int = 5000
    """write state.pt and encoder.safetensors every this many steps (and at the end)"""
    log_every: int = 50
    """append a line to log.jsonl every this many steps"""

    target_frames: int = 1024
    """spectrogram frames per clip (10 ms each; a multiple of 16). Longer clips are cropped at random,
    shorter ones zero-padded. Also the encoder's positional grid: chunk length for downstream use"""
    views: int = 16
    """masked views per clip: the teacher runs once per clip, the student once per view"""
    mask_ratio: float = 0.8
    """share of patches masked in every view (inverse block masking, same count in every view)"""
    micro_batch_size: int | None = None
    """clips per process per forward pass (the batch size per device); default batch_size / processes.
    Smaller values accumulate gradients over batch_size / (processes x micro_batch_size) passes"""
    workers: int = 8
    """DataLoader worker processes per process (decode, resample, crop, masks); 0: in the main process"""
    demo_clips: int = 2048
    """size of the built-in demo set (used without --data)"""
    strict: bool = False
    """fail on the first unreadable audio file instead of skipping it"""

    decoder_dim: int = 768
    """decoder width (a Linear maps the encoder width to it when they differ)"""
    decoder_depth: int = 6
    """decoder blocks"""
    decoder_heads: int = 12
    """decoder attention heads"""

    lr: float = 5e-4
    """peak learning rate (after warm-up)"""
    min_lr: float = 1e-6
    """floor of the cosine decay"""
    warmup_steps: int = 53_000
    """linear warm-up steps (REF: 53 000)"""
    weight_decay: float = 0.05
    """AdamW weight decay on weight matrices and kernels (not on biases, norms, tokens: see --decay-all)"""
    decay_all: bool = False
    """REF's exact optimiser: weight decay on every parameter, biases, norms and tokens included"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float | None = None
    """clip the gradient norm to this value (REF: none)"""
    ema_start: float = 0.9998
    """teacher EMA decay at step 0"""
    ema_end: float = 0.99999
    """teacher EMA decay after the anneal"""
    ema_anneal_steps: int = 100_000
    """steps of the linear EMA ramp from --ema-start to --ema-end"""
    center_targets: bool = False
    """subtract each position's mean over the batch from the targets (not in REF): a young teacher's
    targets are mostly its positional table, the same for every clip; short runs need this"""

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on the CPU (losses and targets are always fp32). On CPUs with native bf16
    (AVX512_BF16, AMX; `python -m bat.tag --info` says) bf16 trains 1.9x (tiny) to 2.9x (base) faster a step"""
    compile: bool = False
    """torch.compile the student and the teacher (REF does on GPU; slow start, faster steps)"""

    probe_data: str | None = None
    """small labelled data set (folder/CSV/shards, or "demo") for a quick ridge probe on frozen student
    features (last block's CLS + mean patch) at step 0 (the random-init baseline) and every
    --probe-every steps; logged as probe_acc and drawn in DIR/curves.png"""
    probe_every: int = 5000
    """steps between probes"""
    probe_clips: int = 600
    """most clips of --probe-data used (70% fit, 30% scored)"""
    collapse_std: float = 0.05
    """warn when the spread of the targets or of the predictions (std over tokens) falls below this"""


# REF's base recipe is the dataclass default. tiny: a CPU-sized run that still learns within minutes.
# Its EMA decays are lower than REF's: at 0.9998 a 1000-step run would leave the teacher at its init.
# It centres the targets: a young teacher's targets are ~88% positional pattern, and without centring
# a few hundred steps taught the student mostly positions. Its crops are 1.28 s: on a pool of short clips
# (a drum hit lasts under a second) 2.56-s crops were two thirds zero padding, and the drums probe lost
# accuracy while pretraining; at 1.28 s it recovers and gains (benchmarks/README.md has the measurements).
# Its lr stays REF's 5e-4: measured at 1,500 and 3,000 steps on real audio (docs/benchmarks.md, "Does
# pretraining beat random initialisation?"). 3,000 steps, not 1,500: on two small real sets 1,500 steps
# left CGP level with random init on one of them (+1.0 points); 3,000 gain on both sets under CGP and the
# linear probe, on every seed measured. Much shorter runs want a smaller step: at 300 steps on the demo
# set lr 5e-4 collapses the last block (effective rank ~20 -> 5) and lr 5e-5 keeps the most
# (docs/benchmarks.md, "Why short pretraining loses information"); demo.sh passes --lr 5e-5.
PRESETS = {
    "base": {},
    "small": dict(decoder_dim=384, decoder_heads=6),
    "tiny": dict(decoder_dim=192, decoder_depth=2, decoder_heads=3, target_frames=128, views=4, batch_size=8,
                 steps=3000, warmup_steps=100, ema_start=0.995, ema_end=0.9995, ema_anneal_steps=500, center_targets=True,
                 checkpoint_every=250, log_every=10, probe_every=250, workers=2, demo_clips=600, probe_clips=300),
}
# Settings a resumed run may change (anything else must match the checkpoint).
RESUMABLE_CHANGES = {"out", "steps", "checkpoint_every", "log_every", "workers", "device", "compile", "probe_data",
                     "probe_every", "probe_clips", "collapse_std", "strict", "micro_batch_size", "precision"}


def parse_config(argv=None) -> Config:
    """tyro CLI whose defaults are the preset of --model."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="base")
    model = pre.parse_known_args(argv)[0].model
    if model not in PRESETS:
        print(f"error: --model must be one of {', '.join(PRESETS)}; got {model!r}", file=sys.stderr)
        sys.exit(2)
    return parse_flags(Config, default=Config(model=model, **PRESETS[model]), args=argv)


# ------------------------------------------------------------------------------------- helpers


def check(cfg: Config) -> None:
    """Refuse out-of-range flag values before anything runs (one line naming the flag)."""
    check_flags(cfg, at_least=dict(steps=1, batch_size=1, checkpoint_every=1, log_every=1, views=1, probe_every=1,
                                   micro_batch_size=1, workers=0, demo_clips=1, probe_clips=2, decoder_dim=1,
                                   decoder_depth=1, decoder_heads=1, warmup_steps=0, ema_anneal_steps=0, seed=0),
                positive=("lr", "grad_clip"), fractions=("ema_start", "ema_end", "adam_beta1", "adam_beta2"))
    for name in ("min_lr", "weight_decay", "collapse_std"):
        if not getattr(cfg, name) >= 0:  # also refuses NaN
            raise FlagError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.target_frames < PATCH or cfg.target_frames % PATCH:
        raise FlagError(f"--target-frames must be a positive multiple of {PATCH}, got {cfg.target_frames}")
    if not 0 < cfg.mask_ratio < 1 or num_kept(cfg.target_frames // PATCH * FREQ_PATCHES, cfg.mask_ratio) < 1:
        raise FlagError(f"--mask-ratio must leave at least one patch and mask one, got {cfg.mask_ratio}")
    if cfg.decoder_dim % cfg.decoder_heads:
        raise FlagError(f"--decoder-dim {cfg.decoder_dim} must be a multiple of --decoder-heads {cfg.decoder_heads}")


def check_config(cfg: Config, world: int) -> int:
    """Validate (flags, and that --out holds no files of another run's); returns the clips per process per
    micro-batch."""
    check(cfg)
    claim_out(cfg.out, "pretrain.py", ("config.json", "log.jsonl", "encoder.safetensors", "state.pt", "curves.png"),
              legacy_key="kept_patches")
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise PretrainError(f"--batch-size {cfg.batch_size} is not a multiple of {world} process(es) x "
                            f"--micro-batch-size {micro}")
    return micro


def clip_source(cfg: Config, skips: SkipLog):
    """The training clips: files of --data (labels ignored), or the demo set generated in code."""
    if cfg.data is None:
        return DemoSource(cfg.demo_clips, crop_samples(cfg.target_frames) / SAMPLE_RATE, seed=0), "demo"
    items = list_dataset(cfg.data, labelled=False)
    skips.add(items.skipped)
    return AudioDataset(items, labelled=False), f"{len(items)} files"


def make_batches(cfg, source, micro, rank, world, start_step, pin):
    """The endless iterator of this process's micro-batches, from optimiser step `start_step` on."""
    dataset = PretrainClips(source, crop_samples(cfg.target_frames), cfg.seed)
    sampler = StreamBatches(len(source), cfg.batch_size, micro, rank, world, cfg.seed, start_step)
    collate = MaskCollate(cfg.views, cfg.target_frames // PATCH, cfg.mask_ratio, cfg.seed)
    # Own generator: creating the loader must not draw from the global RNG (exact resume).
    loader = Loader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                    pin_memory=pin, generator=torch.Generator(),
                    persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers else None)
    return iter(loader)


def describe_run(cfg: Config, student, frontend, data_desc, world, micro, device, bf16, start, rank) -> None:
    """Print what this run does (one line); rank 0 writes the resolved settings to DIR/config.json."""
    accum = cfg.batch_size // (world * micro)
    print0(f"pretraining {cfg.model} ({count_parameters(student.encoder) / 1e6:.1f} M encoder + "
           f"{count_parameters(student.decoder) / 1e6:.1f} M decoder parameters) on {data_desc}, {device}, "
           f"{'bf16' if bf16 else 'fp32'}; {world} process(es) x {micro} clips x {accum} accumulation(s) = "
           f"{cfg.batch_size} clips x {cfg.views} views per step; {'resuming at step ' + str(start) if start else 'from scratch'}")
    if rank == 0:
        lock_out(cfg.out)
        write_json(Path(cfg.out) / "config.json", {
            "written_by": "pretrain.py", **dataclasses.asdict(cfg), "world_size": world, "micro_batch_size": micro, "accum_steps": accum,
            "device": str(device), "bf16": bf16, "data_desc": data_desc, "model_config": student.encoder.cfg.to_dict(),
            "frontend_config": frontend.config(), "crop_samples": crop_samples(cfg.target_frames),
            "kept_patches": num_kept(cfg.target_frames // PATCH * FREQ_PATCHES, cfg.mask_ratio)})


# What every line of DIR/log.jsonl holds besides "step" (and "probe_acc" at --probe-every steps).
LOG_KEYS = ("loss", "loss_global", "loss_local", "lr", "ema_decay", "target_std", "pred_std", "clips_per_s",
            "skipped_files")


class StepLog:
    """Rank 0's view of the run: a line in DIR/log.jsonl per logged step, the progress bar's summary,
    clips/s since the previous line, one collapse warning per kind (the spreads are logged anyway)."""

    def __init__(self, cfg: Config, path: Path, start: int, rank: int):
        self.cfg, self.path, self.rank = cfg, path, rank
        self.pbar = tqdm(total=cfg.steps, initial=start, unit="step", desc="pretrain", dynamic_ncols=True,
                         disable=rank != 0)
        self.t_log, self.step_log, self.warned = time.perf_counter(), start, set()

    def write_random_init(self, probe_acc: float):
        """Step 0: the online probe of the untrained encoder; every other key null (nothing trained yet)."""
        append_jsonl(self.path, {"step": 0, **dict.fromkeys(LOG_KEYS), "probe_acc": probe_acc})

    def write(self, done: int, lr: float, decay: float, stats: list[float], skipped: int, probe_acc=None):
        loss, loss_g, loss_l, t_std, p_std = stats
        now = time.perf_counter()
        clips_per_s = (done - self.step_log) * self.cfg.batch_size / max(now - self.t_log, 1e-9)
        self.t_log, self.step_log = now, done
        if self.rank != 0:
            return
        record = dict(zip(LOG_KEYS, (loss, loss_g, loss_l, lr, decay, t_std, p_std, clips_per_s, skipped)))
        record = {"step": done, **record, **({} if probe_acc is None else {"probe_acc": probe_acc})}
        append_jsonl(self.path, record)
        self.pbar.set_postfix_str(f"loss {loss:.4f} (g {loss_g:.3f} l {loss_l:.3f}) lr {lr:.2e} "
                                  f"{clips_per_s:.1f} clips/s" + (f" probe {probe_acc:.3f}" if probe_acc is not None else ""))
        for name, value in (("target", t_std), ("prediction", p_std)):
            if value < self.cfg.collapse_std and name not in self.warned:
                self.warned.add(name)
                tqdm.write(f"warning: {name} std {value:.4f} < {self.cfg.collapse_std} at step {done}: "
                           "the representation may be collapsing (check lr, EMA decay, data)", file=sys.stderr)


def main(cfg: Config) -> int:
    """Pretrain; under torchrun as data-parallel processes of which rank 0 writes. Returns the exit code:
    0 when done, 128 + N when signal N stopped the run (its checkpoint saved)."""
    check(cfg)
    return run_processes(train, cfg)


def train(cfg: Config, rank: int, world: int, device: torch.device) -> int:
    micro = check_config(cfg, world)
    accum = cfg.batch_size // (world * micro)
    out = Path(cfg.out)
    check_writable(out)  # not made yet: a run refused for its data leaves no empty folder
    if rank == 0:
        lock_out(out, create=False)  # a run to resume: before its log is cut back to the checkpoint
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")  # auto: fp32 on CPUs
    amp = autocast(device, "bf16" if bf16 else "fp32")
    skips = SkipLog(strict=cfg.strict, stream=TqdmStream())

    seed_everything(cfg.seed)
    student, teacher = build_models(cfg, device)
    optimizer = build_optimizer(cfg, student, device)
    ema_decay = EmaSchedule(cfg.ema_start, cfg.ema_end, cfg.ema_anneal_steps)
    frontend = Frontend("bat", target_frames=cfg.target_frames).to(device)

    start = resume(cfg, out, student, teacher, optimizer, skips, device, rank, RESUMABLE_CHANGES)
    source, data_desc = clip_source(cfg, skips)
    probe = probe_set(cfg.probe_data, cfg.probe_clips, crop_samples(cfg.target_frames), cfg.target_frames, skips) \
        if rank == 0 and cfg.probe_data is not None else None
    describe_run(cfg, student, frontend, data_desc, world, micro, device, bf16, start, rank)
    if start >= cfg.steps:
        print0(f"already trained for {start} steps (--steps {cfg.steps}); nothing to do")
        return 0

    model = wrap_student(cfg, student, teacher, world, device)
    batches = make_batches(cfg, source, micro, rank, world, start, pin=device.type == "cuda")
    log_path = out / "log.jsonl"
    steplog, shared_skips, watch = StepLog(cfg, log_path, start, rank), set(skips.seen), LossWatch(cfg, device, start)
    if probe is not None and start == 0:  # the random-init encoder: the baseline the curve must beat
        steplog.write_random_init(probe_accuracy(student.encoder, probe, device, amp))
    with StopFlag() as stop:
        for step in range(start, cfg.steps):  # `step` = 0-based index of this optimiser step
            lr = set_lr(optimizer, step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)
            losses_sum = torch.zeros(3, device=device)
            for k in range(accum):
                batch = next(batches)
                skips.add(batch.skipped)
                if (batch.lengths == 0).any():
                    raise unusable_data(source, skips, f"--data {cfg.data}")
                # DDP: all-reduce the gradients only on the last micro-batch of the step
                sync = model.no_sync() if world > 1 and k < accum - 1 else contextlib.nullcontext()
                with sync:
                    res = ssl_step(model, teacher, frontend, batch, device, amp, cfg.center_targets)
                    (res.losses.total / accum).backward()
                losses_sum += torch.stack([x.detach() for x in res.losses]) / accum
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = ema_decay(step)
            ema_update(teacher, student.encoder, decay)  # after every optimiser step
            done = step + 1
            watch.update(done, losses_sum[0])
            steplog.pbar.update(1)

            # decided alike on every process (only rank 0 holds the probe set): the collectives below must match
            probe_now = cfg.probe_data is not None and (done % cfg.probe_every == 0 or done == cfg.steps)
            log_now = done % cfg.log_every == 0 or done == cfg.steps or probe_now
            signum = stop.any()
            save_now = signum or done % cfg.checkpoint_every == 0 or done == cfg.steps
            if log_now or save_now:  # every step's loss since the last check; before a save, the weights too
                watch.check(done, (student, teacher) if save_now else ())
            if log_now:
                stats = all_reduce_mean(losses_sum.tolist() + [feature_std(res.targets),
                                                                feature_std(res.pred.detach()[res.mask])], device)
                acc = probe_accuracy(student.encoder, probe, device, amp) if probe_now and rank == 0 else None
                steplog.write(done, lr, decay, stats, sync_skips(skips, shared_skips), acc)

            if save_now:  # (checked above: a non-finite state is never saved over the last good one)
                sync_skips(skips, shared_skips)
                save_checkpoint(out, cfg, done, student, teacher, optimizer, skips, world, micro, device, rank)
                watch.saved = done
                if rank == 0 and not signum:  # a stop must be quick: the curves are redrawn on resume
                    save_curves(read_jsonl(log_path), out / "curves.png")
            if signum:
                break
    steplog.pbar.close()
    del batches  # shuts the loader workers down
    return finish(cfg, out, skips, signum, done)


def wrap_student(cfg: Config, student, teacher, world, device):
    """The student as the loop calls it: DDP under torchrun, torch.compile'd with --compile (the teacher too)."""
    model = data_parallel(student, device, gradient_as_bucket_view=True) if world > 1 else student
    if cfg.compile:
        model = torch.compile(model)
        teacher.forward_layers = torch.compile(teacher.forward_layers)  # the method teacher_targets calls
    return model


def finish(cfg: Config, out: Path, skips: SkipLog, signum, done: int) -> int:
    """The last lines of a run (stopped by a signal, or done) and its exit code."""
    if signum:
        print0(f"stopped by signal {signum} after step {done}; checkpoint saved in {out}: "
               "re-run the same command to resume")
        return 128 + signum
    if skips.count:
        print0(f"{skips.count} file(s) skipped (unreadable); see the warnings above")
    print0(f"done: {cfg.steps} steps; wrote {out}/encoder.safetensors, state.pt, log.jsonl, config.json")
    return 0


if __name__ == "__main__":
    try:
        code = main(parse_config())
    except (PretrainError, DataError, AudioError, CheckpointError, FloatingPointError, FlagError,
            OSError) as e:  # OSError: e.g. --out on a read-only or full disk
        error_exit(e)
    except KeyboardInterrupt:  # outside the training loop (starting up): the last checkpoint is kept
        exit_interrupted("re-run the same command to go on from the last checkpoint")
    sys.exit(code)
