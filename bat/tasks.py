"""REF's per-task protocols: what the model sees and how it is trained, one frozen dataclass per task.

Every value comes from the reference implementation (BAT, ICML 2026: github.com/houtan-ghaffari/BAT_ICML2026,
its `configs/<task>/*_config.yaml` and `data/*_datasets.py`). `probe_cgp.py` and `finetune.py` take a
task's recipe as their defaults (every value stays a flag; `--task X --help` shows them), and
`bat.task_inputs` builds exactly the spectrograms the scripts feed the encoder in evaluation.

Input geometry, in REF's order:
  1. resample to 16 kHz with soxr at `quality` (REF: HQ for AudioSet, VHQ for ESC-50 and Speech Commands);
  2. EAT/SSLAM only: subtract the clip's mean (before any padding);
  3. pad with zeros at the end or cut to `clip_samples` (evaluation: the first window). With
     `random_window`, training clips are first rolled circularly by a random amount, then a random window
     is cut, or the padded clip is rolled within its padding (REF's AudioSet loader, also when probing);
  4. front-end (BAT log-mel with min-max, or the Kaldi fbank with the task's legacy statistics `stats`);
  5. pad or crop the spectrogram to `target_frames`.

Adding a task = one more entry in TASKS (the scripts and `--task` pick it up).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from bat.audio import SAMPLE_RATE

MAX_SECONDS = 10.23  # the longest clip `generic` takes by default: REF's AudioSet length (1024 frames)


@dataclass(frozen=True)
class Task:
    name: str
    about: str
    clip_samples: int | None  # waveform padded/cut to this many samples (None: from the training data)
    target_frames: int | None  # spectrogram padded/cropped to this many frames (None: from clip_samples)
    random_window: bool  # training: REF's AudioSet random roll + random window (else: the first window)
    quality: str  # soxr quality of the resampling
    stats: str  # legacy statistics (EAT/SSLAM/BEATs front-end), a name of bat.frontend.LEGACY_STATS
    layout: str | None = None  # the dataset layout `--task auto` recognises as this task
    sample_rate: int = SAMPLE_RATE  # waveform rate; the BAT front-end's n_fft and hop scale with it
    roll: bool = True  # random_window starts with a circular roll (AudioSet); False: a plain random window
    noise_std: float = 0.0  # training: Gaussian noise added to the waveform (REF's BirdSet: 0.02)
    # REF's probe draws a new random window (and noise) every step: a feature cache of one fixed window would train
    # the head on less, so these stream unless --cache-features insists (your own data, `generic`, caches)
    probe_streams: bool = False
    probe: dict = field(default_factory=dict)  # probe_cgp.py defaults
    probe_by_head: dict = field(default_factory=dict)  # --probe KIND -> what differs from `probe` (REF's configs)
    finetune: dict = field(default_factory=dict)  # finetune.py defaults
    frame_wise: bool = False  # a score per 160 ms patch (SED, bat/sed.py) or 20 ms step (ASR, bat/asr.py)


# REF configs/as20k/as20k_{cgp,lp,lcgp,pb}_config.yaml. warmup_share = lr_warmup_steps / optimization_steps,
# so a run with other --steps keeps REF's proportion (20 k steps: 500 warm-up steps).
AS20K_PROBE = dict(steps=20000, batch_size=48, lr=1e-3, warmup_share=0.025, weight_decay=0.05, val_every=0,
                   balanced=False, epoch_clips=None)
# REF configs/as20k/as20k_finetune_config.yaml (40 k steps, warm-up 4 k = 10 %).
AS20K_FINETUNE = dict(steps=40000, batch_size=48, lr=5e-5, warmup_share=0.1, weight_decay=0.05, layer_decay=0.75,
                      drop_path=0.1, head_dropout=0.2, mixup=True, specaug=True, freq_mask=16, time_mask=64,
                      mask_repeats=2, noise=False, time_roll=False, val_every=0, balanced=False, epoch_clips=None)
# REF's data factory: AudioSet-2M draws 200 000 clips per epoch, class-balanced, for every probe and fine-tune
# (the released as2m_*.yaml files are empty; the other settings follow AS-20k's configs).
AS2M_SAMPLING = dict(balanced=True, epoch_clips=200_000)
# REF's HSN: a recording weighs 1 / (recordings sharing its first label); one training set's worth per epoch,
# with replacement.
HSN_SAMPLING = dict(balanced=True, balance_by="first-label", epoch_clips=None)
# REF configs/as20k/as20k_vqt_config.yaml: head_norm false (every other task's VQT and every other head: true).
AS20K_BY_HEAD = {"vqt": dict(head_norm=False)}

TASKS = {
    "audioset": Task(
        name="audioset", about="AudioSet-20k (balanced train, 527 classes, mAP), REF configs/as20k",
        clip_samples=163_680, target_frames=1024, random_window=True, quality="HQ", stats="audioset",
        probe_streams=True, probe=AS20K_PROBE, probe_by_head=AS20K_BY_HEAD, finetune=AS20K_FINETUNE),
    "as2m": Task(
        name="as2m", about="AudioSet-2M (unbalanced train), REF's class-balanced sampler, 200 k clips per epoch",
        clip_samples=163_680, target_frames=1024, random_window=True, quality="HQ", stats="audioset",
        probe_streams=True, probe={**AS20K_PROBE, **AS2M_SAMPLING}, probe_by_head=AS20K_BY_HEAD,
        finetune={**AS20K_FINETUNE, **AS2M_SAMPLING}),
    # ESC-50 clips are all 5 s: REF's BAT loader takes them as they are (501 frames -> 512), its legacy loader
    # pads/cuts to 5 s; cutting to 5 s here gives both, and a defined input for a clip of another length.
    "esc50": Task(
        name="esc50", about="ESC-50, 5-fold cross-validation (accuracy), REF configs/esc50",
        clip_samples=5 * SAMPLE_RATE, target_frames=512, random_window=False, quality="VHQ", stats="esc50",
        layout="esc50",
        probe={**AS20K_PROBE, "steps": 4000, "warmup_share": 0.1, "weight_decay": 0.2},
        finetune={**AS20K_FINETUNE, "steps": 4000, "mixup": False, "time_mask": 32, "mask_repeats": 1,
                  "noise": True, "time_roll": True}),
    "scv2": Task(
        name="scv2", about="Speech Commands v2, 12 classes; validation every 500 steps, the best model is tested",
        clip_samples=SAMPLE_RATE, target_frames=112, random_window=False, quality="VHQ", stats="scv2",
        layout="scv2",
        probe={**AS20K_PROBE, "steps": 10000, "batch_size": 256, "warmup_share": 0.1, "val_every": 500},
        finetune={**AS20K_FINETUNE, "steps": 10000, "batch_size": 256, "head_dropout": 0.0, "mixup": False,
                  "time_mask": 32, "mask_repeats": 1, "noise": True, "time_roll": True, "val_every": 500}),
    # REF configs/hsn + data/bat_audio_datasets.py BirdSet: 32 kHz, 5 s windows (n_fft 2048, hop 320 ->
    # 501 frames -> 512), training on a random 5 s window of each focal recording (shorter ones zero-padded
    # and rolled within the padding) plus Gaussian noise (std 0.02); sampling weighted by inverse class
    # frequency of its first label, with replacement; plain BCE; testing on the 5 s soundscape windows (macro mAP).
    "hsn": Task(
        name="hsn", about="BirdSet HSN (High Sierra Nevada) at 32 kHz: 5 s windows, multi-label macro mAP, "
                          "REF configs/hsn",
        clip_samples=5 * 32000, target_frames=512, random_window=True, quality="HQ", stats="birdset",
        sample_rate=32000, roll=False, noise_std=0.02, probe_streams=True,
        probe={**AS20K_PROBE, "steps": 10000, "batch_size": 64, "warmup_share": 0.1, **HSN_SAMPLING,
               "asymmetric_loss": False},
        finetune={**AS20K_FINETUNE, "steps": 10000, "batch_size": 64, "head_dropout": 0.0, "time_mask": 32,
                  "mask_repeats": 1, "noise": True, "time_roll": True, **HSN_SAMPLING, "asymmetric_loss": False}),
    # Your own data: AudioSet's rules with the clip length taken from the training data (the longest
    # training clip, at most --max-seconds), the spectrogram padded to a whole number of patches; the
    # probe recipe of ESC-50 without its extra weight decay, AS-20k's fine-tuning recipe.
    "generic": Task(
        name="generic", about="your own data: AudioSet's rules, clip length from the training data",
        clip_samples=None, target_frames=None, random_window=True, quality="HQ", stats="audioset",
        probe={**AS20K_PROBE, "steps": 4000, "warmup_share": 0.1}, finetune=AS20K_FINETUNE),
    # Sound event detection, REF configs/dcase2016_task2/sed_cgp_config.yaml (its sed_{lp,lcgp,pb,h2t} configs:
    # batch 16, 10 000 steps, warm-up 1 000, validation every 500, no dropout): whole recordings, the training
    # ones padded to the longest (REF: 120 s = 12 000 frames), frame mAP on the validation split picks the head.
    "dcase2016": Task(
        name="dcase2016", about="DCASE 2016 task 2 / HEAR event tasks: frame-wise probe, onset F1 and frame mAP",
        clip_samples=None, target_frames=None, random_window=False, quality="HQ", stats="dcase", layout="events",
        frame_wise=True,
        probe=dict(steps=4000, batch_size=4, lr=1e-3, warmup_share=0.1, weight_decay=0.05, val_every=50, dropout=0.2),
        probe_by_head={head: dict(steps=10000, batch_size=16, val_every=500, dropout=0.0)
                       for head in ("lp", "lcgp", "protobin", "h2t")},
        finetune={**AS20K_FINETUNE, "steps": 4000, "batch_size": 4, "noise": True, "val_every": 50}),
    # REF configs/librispeech/ls_probe_config.yaml: train-clean-100, dev-clean WER picks the head, test-clean.
    "librispeech": Task(
        name="librispeech", about="LibriSpeech ASR probe: BiLSTM + CTC over characters, WER and CER",
        clip_samples=None, target_frames=None, random_window=False, quality="HQ", stats="librispeech",
        layout="speech", frame_wise=True,
        probe=dict(steps=20000, batch_size=64, lr=1e-3, warmup_share=0.025, weight_decay=0.05, val_every=500,
                   dropout=0.2)),
}
TaskName = Literal[tuple(["auto", *TASKS])]


class TaskError(ValueError):
    """An unknown task or a task that does not fit the data; one line."""


def resolve_task(name, train=None):
    """The Task for `name`; "auto" picks the task whose layout `train` has (ESC-50, Speech Commands, event
    lists, transcripts), else generic."""
    if name != "auto":
        if name not in TASKS:
            raise TaskError(f"--task must be one of auto, {', '.join(TASKS)}; got {name!r}")
        return TASKS[name]
    from bat.listing import DataError, detect_source, is_event_data, is_speech_data

    try:
        source = detect_source(train) if train else None
        if source in ("csv", "folder"):  # event lists (HEAR layout, onset_s/offset_s CSV) or transcripts
            source = "events" if is_event_data(train) else "speech" if is_speech_data(train) else source
    except DataError:  # a missing path or unreadable manifest is reported later, by the data listing
        source = None
    if source == "shards":  # shards of ESC-50 / Speech Commands keep that layout
        from bat.shard_reader import shard_layout

        source = shard_layout(train)
    return next((t for t in TASKS.values() if t.layout and t.layout == source), TASKS["generic"])


def parse_with_task(config_cls, section, argv=None):
    """tyro CLI for a script whose defaults are a task's recipe (`section`: "probe" or "finetune").
    --task and --train are read first so that `--task X --help` shows X's values."""
    import argparse
    import sys

    import tyro

    from bat.cli import parse_flags

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="auto")
    pre.add_argument("--train", default=None)
    pre.add_argument("--probe", default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        defaults = config_with_task(config_cls, section, encoder=tyro.MISSING, train=tyro.MISSING,
                                    task=known.task, _train_path=known.train, _probe=known.probe)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # The help shows --task as typed ("auto" unless given), not what auto resolved to for this --train
    # (a bare --help would read "default: generic"); the parsed config holds the resolved task.
    cfg = parse_flags(config_cls, default=dataclasses.replace(defaults, task=known.task), args=argv)
    return dataclasses.replace(cfg, task=defaults.task)


def config_with_task(config_cls, section, _train_path=None, _probe=None, **values):
    """config_cls(**values) whose unset fields take the recipe of values["task"] ("auto": recognised from
    values["train"]) and of its --probe kind instead of the class defaults; the task is stored resolved."""
    train = _train_path if _train_path is not None else values.get("train")
    if not isinstance(train, (str, os.PathLike)):  # tyro.MISSING while `--help` or a bare call is parsed
        train = None
    task = resolve_task(values.get("task", "auto"), train)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    recipe = getattr(task, section)
    if section == "probe":  # some of REF's tasks have a recipe per head (dcase2016)
        recipe = {**recipe, **task.probe_by_head.get(values.get("probe", _probe), {})}
    recipe = {k: v for k, v in recipe.items() if k in fields}
    return config_cls(**{**recipe, **values, "task": task.name})


def warmup_steps(cfg):
    """--warmup-steps, else REF's share of the steps (AS-20k probe 2.5 %, everything else 10 %)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_share * cfg.steps))


# ---------------------------------------------------------------------------------------------
# geometry: (clip_samples, target_frames) of a run


def clip_geometry(task, train_items=None, target_frames=None, max_seconds=MAX_SECONDS):
    """(clip_samples, target_frames) for a task. `generic` measures the longest clip of `train_items`
    (file headers only; a sample of 5000 for large sets), at most max_seconds, and pads the spectrogram to
    whole patches (16 frames). An explicit target_frames shortens clip_samples to fit it."""
    samples, hop = task.clip_samples, task.sample_rate // 100  # 10 ms frames
    if samples is None:
        samples = int(round(min(_longest_seconds(train_items), max_seconds) * task.sample_rate))
    if target_frames is not None:
        if target_frames <= 0 or target_frames % 16:
            raise TaskError(f"--target-frames must be a positive multiple of 16, got {target_frames}")
        return min(samples, (target_frames - 1) * hop), target_frames
    frames = task.target_frames or 16 * math.ceil((1 + samples // hop) / 16)
    return samples, frames


def _longest_seconds(items):
    import numpy as np

    from bat.listing import durations

    if items is None:
        raise TaskError("the generic task takes its clip length from the training data; none given")
    if len(items) > 5000:  # file headers only, but millions of them take minutes: a sample is enough
        items = items.subset(np.random.default_rng(0).choice(len(items), 5000, replace=False))
    secs = durations(items)
    return float(np.nanmax(secs)) if np.isfinite(secs).any() else 1.0


def frontend_config(base, task, target_frames):
    """The encoder's front-end config for this task: its target frames and sample rate (n_fft and hop
    follow the rate), and for EAT/SSLAM/BEATs the task's legacy statistics (REF normalises every legacy
    fbank with the data set's own mean and std)."""
    cfg = {k: v for k, v in base.items() if k not in ("n_fft", "hop")}
    cfg.update(target_frames=target_frames, sample_rate=task.sample_rate)
    if cfg.get("kind", "bat") != "bat":
        cfg["dataset"] = task.stats
    return cfg


