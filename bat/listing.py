"""Listing: every dataset path of the interface -> an AudioList (files, labels, classes, task); no audio is
read and nothing here imports torch (bat.data is the torch side: datasets, collate, loaders).

    items = list_dataset("data/esc50")                 # AudioList: files, labels, classes, task
    train, test = items.fold_split(1)                  # ESC-50 fold 1 is the test fold

The recognised layouts are described in bat.data; shards are read through bat.shard_reader. `is_event_data`
and `is_speech_data` tell the event (bat.sed) and transcript (bat.asr) layouts apart, for bat.tasks.
"""
import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from bat.audio import AUDIO_EXTENSIONS, AudioError, check_regular_file, decode_error
from bat.shard_reader import (AUDIO_EXTS, ShardError, expand_pattern, is_shard_path, member_seconds, read_index,
                              read_member)

SCV2_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SCV2_CLASSES = SCV2_WORDS + ("_unknown_", "_silence_")
TASK_TYPES = ("multiclass", "multilabel", "unlabelled")  # AudioList.task (bat.tasks.TASKS: REF's recipes)


class DataError(ValueError):
    """A dataset path or manifest that cannot be used; the message is one line."""


class NoLabels(DataError):
    """Labelled use of a data set that holds no labels at all: a CSV without a label column, a folder with
    every file at its root, shards whose JSON names no label. (bat.shards writes such a source unlabelled;
    a source with labels that cannot be listed with them raises a plain DataError.)"""


class LabelIds(NamedTuple):
    """Every clip's class ids in two flat arrays (compressed rows): clip i's are ids[offsets[i]:offsets[i + 1]].
    A few bytes per label where a multi-hot matrix takes 4 x classes per clip (AudioSet-2M: ~20 MB vs 4.2 GB)."""
    ids: np.ndarray  # int64 [labels in all]
    offsets: np.ndarray  # int64 [N + 1]
    num_classes: int

    def __len__(self):
        return len(self.offsets) - 1

    def row(self, i) -> np.ndarray:
        """Clip i's multi-hot float32 [num_classes]."""
        y = np.zeros(self.num_classes, dtype=np.float32)
        y[self.ids[self.offsets[i]:self.offsets[i + 1]]] = 1.0
        return y


@dataclass
class AudioList:
    """The files of a data set and their labels; no audio is read.

    labels[i] is a list of class names (exactly one for multiclass, any number for multilabel,
    empty when unlabelled). segments[i] is None (whole file) or (offset_s, duration_s).
    """

    files: list
    labels: list
    classes: list
    task: str
    source: str  # "folder" | "csv" | "esc50" | "scv2" | "shards"
    root: str
    folds: list | None = None  # ESC-50 fold per file
    splits: list | None = None  # Speech Commands "train" | "val" | "test" per file
    segments: list | None = None
    quality: str = "HQ"  # soxr quality REF uses for this data set (VHQ for ESC-50 and SCV2)
    skipped: list = field(default_factory=list)  # (path, reason) found unreadable while listing
    members: list | None = None  # shards: (tar path, offset, size) of each clip's bytes
    notes: list = field(default_factory=list)  # what the listing noticed, for the run to print (plan_runs)

    def __len__(self):
        return len(self.files)

    def subset(self, indices):
        """The same data set restricted to `indices` (classes are kept, so targets stay aligned)."""
        idx = [int(i) for i in indices]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return dataclasses.replace(self, files=pick(self.files), labels=pick(self.labels),
                                   folds=pick(self.folds), splits=pick(self.splits),
                                   segments=pick(self.segments), members=pick(self.members),
                                   skipped=list(self.skipped))

    def fold_split(self, test_fold):
        """ESC-50: (train = the other folds, test = `test_fold`)."""
        if self.folds is None:
            raise DataError(f"{self.root}: --fold needs ESC-50's layout (meta/esc50.csv), this is a {self.source} data set")
        available = sorted(set(self.folds))
        if test_fold not in available:
            raise DataError(f"{self.root}: fold {test_fold} not in the data set's folds {available}")
        test = [i for i, f in enumerate(self.folds) if f == test_fold]
        train = [i for i, f in enumerate(self.folds) if f != test_fold]
        return self.subset(train), self.subset(test)

    def split(self, name):
        """Speech Commands: the files of split `name` ("train", "val" or "test")."""
        if self.splits is None:
            raise DataError(f"{self.root}: a {self.source} data set has no predefined {name!r} split")
        return self.subset([i for i, s in enumerate(self.splits) if s == name])

    def label_ids(self, classes=None) -> LabelIds:
        """Every clip's class ids (indices into `classes`, default self.classes), compressed; a DataError names
        labels that are not among `classes`."""
        classes = list(self.classes if classes is None else classes)
        index = {c: i for i, c in enumerate(classes)}
        try:
            ids = np.fromiter((index[c] for labs in self.labels for c in labs), dtype=np.int64)
        except KeyError:
            missing = sorted({c for labs in self.labels for c in labs if c not in index})
            raise DataError(f"{self.root}: labels {missing[:5]} are not among the {len(classes)} training "
                            "classes") from None
        offsets = np.zeros(len(self.labels) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, self.labels), dtype=np.int64, count=len(self.labels)), out=offsets[1:])
        return LabelIds(ids, offsets, len(classes))

    def targets(self, classes=None):
        """Targets as an array: class indices [N] (multiclass) or multi-hot float32 [N, C] (multilabel; for a
        large training set AudioDataset keeps label_ids instead and builds each clip's row when it loads it)."""
        if self.task not in ("multiclass", "multilabel"):
            raise DataError(f"{self.root}: an unlabelled data set has no targets")
        lab = self.label_ids(classes)
        if self.task == "multiclass":
            per_clip = np.diff(lab.offsets)
            if (per_clip != 1).any():  # the listings give one; an AudioList built by hand may not
                i = int(np.flatnonzero(per_clip != 1)[0])
                raise DataError(f"{self.files[i]}: a multi-class clip needs exactly one label, got {per_clip[i]}")
            return lab.ids[lab.offsets[:-1]]
        y = np.zeros((len(lab), lab.num_classes), dtype=np.float32)
        y[np.repeat(np.arange(len(lab)), np.diff(lab.offsets)), lab.ids] = 1.0
        return y

    def sampling_labels(self, classes=None, by="labels"):
        """What class-balanced sampling (bat.sampler) weighs: every clip's class ids (by="labels", a LabelIds),
        or each clip's first listed class as an index [N] int64, -1 without a label (by="first-label", REF's HSN)."""
        if by == "labels":
            return self.label_ids(classes)
        index = {c: i for i, c in enumerate(self.classes if classes is None else classes)}
        return np.array([index.get(labs[0], -1) if labs else -1 for labs in self.labels], dtype=np.int64)


