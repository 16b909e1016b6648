"""Data sets: every dataset path of the interface -> a list of files, then a torch Dataset.

Two steps, kept apart so scripts can split, subset and inspect before any audio is read (the first is
bat.listing's):

    items = list_dataset("data/esc50")                 # AudioList: files, labels, classes, task
    train, test = items.fold_split(1)                  # ESC-50 fold 1 is the test fold
    ds = AudioDataset(train, classes=train.classes, clip_samples=5 * 16000, train=True)
    loader = make_loader(ds, batch_size=48, shuffle=True, workers=4)
    batch, _ = next_usable(iter(loader), skips, train.files)  # Batch: waveforms (B, S), lengths, targets, ...

Recognised dataset paths (the README's "Data sets"):
- a folder: every audio file below it; for labelled use the label is the name of the folder directly
  below the root that contains the file (so root/dog/a.wav and root/dog/x/b.wav are both "dog");
- a CSV manifest with a `path` column (relative to the CSV's folder, or absolute) and `label` (one class,
  multi-class task) or `labels` (';'-separated, multi-label task; an empty cell is a clip with no
  positive class, as in AudioSet/BirdSet evaluation lists); optional `start_s` and `end_s` columns make a
  row the window [start_s, end_s) of its file (BirdSet's 5 s soundscape test windows; empty cells: the
  whole file);
- ESC-50's layout (`meta/esc50.csv` + `audio/`): classes are the `category` names in `target` order, the
  `fold` column drives `fold_split`;
- Speech Commands v2 (`validation_list.txt` + `testing_list.txt`): REF's 12 classes, the 10 words, then
  `_unknown_` (every other word folder) and `_silence_`. Like REF, `_background_noise_` is not a class:
  each of its recordings is cut into whole 1 s segments, the first 80% of a recording's segments go to
  train, the next 10% to validation and the rest to test, all labelled `_silence_`. A `_silence_`
  folder (the separately released v2 test set has one) is labelled `_silence_` as well;
- WebDataset tar shards, one `.tar` or a pattern (`shards/train-{000000..000127}.tar`), labels in each
  sample's JSON (bat.shards writes them from any of the above).

Bad audio never stops a run: the Dataset returns a `Skipped` marker instead of raising, the collate
function drops it and reports it in `Batch.skipped`, and `SkipLog` (main process) warns once per file
and counts, or raises with --strict. That works the same with DataLoader workers. `next_usable` is the
one place a training loop gives up: once every file of its data set has been found unreadable it
raises DataError saying how many files were tried and why they failed, instead of spinning.
"""
import gc
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from bat.audio import SAMPLE_RATE, AudioError, check_regular_file, check_waveform, decode_error, load_audio, resample
from bat.cpu import usable_cpus
# The listing (dataset path -> AudioList: list_dataset, stratified_split, DataError, ...) is bat.listing, torch-free.
from bat.distributed import print0
from bat.listing import DataError
from bat.shard_reader import load_member

# ---------------------------------------------------------------------------------------------
# Loading: AudioList -> torch Dataset -> Batch


class Example(NamedTuple):
    waveform: torch.Tensor  # float32 [samples]
    target: object  # int (multiclass), float32 tensor [C] (multilabel) or None (unlabelled)
    index: int  # position in the data set: lets a feature cache key on it


class Skipped(NamedTuple):
    """What a Dataset returns for a file it cannot use; the collate function drops it."""
    index: int
    path: str
    reason: str


class ClipKey(NamedTuple):
    """A training clip as a keyed stream asks AudioDataset for it (bat.sampler.batch_stream, keyed=True): clip
    `index`, with its random draws (roll, window, noise) seeded by `draws` alone. A loader worker's own RNG
    depends on which worker reads the clip and on where the loader started; these do not, so a resumed run
    draws what an uninterrupted one did, with any number of workers."""
    index: int
    draws: tuple  # non-negative ints: (seed, rank, batch in the stream, slot in the batch)


