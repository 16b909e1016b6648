"""WebDataset shards (bat.shards): written from a folder / CSV they yield, through the data layer, the
clips and labels of the source; bad samples are skipped and counted; pretrain.py and finetune.py run
from them under torchrun with 2 processes, and a resumed sharded pretraining run is exact."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import pretrain
import probe_cgp
from bat import demo
from bat.data import AudioDataset, SkipLog, collate
from bat.listing import DataError, durations, list_dataset
from bat.shard_reader import expand_pattern, index_shard
from bat.shards import main as shards_main
from bat.tasks import resolve_task

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The demo classes plus the formats the writer treats differently: 44.1 kHz stereo PCM (-> FLAC),
    float WAV (kept as WAV), 24-bit FLAC (copied)."""
    root = tmp_path_factory.mktemp("src") / "audio"
    demo.write_demo_dataset(root, clips_per_class=2, seconds=1.0)
    rng = np.random.default_rng(0)
    sf.write(root / "tone" / "stereo_44k.wav", rng.standard_normal((30000, 2)) * 0.1, 44100, subtype="PCM_16")
    sf.write(root / "noise_burst" / "float.wav", (rng.standard_normal(9000) * 0.1).astype(np.float32), 16000,
             subtype="FLOAT")
    sf.write(root / "chirp" / "x24.flac", rng.standard_normal(12000) * 0.1, 22050, subtype="PCM_24")
    return root


def write(src, out, size):
    assert shards_main([str(src), str(out), "--shard-size", str(size)]) == 0
    return sorted(str(p) for p in Path(out).parent.glob(Path(out).name + "-*.tar"))


def pattern_of(paths):
    return paths[0][:-10] + "{000000..%06d}.tar" % (len(paths) - 1)


def same_as_source(a, b):
    assert (len(a), a.classes, a.labels, a.task) == (len(b), b.classes, b.labels, b.task)
    da, db = AudioDataset(a), AudioDataset(b)
    for i in range(len(a)):
        x, y = da[i], db[i]
        assert torch.equal(x.waveform, y.waveform), a.files[i]
        assert torch.equal(torch.as_tensor(x.target), torch.as_tensor(y.target)), a.files[i]
    assert np.allclose(durations(a), durations(b))


def test_shards_of_a_folder_yield_its_clips_and_labels(folder, tmp_path):
    paths = write(folder, tmp_path / "sh" / "train", 4)
    items = list_dataset(folder)
    assert len(paths) == (len(items) + 3) // 4
    with tarfile.open(paths[0]) as tar:  # WebDataset layout: KEY.ext + KEY.json
        names = tar.getnames()
    assert names[:2] == ["000000000.flac", "000000000.json"]
    shards = list_dataset(pattern_of(paths))
    assert shards.source == "shards" and not shards.skipped
    same_as_source(items, shards)
    exts = {f.rsplit(".", 1)[1] for f in shards.files}
    assert exts == {"flac", "wav"}  # float WAV kept as it is: FLAC would change its samples
    unlabelled = list_dataset(pattern_of(paths), labelled=False)
    assert unlabelled.task == "unlabelled" and unlabelled.files == shards.files
    before = [os.stat(p).st_mtime_ns for p in paths]
    assert shards_main([str(folder), str(tmp_path / "sh" / "train")]) == 2  # never overwrites
    assert [os.stat(p).st_mtime_ns for p in paths] == before