def detect_source(path):
    """Which kind of dataset path this is: "csv", "esc50", "scv2", "shards" or "folder"."""
    path = os.fspath(path)
    if is_shard_path(path):
        return "shards"
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        if path.lower().endswith(".csv"):
            return "csv"
        raise DataError(f"{path}: a dataset path must be a folder or a .csv manifest")
    if os.path.isfile(os.path.join(path, "meta", "esc50.csv")):
        return "esc50"
    if all(os.path.isfile(os.path.join(path, f)) for f in ("validation_list.txt", "testing_list.txt")):
        return "scv2"
    return "folder"


def list_dataset(path, labelled=True):
    """Dataset path -> AudioList. `labelled=False` lists the audio only (pretraining), for any layout."""
    source = detect_source(path)
    path = os.fspath(path)
    if source == "shards":
        try:
            return list_shards(path, labelled)
        except ShardError as e:
            raise DataError(str(e)) from None
    if not labelled:
        if source == "csv":
            return _list_csv(path, labelled=False)
        root = path  # every layout is, unlabelled, just the audio files below its root
        files = _audio_files(root)
        if not files:
            raise DataError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
        return AudioList(files, [[] for _ in files], [], "unlabelled", source, root)
    lister = {"csv": _list_csv, "esc50": _list_esc50, "scv2": _list_scv2, "folder": _list_folder}[source]
    items = lister(path)
    if len(items) == 0:
        raise DataError(f"{path}: " + ("no rows below the header" if source == "csv" else "no audio files found"))
    return items


def walk_files(root, suffixes):
    """Every file below root whose name ends in one of `suffixes` (lower case), sorted; hidden files and
    folders excluded. Linked folders are followed, each real folder once: a link back up (a -> ..) would
    list every file again and again, and a loop of links never ends."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(suffixes)]
    return sorted(out)


def _audio_files(root):
    """Every audio file below root, sorted, hidden files and folders excluded."""
    return walk_files(root, AUDIO_EXTENSIONS)


def _list_folder(root):
    files = _audio_files(root)
    rels = [os.path.relpath(f, root).split(os.sep) for f in files]
    loose = [f for f, rel in zip(files, rels) if len(rel) < 2]
    if loose:
        error = NoLabels if len(loose) == len(files) else DataError  # a flat folder has no labels at all
        raise error(f"{loose[0]}: audio directly in {root}; labelled folders need one subfolder per class")
    labels = [[rel[0]] for rel in rels]
    classes = sorted({lab[0] for lab in labels})
    return AudioList(files, labels, classes, "multiclass", "folder", root)


def read_text_lines(path):
    """The lines of a UTF-8 text file (split lists, transcripts); a file that is not UTF-8 is a one-line
    DataError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save it as UTF-8") from None


