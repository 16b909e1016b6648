"""Fine-tuning's parts besides its loop (finetune.py): the model and its optimiser, the loss, the batched
augmentations, clip scoring, the resumable progress of a run (the training state), the `Parts` a run is
built from (`setup_clips`, `setup_frames`) and the metadata of the model file.

REF: github.com/houtan-ghaffari/BAT_ICML2026 (the authors' code).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from bat import augment as A
from bat import sed
from bat.audio import SAMPLE_RATE
from bat.data import Loader, collate, next_usable
from bat.distributed import all_gather_object, data_parallel, gather_in_order, print0, share_skips
from bat.events import EVENT_THRESHOLD, MEDIAN_PATCHES
from bat.files import load_state, remove_stale_temporaries, save_state, truncate_jsonl
from bat.frontend import Frontend, fix_frames
from bat.heads import LinearProbe
from bat.listing import DataError
from bat.losses import asymmetric_loss
from bat.metrics import Best, classification_metrics
from bat.model import Encoder, eval_mode
from bat.optim import param_groups_lrd
from bat.precision import autocast
from bat.probes import Probe
from bat.run_control import rng_state, set_rng_state
from bat.sampler import batch_stream, epoch_sampler
from bat.tasks import clip_geometry, datasets, frontend_config, training_data, warmup_steps


def build_model(cfg, base, classes, task, frontend_config, device, frame_wise=False):
    """Probe(encoder with drop-path, LinearProbe head on the CLS token, or frame_wise on each time patch).
    The encoder is rebuilt with drop-path because load_encoder returns an inference encoder; the weights are
    copied exactly."""
    encoder = Encoder(base.cfg, drop_path=cfg.drop_path)
    encoder.load_state_dict(base.state_dict())
    encoder.frontend_config = base.frontend_config if frame_wise else frontend_config
    head = LinearProbe(base.cfg.dim, len(classes), mode="frame" if frame_wise else "cls", norm=True,
                       dropout=cfg.head_dropout)
    return Probe(encoder, head, Frontend.from_config(frontend_config), classes, task).to(device)


def build_optimizer(cfg, model, depth, device, world):
    """AdamW with REF's layer-wise LR decay (patch embedding and CLS token in the lowest group, block i in
    group i + 1, the head and pre_norm at the full rate; set_lr applies each group's lr_scale), and the
    model wrapped for DDP under torchrun."""
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, depth=depth)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2))
    ddp = data_parallel(model, device) if world > 1 else model
    return opt, ddp


def loss_fn(logits, targets, task, label_smoothing=0.0, asymmetric=True):
    """Asymmetric BCE (gamma_neg 1, gamma_pos 0, REF) for multi-label, or plain BCE (asymmetric=False: REF's
    HSN); cross-entropy for multi-class, with integer or soft (mixup) targets. In float32 whatever the
    autocast dtype."""
    logits = logits.float()
    if task == "multilabel":
        return asymmetric_loss(logits, targets.float()) if asymmetric else \
            F.binary_cross_entropy_with_logits(logits, targets.float())
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
        # before padding: the clip wraps around, the padding stays at the end; one shift per batch for BAT (REF)
        spec = A.time_roll(spec, per_clip=raw_frontend.kind != "bat")
    return spec_augmentations(cfg, fix_frames(spec, target_frames), targets, num_classes, task)


def spec_augmentations(cfg, spec, targets, num_classes, task):
    """Mixup (soft targets) and SpecAugment on a batch of spectrograms, clip or frame-wise targets."""
    if cfg.augment and cfg.mixup:
        if task == "multiclass":
            targets = F.one_hot(targets, num_classes).float()
        spec, targets, _ = A.mixup(spec, targets, cfg.mixup_prob, cfg.mixup_beta)
    if cfg.augment and cfg.specaug:
        spec = A.spec_augment(spec, cfg.freq_mask, cfg.time_mask, cfg.mask_repeats)
    return spec, targets


@torch.no_grad()
def evaluate(model, dataset, batch_size, workers, device, skips, rank, world, desc="evaluating"):
    """Logits and targets of every usable clip (in data-set order), sharded over processes."""
    with eval_mode(model):  # mid-run (validation, --eval-every) the model goes back to training afterwards
        shard = list(range(rank, len(dataset), world))
        # own generator: starting the loader must not draw from the global RNG (exact resume)
        loader = Loader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size, collate_fn=collate,
                        num_workers=min(workers, len(shard)), generator=torch.Generator())
        logits, targets, index = [], [], []
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=rank != 0):
            skips.add(batch.skipped)
            if len(batch) == 0:
                continue
            spec = model.frontend(batch.waveforms.to(device), centred=True)
            with autocast(device, "cuda-bf16"):  # REF runs BAT in bf16; the CPU stays float32 (resumes match)
                logits.append(model(spec).float().cpu())
            targets.append(batch.targets)
            index.append(batch.indices)  # positions in `dataset` (Subset passes them through)
    rows = gather_in_order(index, logits, targets)
    if rows is None:  # every process got here: share what each found, then say why nothing was usable
        share_skips(skips)
        raise skips.nothing_usable(dataset.items.files, "the evaluation data")
    return rows[1], rows[2]


# ------------------------------------------------------------------------------ resumable progress


@dataclass
class Progress:
    """What a training state holds besides weights: the position in the run and the validation record."""
    step: int = 0
    consumed: int = 0  # batches taken from the training stream (resume restarts it there)
    history: list = dataclasses.field(default_factory=list)
    best: Best = None  # the best validation model so far


def restore(cfg, fingerprint, state_path, model, opt, skips, rank, device, name, metric):
    """Progress of an interrupted fine-tuning run from its training state (weights, optimiser and RNG restored),
    or a fresh one; `fingerprint` is the settings' hash the state must carry, `metric` names the validation score."""
    progress = load_progress(state_path, fingerprint, model, opt, skips, rank, device, name, Best(metric), cfg.seed)
    if rank == 0:  # a run killed after logging past its last checkpoint logged steps it now redoes
        truncate_jsonl(os.path.join(os.path.dirname(state_path), "log.jsonl"), 0 if progress is None else progress.step)
    if progress is None:
        torch.manual_seed(cfg.seed * 1000 + rank)  # different augmentation draws on every process
        return Progress(best=Best(metric))
    return progress


