"""probe_cgp.py end to end on small generated data sets (tiny random encoder, few steps)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import bat
import probe_cgp
from bat import demo
from bat.data import AudioDataset, collate
from bat.listing import DataError, list_dataset
from bat.metrics import classification_metrics
from bat.tasks import warmup_steps
from bat.optim import lr_at
from synth_sets import make_esc50, with_an_unreadable_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, **kw):
    cfg = probe_cgp.Config(**{"encoder": "random:tiny", "out": str(tmp_path / "out"), "prototypes": 16,
                              "steps": 12, "batch_size": 8, "workers": 0, "select": "none", **kw})
    return cfg, probe_cgp.main(cfg)


def test_cgp_end_to_end_writes_outputs_and_load_probe_reproduces_metrics(demo_sets, tmp_path):
    cfg, metrics = run(tmp_path, train=str(demo_sets / "train"), test=str(demo_sets / "test"))
    out = tmp_path / "out"
    for name in ("config.json", "probe.safetensors", "metrics.json", "gates.png"):
        assert (out / name).is_file(), name
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["task"] == "multiclass" and saved["num_train"] == 30 and saved["num_test"] == 12
    assert saved["skipped_files"] == 0
    for key in ("accuracy", "mAP", "macro_f1"):
        assert 0.0 <= saved[key] <= 1.0
    gates = saved["gate_weights"]
    assert len(gates) == 6 and math.isclose(sum(gates), 1.0, rel_tol=1e-5) and min(gates) > 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["encoder"] == "random:tiny" and resolved["task"] == "generic"
    assert resolved["data_task"] == "multiclass"

    # the saved probe alone (bat.load_probe + its own front-end) gives the same test metrics
    probe = bat.load_probe(out / "probe.safetensors")
    assert probe.task == "multiclass" and probe.labels == sorted(demo.DEMO_CLASSES)
    assert probe.frontend.config()["target_frames"] == 112  # 1 s clips -> 101 frames -> 112
    ds = AudioDataset(list_dataset(demo_sets / "test"), probe.labels, clip_samples=16000)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = probe(probe.frontend(batch.waveforms))
    again = classification_metrics(logits, batch.targets, probe.task)
    for key, value in again.items():
        assert value == pytest.approx(saved[key], abs=1e-6), key
    assert torch.allclose(probe.head.gate_weights(), torch.tensor(gates), atol=1e-6)


def test_cached_cgp_learns_the_demo_classes(demo_sets, tmp_path):
    # 6 classes (chance 1/6); a random-init tiny encoder with CGP separates most of them
    _, metrics = run(tmp_path, train=str(demo_sets / "train"), test=str(demo_sets / "test"), prototypes=128,
                     steps=200, batch_size=10, cache_features=True)
    assert metrics["accuracy"] >= 0.4, metrics


def test_esc50_fold_all_reports_mean_and_std(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    _, metrics = run(tmp_path, train=str(root), fold="all", probe="lp", steps=3, cache_features=True)
    assert sorted(metrics["folds"]) == [f"fold{k}" for k in range(1, 6)]
    accs = [metrics["folds"][f]["accuracy"] for f in sorted(metrics["folds"])]
    assert metrics["accuracy"] == pytest.approx(np.mean(accs)) and metrics["std"]["accuracy"] == pytest.approx(np.std(accs))
    assert metrics["num_train"] == 8 and metrics["num_test"] == 2 and metrics["gate_weights"] is None
    for k in range(1, 6):
        assert (tmp_path / "out" / f"fold{k}" / "probe.safetensors").is_file()
    resolved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert resolved["runs"] == [f"fold{k}" for k in range(1, 6)]
    with pytest.raises(DataError, match="--fold"):
        run(tmp_path, train=str(root), out=str(tmp_path / "o2"))  # ESC-50 needs a fold


def test_an_interrupted_fold_all_goes_on_after_its_finished_folds(tmp_path, capsys):
    """Folds whose metrics.json carries these settings' fingerprint are read back, not trained again (as
    finetune.py does); the result equals an uninterrupted run's. Other settings train every fold again."""
    root = make_esc50(tmp_path / "ESC-50")
    flags = dict(train=str(root), fold="all", probe="lp", steps=3, cache_features=True)
    _, whole = run(tmp_path, **flags)
    out = tmp_path / "out"
    for name in ("fold5/metrics.json", "fold5/probe.safetensors", "metrics.json", "probe.safetensors"):
        (out / name).unlink()  # as if stopped while fold 5 trained
    capsys.readouterr()
    _, resumed = run(tmp_path, **flags, workers=1)  # the worker count does not change a fold's result
    said = capsys.readouterr().out
    assert [f"[fold{k}] already finished" in said for k in range(1, 6)] == [True] * 4 + [False]
    assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(whole))
    assert "fingerprint" not in json.loads((out / "metrics.json").read_text())["folds"]["fold1"]
    for name in ("fold5/metrics.json", "fold5/probe.safetensors", "metrics.json", "probe.safetensors"):
        (out / name).unlink()  # stopped again during fold 5: other settings must not overwrite folds 1-4
    with pytest.raises(FileExistsError, match=r"finished probe_cgp.py run with other settings \(--steps\)"):
        run(tmp_path, **{**flags, "steps": 4})


