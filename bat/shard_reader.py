"""The shard reader: WebDataset-style tar shards (see bat.shards for the layout and the writer) read like a
folder. Indexes (SHARD.tar.idx or the tar headers), pattern expansion and one positional read per clip from
a shard file the process keeps open (up to half its open-file limit, the least recently used closed first).

Torch-free (numpy, soundfile, soxr through bat.audio) and beneath bat.listing, which turns a shard pattern
into an AudioList (bat.listing.list_shards); nothing here imports the listing, the torch side or the writer.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections import OrderedDict

import soundfile as sf

from bat.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, check_waveform, resample

# Audio member extensions, flac first (what bat.shards writes); a sample's first one present is its audio.
AUDIO_EXTS = tuple(sorted((e.lstrip(".") for e in AUDIO_EXTENSIONS), key=lambda e: e != "flac"))
BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ShardError(ValueError):
    """A shard path or pattern that cannot be used; the message is one line."""


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
    damaged or cut short (the samples before the damage are kept). Only the headers are read."""
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
            # tarfile stops quietly at an empty or short header anywhere past the first, so a shard cut at a
            # header boundary (an interrupted copy) would read as whole; a whole tar ends in two zero blocks.
            if os.path.getsize(path) - tar.offset < 2 * tarfile.BLOCKSIZE:
                bad = (path, f"damaged tar after {len(samples)} samples (no end-of-archive marker: cut short?)")
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
    indexed = load_index(path)
    if indexed is not None:
        return (*indexed, None)
    samples, bad = index_shard(path)  # no index, or not ours, or stale: read the tar itself
    return samples, {}, bad


def load_index(path):
    """(samples, {key: JSON}) from SHARD.tar.idx when it is an index of ours matching the tar's size, else None
    (no index, a stale one, or a file that is not one of ours)."""
    try:
        with open(f"{path}.idx", encoding="utf-8") as fh:
            index = json.load(fh)
        if index.get("format") == INDEX_FORMAT and index["tar_bytes"] == os.path.getsize(path):
            samples = [(key, {e: tuple(v) for e, v in parts.items()}) for key, parts, _ in index["samples"]]
            return samples, {key: meta for key, _, meta in index["samples"] if meta is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: JSON but not an object
        pass
    return None


_FDS: OrderedDict = OrderedDict()  # (pid, path) -> fd, least recently used first; each loader worker has its own


def open_shards_cap() -> int:
    """How many shard files a process keeps open: half its open-file limit (the other half is for the loader's
    pipes, sockets and the run's own files), at least 64. Loader workers are processes, each with its own limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no rlimits (Windows)
        return 64
    if soft == resource.RLIM_INFINITY or soft < 0:
        soft = 1 << 17
    return max(64, soft // 2)


def read_member(path, offset, size) -> bytes:
    """The bytes of one tar member: a positional read, no seek state shared across forked workers."""
    key = (os.getpid(), path)
    fd = _FDS.get(key)
    if fd is None:
        cap = open_shards_cap()  # the shards of a big run may be more than a process may open
        while len(_FDS) >= cap:
            os.close(_FDS.popitem(last=False)[1])
        fd = _FDS[key] = os.open(path, os.O_RDONLY)
    else:
        _FDS.move_to_end(key)
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with open(path, "rb") as fh:  # Windows: no pread
        fh.seek(offset)
        return fh.read(size)


def decode(data: bytes, name, sample_rate=SAMPLE_RATE, quality="HQ"):
    """Bytes of an audio file -> mono float32 at `sample_rate`, like bat.audio.load_audio."""
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(name, f"cannot decode ({getattr(e, 'error_string', None) or e})") from e
    y = resample(check_waveform(x.T, name), sr, sample_rate, quality)
    if y.size == 0:
        raise AudioError(name, "zero length after decoding")
    return y


def load_member(member, name, sample_rate=SAMPLE_RATE, quality="HQ"):
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