def test_out_is_a_folder_when_it_exists_or_ends_in_a_slash_else_a_prefix(folder, tmp_path):
    """python -m bat.shards SRC OUT: an existing folder or a path ending in / holds OUT/shard-NNNNNN.tar;
    any other OUT is a file prefix (OUT-NNNNNN.tar beside it); --help says which is which."""
    (tmp_path / "existing").mkdir()
    assert shards_main([str(folder), str(tmp_path / "existing"), "--shard-size", "100"]) == 0
    assert [p.name for p in (tmp_path / "existing").iterdir() if p.suffix == ".tar"] == ["shard-000000.tar"]
    assert shards_main([str(folder), str(tmp_path / "new") + "/", "--shard-size", "100"]) == 0
    assert (tmp_path / "new" / "shard-000000.tar").is_file()
    assert shards_main([str(folder), str(tmp_path / "prefix"), "--shard-size", "100"]) == 0
    assert (tmp_path / "prefix-000000.tar").is_file() and not (tmp_path / "prefix").exists()
    help_text = subprocess.run([sys.executable, "-m", "bat.shards", "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=60).stdout
    help_text = " ".join(help_text.split())  # argparse wraps lines
    assert "ending in /" in help_text and "file prefix" in help_text


def test_shards_of_a_multilabel_csv(folder, tmp_path):
    files = list_dataset(folder).files[:5]
    rows = ["path,labels"] + [f"{f},{'a;b' if i % 2 else ('' if i == 4 else 'b')}" for i, f in enumerate(files)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    paths = write(tmp_path / "m.csv", tmp_path / "ml", 2)
    a, b = list_dataset(tmp_path / "m.csv"), list_dataset(pattern_of(paths))
    assert b.task == "multilabel" and b.labels[4] == []
    same_as_source(a, b)
    assert np.array_equal(a.targets(), b.targets())


def test_shards_of_esc50_keep_its_folds(tmp_path):
    from synth_sets import make_esc50

    root = make_esc50(tmp_path / "ESC-50")
    paths = write(root, tmp_path / "esc", 7)
    a, b = list_dataset(root), list_dataset(pattern_of(paths))
    assert (b.source, b.folds, b.quality) == ("esc50", a.folds, "VHQ")
    assert sorted(a.classes) == b.classes and a.labels == b.labels
    (a_train, a_test), (b_train, b_test) = a.fold_split(1), b.fold_split(1)
    assert a_test.labels == b_test.labels and len(a_train) == len(b_train)
    assert resolve_task("auto", pattern_of(paths)).name == "esc50"  # --task auto reads the layout from the shards
    assert resolve_task("auto", pattern_of(write(tmp_path / "ESC-50" / "audio", tmp_path / "plain", 50))).name == "generic"


def corrupt_member(shard, index):
    """Overwrite the audio bytes of the index-th sample of a shard, keeping the tar intact."""
    samples, _ = index_shard(shard)
    key, parts = samples[index]
    ext = next(e for e in parts if e != "json")
    offset, size = parts[ext]
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * size)
    return f"{shard}/{key}.{ext}"


def test_a_corrupt_sample_is_skipped_and_counted_and_a_truncated_shard_keeps_its_head(folder, tmp_path):
    paths = write(folder, tmp_path / "c", 6)
    bad = corrupt_member(paths[1], 2)
    items = list_dataset(pattern_of(paths))
    ds = AudioDataset(items)
    batch = collate([ds[i] for i in range(len(ds))])
    assert len(batch) == len(ds) - 1 and [p for p, _ in batch.skipped] == [bad]
    log = SkipLog()
    log.add(batch.skipped)
    log.add(batch.skipped)
    assert log.count == 1
    size = os.path.getsize(paths[0])
    with open(paths[0], "r+b") as fh:  # cut the first shard inside its 4th sample's header
        fh.truncate(size // 2 + 100)
    items = list_dataset(pattern_of(paths))
    assert any(p == paths[0] and "damaged tar" in r for p, r in items.skipped)
    assert 0 < sum(f.startswith(paths[0]) for f in items.files) < 6


def test_the_index_beside_a_shard_is_used_and_a_stale_one_ignored(folder, tmp_path):
    paths = write(folder, tmp_path / "ix", 100)
    with_index = list_dataset(paths[0])
    idx = Path(paths[0] + ".idx")
    index = json.loads(idx.read_text())
    assert index["samples"][0][2]["label"] == with_index.labels[0][0]
    idx.rename(tmp_path / "moved.idx")
    from_headers = list_dataset(paths[0])
    assert (from_headers.files, from_headers.members, from_headers.labels) == \
        (with_index.files, with_index.members, with_index.labels)
    index["tar_bytes"] += 512  # the tar changed since: the index must not be trusted
    index["samples"][0][2]["label"] = "wrong"
    idx.write_text(json.dumps(index))
    assert list_dataset(paths[0]).labels == with_index.labels


def test_bad_patterns_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"2 of 2 shards missing") as e:
        list_dataset(str(tmp_path / "x-{000..001}.tar"))
    assert "\n" not in str(e.value)
    (tmp_path / "a-0.tar").write_bytes(b"")
    assert expand_pattern(str(tmp_path / "a-{0..0}.tar")) == [str(tmp_path / "a-0.tar")]
    with pytest.raises(DataError, match="no audio samples"):
        list_dataset(str(tmp_path / "a-0.tar"), labelled=False)
    with pytest.raises(DataError, match="empty range"):
        list_dataset(str(tmp_path / "a-{3..1}.tar"))


def test_probe_on_shards_equals_probe_on_the_folder(folder, tmp_path):
    train = write(folder, tmp_path / "tr", 5)
    metrics = []
    for data in (str(folder), pattern_of(train)):
        cfg = probe_cgp.Config(encoder="random:tiny", train=data, test=data, out=str(tmp_path / f"p{len(metrics)}"),
                               prototypes=8, steps=4, batch_size=8, workers=0)
        metrics.append(probe_cgp.main(cfg))
    assert metrics[0]["num_test"] == metrics[1]["num_test"] == len(list_dataset(folder))
    for k in ("accuracy", "macro_f1", "mAP"):
        assert metrics[0][k] == metrics[1][k], k


SMALL = ["--model", "tiny", "--target-frames", "64", "--batch-size", "4", "--views", "2", "--log-every", "1"]


def test_slow_e2e_torchrun_pretraining_and_finetuning_from_shards(folder, tmp_path):
    paths = write(folder, tmp_path / "sh", 4)
    bad = corrupt_member(paths[2], 1)
    out = tmp_path / "pre"
    # 10 steps of 4 clips from 15 samples: each one, the corrupt one too, is drawn at least twice
    res = subprocess.run([*TORCHRUN, str(ROOT / "pretrain.py"), *SMALL, "--data", pattern_of(paths), "--steps", "10",
                          "--checkpoint-every", "10", "--workers", "1", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 10 and log[-1]["skipped_files"] == 1 and np.isfinite(log[-1]["loss"])
    assert "1 file(s) skipped" in res.stdout and bad in res.stderr
    assert "2 process(es)" in res.stdout
    res = subprocess.run([*TORCHRUN, str(ROOT / "finetune.py"), "--encoder", str(out / "encoder.safetensors"),
                          "--train", pattern_of(paths), "--test", pattern_of(paths), "--steps", "2",
                          "--batch-size", "4", "--warmup-steps", "1", "--workers", "0", "--out", str(tmp_path / "ft")],
                         capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["num_test"] == len(list_dataset(folder)) - 1 and metrics["skipped_files"] == 1


def test_slow_e2e_torchrun_probing_from_shards_equals_one_process(folder, tmp_path):
    """Two processes share the encoding (each caches every other clip) and average the head's gradients:
    with dropout off, the probe equals one process's to float rounding, --select auto's held-out choice
    (the generic task's default: lr grid, early stopping) included; streaming (--no-cache) runs too."""
    from safetensors.torch import load_file

    paths = write(folder, tmp_path / "sh", 4)
    bad = corrupt_member(paths[1], 0)
    data = pattern_of(paths)
    flags = ["--encoder", "random:tiny", "--train", data, "--test", data, "--prototypes", "8", "--steps", "6",
             "--batch-size", "6", "--dropout", "0", "--workers", "0", "--select", "auto"]
    single = probe_cgp.main(probe_cgp.parse_config([*flags, "--out", str(tmp_path / "one")]))
    assert single["selection"]["lr_grid"].keys() == {"0.001", "0.003", "0.01"}
    for name, extra in (("two", []), ("two-stream", ["--no-cache", "--workers", "1"])):
        res = subprocess.run([*TORCHRUN, str(ROOT / "probe_cgp.py"), *flags, *extra, "--out", str(tmp_path / name)],
                             capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("wrote ") == 1 and "over 2 processes" in res.stdout  # rank 0 alone reports
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["num_test"] == single["num_test"] == len(list_dataset(folder)) - 1
        assert metrics["skipped_files"] == 1 and metrics["unreadable_files"][0][0] == bad
        assert metrics["selection"]["lr_grid"].keys() == single["selection"]["lr_grid"].keys()
        assert metrics["held_out"]["lr"] == metrics["selection"]["lr"]
        # the corrupt member falls in the held-out part: cached or streamed, only readable clips are counted
        assert metrics["held_out"]["num_clips"] == single["held_out"]["num_clips"]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["num_train"] == single["num_train"] and metrics["accuracy"] == single["accuracy"]
    for k in ("lr", "step", "lr_grid", "stopped_at"):
        assert metrics["selection"][k] == single["selection"][k], k
    a, b = load_file(str(tmp_path / "one" / "probe.safetensors")), load_file(str(tmp_path / "two" / "probe.safetensors"))
    heads = [k for k in a if k.startswith("head.")]
    assert heads and all(torch.allclose(a[k], b[k], atol=1e-5) for k in heads)


CLEANUP_SCRIPT = """
import os
import sys
import time
import torch
from bat.distributed import all_gather_object, cleanup_distributed, setup_distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(n.startswith(("gloo", "pt_gloo")) for n in names)

rank, world, _, _ = setup_distributed("cpu")
head = torch.nn.Linear(3, 2)
opt = torch.optim.AdamW(head.parameters())
head(torch.ones(1, 3)).sum().backward()
opt.step()  # the first step imports torch._dynamo, and with it torch.distributed.nn.functional
all_gather_object(rank)
running = gloo_threads()
cleanup_distributed()
deadline = time.time() + 10  # freed workers exit at once; a loaded machine may take a moment to schedule them
while gloo_threads() and time.time() < deadline:  # a group kept alive keeps its threads for good
    time.sleep(0.05)
sys.stdout.write(f"rank {rank}: gloo threads {running} -> {gloo_threads()}\\n")  # one write: ranks share the pipe
sys.stdout.flush()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_slow_e2e_torchrun_cleanup_frees_the_process_group(tmp_path):
    """cleanup_distributed frees the gloo group, joining its worker threads while the interpreter is alive.
    A group kept alive past destroy_process_group (torch.distributed.nn.functional's `group=WORLD` defaults,
    when that module is first imported after init_process_group) left a worker that still held the last
    collective's tensors to take the GIL during the interpreter's shutdown: std::terminate, SIGABRT."""
    script = tmp_path / "cleanup.py"
    script.write_text(CLEANUP_SCRIPT)
    res = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    # both ranks print to torchrun's one pipe; match the reports wherever they landed
    found = sorted(re.findall(r"rank (\d): gloo threads (\d+) -> (\d+)", res.stdout))
    assert [r for r, _, _ in found] == ["0", "1"], res.stdout
    for rank, before, after in found:
        assert int(before) > 0 and int(after) == 0, res.stdout


def test_resumed_sharded_pretraining_logs_the_losses_of_an_uninterrupted_run(folder, tmp_path):
    """Warm-up LR does not depend on --steps, so 4 steps then a resume to 8 must log what 8 steps do."""
    data = pattern_of(write(folder, tmp_path / "sh", 3))
    common = [*SMALL, "--data", data, "--micro-batch-size", "2", "--warmup-steps", "100", "--checkpoint-every", "4"]
    logs = []
    for name, runs in (("straight", [("8", "0")]), ("resumed", [("4", "1"), ("8", "1")])):
        for steps, workers in runs:
            cfg = pretrain.parse_config([*common, "--steps", steps, "--workers", workers, "--out", str(tmp_path / name)])
            assert pretrain.main(cfg) == 0
        logs.append([json.loads(ln) for ln in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    assert [r["step"] for r in logs[1]] == list(range(1, 9))
    for a, b in zip(*logs):
        for k in ("loss", "loss_global", "loss_local", "lr", "target_std", "pred_std"):
            assert a[k] == b[k], (a["step"], k)


# ------------------------------------------------------------------------------ the writer's failure modes


def tars(out_dir):
    return sorted(p.name for p in Path(out_dir).iterdir() if ".tar" in p.name)


def one_error_line(err):
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_the_writer_drops_labels_only_when_the_source_has_none(folder, tmp_path, capsys):
    """A labelled source with one bad row or one stray file is refused with the reason and a hint, never
    written unlabelled; a CSV without a label column or a flat folder is written unlabelled."""
    files = list_dataset(folder).files[:4]
    rows = [f"{f},{'' if i == 2 else 'dog'}" for i, f in enumerate(files)]  # one empty label
    (tmp_path / "bad.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    (tmp_path / "stray").mkdir()
    sf.write(tmp_path / "stray" / "loose.wav", np.zeros(1600, np.float32), 16000)
    for f in files[:2]:
        (tmp_path / "stray" / "dog").mkdir(exist_ok=True)
        (tmp_path / "stray" / "dog" / Path(f).name).write_bytes(Path(f).read_bytes())
    for src, reason in ((tmp_path / "bad.csv", "empty 'label'"), (tmp_path / "stray", "subfolder per class")):
        capsys.readouterr()
        assert shards_main([str(src), str(tmp_path / "out") + "/"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert reason in line and "--unlabelled" in line
        assert not (tmp_path / "out").exists() or tars(tmp_path / "out") == []
    (tmp_path / "plain.csv").write_text("path\n" + "".join(f"{f}\n" for f in files))
    (tmp_path / "flat").mkdir()
    for f in files:
        (tmp_path / "flat" / Path(f).name).write_bytes(Path(f).read_bytes())
    for src in (tmp_path / "plain.csv", tmp_path / "flat"):
        paths = write(src, tmp_path / f"{src.stem}_shards", 100)
        assert len(list_dataset(paths[0], labelled=False)) == 4
        with pytest.raises(DataError, match="--unlabelled"):  # the shards hold no labels either
            list_dataset(paths[0])


def test_an_interrupted_writer_leaves_no_temporary_file_and_the_same_command_resumes(folder, tmp_path, monkeypatch,
                                                                                     capsys):
    import bat.shards

    reference = write(folder, tmp_path / "ref" / "x", 4)
    encode, calls = bat.shards.encode, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 10:  # Ctrl-C inside the third shard
            os.kill(os.getpid(), signal.SIGINT)
        return encode(*args)

    monkeypatch.setattr(bat.shards, "encode", interrupted)
    out = tmp_path / "run" / "x"
    capsys.readouterr()
    try:
        assert shards_main([str(folder), str(out), "--shard-size", "4"]) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped bat.shards.main")
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "re-run" in err
    assert tars(out.parent) == ["x-000000.tar", "x-000000.tar.idx", "x-000001.tar", "x-000001.tar.idx"]
    before = [os.stat(p).st_mtime_ns for p in sorted(out.parent.glob("*.tar"))]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bat.shards, "encode", disk_full)
    assert shards_main([str(folder), str(out), "--shard-size", "4"]) == 2
    assert "No space left" in one_error_line(capsys.readouterr().err)
    assert len(tars(out.parent)) == 4  # the complete shards stay, nothing half-written beside them

    monkeypatch.setattr(bat.shards, "encode", encode)
    assert shards_main([str(folder), str(out), "--shard-size", "4"]) == 0  # the same command: resumes
    assert "kept 2" in capsys.readouterr().out
    done = sorted(str(p) for p in out.parent.glob("*.tar"))
    assert [os.stat(p).st_mtime_ns for p in done[:2]] == before  # the complete shards were not rewritten
    assert [Path(p).read_bytes() for p in done] == [Path(p).read_bytes() for p in reference]
    same_as_source(list_dataset(folder), list_dataset(pattern_of(done)))
    assert shards_main([str(folder), str(out), "--shard-size", "4"]) == 0  # complete: nothing to write
    for other in (["--shard-size", "5"], ["--shard-size", "4", "--unlabelled"]):  # another command: refused
        assert shards_main([str(folder), str(out), *other]) == 2
        assert "choose another OUT" in one_error_line(capsys.readouterr().err)
    assert [os.stat(p).st_mtime_ns for p in done[:2]] == before


def test_a_second_writer_into_the_same_out_stops_instead_of_overwriting(folder, tmp_path, monkeypatch, capsys):
    import bat.shards

    encode, out = bat.shards.encode, tmp_path / "x"

    def other_writer_finishes_first(*args):
        if not (tmp_path / "x-000000.tar").exists():  # after this writer's start, before its first shard is done
            (tmp_path / "x-000000.tar").write_bytes(b"the other writer's shard")
        return encode(*args)

    monkeypatch.setattr(bat.shards, "encode", other_writer_finishes_first)
    assert shards_main([str(folder), str(out), "--shard-size", "4"]) == 2
    assert "another writer" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "x-000000.tar").read_bytes() == b"the other writer's shard"
    assert tars(tmp_path) == ["x-000000.tar"]


def test_float_windows_are_stored_with_their_samples(tmp_path):
    """CSV windows (start_s/end_s) of float / double WAV and float AIFF keep their samples (not silence)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(16000) * 0.3).astype(np.float64)
    rows = ["path,label,start_s,end_s"]
    for name, subtype in (("f32.wav", "FLOAT"), ("f64.wav", "DOUBLE"), ("f32.aiff", "FLOAT"), ("i32.wav", "PCM_32"),
                          ("i16.wav", "PCM_16")):
        sf.write(tmp_path / name, x, 16000, subtype=subtype)
        rows += [f"{name},{subtype},0.25,0.5", f"{name},{subtype},0.5,0.75"]
    (tmp_path / "w.csv").write_text("\n".join(rows) + "\n")
    paths = write(tmp_path / "w.csv", tmp_path / "sh", 100)
    a, b = list_dataset(tmp_path / "w.csv"), list_dataset(paths[0])
    same_as_source(a, b)
    for i, (shard, offset, size) in enumerate(b.members):
        with open(shard, "rb") as fh:
            fh.seek(offset)
            stored, sr = sf.read(io.BytesIO(fh.read(size)), dtype="float64")
        source, _ = sf.read(a.files[i], dtype="float64", start=4000 * (1 + i % 2), frames=4000)
        assert sr == 16000 and np.abs(stored).max() > 0.5, a.files[i]
        assert np.array_equal(stored, source), a.files[i]  # float64 too: the very samples of the source


def test_the_descriptor_cache_follows_the_open_file_limit_and_keeps_the_recently_used(tmp_path, monkeypatch):
    import resource

    from bat import shard_reader

    files = []
    for i in range(300):
        files.append(str(tmp_path / f"{i}.tar"))
        Path(files[-1]).write_bytes(bytes([i % 256]) * 4)
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))

    def read_all(order):
        for f in order:
            assert shard_reader.read_member(f, 1, 2) == bytes([files.index(f) % 256]) * 2

    def close_all():
        for key in [k for k in shard_reader._FDS if k[1] in files]:
            os.close(shard_reader._FDS.pop(key))

    try:
        monkeypatch.setattr(resource, "getrlimit", lambda which: (1000, 4096))  # up to 500 open shards
        read_all(files + files)
        assert len(opened) == 300  # with 300 shards, no clip re-opens its shard
        close_all()
        opened.clear()
        monkeypatch.setattr(resource, "getrlimit", lambda which: (100, 4096))  # at least 64 kept open
        read_all(files[:64] + files[:1] + files[64:65] + files[:1])  # 0 was used again: 1 is the one to close
        assert len(opened) == 65
        read_all(files[1:2])
        assert len(opened) == 66
    finally:
        close_all()


def test_shards_are_decoded_at_the_tasks_sample_rate(folder, tmp_path):
    paths = write(folder, tmp_path / "sh", 100)
    a, b = (AudioDataset(list_dataset(src), sample_rate=32000) for src in (folder, paths[0]))  # --task hsn's rate
    for i in range(len(a)):
        assert torch.equal(a[i].waveform, b[i].waveform), a.items.files[i]
    assert len(b[0].waveform) == 32000  # the demo clips last 1 s


def test_pretrain_probe_data_reads_shards_and_csv_windows(folder, tmp_path):
    from bat.frontend import spectrogram
    from bat.online_probe import probe_set

    paths = write(folder, tmp_path / "sh", 5)
    args = (100, 16000, 64)
    a, b = probe_set(str(folder), *args, SkipLog()), probe_set(pattern_of(paths), *args, SkipLog())
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a[0]) == len(list_dataset(folder))
    # windows in the silent first half of clips that are loud after it: the probe must see silence
    wave = np.concatenate([np.zeros(8000), np.ones(8000) * 0.5]).astype(np.float32)
    rows = ["path,label,start_s,end_s"]
    for c in ("a", "b"):
        for k in range(3):
            sf.write(tmp_path / f"{c}{k}.wav", wave, 16000, subtype="FLOAT")
            rows.append(f"{c}{k}.wav,{c},0.0,0.25")
    (tmp_path / "w.csv").write_text("\n".join(rows) + "\n")
    specs, labels, is_test = probe_set(str(tmp_path / "w.csv"), *args, SkipLog())
    silence = spectrogram(torch.zeros(1, 4000), 64).half()
    assert len(specs) == 6 and all(torch.equal(s, silence[0]) for s in specs)
    for f in tmp_path.glob("*.wav"):
        f.write_bytes(b"not audio")
    with pytest.raises(DataError, match="too few usable clips"):
        probe_set(str(tmp_path / "w.csv"), *args, SkipLog())


def test_a_shard_cut_at_a_header_boundary_is_reported_and_intact_tars_are_not(folder, tmp_path):
    paths = write(folder, tmp_path / "sh", 100)
    with tarfile.open(paths[0]) as tar:
        cut_at = tar.getmembers()[6].offset  # the header of the 4th sample: a 512-byte boundary
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(paths[0]).read_bytes()[:cut_at])
    samples, bad = index_shard(str(cut))
    assert [k for k, _ in samples] == ["000000000", "000000001", "000000002"] and "damaged tar" in bad[1]
    items = list_dataset(str(cut))
    assert len(items) == 3 and any(p == str(cut) and "damaged tar" in r for p, r in items.skipped)
    assert index_shard(paths[0])[1] is None
    for fmt in (tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        with tarfile.open(tmp_path / "py.tar", "w", format=fmt) as tar:
            tar.add(list_dataset(folder).files[0], arcname="a.wav")
        samples, bad = index_shard(str(tmp_path / "py.tar"))
        assert len(samples) == 1 and bad is None
    gnu_tar = shutil.which("tar")
    if gnu_tar:
        src = Path(list_dataset(folder).files[0])
        subprocess.run([gnu_tar, "-cf", str(tmp_path / "gnu.tar"), "-C", str(src.parent), src.name], check=True)
        samples, bad = index_shard(str(tmp_path / "gnu.tar"))
        assert len(samples) == 1 and bad is None


def test_shards_can_be_resharded_and_a_source_with_nothing_readable_writes_nothing(folder, tmp_path, capsys):
    paths = write(folder, tmp_path / "a", 4)
    again = write(pattern_of(paths), tmp_path / "b", 7)  # e.g. to change --shard-size
    same_as_source(list_dataset(folder), list_dataset(pattern_of(again)))
    assert list_dataset(pattern_of(again)).files[0].endswith(".flac")
    (tmp_path / "junk" / "dog").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "junk" / "dog" / f"{i}.wav").write_bytes(b"not audio")
    capsys.readouterr()
    assert shards_main([str(tmp_path / "junk"), str(tmp_path / "out") + "/", "--shard-size", "2"]) == 2
    assert "no readable audio" in one_error_line(capsys.readouterr().err)
    assert tars(tmp_path / "out") == []


# ------------------------------------------------------------------ indexing shards made elsewhere (--index)


def webdataset_shards(folder, out_dir, n_shards=3, per_shard=5):
    """Shards laid out as the `webdataset` package writes them (KEY.flac / KEY.wav + KEY.json with a label,
    tarfile's default format), without a .idx; the second holds the samples the listing skips: JSON that is
    not an object, JSON that does not parse, audio without JSON. Returns the brace pattern."""
    files = list_dataset(folder).files
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(out_dir / f"wds-{s:06d}.tar", "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname = len(data), 1700000000, 0o444, "bigdata"
                tar.addfile(info, io.BytesIO(data))

            for i in range(per_shard):
                n = s * per_shard + i
                f = Path(files[n % len(files)])
                key = f"clips/sample{n:06d}" if n % 4 == 3 else f"sample{n:06d}"  # keys may name a folder
                add(f"{key}{f.suffix.lower()}", f.read_bytes())
                meta = {"label": f.parent.name, "path": f.name, "extra": [n, 0.5, None]}
                add(f"{key}.json", json.dumps(meta).encode())
            if s == 1:
                f = Path(files[0])
                for key, data in (("notobject", b"[1, 2]"), ("broken", b'{"label": '), ("nojson", None)):
                    add(f"{key}{f.suffix.lower()}", f.read_bytes())
                    if data is not None:
                        add(f"{key}.json", data)
    return str(out_dir / ("wds-{000000..%06d}.tar" % (n_shards - 1)))


def test_index_writes_the_missing_indexes_and_the_reader_then_reads_the_same(folder, tmp_path, capsys):
    from bat.shard_reader import read_index

    pattern = webdataset_shards(folder, tmp_path / "wds")
    paths = expand_pattern(pattern)
    from_headers = [read_index(p) for p in paths]
    assert all(metas == {} and bad is None for _, metas, bad in from_headers)
    listed, unlabelled = list_dataset(pattern), list_dataset(pattern, labelled=False)
    reasons = sorted(r.split(" (")[0] for _, r in listed.skipped)
    assert reasons == ["no labels", "unreadable labels", "unreadable labels"]
    capsys.readouterr()
    assert shards_main(["--index", pattern]) == 0
    out = capsys.readouterr().out
    assert out.startswith("indexed 3 shard(s) (18 samples") and "0 already indexed, 0 skipped" in out
    for path, (samples, _, _) in zip(paths, from_headers):
        index = json.loads(Path(path + ".idx").read_text())
        assert index["run"] == {"command": "index"} and index["tar_bytes"] == os.path.getsize(path)
        indexed, metas, bad = read_index(path)
        assert indexed == samples and bad is None  # the same samples, members and offsets as from the headers
        with tarfile.open(path) as tar:  # the JSON the listing reads from each sample, when it is an object
            jsons = {m.name[:-5]: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")
                     and not m.name.startswith(("notobject", "broken"))}
        assert metas == jsons and all(metas[k]["extra"][2] is None for k in metas)
    assert list_dataset(pattern) == listed  # files, members, labels, classes and skipped samples alike
    assert list_dataset(pattern, labelled=False) == unlabelled
    same_as_source(listed, list_dataset(pattern))  # and the data layer loads the same clips and targets
    before = {p: (os.stat(p + ".idx").st_mtime_ns, Path(p + ".idx").read_bytes()) for p in paths}
    assert shards_main(["--index", str(tmp_path / "wds" / "*.tar")]) == 0  # a glob; already indexed: kept
    out = capsys.readouterr().out
    assert out.startswith("indexed 0 shard(s)") and "3 already indexed, 0 skipped" in out
    assert {p: (os.stat(p + ".idx").st_mtime_ns, Path(p + ".idx").read_bytes()) for p in paths} == before
    # the writer never takes them for its own: their .idx names --index, not a writing command
    assert shards_main([str(folder), str(tmp_path / "wds" / "wds"), "--shard-size", "5"]) == 2
    assert "choose another OUT" in one_error_line(capsys.readouterr().err)
    assert {p: (os.stat(p + ".idx").st_mtime_ns, Path(p + ".idx").read_bytes()) for p in paths} == before


def test_index_leaves_foreign_files_stale_indexes_and_damaged_shards_as_they_are(folder, tmp_path, capsys):
    pattern = webdataset_shards(folder, tmp_path / "wds", n_shards=5, per_shard=3)
    paths = expand_pattern(pattern)
    foreign = {paths[0]: b"someone else's index\n", paths[1]: b"[1, 2]\n"}  # not ours: a JSON array too
    for path, data in foreign.items():
        Path(path + ".idx").write_bytes(data)
    listed = list_dataset(pattern)  # a foreign .idx is not trusted (nor fatal): the headers are read
    stale = json.dumps({"format": "bat.shard_index/1", "tar_bytes": 512, "run": {}, "samples": []}).encode()
    Path(paths[2] + ".idx").write_bytes(stale)
    size = os.path.getsize(paths[3])
    with open(paths[3], "r+b") as fh:  # cut short, e.g. an interrupted copy
        fh.truncate(size // 2 + 100)
    damaged = list_dataset(pattern)
    assert damaged.files != listed.files and any(p == paths[3] and "damaged tar" in r for p, r in damaged.skipped)
    capsys.readouterr()
    assert shards_main(["--index", pattern]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: skipped ") for w in warnings), captured.err
    for path in paths[:2]:
        assert any(f"{path}.idx exists and is not an index of bat's" in w for w in warnings)
    assert any(f"{paths[2]}.idx is not a current index of this tar" in w for w in warnings)
    assert any(w.startswith(f"warning: skipped {paths[3]}: damaged tar") for w in warnings)
    assert "\n" not in captured.out.strip() and captured.out.startswith("indexed 1 shard(s)")
    assert "4 skipped (2 not bat's .idx, 1 stale index, 1 damaged" in captured.out
    assert {p: Path(p + ".idx").read_bytes() for p in foreign} == foreign  # byte-identical
    assert Path(paths[2] + ".idx").read_bytes() == stale
    assert not os.path.exists(paths[3] + ".idx") and os.path.exists(paths[4] + ".idx")
    assert list_dataset(pattern) == damaged  # the damage is still reported, the samples before it kept
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == sorted(
        [Path(p).name for p in paths] + [Path(p).name + ".idx" for p in (*paths[:3], paths[4])])


def test_index_write_errors_and_ctrl_c_leave_no_partial_index(folder, tmp_path, monkeypatch, capsys):
    import errno

    import bat.shards

    pattern = webdataset_shards(folder, tmp_path / "wds")
    paths = expand_pattern(pattern)

    def files():
        return sorted(p.name for p in (tmp_path / "wds").iterdir())

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write_index = bat.shards.write_index

    def disk_full_while_writing(tar_path, metas, run, idx_path, samples=None):
        write_index(tar_path, metas, run, idx_path, samples)  # the temporary file is there
        assert os.path.exists(idx_path) and os.path.dirname(idx_path) == os.path.dirname(tar_path)
        disk_full()

    tars_only = files()
    for target, fail in ((os, "replace"), (bat.shards, "write_index")):
        with monkeypatch.context() as m:
            m.setattr(target, fail, disk_full if fail == "replace" else disk_full_while_writing)
            capsys.readouterr()
            assert shards_main(["--index", pattern]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert paths[0] + ".idx" in line and "No space left" in line
            assert files() == tars_only  # no .idx, no temporary file
    # A read-only folder: chmod does not bind root (os.replace's failure above stands in for it then).
    if os.geteuid() != 0:
        os.chmod(tmp_path / "wds", 0o555)
        try:
            assert shards_main(["--index", pattern]) == 2
            assert "Permission denied" in one_error_line(capsys.readouterr().err)
        finally:
            os.chmod(tmp_path / "wds", 0o755)
        assert files() == tars_only
    sample_metas = bat.shards._sample_metas

    def interrupted(tar_path, *args):
        if tar_path == paths[1]:  # Ctrl-C while indexing the second shard
            os.kill(os.getpid(), signal.SIGINT)
        return sample_metas(tar_path, *args)

    monkeypatch.setattr(bat.shards, "_sample_metas", interrupted)
    capsys.readouterr()
    try:
        assert shards_main(["--index", pattern]) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped bat.shards.main")
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "re-run" in err
    assert files() == sorted([*tars_only, Path(paths[0]).name + ".idx"])
    monkeypatch.setattr(bat.shards, "_sample_metas", sample_metas)
    assert shards_main(["--index", pattern]) == 0  # the same command indexes the rest
    assert "indexed 2 shard(s)" in capsys.readouterr().out and files() == sorted(
        [*tars_only, *(Path(p).name + ".idx" for p in paths)])


def test_index_and_write_arguments_do_not_mix(tmp_path, capsys):
    for argv, words in (([], "SRC and OUT are required"), (["src"], "SRC and OUT are required"),
                        (["--index", "x.tar", "src"], "takes no SRC"),
                        (["--index", "x.tar", "--shard-size", "5"], "takes no SRC"),
                        (["--index", str(tmp_path / "a-{0..1}.tar")], "2 of 2 shards missing"),
                        (["--index", str(tmp_path / "a")], "not a shard pattern")):
        capsys.readouterr()
        assert shards_main(argv) == 2
        assert words in one_error_line(capsys.readouterr().err)
