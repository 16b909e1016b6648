"""Sound event detection (SED): event lists, the 160 ms target grid, post-processing and metrics.

A frame-wise head (bat.heads.frame_head: frame_wise=True or mode="frame") gives one score per class and
*time patch*: the encoder's patches are 16 spectrogram frames of 10 ms, so patch k covers
[0.16 k, 0.16 (k + 1)) s. Everything here follows the BAT reference implementation's DCASE 2016 task 2
evaluation (github.com/houtan-ghaffari/BAT_ICML2026, data/bat_audio_datasets.py, engine/evaluator.py):

- targets: patch k of class c is 1 when an event of c satisfies onset <= 0.16 k <= offset (REF compares
  the patch's start time, which it calls its centre, with the event's boundaries in ms);
- post-processing (bat.events.decode_events, shared with `python -m bat.tag --events`): per class, a median
  filter over 3 patches (scipy.signal.medfilt: zero-padded ends), then score >= 0.3; each run of active
  patches k0..k1 becomes the event (0.16 k0, 0.16 k1) s;
- onset F1: event-based, onset only, 200 ms collar, events matched one-to-one within a class and file
  (a maximum matching, like sed_eval's "optimal" matching), counts summed over all files and classes
  (micro-averaged): F1 = 2 TP / (N_ref + N_est); NaN when nothing was detected (as sed_eval);
- frame mAP: average precision over all (patch, class) pairs of all test recordings, micro-averaged
  (REF selects its model on this) and macro-averaged over classes.

Data: the HEAR 2021 task layout (`labelvocabulary.csv`, `{train,valid,test}.json` mapping a file name to
its events `{"label", "start", "end"}` in ms, audio in `<rate>/<split>/`), or a CSV manifest
`path,label,onset_s,offset_s` (one row per event; a row with an empty label lists a file without events).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from bat.audio import SAMPLE_RATE, AudioError, check_regular_file, load_audio
from bat.augment import coloured_noise
from bat.data import ClipKey, Skipped, forever, seeded_generator
from bat.heads import Features, frozen_features
from bat.listing import HEAR_SPLITS, DataError, is_event_data, read_csv
from bat.metrics import average_precision, mean_average_precision
from bat.model import eval_mode
from bat.precision import autocast
# One post-processing for training-time metrics and the torch-free ONNX runtime (python -m bat.tag --events)
from bat.events import EVENT_THRESHOLD as THRESHOLD, MEDIAN_PATCHES, decode_events

PATCH_SECONDS = 0.16  # 16 frames x 10 ms hop
COLLAR_SECONDS = 0.2


# ---------------------------------------------------------------------------------------------
# Event lists


@dataclass
class EventList:
    """Recordings and their events; no audio is read. events[i] = [(label, onset_s, offset_s), ...]."""

    files: list
    events: list
    classes: list
    source: str  # "hear" | "csv"
    root: str
    skipped: list = field(default_factory=list)

    def __len__(self):
        return len(self.files)


def list_events(path, split=None):
    """An EventList from a HEAR task folder (split: "train", "valid" or "test") or an event CSV."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if not is_event_data(path):
        raise DataError(f"{path}: not event data (a HEAR task folder with labelvocabulary.csv and "
                        "train/valid/test.json, or a CSV with path,label,onset_s,offset_s)")
    if os.path.isdir(path):
        return _list_hear(path, split or "train")
    return _list_event_csv(path)


def _hear_vocabulary(path):
    """The class names of a HEAR labelvocabulary.csv (idx,label), in idx order."""
    header, rows = read_csv(path)
    if not {"idx", "label"} <= set(header):
        raise DataError(f"{path}: needs the columns idx and label (found {header})")
    try:
        labels = [(r["label"] or "").strip() for r in sorted(rows, key=lambda r: int(r["idx"]))]
    except (TypeError, ValueError):
        raise DataError(f"{path}: every idx must be a whole number") from None
    if not all(labels) or len(set(labels)) < len(labels):  # a class never trained, or two outputs for one
        raise DataError(f"{path}: every label must be given once (found {labels[:10]})")
    return labels