# How a training state's batches and augmentations are drawn: keyed on (seed, rank, batch, slot), so a resumed run
# draws as an uninterrupted one whatever its loader workers (bat.data.ClipKey). States without "draws" but with
# one stream place per process (a list) came after keyed draws too; those with a single number may be older.
DRAWS = "keyed-1"


def load_progress(state_path, fingerprint, model, opt, skips, rank, device, name, best: Best, seed: int):
    """The progress in a training state (fine-tuning's, or a probe's: bat.probe_state), with the model's, the
    optimiser's and every process's RNG state restored from it; None when there is none. `best` is the empty
    selection whose metric and direction the saved one keeps."""
    if rank == 0:
        remove_stale_temporaries(state_path)
    state = read_state(state_path, fingerprint) if os.path.exists(state_path) else None
    # Under torchrun every process reads the state itself: on a disk that is not shared they would diverge.
    found = all_gather_object(None if state is None else state["step"])
    if len(set(found)) > 1:
        raise DataError(f"processes see different training states in {os.path.dirname(state_path) or '.'} (steps "
                        f"{found}): --out must be a folder every node reads and writes (a shared file system)")
    if state is None:
        return None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    skips.load(state.get("skips", {"seen": state.get("skipped", {})}))
    print0(f"[{name}] resuming from {state_path} at step {state['step']}")
    if state.get("draws") != DRAWS and not isinstance(state["consumed"], list):  # see DRAWS
        print0(f"note: [{name}] the state was saved by an earlier version of bat, which may have drawn batches and "
               "augmentations another way: the run goes on, perhaps not exactly as an uninterrupted run would")
    if len(state["rng"]) == len(found):
        set_rng_state(state["rng"][rank], device)
    else:  # the saved draws belong to another number of processes: fresh ones, still one stream per process
        torch.manual_seed(seed * 1000 + rank + 7919 * state["step"])
        print0(f"note: [{name}] the state was saved by {len(state['rng'])} process(es), resumed by {len(found)}: "
               "the run goes on, but its batches and random draws differ from an uninterrupted run's")
    return Progress(state["step"], consumed_here(state, rank, len(found)), state["history"],
                    Best.from_dict(state["best"], best.metric, best.lower))