def centres_waveform(frontend_cfg):
    """EAT/SSLAM subtract each clip's mean before it is padded (REF's legacy loaders); BAT and BEATs do not."""
    return frontend_cfg.get("kind", "bat") in ("eat", "sslam")


def datasets(task, items, classes, clip_samples, frontend_cfg, train=False):
    """The AudioDataset the scripts read `items` with under this task (train: the task's random window)."""
    from bat.data import AudioDataset

    items = dataclasses.replace(items, quality=task.quality)
    return AudioDataset(items, classes, clip_samples, train=train and task.random_window,
                        centre=centres_waveform(frontend_cfg), sample_rate=task.sample_rate,
                        noise_std=task.noise_std, roll=task.roll)


def model_inputs(frontend, batch, device=None):
    """Batch -> spectrograms [B, 1, T, 128] as the encoder sees them (the waveforms are already cut and,
    for EAT/SSLAM, centred by the dataset: the front-end must not centre them again)."""
    wave = batch.waveforms if device is None else batch.waveforms.to(device, non_blocking=True)
    return frontend(wave, centred=True)


# ---------------------------------------------------------------------------------------------
# runs: which clips train, validate and test


@dataclass
class Run:
    name: str  # "test", or "fold3" for ESC-50
    train: object  # AudioList
    val: object | None  # AudioList (Speech Commands' validation list) or None
    test: object  # AudioList