def test_a_finished_probe_is_not_overwritten_by_other_settings(demo_sets, tmp_path):
    data = dict(train=str(demo_sets / "train"), test=str(demo_sets / "test"), steps=2)
    run(tmp_path, **data)
    saved = (tmp_path / "out" / "probe.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"finished probe_cgp.py run with other settings \(--encoder, --lr\)"):
        run(tmp_path, **data, encoder="random:small", lr=0.01)
    assert (tmp_path / "out" / "probe.safetensors").read_bytes() == saved
    run(tmp_path, **data, strict=True)  # what the result does not depend on may change: the same run again


@pytest.mark.parametrize("by", ["first-label", "labels"])
def test_multilabel_csv_with_a_corrupt_file(tmp_path, by):
    rows = ["path,labels"]
    for i in range(12):
        wave, name = demo.demo_clip(i, seed=5, seconds=0.5)
        other, name2 = demo.demo_clip(i + 1, seed=6, seconds=0.5)
        sf.write(tmp_path / f"{i}.wav", 0.5 * (wave + other), 16000)
        rows.append(f"{i}.wav,{name};{name2}")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEnot audio")
    rows.append(f"bad.wav,{name}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows[:1] + rows[1:7]) + "\n")
    # balanced sampling (REF's AudioSet-2M by labels, HSN by first label) over a feature cache that lacks the
    # unreadable clip: the sampling labels follow the cache's rows
    _, metrics = run(tmp_path, train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv"), probe="lcgp",
                     balanced=True, balance_by=by, steps=30)
    assert metrics["task"] == "multilabel" and "accuracy" not in metrics
    assert metrics["skipped_files"] == 1 and metrics["num_train"] == 12 and metrics["num_test"] == 6
    assert math.isfinite(metrics["mAP"]) and len(metrics["gate_weights"]) == 6


def test_cache_that_does_not_fit_is_refused(demo_sets, tmp_path, monkeypatch):
    import bat.features

    monkeypatch.setattr(bat.features, "available_bytes", lambda device: 1000)  # decide_cache reads it there
    with pytest.raises(DataError, match="run without --cache-features"):
        run(tmp_path, train=str(demo_sets / "train"), test=str(demo_sets / "test"), cache_features=True)


def test_lr_schedule_matches_ref_values(golden_dir):
    # REF's RiseRunDecay for the AS-20k CGP probe: its parameters and LR values, from the golden ssl.json facts
    ref = json.loads((golden_dir / "ssl.json").read_text())["facts"]["lr_schedule_as20k_cgp_probe"]
    params, values = ref["params"], {int(k): v for k, v in ref["values"].items()}
    assert len(values) >= 6 and {0, params["warmup_steps"], params["total_steps"]} <= set(values)
    cfg = probe_cgp.config(encoder="x", train="y", task="audioset")  # the AS-20k recipe gives REF's warm-up
    assert (cfg.steps, warmup_steps(cfg), cfg.lr, cfg.min_lr) == (
        params["total_steps"], params["warmup_steps"], params["lr"], params["min_lr"])
    assert cfg.batch_size == 48  # configs/as20k/as20k_cgp_config.yaml (not in the JSON)
    for step, lr in values.items():
        assert lr_at(step, cfg.lr, warmup_steps(cfg), cfg.steps, cfg.min_lr) == pytest.approx(lr, rel=1e-9), step


def test_cli_strict_gives_a_one_line_error(demo_sets, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_sets / "train", data)
    (data / "tone" / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")
    cmd = [sys.executable, os.path.join(ROOT, "probe_cgp.py"), "--encoder", "random:tiny", "--train", str(data),
           "--test", str(demo_sets / "test"), "--out", str(tmp_path / "o"), "--steps", "2", "--prototypes", "8",
           "--batch-size", "64", "--workers", "0", "--strict"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "broken.wav" in lines[0] and "Traceback" not in res.stderr


def test_cli_under_torchrun_needs_a_batch_that_splits_over_the_processes(demo_sets, tmp_path):
    # --batch-size is the batch of all processes together (torchrun sets WORLD_SIZE); checked before any work
    cmd = [sys.executable, os.path.join(ROOT, "probe_cgp.py"), "--encoder", "random:tiny", "--train",
           str(demo_sets / "train"), "--test", str(demo_sets / "test"), "--out", str(tmp_path / "o"), "--steps", "2",
           "--batch-size", "5"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"})
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith("error: --batch-size 5 is the batch of all 2 processes")
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_out_holding_another_runs_files_is_refused_and_left_as_it_is(demo_sets, tmp_path):
    sets = dict(train=str(demo_sets / "train"), test=str(demo_sets / "test"), steps=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("my own results")
    with pytest.raises(FileExistsError, match=r"out holds metrics.json, not written by probe_cgp.py"):
        run(tmp_path, **sets)
    assert sorted(os.listdir(out)) == ["metrics.json"] and (out / "metrics.json").read_text() == "my own results"
    (out / "metrics.json").unlink()
    run(tmp_path, **sets)  # a run of its own writes there, and may re-run into it
    assert json.loads((out / "config.json").read_text())["written_by"] == "probe_cgp.py"
    run(tmp_path, **sets)
    (out / "config.json").write_text(json.dumps({"written_by": "pretrain.py"}))
    with pytest.raises(FileExistsError, match="not written by probe_cgp.py"):
        run(tmp_path, **sets)
    # config.json of earlier versions (no "written_by"): a probe's is known by its prototypes, a pretraining's is not
    (out / "config.json").write_text(json.dumps({"out": str(out), "kept_patches": 12}))
    with pytest.raises(FileExistsError, match="not written by probe_cgp.py"):
        run(tmp_path, **sets)
    (out / "config.json").write_text(json.dumps({"out": str(out), "prototypes": 16}))
    run(tmp_path, **sets)


def test_a_class_whose_every_clip_is_unreadable_is_named(demo_sets, tmp_path, capsys):
    lost, n = with_an_unreadable_class(demo_sets / "train", tmp_path / "train")
    _, metrics = run(tmp_path, train=str(tmp_path / "train"), test=str(demo_sets / "test"), steps=2)
    assert metrics["untrained_classes"] == [lost] and metrics["skipped_files"] == n
    assert f"warning: no readable training clip of {lost}: the head never learned this class" in capsys.readouterr().out
    _, metrics = run(tmp_path, train=str(demo_sets / "train"), test=str(demo_sets / "test"), steps=2,
                     out=str(tmp_path / "o2"))
    assert "untrained_classes" not in metrics


def test_cpu_processes_of_one_node_budget_the_cache_on_their_share(monkeypatch, capsys):
    """Under torchrun on the CPU every process holds the whole cache, and they share one machine's memory."""
    import bat.features
    from bat.heads import build_head
    from bat.tasks import TASKS

    encoder = bat.load_encoder("random:tiny")
    head = build_head("cgp", encoder.cfg.dim, encoder.cfg.depth, 3, prototypes=8)
    need = bat.features.cache_size(head, encoder, 100, 112, torch.float32)[0]
    monkeypatch.setattr(bat.features, "available_bytes", lambda device: int(1.5 * need))
    task = TASKS["esc50"]  # no random window: no note
    decide = lambda: bat.features.decide_cache(head, encoder, 100, 112, torch.device("cpu"), task, 16000, must=True)  # noqa: E731
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decide() is True
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DataError, match="available to each of 2 processes on cpu"):
        decide()
    assert "streaming (does not fit)" in capsys.readouterr().out


def test_ref_tasks_with_random_windows_stream_unless_told_to_cache(monkeypatch, capsys):
    """REF trains AudioSet and HSN probes on a new random window (HSN: plus noise) of every clip at every step:
    a cache of one fixed window is taken only with --cache-features, and then said; generic data caches."""
    import bat.features
    from bat.heads import build_head
    from bat.tasks import TASKS

    encoder = bat.load_encoder("random:tiny")
    head = build_head("cgp", encoder.cfg.dim, encoder.cfg.depth, 3, prototypes=8)
    monkeypatch.setattr(bat.features, "available_bytes", lambda device: 2**40)
    decide = lambda task, must: bat.features.decide_cache(head, encoder, 10, 112, torch.device("cpu"), TASKS[task],  # noqa: E731
                                                          16000, must=must)
    assert decide("hsn", False) is False and "off for task hsn" in capsys.readouterr().out
    assert decide("audioset", False) is False
    assert decide("hsn", True) is True and "task hsn's random window and noise of training clips need --no-cache" \
        in capsys.readouterr().out
    assert decide("generic", False) is True and "random roll and window" in capsys.readouterr().out
    assert decide("esc50", False) is True