def _hear_audio_dir(root, split):
    """HEAR keeps one copy of the audio per sample rate (<rate>/<split>/); the 16 kHz copy saves a resample."""
    rates = sorted((d for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, split))),
                   key=lambda d: (int(d) != SAMPLE_RATE, -int(d)))
    if rates:
        return os.path.join(root, rates[0], split)
    if os.path.isdir(os.path.join(root, split)):
        return os.path.join(root, split)
    raise DataError(f"{root}: no audio folder for split {split!r} (expected e.g. {root}/16000/{split}/)")


def _list_hear(root, split):
    if split not in HEAR_SPLITS:
        raise DataError(f"unknown HEAR split {split!r}; one of {HEAR_SPLITS}")
    classes = _hear_vocabulary(os.path.join(root, "labelvocabulary.csv"))
    json_path = os.path.join(root, f"{split}.json")
    if not os.path.isfile(json_path):
        raise DataError(f"{root}: no {split}.json")
    try:
        with open(json_path, encoding="utf-8") as fh:
            table = json.load(fh)
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"{json_path}: not a HEAR split table ({e})") from None
    if not isinstance(table, dict):
        raise DataError(f"{json_path}: not a HEAR split table (a JSON object of file name -> events)")
    audio = _hear_audio_dir(root, split)
    files, events = [], []
    for name in sorted(table):
        try:
            evs = [(e["label"], float(e["start"]) / 1000.0, float(e["end"]) / 1000.0) for e in table[name]]
        except (TypeError, KeyError, ValueError):
            raise DataError(f"{json_path}: {name}: each event needs label, start and end (ms)") from None
        bad = [e for e in evs if not 0 <= e[1] <= e[2] < math.inf]  # NaN fails too
        if bad:
            raise DataError(f"{json_path}: {name}: need 0 <= start <= end (ms), got {1000 * bad[0][1]:g}, "
                            f"{1000 * bad[0][2]:g}")
        unknown = {e[0] for e in evs} - set(classes)
        if unknown:
            raise DataError(f"{json_path}: {name} has labels {sorted(unknown)} not in labelvocabulary.csv")
        files.append(os.path.join(audio, name))
        events.append(evs)
    if not files:
        raise DataError(f"{json_path}: no recordings")
    return EventList(files, events, classes, "hear", root)


