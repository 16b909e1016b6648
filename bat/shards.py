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
import sys
import tarfile

import soundfile as sf

from bat.audio import AudioError, check_regular_file
from bat.listing import DataError, list_dataset
# The indexed reader is bat.shard_reader (beneath the listing); this module writes the shards.
from bat.shard_reader import INDEX_FORMAT, ShardError, index_shard

LOSSLESS_TO_FLAC = {"PCM_16", "PCM_24", "PCM_S8", "PCM_U8"}  # sample formats FLAC stores exactly


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



# ----------------------------------------------------------------------------------------- writing


def encode(path, segment=None) -> tuple[bytes, str]:
    """(bytes, extension) to store for one source file (or a (offset_s, duration_s) part of it)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    check_regular_file(path)  # a FIFO would block soundfile forever
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
    try:
        write_shards(a.src, a.out, a.shard_size, labelled=False if a.unlabelled else None)
    except (ShardError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
