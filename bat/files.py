"""Files a run writes: atomically (readers only ever see the old or the complete new file), and
training states that load without running pickled code (`save_state` / `load_state`, `write_json`)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch


def partial_path(path) -> Path:
    """Where `atomic_write` puts the bytes of `path` until they are complete: `.NAME.partial`."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open `path` for writing so that readers only ever see the old or the complete new file.

    The data goes to `.NAME.partial` in the same folder, is fsynced and renamed over `path`. The name
    is fixed (not random), so a write killed midway leaves one file that the next save of `path`
    overwrites, and `remove_stale_temporaries` can find; an error during the write removes it at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def save_state(path, state: dict) -> None:
    """torch.save, atomically (see `atomic_write`): a crash or kill at any moment leaves either the old
    or the new file, never a torn one. Keep `state` to tensors, numbers, strings, lists and dicts so
    `load_state` can refuse pickled code."""
    try:
        with atomic_write(path) as fh:
            torch.save(state, fh)
    except (RuntimeError, OSError) as e:
        # A full disk surfaces as torch's RuntimeError "[enforce fail at inline_container.cc...] unexpected pos",
        # or as the OSError of closing the file, which names no file: either way, say which file and why.
        if isinstance(e, OSError) and e.filename:
            raise
        raise OSError(f"{path}: cannot write the training state ({first_line(e)}); the disk may be full") from None


def fsync_dir(folder) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_state(path, map_location="cpu", mmap: bool = False) -> dict:
    """A state written by save_state, loaded with weights_only=True (no pickled code runs). mmap: map the
    tensors instead of reading them (cheap; a torn file is still refused, its index at the end is missing)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"{path}: cannot read the training state ({first_line(e)}); delete it to start over") from None


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line (torch's often carry a C++ backtrace), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def remove_stale_temporaries(path) -> None:
    """Delete the `.NAME.partial` (and older `.NAME.tmp*`) files a killed writer left next to `path`;
    they are never read."""
    path = Path(path)
    for tmp in [partial_path(path), *path.parent.glob(f".{path.name}.tmp*")]:
        with contextlib.suppress(OSError):
            tmp.unlink()


def json_safe(obj):
    """obj with every non-finite float (NaN, inf) replaced by None: JSON has no NaN, and a file with
    `NaN` in it is not valid JSON for most readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    """Write JSON atomically (see `atomic_write`); NaN and inf are written as null."""
    with atomic_write(path, "w") as fh:
        json.dump(json_safe(obj), fh, indent=2, allow_nan=False)


def written_by(path, script: str, legacy_key: str | None = None) -> bool | None:
    """Whether the JSON file `path` (a run's config.json, an export's tagger.json) says `script` wrote it:
    its "written_by", or for files of earlier versions, which carry none, `legacy_key`, a key only that
    script's configurations hold. None: there is no such file; False: another's, or not a run's file."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable or not JSON
        return False
    if not isinstance(config, dict):
        return False
    if "written_by" in config:
        return config["written_by"] == script
    return legacy_key is not None and legacy_key in config


def claim_out(out, script: str, names, config: str = "config.json", legacy_key: str | None = None,
              settings: dict | None = None, may_change=(), results=()) -> None:
    """Refuse to write into the folder `out` when it already holds one of `names` (paths inside it) that a run
    of `script` did not write: a run never overwrites files it did not create. They are a run's when the
    folder's `config` says `script` wrote it (`written_by`), so re-running or resuming a run works.

    With `settings` (the new run's, as its config file stores them): also refuse when the folder holds a
    finished result (one of `results`) of a run whose settings differ, other than `may_change`'s."""
    out = Path(out)
    present = [n for n in names if os.path.lexists(out / n)]
    if present and not written_by(out / config, script, legacy_key):
        raise FileExistsError(f"{out} holds {', '.join(present)}, not written by {script}: choose another --out "
                              "(a run never overwrites files it did not create)")
    if settings is not None and any(os.path.lexists(out / n) for n in results):
        changed = changed_settings(out / config, settings, may_change)
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed[:4]) + (", ..." if len(changed) > 4 else "")
            raise FileExistsError(f"{out} holds a finished {script} run with other settings ({flags}): choose "
                                  "another --out, or delete that run to redo it here")