def seeded_generator(*key) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative ints, mixed by numpy's SeedSequence so that
    neighbouring keys (consecutive clips) give unrelated draws."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def fit_length(x, clip_samples, train, roll=True, generator=None):
    """Crop or zero-pad a waveform to clip_samples. Evaluation (train=False): the first window, or the
    clip zero-padded at the end. train=True is REF's AudioSet training rule: roll the clip circularly by
    a random amount, then cut a random window, or zero-pad and roll it by a random amount within the
    padding. roll=False leaves out the circular roll (REF's BirdSet: a random window of the recording).
    The draws come from `generator` (None: torch's global RNG)."""
    n = x.shape[0]
    if clip_samples is None:
        return x
    draw = lambda high: int(torch.randint(0, high, (), generator=generator))  # noqa: E731
    if train and roll and n > 0:
        x = torch.roll(x, draw(n))
    if n == clip_samples:
        return x
    if n > clip_samples:
        start = draw(n - clip_samples + 1) if train else 0
        return x[start:start + clip_samples]
    pad = clip_samples - n
    x = torch.nn.functional.pad(x, (0, pad))
    return torch.roll(x, draw(pad + 1)) if train else x


# A training file longer than this many windows is read one window at a time (AudioDataset.load_window):
# decoding an hour of audio to take 10 s of it costs seconds and ~1 GB per loader worker. Shorter ones are
# read whole, rolled and cut, exactly as REF does.
LONG_FILE = 4


class AudioDataset(torch.utils.data.Dataset):
    """Loads the files of an AudioList at sample_rate (16 kHz). Items: Example, or Skipped for a bad file.

    classes: the class list targets index into (pass the training set's for the test set, so
    indices agree). labelled=False ignores labels (pretraining). clip_samples=None keeps each clip's
    own length (the collate function zero-pads the batch). In training (train=True) `roll` is
    fit_length's, and noise_std > 0 adds Gaussian noise of that std to every clip (REF's BirdSet: 0.02).

    An item is asked for by its index (`ds[i]`: the training draws come from torch's global RNG) or by a
    ClipKey (`ds[ClipKey(i, draws)]`: from a generator seeded by `draws`, the same wherever it is read).
    """

    def __init__(self, items, classes=None, clip_samples=None, train=False, labelled=True, centre=False,
                 sample_rate=SAMPLE_RATE, noise_std=0.0, roll=True):
        self.items = items
        self.sample_rate, self.noise_std, self.roll = sample_rate, noise_std, roll
        self.centre = centre  # subtract the clip's mean before fitting its length (REF's EAT/SSLAM loaders)
        self.labelled = labelled and items.task != "unlabelled"
        self.classes = list(items.classes if classes is None else classes)
        self.task = items.task if self.labelled else "unlabelled"
        self.clip_samples = clip_samples
        self.train = train
        # multi-class: one id per clip; multi-label: compressed ids, each clip's multi-hot row built when it is
        # loaded (a dense [N, C] matrix is 4.2 GB for AudioSet-2M, in every process)
        self._targets = None if not self.labelled else \
            items.targets(self.classes) if self.task == "multiclass" else items.label_ids(self.classes)
        self._whole = set()  # files load_window found short: read whole

    def __len__(self):
        return len(self.items)

    def load(self, i):
        if self.items.members is not None:
            return load_member(self.items.members[i], self.items.files[i], self.sample_rate, self.items.quality)
        seg = self.items.segments[i] if self.items.segments is not None else None
        if seg is None:
            return load_audio(self.items.files[i], self.sample_rate, self.items.quality)
        return load_segment(self.items.files[i], seg[0], seg[1], self.sample_rate, self.items.quality)

    def load_window(self, i, samples, start=None, wrap=True, generator=None):
        """`samples` samples of file i from the fraction `start` of its length on (None: drawn uniformly from
        `generator`, None: torch's global one), wrapping around at its end (a window of the circularly rolled
        clip; wrap=False: `start` spans the windows that fit), decoding only them and a 50 ms margin; None, read
        it whole, unless file i is a plain file longer than LONG_FILE windows."""
        import soundfile as sf

        if self.items.members is not None or self.items.segments is not None or i in self._whole:
            return None
        path = self.items.files[i]
        check_regular_file(path)  # a FIFO would block soundfile forever
        try:
            info = sf.info(str(path))
        except Exception as e:
            raise decode_error(path, e) from e
        frames, sr = info.frames, info.samplerate
        if frames <= 0 or sr <= 0 or frames * self.sample_rate <= LONG_FILE * samples * sr:
            self._whole.add(i)  # read whole from now on without asking its header again (a hot path)
            return None
        # native frames: the window, and a margin so that its last samples are resampled as in the whole file
        need = int(np.ceil(samples * sr / self.sample_rate)) + sr // 20
        if start is None:  # drawn only here: short files keep their draws
            start = float(torch.rand((), generator=generator))
        first = int(start * frames) if wrap else int(start * (frames - need + 1))
        head = min(need, frames - first)  # >= 1: start < 1
        try:
            x = load_segment(path, first / sr, head / sr, self.sample_rate, self.items.quality)
            if len(x) < samples:  # past the end: go on from the start, as the roll does
                rest = load_segment(path, 0.0, (need - head + 16) / sr, self.sample_rate, self.items.quality)
                x = np.concatenate([x, rest])
        except AudioError:  # e.g. a header promising more frames than the file holds: read what there is
            return None
        return np.pad(x[:samples], (0, max(0, samples - len(x))))

    def __getitem__(self, key):
        i, gen = key, None  # an index: the training draws come from torch's global RNG
        if isinstance(key, ClipKey):  # from the clip's own generator: the same draws in any worker, after any resume
            i, gen = key.index, seeded_generator(*key.draws) if self.train else None
        try:
            # a long file: only the window fit_length would cut (training: a random one, as its roll and cut;
            # evaluation: the first); not where the clip's mean is removed first (EAT/SSLAM), which needs it all
            window = None if not self.clip_samples or self.centre else \
                self.load_window(i, self.clip_samples, None if self.train else 0.0, self.roll, gen)
            x = torch.from_numpy(self.load(i) if window is None else window)
        except AudioError as e:
            return Skipped(i, e.path, e.reason)
        if self.centre:
            x = x - x.mean()
        if window is None:
            x = fit_length(x, self.clip_samples, self.train, self.roll, gen)
        if self.train and self.noise_std:
            x = x + self.noise_std * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        target = None
        if self._targets is not None:
            target = int(self._targets[i]) if self.task == "multiclass" else torch.from_numpy(self._targets.row(i))
        return Example(x, target, i)