def _list_event_csv(path):
    base = os.path.dirname(os.path.abspath(path))
    header, rows = read_csv(path)
    if "label" not in {h.strip() for h in header}:
        raise DataError(f"{path}: event data needs a 'label' column (found {header})")
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]  # "path, label, ..." headers too
    by_file = {}
    for line, row in enumerate(rows, start=2):
        p = (row.get("path") or "").strip()
        if not p:
            raise DataError(f"{path}:{line}: empty 'path'")
        evs = by_file.setdefault(p if os.path.isabs(p) else os.path.join(base, p), [])
        label = (row.get("label") or "").strip()
        if not label:
            continue  # a recording without events
        try:
            onset, offset = float(row["onset_s"]), float(row["offset_s"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{line}: onset_s/offset_s must be numbers (seconds)") from None
        if not 0 <= onset <= offset < math.inf:  # NaN fails too
            raise DataError(f"{path}:{line}: need 0 <= onset_s <= offset_s, got {onset}, {offset}")
        evs.append((label, onset, offset))
    if not by_file:
        raise DataError(f"{path}: no rows")
    classes = sorted({e[0] for evs in by_file.values() for e in evs})
    if not classes:
        raise DataError(f"{path}: no labelled events (every 'label' cell is empty)")
    return EventList(list(by_file), list(by_file.values()), classes, "csv", path)


def plan_splits(train, test=None):
    """(train, valid or None, test) EventLists for --train/--test: a HEAR task folder brings its own
    train/valid/test splits (--test, when given, replaces its test split); an event CSV needs --test."""
    train_items = list_events(train, "train")
    valid = list_events(train, "valid") if train_items.source == "hear" and os.path.isfile(
        os.path.join(train, "valid.json")) else None
    if test is None:
        if train_items.source != "hear":
            raise DataError(f"{train}: an event CSV has no test split; give --test (another event CSV or a HEAR folder)")
        test = train
    test_items = list_events(test, "test")
    missing = sorted({e[0] for evs in test_items.events for e in evs} - set(train_items.classes))
    if missing:
        raise DataError(f"{test}: event labels {missing[:5]} are not among the training classes")
    return train_items, valid, test_items


# ---------------------------------------------------------------------------------------------
# Target grid and post-processing


def patch_times(num_patches):
    """The time (s) REF assigns to each patch: its start, 0.16 k (float64, as REF's numpy code)."""
    return np.arange(num_patches) * (PATCH_SECONDS * 1000.0) / 1000.0


def target_grid(events, num_patches, classes):
    """Multi-hot targets (num_patches, C), float32: patch k of class c is 1 when an event of class c
    has onset <= 0.16 k <= offset (REF's alignment, in ms)."""
    index = {c: i for i, c in enumerate(classes)}
    t_ms = np.arange(num_patches) * (PATCH_SECONDS * 1000.0)
    y = np.zeros((num_patches, len(classes)), dtype=np.float32)
    for label, onset, offset in events:
        if label not in index:
            raise DataError(f"event label {label!r} is not among the {len(classes)} training classes")
        # back to ms, rounded so that an onset of exactly 0.16 s compares equal to patch 1 (160 ms)
        on_ms, off_ms = round(onset * 1000.0, 6), round(offset * 1000.0, 6)
        y[(t_ms >= on_ms) & (t_ms <= off_ms), index[label]] = 1.0
    return y


def detect_events(scores, classes, threshold=THRESHOLD):
    """Per-patch probabilities (T', C) -> [(label, onset_s, offset_s)] by REF's rule (median filter of 3
    patches, zero-padded ends like scipy.signal.medfilt, then score >= threshold; a run of active patches
    k0..k1 is the event (0.16 k0, 0.16 k1)). One definition with `python -m bat.tag --events`."""
    scores = np.asarray(scores, dtype=np.float64)
    return decode_events(patch_times(scores.shape[0]), scores.reshape(scores.shape[0], len(classes)), classes,
                         threshold)


# ---------------------------------------------------------------------------------------------
# Metrics


def count_onset_matches(ref_onsets, est_onsets, collar=COLLAR_SECONDS):
    """Largest number of one-to-one pairs with |ref - est| <= collar. For points on a line with one
    distance threshold, pairing in sorted order is a maximum matching (what sed_eval's optimal
    bipartite matching finds)."""
    ref, est = sorted(ref_onsets), sorted(est_onsets)
    i = j = matched = 0
    while i < len(ref) and j < len(est):
        if abs(ref[i] - est[j]) <= collar:
            matched, i, j = matched + 1, i + 1, j + 1
        elif ref[i] < est[j]:
            i += 1
        else:
            j += 1
    return matched


def onset_f1(references, estimates, collar=COLLAR_SECONDS):
    """Event-based onset-only scores, micro-averaged over files and classes, as sed_eval's
    EventBasedMetrics(t_collar=collar, evaluate_onset=True, evaluate_offset=False).results()["overall"].

    references, estimates: one event list [(label, onset_s, offset_s), ...] per file, in the same order.
    Returns {"onset_f1", "onset_precision", "onset_recall", "num_ref_events", "num_est_events",
    "num_matched_events"}; precision (recall) is NaN without estimated (reference) events, and F1 NaN
    when either is."""
    if len(references) != len(estimates):
        raise ValueError(f"{len(references)} reference files but {len(estimates)} estimated")
    n_ref = n_est = n_tp = 0
    for ref, est in zip(references, estimates):
        n_ref, n_est = n_ref + len(ref), n_est + len(est)
        for label in {e[0] for e in ref} & {e[0] for e in est}:
            n_tp += count_onset_matches([e[1] for e in ref if e[0] == label], [e[1] for e in est if e[0] == label],
                                        collar)
    precision = n_tp / n_est if n_est else float("nan")
    recall = n_tp / n_ref if n_ref else float("nan")
    if precision == 0 and recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)  # NaN propagates, as in sed_eval
    return {"onset_f1": float(f1), "onset_precision": float(precision), "onset_recall": float(recall),
            "num_ref_events": n_ref, "num_est_events": n_est, "num_matched_events": n_tp}


def frame_map(scores, targets):
    """(micro, macro) average precision over every (patch, class) pair; scores/targets (N, C). Without a single
    positive pair both are 0, as scikit-learn (REF's evaluator) scores them."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    micro = average_precision(scores.ravel(), targets.ravel())
    return (0.0 if np.isnan(micro) else micro), mean_average_precision(scores, targets)


def sed_metrics(scores, events, classes, threshold=THRESHOLD):
    """Everything metrics.json reports for a SED test set. scores: one (T'_i, C) probability array per
    recording; events: its reference event list. Targets are rebuilt on each recording's own grid."""
    targets = [target_grid(ev, s.shape[0], classes) for s, ev in zip(scores, events)]
    estimates = [detect_events(s, classes, threshold) for s in scores]
    out = onset_f1(events, estimates)
    micro, macro = frame_map(np.concatenate(scores), np.concatenate(targets))
    out.update(frame_mAP=micro, frame_mAP_macro=macro, threshold=threshold, median_filter_patches=MEDIAN_PATCHES,
               collar_s=COLLAR_SECONDS, patch_s=PATCH_SECONDS)
    return out


# ---------------------------------------------------------------------------------------------
# Loading recordings


class EventDataset(torch.utils.data.Dataset):
    """Whole recordings as model inputs with their target grid.

    Item: (spec (1, T, 128), targets (T // 16, C), index), or Skipped for an unreadable file. The
    spectrogram is computed per recording before any padding (REF normalises the whole recording, then
    zero-pads or crops the spectrogram to `target_frames`); target_frames=None keeps the recording's
    own length (evaluation, one recording per batch). noise_prob: training only, REF's coloured noise on that
    share of the recordings' waveforms (bat.augment.coloured_noise) before the front-end.

    A recording is asked for by its index (`ds[i]`: the noise comes from torch's global RNG) or by a
    bat.data.ClipKey (`ds[ClipKey(i, draws)]`: from a generator seeded by `draws`, the same wherever it is read).
    """

    def __init__(self, items, classes, frontend, target_frames=None, noise_prob=0.0):
        self.items, self.classes, self.frontend, self.target_frames = items, list(classes), frontend, target_frames
        self.noise_prob = noise_prob

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, gen = key, None
        if isinstance(key, ClipKey):  # a keyed training stream: the same noise in any loader worker, after any resume
            i, gen = key.index, seeded_generator(*key.draws)
        try:
            wave = torch.from_numpy(load_audio(self.items.files[i], SAMPLE_RATE))
        except AudioError as e:
            return Skipped(i, e.path, e.reason)
        with torch.no_grad():
            if self.noise_prob:
                wave = coloured_noise(wave[None], self.noise_prob, generator=gen)[0]
            spec = self.frontend(wave[None])[0]  # (1, T, 128)
        if self.target_frames is not None:
            spec = torch.nn.functional.pad(spec, (0, 0, 0, self.target_frames - spec.shape[1]))
        elif spec.shape[1] < 16:  # under one patch (0.15 s): zero-padded to one, as a short training clip is
            spec = torch.nn.functional.pad(spec, (0, 0, 0, 16 - spec.shape[1]))
        y = target_grid(self.items.events[i], spec.shape[1] // 16, self.classes)
        return spec, torch.from_numpy(y), i


def collate_events(items):
    """-> (spec (B, 1, T, 128), targets (B, T', C), indices, skipped); specs of one batch share a length."""
    good = [x for x in items if not isinstance(x, Skipped)]
    skipped = [(x.path, x.reason) for x in items if isinstance(x, Skipped)]
    if not good:
        return None, None, [], skipped
    return (torch.stack([x[0] for x in good]), torch.stack([x[1] for x in good]), [x[2] for x in good], skipped)


def recording_frames(items, cap_seconds=None):
    """Training spectrogram length: the longest recording's frames rounded down to whole patches (REF:
    120 s recordings -> 12001 frames -> 12000), at most cap_seconds."""
    import soundfile as sf

    longest = 0.0
    for f in items.files:
        try:
            check_regular_file(f)  # a FIFO would block soundfile forever
            info = sf.info(f)
            longest = max(longest, info.frames / info.samplerate)
        except Exception:  # noqa: BLE001 - unreadable files are reported when loaded
            continue
    if cap_seconds is not None:
        longest = min(longest, cap_seconds)
    frames = 16 * ((1 + int(round(longest * SAMPLE_RATE)) // 160) // 16)
    if frames == 0:
        raise DataError(f"{items.root}: no readable recording of at least 0.16 s")
    return frames


# ---------------------------------------------------------------------------------------------
# Frame-wise probes: heads, training batches, validation and test scoring (probe_cgp.py trains)


def event_frontend(encoder):
    """The encoder's front-end on whole inputs (no fixed length); legacy front-ends with REF's DCASE
    statistics."""
    from bat.frontend import Frontend
    from bat.tasks import TASKS, frontend_config

    return Frontend.from_config(frontend_config(encoder.frontend_config, TASKS["dcase2016"], None))


def event_loader(dataset, batch_size, shuffle=False, workers=0, seed=0):
    """A DataLoader of EventDataset batches (collate_events); shuffled in a seeded order."""
    from bat.data import make_loader

    return make_loader(dataset, batch_size, shuffle, workers, seed, collate_fn=collate_events)



def recording_batches(batches, skips, files):
    """Endless (spec, targets, batches taken) for training through the encoder (finetune.py) from `batches`, an
    endless stream of collate_events batches of the recordings `files` (bat.sampler.batch_stream: a resumed run's
    starts at the batch it stopped before, without loading the earlier ones). Batches whose every recording is
    unreadable are skipped and counted in `taken`; an error is raised once all the recordings are unreadable."""
    taken = 0
    for spec, y, _, skipped in batches:
        skips.add(skipped)
        taken += 1
        if spec is not None:
            yield spec, y, taken
            taken = 0
        elif skips.all_unreadable(files):  # never spin on unreadable data
            raise skips.nothing_usable(files, "the training recordings")


@torch.no_grad()
def predict_recordings(encoder, head, dataset, device, workers=0, skips=None):
    """Sigmoid scores (T'_i, C) for every readable recording of an EventDataset, each encoded whole on its
    own (no padding: inputs beyond 64 time patches go through the encoder in chunks). Returns (scores,
    indices into dataset.items)."""
    scores, indices = [], []
    with eval_mode(encoder, head):  # a fine-tuning run's model mid-run, or a loaded probe's: each gets its mode back
        for spec, _, idx, skipped in event_loader(dataset, 1, workers=workers):
            if skips is not None:
                skips.add(skipped)
            if spec is None:
                continue
            spec = spec.to(device)
            with autocast(device, "cuda-bf16"):  # the head: bf16 on CUDA (REF)
                logits = head(frozen_features(encoder, head, spec)).float()
            if not torch.isfinite(logits).all():  # a sigmoid of NaN would be scored as if it meant something
                raise FloatingPointError(f"the model's scores are NaN or infinite on {dataset.items.files[idx[0]]}: "
                                         "its weights diverged (try a lower --lr) or the audio holds non-finite values")
            scores.append(logits.sigmoid()[0].cpu().numpy())
            indices += idx
    return scores, indices


def training_batches(encoder, head, dataset, batch_size, device, cache, seed=0, workers=0, skips=None):
    """Endless (Features, targets) training batches in random order. cache=True encodes every recording once
    and draws batches from memory (exact: REF's frame-wise probing uses no augmentation); else the frozen
    encoder runs on every batch."""
    loader = event_loader(dataset, batch_size, shuffle=not cache, workers=workers, seed=seed)
    if not cache:
        for spec, y, _, skipped in forever(loader):
            skips.add(skipped)
            if spec is not None:  # None: every recording of this batch was unreadable
                yield frozen_features(encoder, head, spec.to(device)), y.to(device)
            elif skips is not None and skips.all_unreadable(dataset.items.files):  # never spin on unreadable data
                raise skips.nothing_usable(dataset.items.files, "the training recordings")
    parts, ys = [], []
    for spec, y, _, skipped in loader:
        skips.add(skipped)
        if spec is not None:
            parts.append(frozen_features(encoder, head, spec.to(device)))
            ys.append(y.to(device))
    if not parts:
        raise DataError("no usable training recordings (every file was skipped)")
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=1)  # noqa: E731  (layers first)
    feats = Features(cat([f.cls for f in parts]), cat([f.tokens for f in parts]), parts[0].time_patches)
    y, gen = torch.cat(ys), torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(y.shape[0], generator=gen).split(batch_size):
            idx = idx.to(device)
            yield feats.index(idx), y[idx]


def valid_frame_map(encoder, head, valid, classes, device, workers=0, skips=None):
    """Micro frame mAP of `head` on the whole validation recordings (REF's selection score)."""
    scores, idx = predict_recordings(encoder, head, EventDataset(valid, classes, event_frontend(encoder)), device,
                                     workers, skips)
    if not scores:
        raise DataError("no usable validation recordings (every file was skipped)")
    targets = [target_grid(valid.events[i], s.shape[0], classes) for s, i in zip(scores, idx)]
    return frame_map(np.concatenate(scores), np.concatenate(targets))[0]


def test_sed(encoder, head, test, classes, device, workers=0, skips=None):
    """Onset F1 and frame mAP of `head` on the whole test recordings (chunked encoder)."""
    scores, idx = predict_recordings(encoder, head, EventDataset(test, classes, event_frontend(encoder)), device,
                                     workers, skips)
    if not scores:
        raise DataError("no usable test recordings (every file was skipped)")
    return {**sed_metrics(scores, [test.events[i] for i in idx], classes), "num_test": len(scores)}


def probe_parts(encoder, head, train, valid, test, device, batch_size, frames, cache, seed=0, workers=0, skips=None):
    """The frame-wise probe's side of probe_cgp.py's training loop: (endless (features, targets, rows) batches
    of the training recordings padded or cropped to `frames`, the loss (binary cross-entropy per patch and
    class, REF), validate() -> (micro frame mAP, history record) or None without a validation split,
    test() -> onset F1 and frame mAP on the whole test recordings)."""
    classes = train.classes
    ds = EventDataset(train, classes, event_frontend(encoder), frames)
    batches = ((f, y, len(y)) for f, y in training_batches(encoder, head, ds, batch_size, device, cache, seed,
                                                           workers, skips))

    def validate():
        score = valid_frame_map(encoder, head, valid, classes, device, workers, skips)
        return score, {"split": "valid", "frame_mAP": score}

    def test_():
        return {**test_sed(encoder, head, test, classes, device, workers, skips),
                "num_train": sum(f not in skips.seen for f in train.files), "target_frames": frames}

    loss = lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)  # noqa: E731
    return batches, loss, (validate if valid is not None else None), test_
