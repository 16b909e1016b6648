"""WebDataset-style tar shards: a writer, and an indexed reader the data layer uses like a folder.

    python -m bat.shards data/train.csv shards/train --shard-size 1000
    # -> shards/train-000000.tar ...; then anywhere a dataset path is accepted:
    python pretrain.py --data 'shards/train-{000000..000127}.tar' --out runs/bat
    python probe_cgp.py --train 'shards/train-{000000..000009}.tar' --test 'shards/test-{000000..000001}.tar' ...

A shard is a plain tar holding, per sample, `KEY.flac` (or the source file's own extension, see
below) and `KEY.json` ({"path": source path, "label": "dog"} or {"labels": ["dog", "bark"]}, and
"fold" / "split" for ESC-50 / Speech Commands). That is WebDataset's layout, so the `webdataset`
package reads these shards, and shards written with it (audio + a JSON with label/labels) read here.
Beside each shard the writer puts SHARD.tar.idx (JSON: every sample's member offsets and labels), so
a process starts by reading two files per shard instead of every tar header; shards without one (or
with a stale one) are indexed from their headers.

Why a reader of our own and not the `webdataset` package: `webdataset` streams (an IterableDataset
with a shuffle buffer), so a run can no longer address a clip by its position, and pretrain.py's
exact resumption and process-independent batches (bat.pretraining.StreamBatches) would be lost.
Here the shards are indexed once, and a clip is then read with one positional read (`os.pread`) from a shard file the worker keeps open.
That removes what stalls a multi-node run on millions of small files (an open/stat per clip on the
shared file system) and keeps every guarantee of the file-based path. What it does not give is
purely sequential reading: storage where random reads inside a big file are slow (object stores)
wants a streaming reader instead.

Audio is stored losslessly: integer PCM (most WAV/AIFF) becomes FLAC with the same samples, FLAC is
copied as it is, and anything FLAC cannot hold exactly (float WAV, MP3, OGG) is stored byte for byte
under its own extension. Resampling to 16 kHz happens when a clip is read, exactly as for the file.
Shards of ESC-50 or Speech Commands list as that layout again (folds, splits; class names sorted).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
import tarfile

import soundfile as sf

from bat.audio import AudioError, check_waveform, resample

AUDIO_EXTS = ("flac", "wav", "ogg", "mp3", "aiff", "aif")
LOSSLESS_TO_FLAC = {"PCM_16", "PCM_24", "PCM_S8", "PCM_U8"}  # sample formats FLAC stores exactly
BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ShardError(ValueError):
    """A shard path or pattern that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------------------- reading


def is_shard_path(path) -> bool:
    """A .tar file, or a pattern of them ('train-{000000..000127}.tar', 'shards/*.tar')."""
    return os.fspath(path).lower().endswith(".tar")


def expand_pattern(pattern) -> list[str]:
    """'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar (zero-padded like the first bound); glob
    patterns (*, ?) are expanded too. Every shard must exist."""
    pattern = os.fspath(pattern)
    paths = [pattern]
    while any(BRACES.search(p) for p in paths):
        out = []
        for p in paths:
            m = BRACES.search(p)
            if m is None:
                out.append(p)
                continue
            lo, hi = m.group(1), m.group(2)
            if int(hi) < int(lo):
                raise ShardError(f"{pattern}: empty range {{{lo}..{hi}}}")
            out += [p[:m.start()] + str(i).zfill(len(lo)) + p[m.end():] for i in range(int(lo), int(hi) + 1)]
        paths = out
    if any(c in pattern for c in "*?["):
        paths = sorted(q for p in paths for q in glob.glob(p))
        if not paths:
            raise ShardError(f"{pattern}: no shard matches")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ShardError(f"{pattern}: {len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}")
    return paths


