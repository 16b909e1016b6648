"""Never hang, never lose a result, one line per mistake: the scripts fed malformed input.

Every case builds its own bad files and checkpoints, runs the real script in a subprocess under a
timeout it must not reach (a hang fails the test instead of blocking CI), and asserts the exit code
and that the last line on stderr is the one-line error, with no traceback anywhere.
"""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from bat.checkpoint import CheckpointError, atomic_save_safetensors, load_encoder, read_safetensors, save_encoder
from bat.files import load_state, save_state
from bat.model import Encoder, EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90  # far above what any case needs; reaching it means the script hung
TINY_PRETRAIN = ["--model", "tiny", "--target-frames", "64", "--batch-size", "2", "--views", "2", "--steps", "3"]


def run(*args, timeout=TIMEOUT):
    return run_many([args], timeout)[0]


def run_many(commands, timeout=TIMEOUT):
    """Run the scripts side by side (most of each run is Python and torch starting up); each must exit
    within `timeout` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for args in commands]
    results, t0 = [], time.time()
    try:
        for args, proc in zip(commands, procs):
            try:
                out, err = proc.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"hung (no exit within {timeout} s): {' '.join(map(str, args))}")
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def one_line_error(res, *words, code=2):
    """The run failed with `code`, its last stderr line is `error: ...` holding `words`, no traceback."""
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: "), res.stderr[-3000:]
    for w in words:
        assert w in last, last
    return last


def bad_audio(folder):
    """A labelled folder (two classes) of files that all fail in different ways."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        (folder / c / "noise.wav").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        (folder / c / "empty.mp3").write_bytes(b"")
        (folder / c / "junk.mp3").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        (folder / c / "text.flac").write_text("not audio at all\n")
    sf.write(folder / "a" / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    return folder


# ------------------------------------------------------------------------------------- pretrain.py


@pytest.mark.parametrize("workers", [0, 2])
def test_pretrain_gives_up_on_data_without_a_usable_clip(tmp_path, workers):
    res = run("pretrain.py", *TINY_PRETRAIN, "--data", bad_audio(tmp_path / "bad"), "--out", tmp_path / "run",
              "--workers", workers)
    one_line_error(res, "no usable clip", "all 9 file(s) were tried", "empty file (0 bytes)")


def test_pretrain_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    one_line_error(run("pretrain.py", *TINY_PRETRAIN, "--out", tmp_path / "file" / "run"), "Not a directory")


def test_pretrain_write_failing_mid_run_exits_with_its_workers(tmp_path):
    """The first checkpoint write fails while two DataLoader workers (which ignore SIGTERM) are running."""
    out = tmp_path / "run"
    (out / ".state.pt.partial" / "squatter").mkdir(parents=True)  # where state.pt's bytes go: a folder
    res = run("pretrain.py", *TINY_PRETRAIN, "--checkpoint-every", "2", "--log-every", "1", "--workers", "2", "--out", out)
    one_line_error(res, ".state.pt.partial", "Is a directory")
    assert json.loads((out / "log.jsonl").read_text().splitlines()[1])["step"] == 2  # it did train


PRETRAIN_FLAGS = [  # (flag, value, words the error line must hold)
    ("--steps", "0", ["--steps must be >= 1, got 0"]),
    ("--batch-size", "-2", ["--batch-size must be >= 1, got -2"]),
    ("--device", "cuda:99", ["--device cuda:99"]),
    ("--seed", "99999999999999999999", ["--seed must lie in [0, 4294967295], got 99999999999999999999"]),  # overflowed
]


def test_pretrain_bad_flag_values(tmp_path):
    runs = run_many([("pretrain.py", *TINY_PRETRAIN, flag, value, "--out", tmp_path / str(i))
                     for i, (flag, value, _) in enumerate(PRETRAIN_FLAGS)])
    for i, (res, (flag, value, words)) in enumerate(zip(runs, PRETRAIN_FLAGS)):
        one_line_error(res, *words)
        assert not (tmp_path / str(i)).exists(), flag  # refused before anything was written


# ------------------------------------------------------------------------------ probe_cgp.py, finetune.py


def good_audio(folder, n=3):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sf.write(folder / c / f"{i}.wav", 0.1 * rng.standard_normal(8000).astype(np.float32), 16000)
    return folder


def test_probe_and_finetune_give_up_on_data_without_a_usable_clip(tmp_path):
    """The audit's hang: every training file unreadable, the data loop took empty batches forever."""
    bad = bad_audio(tmp_path / "bad")
    common = ["--encoder", "random:tiny", "--train", bad, "--test", bad, "--steps", "3", "--batch-size", "2",
              "--workers", "0"]
    # --select none: the whole --train is the training set (--select auto would hold out a part of it)
    probe, fine = run_many([("probe_cgp.py", *common, "--no-cache", "--select", "none", "--out", tmp_path / "p"),
                            ("finetune.py", *common, "--out", tmp_path / "f")])
    for res in (probe, fine):
        one_line_error(res, f"no usable clip in --train {bad}", "all 9 file(s) were tried", "2 x empty file (0 bytes)")


def test_probe_counts_say_which_files_were_found_bad_and_which_never_read(tmp_path):
    """10 files, 4 of them bad, a run that reads only some: metrics.json tells the two apart."""
    data = good_audio(tmp_path / "data")
    bad = [data / "a" / "bad0.wav", data / "b" / "bad1.wav", data / "a" / "bad2.wav", data / "b" / "bad3.wav"]
    for p in bad:
        p.write_bytes(b"RIFF not really")
    test = good_audio(tmp_path / "test", n=1)
    res = run("probe_cgp.py", "--encoder", "random:tiny", "--train", data, "--test", test, "--steps", "1",
              "--batch-size", "2", "--workers", "0", "--no-cache", "--select", "none", "--out", tmp_path / "p")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    found = {p for p, _ in m["unreadable_files"]}
    assert m["skipped_files"] == len(found) and found <= {str(p) for p in bad}
    # one step of 2 clips: 1 or 2 good files read, the bad ones met on the way found, the rest never read
    assert 10 - len(found) - 2 <= m["unread_files"] <= 10 - len(found) - 1


PROBE_FLAGS = [  # (script, flag, value, words the error line must hold)
    ("probe_cgp.py", "--batch-size", "0", ["--batch-size must be >= 1, got 0"]),
    ("probe_cgp.py", "--prototypes", "-1", ["--prototypes must be >= 1, got -1"]),
    ("finetune.py", "--steps", "0", ["--steps must be >= 1, got 0"]),
    ("probe_cgp.py", "--seed", "-1", ["--seed must lie in [0, 4294967295], got -1"]),  # was numpy's traceback
    ("finetune.py", "--adam-beta2", "1", ["--adam-beta2 must lie in [0, 1), got 1.0"]),  # was AdamW's traceback
]


def test_probe_and_finetune_bad_flags_out_and_encoders(tmp_path):
    data = good_audio(tmp_path / "data")
    (tmp_path / "file").write_text("a file, not a folder")
    common = ["--train", data, "--steps", "1", "--workers", "0"]
    cases = [(script, "--encoder", "random:tiny", *common, flag, value, "--out", tmp_path / str(i))
             for i, (script, flag, value, _) in enumerate(PROBE_FLAGS)]
    cases += [(script, "--encoder", "random:tiny", *common, "--out", tmp_path / "file" / "run")
              for script in ("probe_cgp.py", "finetune.py")]
    bad = bad_checkpoints(tmp_path / "checkpoints")
    encoders = [bad["truncated"], bad["model_config = {dim: 32, not json"], "random:tinyy"]
    cases += [("probe_cgp.py", "--encoder", e, *common, "--out", tmp_path / "e") for e in encoders]
    runs = run_many(cases)
    for i, (res, (_, flag, value, words)) in enumerate(zip(runs, PROBE_FLAGS)):
        one_line_error(res, *words)
        assert not (tmp_path / str(i)).exists(), flag  # refused before anything was written
    for res in runs[len(PROBE_FLAGS):len(PROBE_FLAGS) + 2]:
        one_line_error(res, str(tmp_path / "file"), "Not a directory")
    for res, encoder in zip(runs[len(PROBE_FLAGS) + 2:], encoders):
        one_line_error(res, f"error: {encoder}: ")
    assert not (tmp_path / "e").exists()  # a run refused for its encoder leaves no empty --out folder behind


READ_A_FIFO = """import sys
from bat.audio import AudioError, load_audio
from bat.listing import _duration
from bat.tag import read_blocks
from bat.data import load_segment
from bat.shards import encode
for read in (load_audio, _duration, lambda p: read_blocks(p, 16000, 16000), lambda p: load_segment(p, 0.0, 1.0),
             encode):
    try:
        read(sys.argv[1])
    except AudioError as e:
        print(e)
"""


def test_a_fifo_named_wav_is_refused_without_being_opened(tmp_path):
    """libsndfile waits forever for a writer when it opens a FIFO: every reader asks for a regular file first."""
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    res = run("-c", READ_A_FIFO, fifo, timeout=60)
    assert res.stdout.splitlines() == [f"{fifo}: not a regular file (a pipe or device?)"] * 5, res.stderr[-3000:]


def test_probe_skips_a_fifo_and_refuses_a_manifest_that_is_not_utf8(tmp_path):
    data, test = good_audio(tmp_path / "data"), good_audio(tmp_path / "test", n=1)
    os.mkfifo(test / "a" / "pipe.wav")  # in --test: every test file is read
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes(f"path,label\n{data / 'a' / '0.wav'},caf\xe9\n".encode("latin-1"))
    common = ["--encoder", "random:tiny", "--steps", "1", "--batch-size", "2", "--workers", "0", "--no-cache",
              "--select", "none"]
    fifo, latin1 = run_many([("probe_cgp.py", *common, "--train", data, "--test", test, "--out", tmp_path / "p"),
                             ("probe_cgp.py", *common, "--train", manifest, "--out", tmp_path / "c")])
    assert fifo.returncode == 0 and "Traceback" not in fifo.stderr, fifo.stderr[-3000:]
    assert f"{test / 'a' / 'pipe.wav'}: not a regular file (a pipe or device?)" in fifo.stderr, fifo.stderr[-3000:]
    one_line_error(latin1, f"{manifest}: not UTF-8 text (byte 0xe9); save the CSV as UTF-8")


# ------------------------------------------------------------------------------------- checkpoints


def tiny_encoder():
    return Encoder(EncoderConfig(dim=32, depth=1, num_heads=2, chunk_patches=4))


def bad_checkpoints(folder):
    """{name: path} of files that must each be refused with a CheckpointError naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.safetensors"
    save_encoder(good, tiny_encoder())
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "header only": data[:8], "random bytes": os.urandom(4000),
             "empty": b""}
    out = {}
    for name, blob in files.items():
        out[name] = folder / f"{name.replace(' ', '_')}.safetensors"
        out[name].write_bytes(blob)
    state = {k: v.contiguous() for k, v in tiny_encoder().state_dict().items()}
    for key, value in (("model_config", "{dim: 32, not json"), ("frontend_config", "bat"),
                       ("model_config", json.dumps({"width": 32}))):
        p = folder / f"meta_{key}_{len(out)}.safetensors"
        meta = {"model_config": json.dumps(EncoderConfig(dim=32, depth=1, num_heads=2, chunk_patches=4).to_dict()),
                "frontend_config": json.dumps({"kind": "bat"}), key: value}
        save_file(state, str(p), metadata=meta)
        out[f"{key} = {value}"] = p
    pt = folder / "truncated.pt"
    torch.save(state, pt)
    pt.write_bytes(pt.read_bytes()[:1000])
    out["truncated .pt"] = pt
    return out


def test_every_bad_checkpoint_is_one_checkpoint_error_naming_the_file(tmp_path):
    for name, path in bad_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            load_encoder(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, (name, msg)
    with pytest.raises(CheckpointError, match=r"random:tinyy.*random:tiny, random:small, random:base"):
        load_encoder("random:tinyy")


# ------------------------------------------------------------------------------------- leftovers


KEEP_SAVING = """
import sys, torch
from bat.checkpoint import atomic_save_safetensors
tensors = {f"t{i}": torch.randn(1_000_000) for i in range(16)}  # 64 MB: a kill lands mid-write
while True:
    atomic_save_safetensors(tensors, sys.argv[1])
"""


def test_a_kill_mid_save_leaves_only_a_file_the_next_save_replaces(tmp_path):
    target = tmp_path / "encoder.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", KEEP_SAVING, str(target)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.time()
        while not (target.exists() and (tmp_path / ".encoder.safetensors.partial").exists()):
            assert proc.poll() is None and time.time() - t0 < TIMEOUT
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {p.name for p in tmp_path.iterdir()} <= {"encoder.safetensors", ".encoder.safetensors.partial"}
    atomic_save_safetensors({"x": torch.zeros(3)}, target)  # the next save of the same file
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]


ENFORCE_FAIL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch.save, disk full


def disk_full(*args, **kwargs):
    raise RuntimeError(ENFORCE_FAIL)


# `python -c DISK_FULL script.py flags...`: the script, run with torch.save failing as on a full disk
DISK_FULL = f"""import runpy, sys, torch
def disk_full(*args, **kwargs):
    raise RuntimeError({ENFORCE_FAIL!r})
torch.save = disk_full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_while_saving_a_state_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    save_state(target, {"step": 1})
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"^{target}: cannot write the training state .*the disk may be full$"):
        save_state(target, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"] and load_state(target) == {"step": 1}
    monkeypatch.undo()
    if os.path.exists("/dev/full"):  # a real full disk: the write fails inside torch.save, then again at close
        real_open = open
        monkeypatch.setattr("bat.files.open", lambda path, mode="r": real_open("/dev/full", mode), raising=False)
        with pytest.raises(OSError, match=f"^{target}: cannot write the training state .*the disk may be full$"):
            save_state(target, {"x": torch.zeros(100_000)})
        assert [p.name for p in tmp_path.iterdir()] == ["state.pt"] and load_state(target) == {"step": 1}


def test_a_full_disk_while_saving_safetensors_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    import bat.checkpoint
    from bat.cli import error_exit

    target = tmp_path / "probe.safetensors"
    atomic_save_safetensors({"w": torch.ones(4)}, target)
    real_write = bat.checkpoint.atomic_write

    @contextlib.contextmanager
    def full_disk(path, mode="wb"):
        with real_write(path, mode) as fh:
            yield FullDisk(fh)

    monkeypatch.setattr(bat.checkpoint, "atomic_write", full_disk)
    with pytest.raises(OSError) as info:
        atomic_save_safetensors({"w": torch.zeros(100_000)}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["probe.safetensors"]  # no partial file left
    assert torch.equal(read_safetensors(target)[0]["w"], torch.ones(4))
    with pytest.raises(SystemExit):
        error_exit(info.value)
    assert capsys.readouterr().err == f"error: {target}: No space left on device\n"


class FullDisk:
    """A file on a full disk: half the bytes land, then ENOSPC as write(2) reports it (naming no file)."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_scripts_on_a_full_disk_exit_with_one_line(tmp_path):
    data = good_audio(tmp_path / "data")
    fine, pre = run_many([
        ("-c", DISK_FULL, "finetune.py", "--encoder", "random:tiny", "--train", data, "--steps", "2",
         "--stop-after", "1", "--batch-size", "2", "--workers", "0", "--out", tmp_path / "f"),
        ("-c", DISK_FULL, "pretrain.py", *TINY_PRETRAIN, "--checkpoint-every", "1", "--workers", "0",
         "--out", tmp_path / "p")])
    for res, out in ((fine, tmp_path / "f"), (pre, tmp_path / "p")):
        one_line_error(res, f"{out / 'state.pt'}: cannot write the training state", "the disk may be full")
        assert not (out / ".state.pt.partial").exists()