def read_csv(path, header_only=False):
    """(header, rows as dicts) of a CSV file (a UTF-8 BOM is dropped; rows are [] with header_only). A file
    that is not UTF-8 is a one-line DataError: csv would stop mid-read with a UnicodeDecodeError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            return header, [] if header_only else list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the CSV as UTF-8") from None


def _list_csv(path, labelled=True):
    base = os.path.dirname(os.path.abspath(path))
    columns, rows = read_csv(path)
    if "path" not in columns:
        raise DataError(f"{path}: the manifest needs a 'path' column (found {columns})")
    if labelled and not ({"label", "labels"} & set(columns)):
        raise NoLabels(f"{path}: labelled use needs a 'label' or 'labels' column (found {columns})")
    multilabel = labelled and "labels" in columns  # an explicit `labels` column declares a multi-label task
    windows = "start_s" in columns and "end_s" in columns
    files, labels, segments, first, repeated, rows_of, conflict = [], [], [], {}, None, {}, None
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        p = (row["path"] or "").strip()
        if not p:
            raise DataError(f"{path}:{line}: empty 'path'")
        files.append(p if os.path.isabs(p) else os.path.join(base, p))
        segments.append(_csv_window(row, path, line) if windows else None)
        clip = clip_key(files[-1], segments[-1])
        if clip in first and not repeated:
            repeated = (line, first[clip], p)
        first.setdefault(clip, line)
        if not labelled:
            labels.append([])
        elif multilabel:
            labels.append(_ordered(row["labels"].split(";") if row["labels"] else []))
        else:
            lab = (row["label"] or "").strip()
            if not lab:
                raise DataError(f"{path}:{line}: empty 'label'")
            labels.append([lab])
        if clip in rows_of and conflict is None and set(labels[-1]) != set(labels[rows_of[clip]]):
            conflict = (line, first[clip], p, labels[rows_of[clip]], labels[-1])
        rows_of.setdefault(clip, len(files) - 1)
    task = "unlabelled" if not labelled else "multilabel" if multilabel else "multiclass"
    classes = sorted({c for labs in labels for c in labs})
    # A clip listed twice is kept (REF's BirdSet lists take their rows as they come) but said: it counts
    # twice in training (stratified_split keeps its copies on one side).
    notes = [] if repeated is None else [
        f"note: {path} lists {len(files) - len(first)} clip(s) more than once, e.g. {repeated[2]} (lines "
        f"{repeated[1]} and {repeated[0]}): each copy counts in training and in its split"]
    if conflict is not None:  # contradictory targets for one clip: most likely a mistake in the list
        named = [";".join(labs) or "none" for labs in (conflict[4], conflict[3])]
        notes.append(f"warning: {path} gives {conflict[2]} other labels on line {conflict[0]} ({named[0]}) than on "
                     f"line {conflict[1]} ({named[1]})")
    return AudioList(files, labels, classes, task, "csv", path, segments=segments if windows else None,
                     notes=notes)


def _csv_window(row, path, line):
    """(offset_s, duration_s) of a manifest row with start_s / end_s, or None when both are empty."""
    start, end = (row["start_s"] or "").strip(), (row["end_s"] or "").strip()
    if not start and not end:
        return None
    try:
        start, end = float(start), float(end)
    except ValueError:
        raise DataError(f"{path}:{line}: start_s and end_s must be numbers (seconds), got {start!r}, {end!r}") from None
    if not 0 <= start < end < math.inf:  # NaN fails too
        raise DataError(f"{path}:{line}: need 0 <= start_s < end_s (finite), got {start}, {end}")
    return start, end - start


def _list_esc50(root):
    meta = os.path.join(root, "meta", "esc50.csv")
    _, rows = read_csv(meta)
    try:
        names = {}
        for r in rows:  # the first row of a target names it
            names.setdefault(int(r["target"]), r["category"])
        files = [os.path.join(root, "audio", r["filename"]) for r in rows]
        folds = [int(r["fold"]) for r in rows]
    except (KeyError, ValueError, TypeError) as e:  # TypeError: a short row (its missing fields are None)
        raise DataError(f"{meta}: not ESC-50's format (need filename, fold, target, category): {e}") from None
    for line, r in enumerate(rows, start=2):
        if names[int(r["target"])] != r["category"]:
            raise DataError(f"{meta}:{line}: target {r['target']} is {r['category']!r} here but "
                            f"{names[int(r['target'])]!r} above (one category per target)")
    if not rows:
        raise DataError(f"{meta}: no rows")
    classes = [names[t] for t in sorted(names)]  # REF's class index is `target`
    labels = [[r["category"]] for r in rows]
    return AudioList(files, labels, classes, "multiclass", "esc50", root, folds=folds, quality="VHQ")


def _list_scv2(root):
    def read_list(name):
        return {ln.strip() for ln in read_text_lines(os.path.join(root, name)) if ln.strip()}

    val, test = read_list("validation_list.txt"), read_list("testing_list.txt")
    files, labels, splits, segments, skipped, present = [], [], [], [], [], set()
    for word in sorted(os.listdir(root)):
        folder = os.path.join(root, word)
        if not os.path.isdir(folder) or word == "_background_noise_" or word.startswith("."):
            continue
        label = word if word in SCV2_WORDS or word == "_silence_" else "_unknown_"
        for name in sorted(os.listdir(folder)):
            if not name.lower().endswith(".wav"):
                continue
            rel = f"{word}/{name}"
            present.add(rel)
            files.append(os.path.join(folder, name))
            labels.append([label])
            splits.append("val" if rel in val else "test" if rel in test else "train")
            segments.append(None)
    noise = os.path.join(root, "_background_noise_")
    if os.path.isdir(noise):
        for name in sorted(os.listdir(noise)):
            if not name.lower().endswith(".wav"):
                continue
            f = os.path.join(noise, name)
            try:
                seconds = _duration(f)
            except AudioError as e:
                skipped.append((e.path, e.reason))
                continue
            n = int(np.floor(seconds))
            for i in range(n):  # REF: whole 1 s chunks, 80/10/10 by position within the recording
                files.append(f)
                labels.append(["_silence_"])
                splits.append("train" if i < n * 0.8 else "val" if i < n * 0.9 else "test")
                segments.append((float(i), 1.0))
    notes = [f"note: {root}/{name} names {len(absent)} file(s) not present, e.g. {min(absent)} (a partial "
             "download?): the split is smaller than the list" for name, absent in
             (("validation_list.txt", val - present), ("testing_list.txt", test - present)) if absent]
    return AudioList(files, labels, list(SCV2_CLASSES), "multiclass", "scv2", root,
                     splits=splits, segments=segments, quality="VHQ", skipped=skipped, notes=notes)


def _duration(path):
    import soundfile as sf

    check_regular_file(path)
    try:
        info = sf.info(path)
    except Exception as e:
        raise decode_error(path, e) from e
    return info.frames / info.samplerate


def durations(items):
    """Seconds of every item from the file headers (no decoding); NaN where the header is unreadable
    (the loader will skip and report that file later)."""
    out = np.full(len(items), np.nan)
    for i, f in enumerate(items.files):
        seg = items.segments[i] if items.segments is not None else None
        if seg is not None:
            out[i] = seg[1]
            continue
        try:
            out[i] = member_seconds(items.members[i], f) if items.members is not None else _duration(f)
        except AudioError:
            pass
    return out


def clip_key(file, segment=None, member=None):
    """What identifies a clip: its file (normalised), window and shard member; a CSV may list one clip on
    several rows."""
    return os.path.normpath(file), segment, member


def stratified_split(items, test_fraction=0.2, seed=0):
    """(train, test) with about `test_fraction` of every class (by first label) in test, at least one
    clip per class on each side where the class has two or more. Rows listing the same clip go to the same
    side (a held-out score must not be measured on a copy of a training clip). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    rows = {}  # clip -> its row indices, in the order clips first appear
    for i, f in enumerate(items.files):
        segment, member = (None if xs is None else xs[i] for xs in (items.segments, items.members))
        rows.setdefault(clip_key(f, segment, member), []).append(i)
    by_class = {}
    for idx in rows.values():
        labs = items.labels[idx[0]]
        by_class.setdefault(labs[0] if labs else "", []).append(idx)
    test = []
    for key in sorted(by_class):
        clips = by_class[key]
        order = rng.permutation(len(clips))  # without repeated rows: the same draw as permuting the rows
        k = int(round(len(clips) * test_fraction))
        k = min(max(k, 1), len(clips) - 1) if len(clips) >= 2 else 0
        test += [i for j in order[:k] for i in clips[j]]
    test_set = set(test)
    train = [i for i in range(len(items)) if i not in test_set]
    return items.subset(train), items.subset(sorted(test))