def training_data(train, run):
    """How error messages and the read-file tracking (bat.data.SkipLog) name a run's training set."""
    return f"--train {train}" + (f" ({run.name})" if run.name != "test" else "")


def plan_runs(train, test=None, fold=None, test_fraction=0.2, seed=0, log=print):
    """[Run]: one, or one per fold for ESC-50 `fold="all"`. A data set's own split wins (ESC-50 folds,
    the Speech Commands lists); without --test a folder or CSV holds out a stratified share."""
    from bat.listing import DataError, list_dataset, stratified_split

    items = list_dataset(train)
    for note in items.notes:  # what the listing noticed: repeated rows, list entries without a file
        log(note)
    if not items.classes or (items.task == "multiclass" and len(items.classes) == 1):
        found = f"one class ({items.classes[0]})" if items.classes else "no labels (every label cell is empty)"
        need = "at least one label" if items.task == "multilabel" else "at least two classes"
        raise DataError(f"{train}: {found}; {items.task} classification needs {need}")
    if fold is not None:
        if test is not None:
            raise DataError("--fold picks the test fold of an ESC-50 --train; leave out --test")
        if items.folds is None:
            raise DataError(f"{train}: --fold needs ESC-50's layout (meta/esc50.csv), this is a {items.source} data set")
        try:
            folds = sorted(set(items.folds)) if fold == "all" else [int(fold)]
        except ValueError:
            raise DataError(f"--fold must be a fold number or 'all', got {fold!r}") from None
        return checked([Run(f"fold{k}", tr, None, te) for k in folds for tr, te in [items.fold_split(k)]],
                       train, test)
    if items.source == "esc50":
        raise DataError(f"{train} is ESC-50: choose the test fold with --fold 1..5 or --fold all")
    if items.source == "scv2":
        own = items.split("test")
        test_items = own if test is None else _test_split(list_dataset(test))
        return checked([Run("test", items.split("train"), items.split("val"), test_items)], train, test)
    if test is not None:
        return checked([Run("test", items, None, _test_split(list_dataset(test)))], train, test)
    log(f"note: no --test given; holding out a stratified {test_fraction:.0%} of {train} (seed {seed})")
    tr, te = stratified_split(items, test_fraction, seed)
    if not len(te):
        raise DataError(f"{train}: too few clips to hold out a test split (one per class); add clips or pass --test")
    return [Run("test", tr, None, te)]