def load_segment(path, offset_s, duration_s, sample_rate=SAMPLE_RATE, quality="HQ"):
    """Like load_audio for the part [offset_s, offset_s + duration_s) of a file (librosa.load's
    offset/duration: cut at the native rate, then resample)."""
    import soundfile as sf

    check_regular_file(path)  # a FIFO would block soundfile forever
    try:
        with sf.SoundFile(str(path)) as fh:
            sr = fh.samplerate
            fh.seek(int(round(offset_s * sr)))
            data = fh.read(int(round(duration_s * sr)), dtype="float32", always_2d=True)
    except Exception as e:
        raise decode_error(path, e) from e
    y = check_waveform(data.T, path)
    return resample(y, sr, sample_rate, quality)


class DemoDataset(torch.utils.data.Dataset):
    """The built-in synthetic demo set (bat.demo) as a Dataset, generated on the fly: no files.
    Clip i is bat.demo.demo_clip(offset + i, seed, seconds)."""

    def __init__(self, num_clips, seconds=1.0, seed=0, labelled=True, offset=0):
        from bat import demo

        self.num_clips, self.seconds, self.seed, self.offset = num_clips, seconds, seed, offset
        self.classes = list(demo.DEMO_CLASSES)
        self.task = "multiclass" if labelled else "unlabelled"
        self.labelled = labelled

    def __len__(self):
        return self.num_clips

    def __getitem__(self, i):
        from bat.demo import demo_clip

        if not 0 <= i < self.num_clips:
            raise IndexError(i)
        x, label = demo_clip(self.offset + i, self.seed, self.seconds)
        return Example(torch.from_numpy(x), self.classes.index(label) if self.labelled else None, i)


@dataclass
class Batch:
    waveforms: torch.Tensor  # float32 [B, S], zero-padded to the longest clip
    lengths: torch.Tensor  # int64 [B], valid samples per row
    targets: torch.Tensor | None  # int64 [B] (multiclass), float32 [B, C] (multilabel), None
    indices: torch.Tensor  # int64 [B], data-set positions
    skipped: list  # (path, reason) of items dropped from this batch

    def __len__(self):
        return self.waveforms.shape[0]

    def to(self, device, non_blocking=False):
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.waveforms), move(self.lengths), move(self.targets), self.indices, self.skipped)

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this on custom batch types
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.waveforms), pin(self.lengths), pin(self.targets), self.indices, self.skipped)