def index_shard(path):
    """[(key, {ext: (offset, size)})] of one tar, in file order, and a (path, reason) if the tar is
    damaged (the samples before the damage are kept). Only the headers are read."""
    samples, bad = {}, None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, base = os.path.split(info.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")  # WebDataset: the key ends at the first dot of the name
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        if samples:  # the sample being read may be incomplete
            samples.pop(next(reversed(samples)))
        bad = (path, f"damaged tar after {len(samples)} samples ({e})")
    return list(samples.items()), bad


INDEX_FORMAT = "bat.shard_index/1"


def read_index(path):
    """(samples as index_shard gives them, {key: the sample's JSON}, damage) of one shard, from the
    index bat.shards wrote beside it (SHARD.tar.idx) when it matches the tar's size, else by reading
    the tar's headers. With the index a process reads two files per shard at start, not every header:
    on a shared file system the headers of millions of samples are millions of small reads per process."""
    try:
        with open(f"{path}.idx", encoding="utf-8") as fh:
            index = json.load(fh)
        if index.get("format") == INDEX_FORMAT and index["tar_bytes"] == os.path.getsize(path):
            samples = [(key, {e: tuple(v) for e, v in parts.items()}) for key, parts, _ in index["samples"]]
            return samples, {key: meta for key, _, meta in index["samples"] if meta is not None}, None
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no index, or not ours, or stale: read the tar itself
    samples, bad = index_shard(path)
    return samples, {}, bad


def write_index(path, metas: dict) -> None:
    """SHARD.tar.idx: every sample's member offsets and JSON (read back by read_index)."""
    samples, bad = index_shard(path)
    if bad:
        raise ShardError(f"{path}: {bad[1]}")
    index = {"format": INDEX_FORMAT, "tar_bytes": os.path.getsize(path),
             "samples": [[key, parts, metas.get(key)] for key, parts in samples]}
    tmp = f"{path}.idx.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(index, fh, separators=(",", ":"))
    os.replace(tmp, f"{path}.idx")


_FDS: dict = {}  # (pid, path) -> fd: each loader worker keeps its own shard files open


def read_member(path, offset, size) -> bytes:
    """The bytes of one tar member: a positional read, no seek state shared across forked workers."""
    key = (os.getpid(), path)
    fd = _FDS.get(key)
    if fd is None:
        if len(_FDS) >= 256:  # bound the open files; the shards of a big run are many
            for k in list(_FDS)[:128]:
                os.close(_FDS.pop(k))
        fd = _FDS[key] = os.open(path, os.O_RDONLY)
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with open(path, "rb") as fh:  # Windows: no pread
        fh.seek(offset)
        return fh.read(size)


def decode(data: bytes, name, sample_rate=16000, quality="HQ"):
    """Bytes of an audio file -> mono float32 at `sample_rate`, like bat.audio.load_audio."""
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(name, f"cannot decode ({getattr(e, 'error_string', None) or e})") from e
    y = resample(check_waveform(x.T, name), sr, sample_rate, quality)
    if y.size == 0:
        raise AudioError(name, "zero length after decoding")
    return y


def load_member(member, name, sample_rate=16000, quality="HQ"):
    """A clip of a shard, member = (shard path, offset, size), name = how errors call it."""
    try:
        data = read_member(*member)
    except OSError as e:
        raise AudioError(name, f"cannot read ({e})") from e
    return decode(data, name, sample_rate, quality)


def member_seconds(member, name) -> float:
    try:
        info = sf.info(io.BytesIO(read_member(*member)))
    except Exception as e:
        raise AudioError(name, f"cannot decode ({getattr(e, 'error_string', None) or e})") from e
    return info.frames / info.samplerate


def _labels_of(meta, where):
    if "labels" in meta:
        labs = meta["labels"]
        if isinstance(labs, str):
            labs = labs.split(";")
        return "multilabel", sorted({str(c).strip() for c in labs if str(c).strip()})
    if "label" in meta and str(meta["label"]).strip():
        return "multiclass", [str(meta["label"]).strip()]
    raise ShardError(f"{where}: labelled use needs a 'label' or 'labels' field in every sample's JSON")


def list_shards(pattern, labelled=True):
    """Shard pattern -> bat.data.AudioList whose files are named SHARD/KEY.EXT and whose `members`
    say where each clip's bytes are. Samples without audio or with unreadable JSON are skipped and
    listed in `skipped` (the loader's skip-and-count); a damaged tar keeps its samples up to the damage."""
    from bat.data import AudioList

    files, members, metas, skipped = [], [], [], []
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


def shard_layout(pattern) -> str:
    """"esc50" or "scv2" when the shards were written from that layout (their first sample's JSON says so),
    else "shards": what --task auto needs, read from one index (or one JSON member), not the whole list."""
    try:
        shard = expand_pattern(pattern)[0]
        samples, metas, _ = read_index(shard)
        key, parts = samples[0]
        meta = metas.get(key) or json.loads(read_member(shard, *parts["json"]))
        return meta.get("layout") or "shards"
    except (ShardError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError):
        return "shards"  # unreadable here: the data listing reports it in its own words


# ----------------------------------------------------------------------------------------- writing


def encode(path, segment=None) -> tuple[bytes, str]:
    """(bytes, extension) to store for one source file (or a (offset_s, duration_s) part of it)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        info = sf.info(path)
        if segment is None and ext == "flac":
            with open(path, "rb") as fh:
                return fh.read(), "flac"
        if segment is None and info.subtype not in LOSSLESS_TO_FLAC:
            with open(path, "rb") as fh:  # FLAC would change these samples: keep the file as it is
                return fh.read(), ext
        with sf.SoundFile(path) as fh:
            start, frames = (0, -1) if segment is None else (round(segment[0] * fh.samplerate),
                                                             round(segment[1] * fh.samplerate))
            fh.seek(start)
            data = fh.read(frames, dtype="int32", always_2d=True)
        subtype = info.subtype if info.subtype in LOSSLESS_TO_FLAC else "PCM_24"
        buf = io.BytesIO()
        sf.write(buf, data, info.samplerate, format="FLAC", subtype=subtype)
        return buf.getvalue(), "flac"
    except Exception as e:
        raise AudioError(path, f"cannot decode ({getattr(e, 'error_string', None) or e})") from e


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(src, out, shard_size=1000, labelled=None, stream=sys.stdout) -> list[str]:
    """Write the data set at `src` (any dataset path) as OUT/shard-000000.tar, ... when `out` is a folder
    (an existing one, or a path ending in a separator), else as OUT-000000.tar, OUT-000001.tar, ...;
    returns the shard paths. labelled=None: labelled when the source has labels."""
    from bat.data import DataError, list_dataset

    if shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    if labelled is None:
        try:
            items = list_dataset(src)
        except DataError:
            items = list_dataset(src, labelled=False)
    else:
        items = list_dataset(src, labelled=labelled)
    out = os.fspath(out)
    folder = os.path.isdir(out) or out.endswith(("/", os.sep))
    prefix = os.path.join(out, "shard") if folder else out
    existing = glob.glob(glob.escape(prefix) + "-[0-9]*.tar")
    if existing:
        raise ShardError(f"{existing[0]} exists: choose another OUT (this never overwrites shards)")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    n_shards = (len(items) + shard_size - 1) // shard_size
    width = max(6, len(str(n_shards - 1)))
    root = items.root if os.path.isdir(items.root) else os.path.dirname(os.path.abspath(items.root))
    paths, skipped = [], list(items.skipped)
    for s in range(n_shards):
        path = f"{prefix}-{s:0{width}d}.tar"
        tmp, metas = f"{path}.tmp{os.getpid()}", {}
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(s * shard_size, min(len(items), (s + 1) * shard_size)):
                seg = items.segments[i] if items.segments is not None else None
                try:
                    data, ext = encode(items.files[i], seg)
                except AudioError as e:
                    skipped.append((e.path, e.reason))
                    print(f"warning: skipped {e}", file=sys.stderr)
                    continue
                meta = {"path": os.path.relpath(os.path.abspath(items.files[i]), root)}
                if items.task == "multiclass":
                    meta["label"] = items.labels[i][0]
                elif items.task == "multilabel":
                    meta["labels"] = items.labels[i]
                for field_, values in (("fold", items.folds), ("split", items.splits), ("segment", items.segments)):
                    if values is not None and values[i] is not None:
                        meta[field_] = values[i]
                if items.quality != "HQ":
                    meta["quality"] = items.quality
                if items.source in ("esc50", "scv2"):  # read back as that layout: --fold, splits
                    meta["layout"] = items.source
                key = f"{i:09d}"
                metas[key] = meta
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        os.replace(tmp, path)
        write_index(path, metas)
        paths.append(path)
    pattern = paths[0] if len(paths) == 1 else f"{prefix}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar"
    print(f"wrote {len(items) - len(skipped) + len(items.skipped)} samples ({items.task}) in {len(paths)} "
          f"shard(s): '{pattern}'" + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""), file=stream)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bat.shards", description=(
        "Write a data set (folder, CSV manifest, ESC-50 or Speech Commands layout) as WebDataset tar shards: "
        "KEY.flac + KEY.json (labels) per sample. Read them back anywhere a dataset path is accepted, "
        "e.g. --data 'OUT-{000000..000009}.tar'."))
    p.add_argument("src", help="the data set: a folder of audio, a CSV manifest, ESC-50 or Speech Commands")
    p.add_argument("out", help="where the shards go: a folder (one that exists, or a path ending in /) gets "
                   "OUT/shard-000000.tar, OUT/shard-000001.tar, ...; anything else is a file prefix: "
                   "OUT-000000.tar, OUT-000001.tar, ... beside it")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--unlabelled", action="store_true", help="store audio only, even when the source has labels")
    a = p.parse_args(argv)
    from bat.data import DataError

    try:
        write_shards(a.src, a.out, a.shard_size, labelled=False if a.unlabelled else None)
    except (ShardError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
