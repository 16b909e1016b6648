"""probe_cgp.py's training state: a run stopped mid-way (--stop-after, SIGINT/SIGTERM) and re-run ends as an
uninterrupted run does, on the cached and on the streamed path (tiny random encoder, few steps)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import probe_cgp
from bat import demo
from bat.listing import DataError
from bat.run_control import StopFlag
from synth_sets import make_esc50


@pytest.fixture(scope="module")
def scv2(tmp_path_factory):
    """A Speech Commands v2 layout: its validation list exercises the best head and history of a resumed run."""
    root = tmp_path_factory.mktemp("scv2")
    val, test = [], []
    for w, word in enumerate(("yes", "no", "up")):
        os.makedirs(root / word)
        for k in range(4):
            wave, _ = demo.demo_clip(w, seed=100 + k, seconds=1.0)
            sf.write(root / word / f"{k}.wav", wave, 16000)
        val.append(f"{word}/0.wav")
        test.append(f"{word}/1.wav")
    os.makedirs(root / "_background_noise_")
    sf.write(root / "_background_noise_" / "noise.wav", 0.05 * np.random.default_rng(0).standard_normal(5 * 16000),
             16000)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    return root


def run(out, **kw):
    cfg = probe_cgp.Config(**{"encoder": "random:tiny", "out": str(out), "prototypes": 16, "steps": 6,
                              "batch_size": 4, "workers": 0, "select": "none", **kw})
    return probe_cgp.main(cfg)


def assert_same_run(a, b):
    """Same metrics and bit-identical head weights."""
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    wa, wb = load_file(a / "probe.safetensors"), load_file(b / "probe.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (a / "state.pt").exists() and not (b / "state.pt").exists()  # removed once the outputs are written


def test_a_stopped_cached_run_resumes_as_if_never_stopped(demo_sets, tmp_path):
    data = dict(train=str(demo_sets / "train"), test=str(demo_sets / "test"), cache_features=True)
    run(tmp_path / "a", **data)
    assert run(tmp_path / "b", stop_after=2, **data) is None  # "interrupted" after step 2
    assert (tmp_path / "b" / "state.pt").is_file() and not (tmp_path / "b" / "probe.safetensors").exists()

    with pytest.raises(DataError) as e:  # other settings: refused, the state kept
        run(tmp_path / "b", lr=2e-3, **data)
    assert "state.pt was written with other settings" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "b" / "state.pt").is_file()

    run(tmp_path / "b", workers=1, checkpoint_every=3, **data)  # what does not change the result may change
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_stopped_streamed_run_resumes_as_if_never_stopped(scv2, tmp_path, capsys):
    data = dict(train=str(scv2), no_cache=True, val_every=2, steps=5)  # noise and random windows: keyed draws
    run(tmp_path / "a", **data)
    assert run(tmp_path / "b", stop_after=2, **data) is None
    assert "run the same command again to resume" in capsys.readouterr().out
    run(tmp_path / "b", **data)
    assert "resuming from" in capsys.readouterr().out
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert [h["step"] for h in json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]] == [2, 4, 5]


def test_a_fold_stopped_mid_way_resumes_from_its_own_state(tmp_path):
    data = dict(train=str(make_esc50(tmp_path / "ESC-50")), fold="all", steps=4, cache_features=True)
    run(tmp_path / "a", **data)
    assert run(tmp_path / "b", stop_after=2, **data) is None  # in fold 1
    assert (tmp_path / "b" / "fold1" / "state.pt").is_file() and not (tmp_path / "b" / "state.pt").exists()
    run(tmp_path / "b", **data)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    for k in range(1, 6):
        assert_same_run(tmp_path / "a" / f"fold{k}", tmp_path / "b" / f"fold{k}")


def test_a_signal_saves_the_state_and_returns_128_plus_its_number(demo_sets, tmp_path, monkeypatch):
    data = dict(train=str(demo_sets / "train"), test=str(demo_sets / "test"), cache_features=True)
    run(tmp_path / "a", **data)
    calls = []

    def sigterm_in_step_3(self):  # StopFlag.any after every step: as if SIGTERM came during step 3
        calls.append(1)
        return 15 if len(calls) == 3 else 0

    monkeypatch.setattr(StopFlag, "any", sigterm_in_step_3)
    assert run(tmp_path / "b", **data) == 128 + 15
    monkeypatch.undo()
    run(tmp_path / "b", **data)
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_select_auto_and_frame_wise_tasks_refuse_stop_after(demo_sets, tmp_path):
    with pytest.raises(probe_cgp.FlagError, match="--select auto saves no training state"):
        run(tmp_path / "a", train=str(demo_sets / "train"), test=str(demo_sets / "test"), select="auto",
            stop_after=1)
    with pytest.raises(probe_cgp.FlagError, match="--task dcase2016 saves no training state"):
        run(tmp_path / "b", train=str(demo_sets / "train"), task="dcase2016", stop_after=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sigterm_during_the_training_steps_saves_the_state_and_exits_143(demo_sets, tmp_path):
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    cmd = [sys.executable, "probe_cgp.py", "--encoder", "random:tiny", "--train", str(demo_sets / "train"), "--test",
           str(demo_sets / "test"), "--out", str(tmp_path / "o"), "--steps", "100000", "--prototypes", "8",
           "--batch-size", "2", "--workers", "1", "--no-cache", "--select", "none"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=root, stdout=fo, stderr=fe, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while "probe test" not in err.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, err.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err.read_text(), err.read_text()[-2000:]
    assert "run the same command again to resume" in out.read_text()
    assert (tmp_path / "o" / "state.pt").is_file() and not (tmp_path / "o" / "probe.safetensors").exists()


def test_slow_torchrun_resume_reproduces_the_uninterrupted_run(demo_sets, tmp_path):
    """Two streaming processes: each one's dropout draws come back from the state, its own share of the
    distributed shuffle restarts where it stopped, and the report counts every process's files. ~35 s: three
    torchrun starts."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "probe_cgp.py"), "--encoder", "random:tiny", "--train", str(demo_sets / "train"),
           "--test", str(demo_sets / "test"), "--steps", "4", "--batch-size", "4", "--prototypes", "8",
           "--workers", "0", "--select", "none", "--no-cache"]
    for out, extra in (("a", []), ("b", ["--stop-after", "2"]), ("b", [])):
        res = subprocess.run(cmd + ["--out", str(tmp_path / out), *extra], capture_output=True, text=True, cwd=root,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout
    assert_same_run(tmp_path / "a", tmp_path / "b")