def consumed_here(state, rank, world):
    """This process's batches taken from its stream, from a training state: each process's when as many saved it
    (states of one process before that held one number), else the first's (another number of processes: the
    streams are others anyway)."""
    consumed = state["consumed"]
    if isinstance(consumed, int):
        return consumed
    return consumed[rank] if len(consumed) == world else consumed[0]


def read_state(state_path, fingerprint, mmap=False):
    """The training state in state_path, refused with a one-line DataError when it cannot be read (torn, not a
    state) or was written with other settings than `fingerprint`'s. mmap: only open it (see `check_state`)."""
    try:
        state = load_state(state_path, mmap=mmap)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise DataError(f"{state_path} was written with other settings (see its config.json); "
                        "use another --out or delete it")
    return state


def check_state(state_path, fingerprint):
    """Refuse a training state that could not resume this run before the run writes anything (its config.json
    included); cheap: the tensors are mapped, not read. No state: nothing to check."""
    if os.path.exists(state_path):
        read_state(state_path, fingerprint, mmap=True)


def save_progress(fingerprint, state_path, model, opt, progress, skips, rank, device):
    """Write the training state (rank 0, atomically); every process passes its RNG state."""
    states = all_gather_object(rng_state(device))  # every process's RNG: each draws its own augmentations
    # every process's place in its own stream: one that skipped a batch without a readable clip is further on
    consumed = all_gather_object(progress.consumed)
    if rank == 0:
        save_state(state_path, {"fingerprint": fingerprint, "model": model.state_dict(),
                                "optimizer": opt.state_dict(), "step": progress.step, "consumed": consumed,
                                "history": progress.history, "best": progress.best.to_dict(), "rng": states,
                                "skips": skips.state(), "draws": DRAWS})
    if dist.is_initialized():
        dist.barrier()


# What a run writes into its folder: --out itself, or with --fold all one sub-folder per fold.
RUN_FILES = ("model.safetensors", "metrics.json", "log.jsonl", "state.pt")


def run_folder(cfg, name, runs):
    """The folder of run `name` of `runs` planned runs."""
    return cfg.out if runs == 1 else os.path.join(cfg.out, name)


def out_files(names):
    """Every file the runs `names` write, as paths inside --out (with --fold all also the folds' summary)."""
    if len(names) == 1:
        return ["config.json", *RUN_FILES]
    return ["config.json", "model.safetensors", "metrics.json", *(f"{n}/{f}" for n in names for f in RUN_FILES)]


def finished_run(run_dir, fingerprint):
    """(model, metrics) of a run with this settings' fingerprint that already completed in run_dir (an
    interrupted --fold all resumes after it), else None; a training state beside it means it did not."""
    from bat.probes import read_finished_run

    if os.path.exists(os.path.join(run_dir, "state.pt")):
        return None
    return read_finished_run(run_dir, "model.safetensors", fingerprint)


def test_best(p, skips):
    """(model, metrics) of a finished run (finetune.py's Parts `p`) on the test set: of the best validation
    model where there was validation (REF), with the selection and the history."""
    best = p.progress.best
    if best.state is not None:  # REF: test the model that was best on the validation split
        p.model.load_state_dict(best.state)
        print0(f"[{p.name}] testing the best validation model (step {best.step}, {best.metric} "
               f"{100 * best.score:.2f})")
    p.model.eval()
    metrics = {**p.test(), "num_train": sum(f not in skips.seen for f in p.train.files), "steps": p.progress.step,
               **p.extra}
    metrics.update(skips.untrained_classes(p.train, p.name))
    if best.state is not None:
        metrics["selected"] = best.selected()
    if p.progress.history:
        metrics["history"] = p.progress.history
    return p.model.eval(), metrics


# ------------------------------------------------------------------------ a run's parts

@dataclass
class Parts:
    """Everything one fine-tuning run builds before its first step. Clip-level (setup_clips) and frame-level
    (setup_frames) targets differ only in their batches, loss and scoring."""
    name: str  # of the run, in messages
    model: Probe
    ddp: torch.nn.Module  # the model, wrapped for DDP under torchrun
    opt: torch.optim.Optimizer
    progress: Progress
    next_batch: Callable  # () -> (spectrograms, targets, clips) of one augmented micro-batch on the device
    loss: Callable  # (logits, targets) -> scalar loss in float32
    test: Callable  # () -> the test metrics, num_test included
    validate: Callable | None  # () -> (score, history record); None: no validation split
    train: object  # the training list (AudioList, or bat.sed's EventList): num_train counts its readable files
    extra: dict  # what metrics.json adds (target_frames, clip_samples, ...)
    report: Callable  # () -> metrics.json's account of unreadable files