# ------------------------------------------------------------------------------ event and speech layouts
# Which task a csv or folder is for (bat.tasks.resolve_task); bat.sed and bat.asr list them.

HEAR_SPLITS = ("train", "valid", "test")


def is_event_data(path):
    """True for a HEAR task folder or a CSV manifest with onset_s/offset_s columns."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "labelvocabulary.csv")) and any(
            os.path.isfile(os.path.join(path, f"{s}.json")) for s in HEAR_SPLITS)
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return {"onset_s", "offset_s"} <= {h.strip() for h in read_csv(path, header_only=True)[0]}
    return False


def is_speech_data(path):
    """True for a CSV with `path` and `text` columns or a folder holding LibriSpeech *.trans.txt files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return bool(walk_files(path, (".trans.txt",)))
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return {"path", "text"} <= {h.strip() for h in read_csv(path, header_only=True)[0]}
    return False


# --------------------------------------------------------------------------------------- shards


def _ordered(labs):
    """A clip's distinct label names in their listed order (REF's HSN sampling weighs the first)."""
    return list(dict.fromkeys(str(c).strip() for c in labs if str(c).strip()))


def _labels_of(meta, where):
    if "labels" in meta:
        labs = meta["labels"]
        if isinstance(labs, str):
            labs = labs.split(";")
        return "multilabel", _ordered(labs)
    if "label" in meta and str(meta["label"]).strip():
        return "multiclass", [str(meta["label"]).strip()]
    raise ShardError(f"{where}: labelled use needs a 'label' or 'labels' field in every sample's JSON")


