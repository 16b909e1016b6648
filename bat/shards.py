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
with a stale one) are indexed from their headers, in every process of every run. Shards made elsewhere
get their .idx once with `python -m bat.shards --index 'data/as2m-{000000..002047}.tar'` (or a glob):
shards already indexed are kept, and damaged ones and any other file named SHARD.tar.idx are left alone.

Why a reader of our own and not the `webdataset` package: `webdataset` streams (an IterableDataset
with a shuffle buffer), so a run can no longer address a clip by its position, and pretrain.py's
exact resumption and process-independent batches (bat.pretraining.StreamBatches) would be lost.
Here the shards are indexed once, and a clip is then read with one positional read (`os.pread`) from a
shard file the worker keeps open.
That removes what stalls a multi-node run on millions of small files (an open/stat per clip on the
shared file system) and keeps every guarantee of the file-based path. What it does not give is
purely sequential reading: storage where random reads inside a big file are slow (object stores)
wants a streaming reader instead.

Audio is stored losslessly: integer PCM (most WAV/AIFF) becomes FLAC with the same samples, FLAC is
copied as it is, and anything FLAC cannot hold exactly (float WAV, MP3, OGG) is stored byte for byte
under its own extension; a CSV window (start_s/end_s) of such a file becomes a WAV of the window's
samples (float32 as the data layer reads them, or the source's own 32-bit integer / double samples).
Resampling happens when a clip is read, exactly as for the file. Shards of ESC-50 or Speech Commands
list as that layout again (folds, splits; class names sorted); shards are a source too (re-sharding,
e.g. to another --shard-size: their members are copied as they are).

A source is written with its labels when it has any: one whose labels cannot all be read (an empty
label, a file beside the class folders) is an error, not an unlabelled copy. Each shard is built under
a temporary name and claimed exclusively, so an interrupted run (Ctrl-C, SIGTERM, a full disk) leaves
only complete shards, and a second writer into the same OUT stops instead of overwriting. Each .idx
names the command that wrote it (source, shard size, task, item count): re-running the same command
keeps the complete shards and writes the rest; a different command into that OUT is refused.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import signal
import sys
import tarfile
import threading
import time

import soundfile as sf

from bat.audio import AudioError, check_regular_file
from bat.listing import DataError, NoLabels, list_dataset
# The indexed reader is bat.shard_reader (beneath the listing); this module writes the shards.
from bat.shard_reader import (INDEX_FORMAT, ShardError, expand_pattern, index_shard, is_shard_path, load_index,
                              read_member)

LOSSLESS_TO_FLAC = {"PCM_16", "PCM_24", "PCM_S8", "PCM_U8"}  # sample formats FLAC stores exactly
# A window (CSV start_s/end_s) of a file FLAC cannot hold exactly is stored as WAV: of the source's own samples
# where soundfile reads them exactly, else of the float32 samples the data layer reads from the source anyway.
WINDOW_AS_WAV = {"PCM_32": ("int32", "PCM_32"), "DOUBLE": ("float64", "DOUBLE")}  # subtype -> (dtype, subtype)


def write_index(tar_path, metas: dict, run, idx_path, samples=None) -> None:
    """The SHARD.tar.idx of a tar: every sample's member offsets and JSON (read back by read_index), and `run`:
    what identifies the command that wrote the shard (a re-run of that command keeps the shard).
    `samples`: the tar's index_shard samples when the caller has them already (an intact tar's)."""
    if samples is None:
        samples, bad = index_shard(tar_path)
        if bad:
            raise ShardError(f"{tar_path}: {bad[1]}")
    index = {"format": INDEX_FORMAT, "tar_bytes": os.path.getsize(tar_path), "run": run,
             "samples": [[key, parts, metas.get(key)] for key, parts in samples]}
    with open(idx_path, "w", encoding="utf-8") as fh:
        json.dump(index, fh, separators=(",", ":"))


# ----------------------------------------------------------------------------------------- writing


def encode(path, segment=None, member=None) -> tuple[bytes, str]:
    """(bytes, extension) to store for one source file, a (offset_s, duration_s) window of it, or a sample
    of shards (member = (shard, offset, size), when the source is shards)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if member is None:
        check_regular_file(path)  # a FIFO would block soundfile forever
    try:
        if member is not None:  # re-sharding: the stored bytes as they are
            data = read_member(*member)
            sf.info(io.BytesIO(data))  # what cannot be decoded is skipped, as a file is
            return data, ext
        info = sf.info(path)
        if segment is None and ext == "flac":
            with open(path, "rb") as fh:
                return fh.read(), "flac"
        if segment is None and info.subtype not in LOSSLESS_TO_FLAC:
            with open(path, "rb") as fh:  # FLAC would change these samples: keep the file as it is
                return fh.read(), ext
        flac = info.subtype in LOSSLESS_TO_FLAC
        # int32 is exact for integer PCM; libsndfile does not scale float samples read as integers (silence)
        dtype, subtype = ("int32", info.subtype) if flac else WINDOW_AS_WAV.get(info.subtype, ("float32", "FLOAT"))
        with sf.SoundFile(path) as fh:
            start, frames = (0, -1) if segment is None else (round(segment[0] * fh.samplerate),
                                                             round(segment[1] * fh.samplerate))
            fh.seek(start)
            data = fh.read(frames, dtype=dtype, always_2d=True)
        buf = io.BytesIO()
        sf.write(buf, data, info.samplerate, format="FLAC" if flac else "WAV", subtype=subtype)
        return buf.getvalue(), "flac" if flac else "wav"
    except Exception as e:
        raise AudioError(path, f"cannot decode ({getattr(e, 'error_string', None) or e})") from e


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same shards
    tar.addfile(info, io.BytesIO(data))


def _list_source(src, labelled):
    """The source's AudioList; labelled=None: with its labels when it has any. A source with labels that
    cannot be listed with them (an empty label, a file beside the class folders) is an error: writing it
    unlabelled would silently drop every label."""
    if labelled is not None:
        return list_dataset(src, labelled=labelled)
    try:
        return list_dataset(src)
    except NoLabels:
        return list_dataset(src, labelled=False)  # no labels to lose
    except DataError as e:
        try:
            list_dataset(src, labelled=False)
        except DataError:
            raise e from None  # unusable either way: no hint
        raise DataError(f"{e} (--unlabelled writes the audio without labels)") from None


def _meta(items, i, root) -> dict:
    """The JSON of sample i: its source path and labels (and fold, split, window, quality, layout)."""
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
    return meta


def _kept_shards(prefix, paths, run) -> dict:
    """{shard: samples} of the shards in OUT that an interrupted run of this same command completed (the .tar
    and its .idx naming this run); any other shard there is another command's, and this one stops."""
    kept, ours = {}, {os.path.basename(p) for p in paths}
    for path in sorted(glob.glob(glob.escape(prefix) + "-[0-9]*.tar")):
        try:
            with open(f"{path}.idx", encoding="utf-8") as fh:
                index = json.load(fh)
            complete = (os.path.basename(path) in ours and index["run"] == run
                        and index["tar_bytes"] == os.path.getsize(path))
        except (OSError, ValueError, KeyError, TypeError):
            complete = False
        if not complete:
            raise ShardError(f"{path} exists and is not a complete shard of this command: choose another OUT "
                             "(this never overwrites shards)")
        kept[path] = len(index["samples"])
    return kept


def _claim(tmp, path):
    """Give the finished shard its final name unless that name exists: os.replace would silently overwrite
    the shard of another writer into the same OUT."""
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        raise ShardError(f"{path} appeared while this was writing: another writer into the same OUT? "
                         "(this never overwrites shards)") from None
    except OSError:  # a file system without hard links: claim the name exclusively, then move in
        with open(path, "xb"):
            pass
        os.replace(tmp, path)
    else:
        os.remove(tmp)


def _stop_if_asked(stop):
    if stop is not None and stop.is_set():
        raise KeyboardInterrupt  # here, between samples: raised inside soundfile's callbacks it would be lost


def _write_shard(path, items, indices, root, run, skipped, stop=None) -> int:
    """Write items[indices] as the shard `path` and its .idx; returns how many samples it holds. Both are built
    under temporary names: an interrupted or failed write (Ctrl-C, a full disk) leaves nothing behind."""
    tmp, metas = f"{path}.tmp{os.getpid()}", {}
    idx_tmp = f"{tmp}.idx"
    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in indices:
                _stop_if_asked(stop)
                seg = items.segments[i] if items.segments is not None else None
                member = items.members[i] if items.members is not None else None
                try:
                    data, ext = encode(items.files[i], seg, member)
                except AudioError as e:
                    skipped.append((e.path, e.reason))
                    print(f"warning: skipped {e}", file=sys.stderr)
                    continue
                key = f"{i:09d}"
                metas[key] = _meta(items, i, root)
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(metas[key]).encode())
        _stop_if_asked(stop)  # the last sample may have been cut short by the signal
        write_index(tmp, metas, run, idx_tmp)
        _claim(tmp, path)
        try:  # at once: a .tar without its .idx would make a re-run refuse it as another command's
            os.replace(idx_tmp, f"{path}.idx")
        except BaseException:
            os.remove(path)
            raise
    finally:
        for leftover in (tmp, idx_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return len(metas)


def write_shards(src, out, shard_size=1000, labelled=None, stream=None, stop=None) -> list[str]:
    """Write the data set at `src` (any dataset path, shards included) as OUT/shard-000000.tar, ... when `out`
    is a folder (an existing one, or a path ending in a separator), else as OUT-000000.tar, OUT-000001.tar,
    ...; returns the shard paths. labelled=None: labelled when the source has labels.

    The writer is deterministic, so re-running the same command after an interruption keeps the shards it
    completed and writes the rest; shards of any other command are never overwritten. `stop`: a
    threading.Event; once it is set, the writer stops at the next sample with KeyboardInterrupt."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    items = _list_source(src, labelled)
    out = os.fspath(out)
    folder = os.path.isdir(out) or out.endswith(("/", os.sep))
    prefix = os.path.join(out, "shard") if folder else out
    n_shards = (len(items) + shard_size - 1) // shard_size
    width = max(6, len(str(n_shards - 1)))
    paths = [f"{prefix}-{s:0{width}d}.tar" for s in range(n_shards)]
    run = {"src": os.path.abspath(os.fspath(src)), "shard_size": shard_size, "task": items.task, "items": len(items)}
    kept = _kept_shards(prefix, paths, run)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    root = items.root if os.path.isdir(items.root) else os.path.dirname(os.path.abspath(items.root))
    written, samples, skipped = [], 0, list(items.skipped)
    for s, path in enumerate(paths):
        if path not in kept:
            samples += _write_shard(path, items, range(s * shard_size, min(len(items), (s + 1) * shard_size)),
                                    root, run, skipped, stop)
            written.append(path)
    if samples + sum(kept.values()) == 0:  # every file unreadable: shards of nothing would only mislead
        for path in written:
            os.remove(path)
            os.remove(f"{path}.idx")
        why = f": {len(skipped)} unreadable, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ShardError(f"{src}: no readable audio to write{why}")
    pattern = paths[0] if len(paths) == 1 else f"{prefix}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar"
    print((f"wrote {samples} samples ({items.task}) in {len(written)} shard(s)" if written else "nothing to write")
          + (f", kept {len(kept)} complete shard(s) of an earlier run" if kept else "") + f": '{pattern}'"
          + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""), file=stream or sys.stdout)
    return paths


# ---------------------------------------------------------------------------------------- indexing

# The `run` of an index written by --index: no writer's run (see _kept_shards), so `python -m bat.shards SRC OUT`
# never takes shards it did not write for its own.
INDEX_RUN = {"command": "index"}


def _sample_metas(tar_path, samples, stop=None) -> dict:
    """{key: JSON object} of the samples whose .json member the listing would read as a JSON object. Any other
    (unreadable, not an object) is left out of the index: the reader then reads that member itself and skips
    the sample in its own words, exactly as without an index."""
    metas = {}
    with open(tar_path, "rb") as fh:
        for key, parts in samples:
            _stop_if_asked(stop)
            if "json" not in parts:
                continue
            offset, size = parts["json"]
            fh.seek(offset)
            try:
                meta = json.loads(fh.read(size))  # bytes, as list_shards parses them (UTF-8/16/32)
            except Exception:  # noqa: BLE001 - whatever fails here fails the same way in the reader
                continue
            if isinstance(meta, dict):
                metas[key] = meta
    return metas


def _index_one(path, stop=None):
    """Write SHARD.tar.idx for one shard: (samples indexed, "indexed", None), else (0, what, why) with `what`
    "already indexed", "damaged", "stale index" or "not bat's .idx": left as it is."""
    idx = f"{path}.idx"
    if load_index(path) is not None:
        return 0, "already indexed", None
    if os.path.lexists(idx):  # never overwrite a file this did not write (a stale index of ours included)
        try:
            with open(idx, encoding="utf-8") as fh:
                stale = json.load(fh).get("format") == INDEX_FORMAT
        except (OSError, ValueError, AttributeError):
            stale = False
        if stale:
            why = f"{idx} is not a current index of this tar (stale or damaged): remove it to re-index"
            return 0, "stale index", why
        return 0, "not bat's .idx", f"{idx} exists and is not an index of bat's: left as it is"
    samples, bad = index_shard(path)
    if bad:  # the reader reports the damage each time it lists the shard; an index would hide it
        return 0, "damaged", bad[1]
    metas = _sample_metas(path, samples, stop)
    tmp = f"{idx}.tmp{os.getpid()}"  # in the same folder, so that os.replace is atomic
    try:
        write_index(path, metas, INDEX_RUN, tmp, samples)
        _stop_if_asked(stop)
        os.replace(tmp, idx)
    except OSError as e:
        raise ShardError(f"{idx}: cannot write the index ({e.strerror or e}); nothing written") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(samples), "indexed", None


def index_shards(pattern, stream=None, stop=None) -> tuple[list, list, list]:
    """Write the missing SHARD.tar.idx beside existing shards (e.g. made with the `webdataset` package), so
    that every process of every run reads two files per shard at start instead of every tar header. Returns
    (indexed, already indexed, [(shard, reason)] left as they are): a damaged tar, or a SHARD.tar.idx that is
    not a current index of ours (never overwritten). Each index is written under a temporary name in the
    shard's folder and renamed: an interruption or a write error leaves no partial index."""
    pattern = os.fspath(pattern)
    if not is_shard_path(pattern):
        raise ShardError(f"{pattern}: not a shard pattern (.tar files, e.g. 'data/train-{{000000..000099}}.tar')")
    start, n_samples = time.perf_counter(), 0
    indexed, kept, skipped, kinds = [], [], [], {}
    for path in dict.fromkeys(expand_pattern(pattern)):  # a glob may overlap a range: each shard once
        _stop_if_asked(stop)
        n, what, why = _index_one(path, stop)
        if what == "indexed":
            indexed.append(path)
            n_samples += n
        elif what == "already indexed":
            kept.append(path)
        else:
            skipped.append((path, why))
            kinds[what] = kinds.get(what, 0) + 1
            print(f"warning: skipped {path}: {why}", file=sys.stderr)
    seconds = time.perf_counter() - start
    why = f" ({', '.join(f'{n} {what}' for what, n in kinds.items())}; see the warnings)" if kinds else ""
    print(f"indexed {len(indexed)} shard(s) ({n_samples} samples in {seconds:.1f} s), {len(kept)} already indexed, "
          f"{len(skipped)} skipped{why}: '{pattern}'", file=stream or sys.stdout)
    return indexed, kept, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bat.shards", usage=(
        "python -m bat.shards [-h] [--shard-size N] [--unlabelled] SRC OUT\n"
        "       python -m bat.shards --index PATTERN"), description=(
        "Write a data set (folder, CSV manifest, ESC-50 or Speech Commands layout, shards) as WebDataset tar "
        "shards: KEY.flac + KEY.json (labels) per sample. Read them back anywhere a dataset path is accepted, "
        "e.g. --data 'OUT-{000000..000009}.tar'. Interrupted? Run the same command again: it keeps the complete "
        "shards and writes the rest. With --index: write the missing SHARD.tar.idx of existing shards instead."))
    p.add_argument("src", nargs="?", metavar="SRC", help="the data set: a folder of audio, a CSV manifest, "
                   "ESC-50 or Speech Commands, or shards (to re-shard them)")
    p.add_argument("out", nargs="?", metavar="OUT", help="where the shards go: a folder (one that exists, or a "
                   "path ending in /) gets OUT/shard-000000.tar, OUT/shard-000001.tar, ...; anything else is a "
                   "file prefix: OUT-000000.tar, OUT-000001.tar, ... beside it")
    p.add_argument("--shard-size", type=int, default=None, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--unlabelled", action="store_true", help="store audio only, even when the source has labels")
    p.add_argument("--index", metavar="PATTERN", help="instead of writing shards: write the missing SHARD.tar.idx "
                   "beside existing shards (e.g. made with the webdataset package; 'data/x-{000000..000099}.tar' "
                   "or a glob), once, so that runs start without reading every tar header. Shards already "
                   "indexed are kept, damaged ones and any other file named SHARD.tar.idx left as they are")
    a = p.parse_args(argv)
    if a.index is not None and (a.src is not None or a.shard_size is not None or a.unlabelled):
        print("error: --index PATTERN takes no SRC, OUT, --shard-size or --unlabelled", file=sys.stderr)
        return 2
    if a.index is None and a.out is None:
        print("error: SRC and OUT are required to write shards (or --index PATTERN to index existing shards)",
              file=sys.stderr)
        return 2
    stop, received = threading.Event(), []

    def request_stop(signum, frame):  # Ctrl-C, or a scheduler's SIGTERM: stop at the next sample, cleaning up
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: at once
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if a.index is not None:
            index_shards(a.index, stop=stop)
        else:
            write_shards(a.src, a.out, 1000 if a.shard_size is None else a.shard_size,
                         labelled=False if a.unlabelled else None, stop=stop)
    except KeyboardInterrupt:  # one line, and 128 + the signal (130 for Ctrl-C), as the scripts
        print("stopped: the indexes written are kept; re-run the same command to index the rest" if a.index
              else "stopped: the complete shards are kept; re-run the same command to write the rest", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    except (ShardError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