def setup_clips(cfg, task, base, run, run_dir, rank, world, device, skips, fingerprint: str):
    """Data, model, optimiser and (resumed) progress of one clip-level run, with a one-line summary."""
    classes, kind = run.train.classes, run.train.task
    per_proc, rem = divmod(cfg.batch_size, world * cfg.accum_steps)
    if rem or per_proc == 0:
        raise DataError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --accum-steps "
                        f"= {world * cfg.accum_steps}")
    clip_samples, frames = clip_geometry(task, run.train, cfg.target_frames, cfg.max_seconds)
    fcfg = frontend_config(base.frontend_config, task, frames)
    data = lambda items, train=False: datasets(task, items, classes, clip_samples, fcfg, train)  # noqa: E731
    val_ds, test_ds = (data(run.val) if run.val is not None and len(run.val) else None), data(run.test)
    if cfg.val_every and val_ds is None:
        print0(f"note: [{run.name}] no validation split; --val-every ignored (the final model is tested)")

    torch.manual_seed(cfg.seed)  # the head's init and dropout/drop-path draws; + rank below
    model = build_model(cfg, base, classes, kind, fcfg, device).train()
    model.clip_samples = clip_samples  # the training window: Probe.predict and export.py score windows of it
    opt, ddp = build_optimizer(cfg, model, base.cfg.depth, device, world)
    key = "accuracy" if kind == "multiclass" else "mAP"
    progress = restore(cfg, fingerprint, os.path.join(run_dir, "state.pt"), model, opt, skips, rank, device,
                       run.name, key)
    labels = run.train.sampling_labels(classes, cfg.balance_by) if cfg.balanced else None
    sampler = epoch_sampler(len(run.train), labels, cfg.balanced, cfg.epoch_clips, len(classes), world, rank, cfg.seed,
                            cfg.balance_by)
    # keyed: a clip's roll, window and noise are a function of its place in the stream, not of the loader
    # worker that reads it, so a resumed run draws them as an uninterrupted one did, with any --workers
    batches, stream = batch_stream(data(run.train, train=cfg.augment), sampler, per_proc, cfg.workers, cfg.seed,
                                   progress.consumed, collate, rank, keyed=True)
    raw_frontend = Frontend.from_config({**fcfg, "target_frames": None}).to(device)  # augmentations before padding
    eval_bs = cfg.eval_batch_size or 2 * per_proc
    scores = lambda ds, desc: evaluate(model, ds, eval_bs, cfg.workers, device, skips, rank, world, desc)  # noqa: E731

    def next_batch():
        batch, taken = next_usable(batches, skips, run.train.files, training_data(cfg.train, run))
        progress.consumed += taken
        with torch.no_grad():
            spec, targets = training_inputs(cfg, raw_frontend, frames, batch.waveforms.to(device, non_blocking=True),
                                            batch.lengths.to(device), batch.targets.to(device), len(classes), kind)
        return spec, targets, len(batch)

    def validate():
        m = classification_metrics(*scores(val_ds, "validating"), kind)
        return m[key], {"split": "val", **m}

    def test():
        logits, targets = scores(test_ds, "evaluating")
        return {**classification_metrics(logits, targets, kind, classes), "num_test": int(targets.shape[0])}

    print0(f"[{run.name}] task {task.name}: {kind}, {len(classes)} classes, {len(run.train)} train / "
           f"{len(val_ds) if val_ds else 0} val / {len(run.test)} test clips; clips {clip_samples / SAMPLE_RATE:.2f} s "
           f"-> {frames} frames; {world} process(es) x {per_proc} clips x {cfg.accum_steps} accumulation = "
           f"{cfg.batch_size} per step; warm-up {warmup_steps(cfg)} of {cfg.steps} steps; "
           f"{sum(p.numel() for p in model.parameters()):,} parameters; {stream.per_epoch} batches per epoch")
    loss = lambda logits, y: loss_fn(logits, y, kind, cfg.label_smoothing, cfg.asymmetric_loss)  # noqa: E731
    return Parts(run.name, model, ddp, opt, progress, next_batch, loss, test, validate if val_ds is not None else None,
                 run.train, {"gate_weights": None, "target_frames": frames, "clip_samples": clip_samples},
                 lambda: skips.report(run.train.files, training_data(cfg.train, run)))


