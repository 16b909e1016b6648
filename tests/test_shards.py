"""WebDataset shards (bat.shards): written from a folder / CSV they yield, through the data layer, the
clips and labels of the source; bad samples are skipped and counted; pretrain.py and finetune.py run
from them under torchrun with 2 processes, and a resumed sharded pretraining run is exact."""
import json
import os
import re
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
    from test_probe_script import make_esc50

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
    res = subprocess.run([*TORCHRUN, str(ROOT / "pretrain.py"), *SMALL, "--data", pattern_of(paths), "--steps", "20",
                          "--checkpoint-every", "20", "--workers", "1", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 20 and log[-1]["skipped_files"] == 1 and np.isfinite(log[-1]["loss"])
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
from bat.train import all_gather_object, cleanup_distributed, setup_distributed

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