def changed_settings(config_path, settings: dict, may_change=()) -> list:
    """The keys of `settings` whose value differs from the one in the JSON file `config_path` (keys the
    file lacks, from older versions, and those in `may_change` are not compared)."""
    try:
        saved = json.loads(Path(config_path).read_text())
    except (OSError, ValueError):
        return []
    same = lambda v: json.loads(json.dumps(json_safe(v), default=str))  # noqa: E731  (tuples, paths as JSON has them)
    return sorted(k for k, v in settings.items()
                  if k not in may_change and isinstance(saved, dict) and k in saved and same(v) != saved[k])


_HELD_LOCKS = {}  # folder -> (open descriptor, its (st_dev, st_ino)): a lock lasts as long as its process


def lock_out(out, create: bool = True) -> None:
    """Lock the folder `out` for this process (creating it, unless `create` is False and it does not exist
    yet), or refuse when another process holds it: two copies of one command (a job submitted twice)
    would interleave their logs and checkpoints. Locking a folder this process holds already is a no-op."""
    try:
        import fcntl
    except ImportError:  # Windows: runs go unlocked
        return
    key = os.path.realpath(out)
    if key in _HELD_LOCKS or (not create and not os.path.isdir(out)):
        return
    os.makedirs(out, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FileExistsError(f"{out} is being written by another run right now: wait for it to end, or "
                                  "choose another --out") from None
        return  # a file system without locks (some network mounts): go on unlocked
    st = os.fstat(fd)
    _HELD_LOCKS[key] = (fd, (st.st_dev, st.st_ino))


def _forget_locks_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock; if it outlived a killed parent for a few
    # seconds, the re-run would be refused. Its copy of the descriptor is closed; the parent's holds the lock.
    # Only a descriptor that is still the locked folder: closing a number reused for another file (the
    # pipe multiprocessing watches the child by) would break the child.
    for fd, ident in _HELD_LOCKS.values():
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == ident:
                os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):  # POSIX (Windows has no fork, nor flock)
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def unlock_all() -> None:
    """Release the folders this process locked (a script's main() returns; called from Python, the next
    run in the same process may use them again)."""
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.popitem()[1][0])


def check_writable(folder, out=None) -> None:
    """Raise OSError naming the folder unless files can be created in `folder` or, while it does not exist,
    in its nearest existing parent: a read-only disk or folder is found before any work, and a run that
    fails on its input leaves no empty --out folder behind (the first file written creates it)."""
    out = folder if out is None else out  # what the message calls --out
    nearest = os.path.abspath(folder)
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise NotADirectoryError(errno.ENOTDIR, f"Not a directory (--out {out} lies under it)", nearest)
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (--out {out} cannot be written there)", nearest) from None


def append_jsonl(path, record: dict) -> None:
    """Append one JSON object as a line (a run's log.jsonl)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    """Every line of a JSONL file ([] when there is none)."""
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def truncate_jsonl(path, step: int) -> None:
    """Drop the lines whose "step" is past `step` (a killed run may have logged beyond the checkpoint it
    resumes from), and lines torn by the kill, atomically."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if ln.strip() and json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError):
            pass  # a line torn by a kill
    with atomic_write(path, "w") as fh:
        fh.write("".join(ln + "\n" for ln in keep))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(settings: dict, may_change=()) -> str:
    """A short hash of the settings a saved result depends on; those in `may_change` (output folder,
    worker count, ...) are left out, so a re-run that changes only them still finds its results."""
    kept = {k: v for k, v in settings.items() if k not in may_change}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