def setup_frames(cfg, base, train, valid, test, run_dir, device, skips, fingerprint: str):
    """The same for frame-level targets (--task dcase2016, REF configs/dcase2016_task2/sed_finetune_config.yaml):
    the last layer's patch tokens averaged over frequency per 160 ms, LayerNorm, dropout, Linear; binary
    cross-entropy; coloured noise on the waveforms, mixup and SpecAugment on the spectrograms of whole
    recordings padded to the longest;
    validation frame mAP; whole test recordings scored with onset F1 and frame mAP (bat.sed). `fingerprint`: of
    the settings a resumed run must keep."""
    classes, frames = train.classes, cfg.target_frames or sed.recording_frames(train)
    per_step, rem = divmod(cfg.batch_size, cfg.accum_steps)
    if rem:
        raise DataError(f"--batch-size {cfg.batch_size} must be a multiple of --accum-steps {cfg.accum_steps}")
    torch.manual_seed(cfg.seed)  # the head's init
    frontend = sed.event_frontend(base)
    model = build_model(cfg, base, classes, "multilabel", frontend.config(), device,
                        frame_wise=True).train()
    opt, ddp = build_optimizer(cfg, model, base.cfg.depth, device, 1)
    progress = restore(cfg, fingerprint, os.path.join(run_dir, "state.pt"), model, opt, skips, 0, device, "sed",
                       "frame_mAP")
    noise = cfg.noise_prob if cfg.augment and cfg.noise else 0.0  # REF: coloured noise on 30 % of recordings
    recordings = sed.EventDataset(train, classes, frontend, frames, noise)
    # As setup_clips: the stream starts at the first batch not yet trained on (a resumed run loads none of the
    # earlier ones), and keyed, a recording's noise is a function of its place in the stream, not of the loader
    # worker that reads it, so a resumed run draws what an uninterrupted one did, with any --workers
    stream, _ = batch_stream(recordings, epoch_sampler(len(train), seed=cfg.seed), per_step, cfg.workers, cfg.seed,
                             progress.consumed, sed.collate_events, keyed=True)
    batches = sed.recording_batches(stream, skips, train.files)

    def next_batch():
        spec, y, taken = next(batches)
        progress.consumed += taken
        with torch.no_grad():
            spec, y = spec_augmentations(cfg, spec.to(device), y.to(device), len(classes), "multilabel")
        return spec, y, len(y)

    def validate():  # scored in eval mode (no drop-path), the model back to training afterwards: predict_recordings
        score = sed.valid_frame_map(model.encoder, model.head, valid, classes, device, cfg.workers, skips)
        return score, {"split": "valid", "frame_mAP": score}

    def test_():  # also mid-training (--eval-every): as validate
        return sed.test_sed(model.encoder, model.head, test, classes, device, cfg.workers, skips)

    print(f"SED fine-tune: {len(classes)} classes, {len(train)} train / {len(valid) if valid else 0} valid / "
          f"{len(test)} test recordings, inputs {frames} frames, {cfg.steps} steps x {cfg.batch_size}")
    # REF: plain binary cross-entropy here (use_asymmetric_loss false)
    loss = lambda logits, y: F.binary_cross_entropy_with_logits(logits.float(), y)  # noqa: E731
    return Parts("sed", model, ddp, opt, progress, next_batch, loss, test_, validate if valid is not None else None,
                 train, {"task": "sed", "target_frames": frames}, skips.report)


def file_metadata(cfg, metrics, run_name, fingerprint: str):
    """What export.py and users read from model.safetensors besides the weights: the task recipe and the
    model's input window (clip_samples waveform samples -> target_frames spectrogram frames), or for a
    frame-wise model the event decoding (bat.events)."""
    if metrics.get("task") == "sed":
        return {"trained_by": "finetune.py", "task_name": cfg.task, "frame_wise": True,
                "patch_seconds": sed.PATCH_SECONDS, "threshold": EVENT_THRESHOLD, "median_filter_patches": MEDIAN_PATCHES}
    return {"trained_by": "finetune.py", "task_name": cfg.task, "clip_samples": metrics["clip_samples"],
            "target_frames": metrics["target_frames"], "fold": run_name, "fingerprint": fingerprint}