def collate(items):
    """Examples -> Batch; Skipped markers are dropped and listed. A batch may end up empty (B = 0)."""
    good = [x for x in items if isinstance(x, Example)]
    skipped = [(x.path, x.reason) for x in items if isinstance(x, Skipped)]
    lengths = torch.tensor([x.waveform.shape[0] for x in good], dtype=torch.long)
    waves = torch.zeros(len(good), int(lengths.max()) if len(good) else 0)
    for row, x in enumerate(good):  # one copy per clip, as a padded stack must do
        waves[row, : x.waveform.shape[0]] = x.waveform
    targets = None
    if good and good[0].target is not None:
        t0 = good[0].target
        targets = (torch.stack([x.target for x in good]).float() if torch.is_tensor(t0)
                   else torch.tensor([x.target for x in good], dtype=torch.long))
    indices = torch.tensor([x.index for x in good], dtype=torch.long)
    return Batch(waves, lengths, targets, indices, skipped)


# The longest wait for one batch from the loader workers before the run ends with a reason instead of
# hanging (a network file system that stopped answering, a decoder that never returns). Generous: a batch
# of long files from a slow disk takes seconds. BAT_LOADER_TIMEOUT (seconds) changes it.
LOADER_TIMEOUT = float(os.environ.get("BAT_LOADER_TIMEOUT", "600"))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGINT / SIGTERM. Ctrl-C, torchrun and batch schedulers signal
    the whole process group; a worker dying of it would crash the main process before it could save its
    state. The main process handles the signal and shuts the workers down itself."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader(torch.utils.data.DataLoader):
    """torch's DataLoader whose worker processes must deliver each batch within LOADER_TIMEOUT seconds: a
    stall is a TimeoutError (an OSError: the scripts' one-line error) naming the wait. With workers=0 the
    main process reads itself, and a read that never returns cannot be timed out from within it. Its
    workers ignore SIGINT / SIGTERM (ignore_stop_signals): the run that owns them decides how to stop."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("timeout", LOADER_TIMEOUT)
            kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return _no_stall(super().__iter__(), self.timeout)
        # The workers share the data set's per-clip Python objects (paths, label lists) with this process page by
        # page; a garbage collection in a worker writes to every object it visits and so copies them all (~0.6 GB
        # per worker for AudioSet-2M's listing). Python's advice: freeze what exists while forking. This process
        # unfreezes right after, so its own garbage is still collected; the workers keep the frozen view.
        gc.freeze()
        try:
            batches = super().__iter__()  # starts (forks) the workers
        finally:
            gc.unfreeze()
        return _no_stall(batches, self.timeout)


def processes_on_this_node() -> int:
    """torchrun's processes on this machine (LOCAL_WORLD_SIZE; 1 without torchrun): they share its CPUs and memory."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers(most: int = 4) -> int:
    """Loader workers per process by default: at most `most`, within this process's share of the CPUs it may
    use (a SLURM or taskset allocation or a container's CPU quota, not the whole node: bat.cpu.usable_cpus),
    shared by torchrun's processes on the node."""
    return max(1, min(most, usable_cpus() // processes_on_this_node()))


def _no_stall(batches, timeout):
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise TimeoutError(f"no batch from the data loader workers in {timeout:g} s: a file system that stopped "
                               "answering, or a file its decoder cannot finish (BAT_LOADER_TIMEOUT=SECONDS waits "
                               "longer)") from None
        yield batch


def make_loader(dataset, batch_size, shuffle=False, workers=0, seed=0, drop_last=False, pin_memory=False,
                collate_fn=None):
    """A DataLoader with `collate` (or collate_fn); shuffling is seeded so runs repeat. Its own generator even
    without shuffling: a DataLoader without one draws its workers' base seed from the global RNG every time it
    is iterated, so scoring a validation set more or less often (--eval-every, which a resumed run may change)
    would shift the training's augmentation draws."""
    gen = torch.Generator().manual_seed(seed)
    return Loader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                  collate_fn=collate_fn or collate, generator=gen, drop_last=drop_last,
                  pin_memory=pin_memory, persistent_workers=workers > 0)


def forever(loader):
    """Batches epoch after epoch (training runs count steps, not epochs)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise DataError("the data loader produced no batches (data set smaller than one batch with drop_last?)")


def next_usable(batches, skips, files, what="the training data"):
    """(the next batch of `batches` that holds at least one usable clip, batches taken).

    The one place where a training loop gives up on unreadable data: it logs every skipped file in
    `skips` and raises DataError once every file of `files` (the data set behind `batches`) has been
    found unreadable, so a run never spins on a data set that yields nothing. A data set with even one
    good file never fails here, however unlucky the shuffling.
    """
    taken = 0
    while True:
        batch = next(batches)
        taken += 1
        skips.add(batch.skipped)
        if len(batch):
            skips.mark_read(what, len(files), batch.indices)
            return batch, taken
        if skips.all_unreadable(files):
            raise skips.nothing_usable(files, what)


class SkipLog:
    """The unusable files of a run: warns once per file with one line (printed above any progress
    bar), counts them, and says which files a run never read; strict=True raises instead.

    `seen` maps path -> reason for every file found unreadable. `read` maps a data-set name to a bool
    per item, set for the items a training loop got as usable clips (next_usable marks them), so
    report() can tell "found bad" from "never read" (a run of a few steps reads few files).
    """

    def __init__(self, strict=False, stream=None):
        self.strict = strict
        self.stream = stream
        self.seen = {}
        self.read = {}

    def add(self, skipped):
        for path, reason in skipped:
            if self.strict:
                raise AudioError(path, reason)
            if path not in self.seen:
                self.seen[path] = reason
                self._warn(f"warning: skipped {path}: {reason}")

    def _warn(self, line):
        if self.stream is not None:
            print(line, file=self.stream, flush=True)
        else:  # tqdm.write puts the line above a running progress bar instead of gluing it to the bar
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)

    @property
    def count(self):
        return len(self.seen)

    def mark_read(self, name, num_items, indices):
        if name not in self.read:  # (setdefault would allocate N flags on every call)
            self.read[name] = np.zeros(num_items, dtype=bool)
        flags = self.read[name]
        flags[np.asarray(indices, dtype=np.int64)] = True

    def all_unreadable(self, files):
        return len(self.seen) > 0 and all(f in self.seen for f in files)

    def untrained_classes(self, items, run: str = "", model: str = "the model") -> dict:
        """{"untrained_classes": [...]} for the classes of `items` (an AudioList) every clip of which was found
        unreadable, with a warning (the skip warnings alone hide the consequence: a model that never saw a class);
        {} when there is none. A clip not tried yet counts as readable: nothing is known against it."""
        if not hasattr(items, "labels"):  # frame-level targets (bat.sed's EventList): no labels per file
            return {}
        readable = {c for f, labels in zip(items.files, items.labels) if f not in self.seen for c in labels}
        lost = [c for c in items.classes if c not in readable]
        if not lost:
            return {}
        print0(f"warning: {f'[{run}] ' if run else ''}no readable training clip of {', '.join(lost)}: {model} never "
               f"learned {'this class' if len(lost) == 1 else 'these classes'} (metrics.json: untrained_classes)")
        return {"untrained_classes": lost}

    def nothing_usable(self, files, what="the training data"):
        """The DataError for a data set none of whose files could be read: how many, and why."""
        reasons = {}
        for f in set(files):
            reason = self.seen.get(f, "not read")
            reasons[reason] = reasons.get(reason, 0) + 1
        common = sorted(reasons.items(), key=lambda kv: -kv[1])
        why = "; ".join(f"{n} x {r}" for r, n in common[:3]) + ("; ..." if len(common) > 3 else "")
        return DataError(f"no usable clip in {what}: all {len(set(files))} file(s) were tried and none "
                         f"could be read ({why})")

    def report(self, files=None, name="the training data"):
        """What metrics.json says about bad files: `skipped_files` (how many were found unreadable),
        `unreadable_files` ([path, reason] of each) and, given the training files, `unread_files` (how
        many of them this run never read, so nothing is known about them)."""
        out = {"skipped_files": self.count, "unreadable_files": [[p, r] for p, r in sorted(self.seen.items())]}
        if files is not None:
            flags = self.read.get(name, np.zeros(len(files), dtype=bool))
            read = {f for f, ok in zip(files, flags) if ok}
            out["unread_files"] = sum(1 for f in set(files) if f not in read and f not in self.seen)
        return out

    def state(self):
        """For a training checkpoint (tensors and plain types only, so it loads with weights_only)."""
        return {"seen": dict(self.seen), "read": {k: torch.from_numpy(v.copy()) for k, v in self.read.items()}}

    def load(self, state):
        """Add a state() (of a checkpoint, or of another process) to this log."""
        self.seen.update(state.get("seen", {}))
        for k, v in state.get("read", {}).items():
            v = np.asarray(v, dtype=bool)
            self.read[k] = self.read[k] | v if k in self.read and self.read[k].shape == v.shape else v.copy()