def checked(runs, train, test=None):
    """The planned runs, refused before any work when one has nothing to train or test on, or test labels
    the training data does not have (found after the training, that cost a whole run)."""
    from bat.listing import DataError

    for r in runs:
        where = f" ({r.name})" if r.name != "test" else ""
        if not len(r.train):
            raise DataError(f"{train}: no training clips{where}" + (
                f": every clip is in fold {r.name[4:]}" if r.name.startswith("fold") else
                ": every clip is in the validation or test list" if r.train.source == "scv2" else ""))
        present = sorted({c for labs in r.train.labels for c in labs})
        if r.train.task == "multiclass" and len(present) < 2:  # e.g. Speech Commands with only background noise
            raise DataError(f"{train}: the training clips{where} hold one class ({present[0]}); multiclass "
                            "classification needs at least two")
        if not len(r.test):
            raise DataError(f"{test or train}: the test split is empty{where}" + (
                " (testing_list.txt names no clip)" if r.test.source == "scv2" else ""))
        if r.train.task not in ("multiclass", "multilabel") or r.train.task != r.test.task:
            raise DataError(f"{train} is {r.train.task} but {test or train} is {r.test.task}; both need the "
                            "same labelled task")
        r.test.targets(r.train.classes)  # a DataError naming the labels the training data lacks
    return runs


