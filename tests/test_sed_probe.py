"""probe_cgp.py --task dcase2016 end to end on a generated event set (tiny random encoder, few steps)."""
import json

import numpy as np
import pytest
import torch

import bat
import probe_cgp
from bat.listing import DataError
from bat.sed import EventDataset, event_frontend, list_events, sed_metrics
from bat.cli import FlagError
from synth_sets import make_event_task, shuffle_labels


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return make_event_task(str(tmp_path_factory.mktemp("sed") / "task"), n_train=8, n_valid=2, n_test=3)


def run(tmp_path, train, **kw):
    cfg = probe_cgp.config(**{"encoder": "random:tiny", "train": train, "task": "dcase2016", "out": str(tmp_path),
                              "prototypes": 64, "steps": 80, "batch_size": 4, "lr": 1e-2, "warmup_steps": 4,
                              "val_every": 40, "workers": 0, **kw})
    return probe_cgp.main(cfg)


def test_slow_e2e_frame_wise_cgp_detects_events_far_better_than_shuffled_labels(task_dir, tmp_path):
    """slow end-to-end: a frame-wise CGP probe on random:tiny learns when beeps and hisses happen (seed 0:
    onset F1 0.50 and frame mAP 0.65 against 0.08 and 0.17 with shuffled training labels)."""
    m = run(tmp_path / "real", task_dir)
    control = run(tmp_path / "shuffled", shuffle_labels(task_dir, str(tmp_path / "shuffled_task")))
    assert m["task"] == "sed" and m["num_train"] == 8 and m["num_test"] == 3
    assert m["onset_f1"] > 0.35 and m["frame_mAP"] > 0.5
    assert m["onset_f1"] > np.nan_to_num(control["onset_f1"]) + 0.25
    assert m["frame_mAP"] > control["frame_mAP"] + 0.25
    assert m["selected"]["step"] in (40, 80) and len(m["history"]) == 2  # validation-based selection

    out = tmp_path / "real"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["onset_f1"] == pytest.approx(m["onset_f1"]) and 0 <= saved["frame_mAP"] <= 1
    assert (out / "gates.png").is_file() and json.loads((out / "config.json").read_text())["task"] == "dcase2016"
    # the saved probe alone scores the 11 s test recordings (chunked encoder) to the same metrics
    probe = bat.load_probe(out / "probe.safetensors")
    assert probe.metadata["frame_wise"] and probe.labels == ["beep", "hiss"]
    test = list_events(task_dir, "test")
    ds = EventDataset(test, probe.labels, event_frontend(probe.encoder))
    scores = []
    with torch.no_grad():
        for i in range(len(ds)):
            spec = ds[i][0][None]
            assert spec.shape[2] // 16 > 64  # longer than one encoder chunk
            scores.append(probe(spec)[0].sigmoid().numpy())
    again = sed_metrics(scores, test.events, probe.labels)
    assert again["onset_f1"] == pytest.approx(m["onset_f1"]) and again["frame_mAP"] == pytest.approx(m["frame_mAP"], abs=1e-6)


def test_lcgp_lp_protobin_frame_heads_run_and_reload(tmp_path):
    small = make_event_task(str(tmp_path / "small"), n_train=4, n_valid=1, n_test=1, test_s=6.0)
    for kind in ("lcgp", "lp", "protobin"):
        m = run(tmp_path / kind, small, probe=kind, steps=8, val_every=4)
        assert 0 <= m["frame_mAP"] <= 1 and m["num_ref_events"] > 0 and len(m["history"]) == 2
        assert (m["gate_weights"] is not None) == (kind == "lcgp")
        probe = bat.load_probe(tmp_path / kind / "probe.safetensors")
        assert probe.head.kind == kind and probe(torch.zeros(1, 1, 160, 128)).shape == (1, 10, 2)


def test_event_csv_needs_test_and_rejects_unknown_labels(tmp_path, task_dir):
    csv = tmp_path / "ev.csv"
    csv.write_text(f"path,label,onset_s,offset_s\n{task_dir}/16000/train/train00.wav,beep,0.5,1.0\n")
    with pytest.raises(DataError, match="--test"):
        run(tmp_path / "o", str(csv))


def test_auto_task_recognises_event_and_speech_layouts(tmp_path, task_dir):
    from bat.tasks import resolve_task

    assert resolve_task("auto", task_dir).name == "dcase2016"
    speech = tmp_path / "s.csv"
    speech.write_text("path,text\na.wav,hello\n")
    assert resolve_task("auto", str(speech)).name == "librispeech"
    plain = tmp_path / "p.csv"
    plain.write_text("path,label\na.wav,dog\n")
    assert resolve_task("auto", str(plain)).name == "generic"
    cfg = probe_cgp.parse_config(["--encoder", "random:tiny", "--train", task_dir])
    assert cfg.task == "dcase2016" and cfg.batch_size == 4 and cfg.val_every == 50  # REF's SED recipe


def test_fold_is_refused_for_data_with_its_own_splits(tmp_path, task_dir):
    with pytest.raises(FlagError, match="--fold picks an ESC-50 test fold"):
        probe_cgp.main(probe_cgp.config(encoder="random:tiny", train=task_dir, fold="1", out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