def list_shards(pattern, labelled=True):
    """Shard pattern -> AudioList whose files are named SHARD/KEY.EXT and whose `members`
    say where each clip's bytes are. Samples without audio or with unreadable JSON are skipped and
    listed in `skipped` (the loader's skip-and-count); a damaged tar keeps its samples up to the damage."""
    files, members, metas, skipped, no_json = [], [], [], [], 0
    for shard in expand_pattern(pattern):
        samples, labels_of, bad = read_index(shard)
        if bad:
            skipped.append(bad)
        for key, parts in samples:
            ext = next((e for e in AUDIO_EXTS if e in parts), None)
            name = f"{shard}/{key}"
            if ext is None:
                skipped.append((name, f"no audio member ({', '.join(sorted(parts))})"))
                continue
            meta = {}
            if labelled and "json" not in parts:
                skipped.append((name, "no labels (no .json member)"))
                no_json += 1
                continue
            if labelled and key in labels_of:
                meta = labels_of[key]
            elif labelled:
                try:
                    meta = json.loads(read_member(shard, *parts["json"]))
                    assert isinstance(meta, dict)
                except (ValueError, AssertionError, OSError) as e:
                    skipped.append((f"{name}.json", f"unreadable labels ({e or 'not a JSON object'})"))
                    continue
            files.append(f"{name}.{ext}")
            members.append((shard, *parts[ext]))
            metas.append(meta)
    if labelled and (files or no_json) and not any("label" in m or "labels" in m for m in metas):
        raise NoLabels(f"{pattern}: labelled use needs a 'label' or 'labels' field in the samples' JSON, and "
                       "none has one (shards written with --unlabelled?)")
    if not files:
        raise ShardError(f"{pattern}: no audio samples in the shards")
    if not labelled:
        return AudioList(files, [[] for _ in files], [], "unlabelled", "shards", os.fspath(pattern),
                         members=members, skipped=skipped)
    kinds, labels = set(), []
    for f, meta in zip(files, metas):
        kind, labs = _labels_of(meta, f)
        kinds.add(kind)
        labels.append(labs)
    if len(kinds) > 1:
        raise ShardError(f"{pattern}: some samples have 'label' and others 'labels'; use one for all")
    folds = [m.get("fold") for m in metas]
    splits = [m.get("split") for m in metas]
    layouts = {m.get("layout") for m in metas}
    source = layouts.pop() if len(layouts) == 1 and None not in layouts else "shards"
    return AudioList(files, labels, sorted({c for labs in labels for c in labs}), kinds.pop(), source,
                     os.fspath(pattern), folds=folds if None not in folds else None,
                     splits=splits if None not in splits else None, members=members,
                     quality=metas[0].get("quality", "HQ"), skipped=skipped)