def _test_split(items):
    return items.split("test") if items.source == "scv2" else items


# ---------------------------------------------------------------------------------------------
# bat.task_inputs


def task_inputs(path, task="auto", split="test", fold=None, frontend="bat"):
    """(spectrograms float32 [N, 1, T, 128], targets, class names): the model inputs probe_cgp.py and
    finetune.py build for evaluation under `task`'s recipe (REF's input geometry), for the front-end
    `frontend` ("bat", "eat", "sslam" or "beats"; legacy ones with the task's statistics).

    split picks the data set's own split: ESC-50 "test" (the clips of `fold`) or "train" (the other folds),
    Speech Commands "train" / "val" / "test". A plain folder or CSV has no split: all its clips, in
    sorted-path (folder) or row (CSV) order; for `generic` their longest clip sets the length (the
    scripts use the training set's). Unreadable files are skipped with a warning, so N counts the usable
    clips; targets are class indices [N] (single-label) or multi-hot [N, C].
    """
    import numpy as np
    import torch

    from bat.data import SkipLog, make_loader
    from bat.frontend import KINDS, Frontend
    from bat.listing import DataError, list_dataset

    if frontend not in KINDS:
        raise ValueError(f"frontend must be one of {', '.join(KINDS)}; got {frontend!r}")
    path = os.fspath(path)
    spec = resolve_task(task, path)
    items = _split(list_dataset(path), split, fold)
    if len(items) == 0:
        raise DataError(f"{path}: split {split!r} has no clips")
    clip_samples, frames = clip_geometry(spec, items)
    fcfg = frontend_config({"kind": frontend}, spec, frames)
    front = Frontend.from_config(fcfg)
    ds = datasets(spec, items, items.classes, clip_samples, fcfg, train=False)
    skips, specs, targets = SkipLog(), [], []
    skips.add(items.skipped)
    with torch.no_grad():
        for batch in make_loader(ds, batch_size=16):
            skips.add(batch.skipped)
            if len(batch):
                specs.append(model_inputs(front, batch))
                targets.append(batch.targets)
    if not specs:
        raise skips.nothing_usable(items.files, path)
    return torch.cat(specs).float(), np.asarray(torch.cat(targets).numpy()), list(items.classes)


def _split(items, split, fold):
    from bat.listing import DataError

    if items.source == "esc50":
        if fold is None or split not in ("train", "test"):
            raise DataError(f"{items.root} is ESC-50: pass fold=1..5 and split 'test' (that fold) or 'train' (the others)")
        return items.fold_split(int(fold))[split == "test"]
    if items.source == "scv2":
        if split not in ("train", "val", "test"):
            raise DataError(f"{items.root} is Speech Commands: split must be 'train', 'val' or 'test', got {split!r}")
        return items.split(split)
    return items
