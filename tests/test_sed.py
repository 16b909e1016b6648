"""Sound event detection library (bat/sed.py): target grid, post-processing, onset F1 and frame mAP,
checked on hand-worked cases and against sed_eval / scipy results recorded by tests/make_metric_cases.py."""
import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from bat.events import median3
from bat.frontend import Frontend
from bat.listing import DataError, is_event_data
from bat.data import ClipKey, SkipLog
from bat.sed import (EventDataset, collate_events, detect_events, frame_map, list_events, onset_f1, recording_batches,
                     recording_frames, sed_metrics, target_grid)

CASES = json.loads((__import__("pathlib").Path(__file__).parent / "golden" / "metric_cases.json").read_text())


def test_target_grid_uses_patch_start_times_inclusive():
    y = target_grid([("a", 0.16, 0.5), ("b", 0.0, 0.1), ("b", 0.17, 0.3), ("a", 1.0, 99.0)], 8, ["a", "b"])
    assert y.shape == (8, 2) and y.dtype == np.float32
    # a: patches starting at 160, 320, 480 ms lie in [160, 500]; 1000 ms .. end -> patches 7 (1120 ms)
    assert y[:, 0].tolist() == [0, 1, 1, 1, 0, 0, 0, 1]
    # b: [0, 100] holds patch 0 only; [170, 300] holds no patch start at all (REF's alignment)
    assert y[:, 1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(DataError, match="not among"):
        target_grid([("zzz", 0, 1)], 4, ["a"])


def test_median_filter_matches_scipy_medfilt():
    for case in CASES["medfilt"]:
        np.testing.assert_allclose(median3(np.array(case["x"])), case["medfilt3"], rtol=0, atol=0)


def test_detect_events_hand_worked():
    s = np.array([0.9, 0.1, 0.5, 0.6, 0.7, 0.1, 0.0, 0.4])
    # medfilt3 (zero ends): [0.1, 0.5, 0.5, 0.6, 0.6, 0.1, 0.1, 0.0] -> patches 1..4 >= 0.3
    assert detect_events(s[:, None], ["x"]) == [("x", 0.16, 0.64)]
    # a constant 0.3 is active everywhere (the threshold is inclusive); the zero-padded filter keeps both ends
    two = np.stack([s, np.full(8, 0.3)], 1)
    assert detect_events(two, ["x", "y"]) == [("y", 0.0, 1.12), ("x", 0.16, 0.64)]


def test_onset_f1_hand_worked():
    ref = [[("dog", 1.0, 2.0), ("dog", 5.0, 6.0)]]
    est = [[("dog", 1.12, 1.5), ("dog", 5.3, 6.0), ("cat", 1.0, 2.0)]]
    m = onset_f1(ref, est)
    assert (m["num_matched_events"], m["num_ref_events"], m["num_est_events"]) == (1, 2, 3)
    assert m["onset_precision"] == pytest.approx(1 / 3) and m["onset_recall"] == pytest.approx(1 / 2)
    assert m["onset_f1"] == pytest.approx(0.4)  # 2 TP / (N_ref + N_est) = 2 / 5
    # one-to-one: two detections of one event count once; the collar edge (0.2 s) is inside
    m = onset_f1([[("a", 0.16, 1.0)]], [[("a", 0.36, 1.0), ("a", 0.2, 1.0)]])
    assert m["num_matched_events"] == 1 and m["onset_f1"] == pytest.approx(2 / 3)
    # a maximum matching: 1.18 could take either reference, but 1.5 only the second
    m = onset_f1([[("a", 1.0, 2), ("a", 1.35, 2)]], [[("a", 1.18, 2), ("a", 1.5, 2)]])
    assert m["num_matched_events"] == 2 and m["onset_f1"] == 1.0
    # counts are summed over files (micro): a perfect file does not make up for a missed one
    m = onset_f1([[("a", 1, 2)], [("a", 1, 2)]], [[("a", 1, 2)], []])
    assert m["onset_f1"] == pytest.approx(2 / 3)
    # nothing detected: precision undefined, F1 NaN (as sed_eval)
    m = onset_f1([[("a", 1, 2)]], [[]])
    assert math.isnan(m["onset_f1"]) and m["onset_recall"] == 0.0


def test_onset_f1_equals_sed_eval():
    for case in CASES["onset_f1"]:
        refs = [[tuple(e) for e in f["ref"]] for f in case["files"]]
        ests = [[tuple(e) for e in f["est"]] for f in case["files"]]
        m, want = onset_f1(refs, ests), case["sed_eval"]
        for ours, theirs in (("onset_f1", "f_measure"), ("onset_precision", "precision"), ("onset_recall", "recall")):
            if want[theirs] is None:
                assert math.isnan(m[ours])
            else:
                assert m[ours] == pytest.approx(want[theirs], abs=1e-12)


def test_frame_map_micro_and_macro():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.1, 0.2]])
    targets = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
    micro, macro = frame_map(scores, targets)
    # flattened ranking 0.9+ 0.8- 0.7+ 0.6+ ...: AP = (1/1 + 2/3 + 3/4) / 3
    assert micro == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert macro == pytest.approx((1.0 + 1.0) / 2)


def test_sed_metrics_perfect_prediction():
    events = [[("a", 0.32, 0.96)], [("b", 0.0, 0.48), ("a", 1.6, 2.0)]]
    scores = [target_grid(ev, 16, ["a", "b"]) for ev in events]
    m = sed_metrics(scores, events, ["a", "b"])
    assert m["onset_f1"] == 1.0 and m["frame_mAP"] == 1.0 and m["frame_mAP_macro"] == 1.0


def write_wav(path, seconds, sr=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(int(seconds * sr))).astype(np.float32), sr)


def make_hear(root):
    root.mkdir(parents=True)
    (root / "labelvocabulary.csv").write_text("idx,label\n0,door\n1,cough\n")
    (root / "task_metadata.json").write_text('{"task_name": "toy", "embedding_type": "event"}')
    for split in ("train", "valid", "test"):
        names = {f"{split}{i}.wav": [{"label": "door", "start": 160.0 + 500 * i, "end": 900.0 + 500 * i}]
                 for i in range(2)}
        names[f"{split}0.wav"].append({"label": "cough", "start": 0.0, "end": 320.0})
        (root / f"{split}.json").write_text(json.dumps(names))
        for n in names:
            write_wav(root / "48000" / split / n, 2.0, 48000)
            write_wav(root / "16000" / split / n, 2.0)
    return root


def test_hear_layout_is_listed_with_vocabulary_order_and_16k_audio(tmp_path):
    root = make_hear(tmp_path / "task")
    assert is_event_data(root)
    items = list_events(root, "valid")
    assert items.classes == ["door", "cough"] and items.source == "hear"
    assert [p.split("/")[-3:] for p in items.files] == [["16000", "valid", "valid0.wav"], ["16000", "valid", "valid1.wav"]]
    assert sorted(items.events[0]) == [("cough", 0.0, 0.32), ("door", 0.16, 0.9)]
    with pytest.raises(DataError, match="split"):
        list_events(root, "dev")


def test_event_csv_with_empty_rows_and_bad_times(tmp_path):
    write_wav(tmp_path / "a.wav", 1.0)
    write_wav(tmp_path / "b.wav", 1.0)
    csv = tmp_path / "ev.csv"
    csv.write_text("path,label,onset_s,offset_s\na.wav,bird,0.1,0.5\na.wav,car,0.3,0.9\nb.wav,,,\n")
    assert is_event_data(csv)
    items = list_events(csv)
    assert items.classes == ["bird", "car"] and len(items) == 2 and items.events[1] == []
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,onset_s,offset_s\na.wav,bird,0.5,0.1\n")
    with pytest.raises(DataError, match="onset_s <= offset_s"):
        list_events(bad)
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\na.wav,bird\n")
    assert not is_event_data(plain)


def test_event_dataset_normalises_whole_recording_then_pads(tmp_path):
    root = make_hear(tmp_path / "task")
    items = list_events(root, "train")
    frames = recording_frames(items)
    assert frames == 192  # 2 s -> 201 frames -> 12 whole patches
    fe = Frontend("bat")
    spec, y, idx = EventDataset(items, items.classes, fe, target_frames=256)[0]
    whole = fe(torch.from_numpy(sf.read(items.files[0], dtype="float32")[0])[None])[0]
    assert spec.shape == (1, 256, 128) and y.shape == (16, 2)
    torch.testing.assert_close(spec[:, :201], whole)  # same numbers as the unpadded recording
    assert spec[:, 201:].abs().max() == 0
    np.testing.assert_array_equal(y.numpy(), target_grid(items.events[0], 16, items.classes))
    # evaluation keeps the recording's own length
    spec, y, _ = EventDataset(items, items.classes, fe)[1]
    assert spec.shape == (1, 201, 128) and y.shape == (12, 2)
    x, t, ids, skipped = collate_events([EventDataset(items, items.classes, fe, 192)[i] for i in range(2)])
    assert x.shape == (2, 1, 192, 128) and t.shape == (2, 12, 2) and ids == [0, 1] and skipped == []
    # fine-tuning's coloured noise (REF: 30 % of the training recordings) goes on the waveform before the front-end
    torch.manual_seed(0)
    noisy = EventDataset(items, items.classes, fe, target_frames=256, noise_prob=1.0)[0][0]
    assert noisy.shape == (1, 256, 128)
    assert not torch.allclose(noisy[:, :201], whole) and noisy[:, 201:].abs().max() == 0
    torch.testing.assert_close(EventDataset(items, items.classes, fe, target_frames=256, noise_prob=0.0)[0][0][:, :201], whole)
    # asked for by a ClipKey (finetune.py's training stream), a recording's noise comes from the key alone
    noisy = EventDataset(items, items.classes, fe, target_frames=256, noise_prob=1.0)
    before = torch.get_rng_state()
    same = [noisy[ClipKey(0, (0, 0, 5, 1))][0] for _ in range(2)]
    assert torch.equal(*same) and not torch.equal(same[0], noisy[ClipKey(0, (0, 0, 6, 1))][0])
    assert torch.equal(torch.get_rng_state(), before)


def test_recording_batches_skip_unreadable_batches_and_stop_when_nothing_is_readable():
    """finetune.py's SED training batches: a batch whose every recording is unreadable is skipped and counted in
    the batches taken (resume restarts the stream after it); once every recording is unreadable, one error."""
    spec, y = torch.zeros(1, 1, 16, 128), torch.zeros(1, 1, 2)
    bad = lambda f: (None, None, [], [(f, "cannot decode")])  # noqa: E731 - collate_events of unreadable files
    stream = iter([(spec, y, [0], []), bad("b.wav"), bad("c.wav"), (spec, y, [0], [("b.wav", "cannot decode")])])
    skips = SkipLog(stream=io.StringIO())
    assert [taken for _, _, taken in recording_batches(stream, skips, ["a.wav", "b.wav", "c.wav"])] == [1, 3]
    assert skips.seen == {"b.wav": "cannot decode", "c.wav": "cannot decode"}
    with pytest.raises(DataError, match="no usable clip in the training recordings: all 2"):
        next(recording_batches(iter([bad("b.wav"), bad("c.wav"), bad("b.wav")]), skips, ["b.wav", "c.wav"]))


@pytest.mark.parametrize("file, text, match", [
    ("labelvocabulary.csv", b"idx,label\n0,door\n1,caf\xe9\n", "not UTF-8"),
    ("labelvocabulary.csv", b"index,name\n0,door\n", "needs the columns idx and label"),
    ("labelvocabulary.csv", b"idx,label\nzero,door\n", "whole number"),
    ("labelvocabulary.csv", b"idx,label\n0,door\n1,cough\n2,door\n", "every label must be given once"),
    ("labelvocabulary.csv", b"idx,label\n0,door\n1\n", "every label must be given once"),
    ("valid.json", b"{not json", "not a HEAR split table"),
    ("valid.json", b"[1, 2]", "not a HEAR split table"),
    ("valid.json", b'{"valid0.wav": [{"label": "door", "start": 0}]}', "label, start and end"),
])
def test_a_broken_hear_task_is_one_data_error(tmp_path, file, text, match):
    root = make_hear(tmp_path / "task")
    (root / file).write_bytes(text)
    with pytest.raises(DataError, match=match):
        list_events(root, "valid")


def test_event_times_and_headers_that_would_silently_lose_events(tmp_path):
    """HEAR events with end < start, negative or non-finite times are refused as the CSV's are (they trained
    nothing and scored NaN); a CSV header with spaces is read; event data without any event is refused."""
    root = make_hear(tmp_path / "task")
    for start, end in ((900, 100), (-5, 100), ("NaN", 100), (0, "Infinity")):
        (root / "valid.json").write_text('{"valid0.wav": [{"label": "door", "start": %s, "end": %s}]}' % (start, end))
        with pytest.raises(DataError, match=r"valid0.wav: need 0 <= start <= end \(ms\)"):
            list_events(root, "valid")
    write_wav(tmp_path / "a.wav", 1.0)
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("path, label, onset_s, offset_s\na.wav, bird, 0.1, 0.5\n")
    assert list_events(spaced).events == [[("bird", 0.1, 0.5)]]
    for text, match in (("path,onset_s,offset_s\na.wav,0.1,0.5\n", "needs a 'label' column"),
                        ("path,label,onset_s,offset_s\na.wav,,,\n", "no labelled events"),
                        ("path,label,onset_s,offset_s\na.wav,bird,0.1,inf\n", "need 0 <= onset_s <= offset_s")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(DataError, match=match):
            list_events(tmp_path / "bad.csv")


def test_recordings_under_one_patch_are_scored_and_an_unusable_validation_split_is_one_error(tmp_path):
    """A 0.1-s recording (10 frames, under one 16-frame patch) crashed the encoder's patch embedding in validation
    and test; now padded to one patch as a short training clip is. A validation split without one readable file
    is one DataError (was numpy's 'need at least one array to concatenate'). No scores, no events."""
    import bat
    from bat.heads import build_head
    from bat.sed import event_frontend, plan_splits, predict_recordings, valid_frame_map
    from synth_sets import make_event_task

    task = make_event_task(str(tmp_path / "task"), n_train=1, n_valid=1, n_test=1, train_s=2.0, test_s=2.0)
    _, valid, _ = plan_splits(task)
    sf.write(valid.files[0], np.zeros(1600, np.float32), 16000)  # 0.1 s
    enc = bat.load_encoder("random:tiny")
    head = build_head("lp", enc.cfg.dim, enc.cfg.depth, len(valid.classes), mode="frame")
    ds = EventDataset(valid, valid.classes, event_frontend(enc))
    assert ds[0][0].shape[1] == 16 and ds[0][1].shape == (1, len(valid.classes))
    scores, _ = predict_recordings(enc, head, ds, torch.device("cpu"))
    assert scores[0].shape == (1, len(valid.classes))
    assert valid_frame_map(enc, head, valid, valid.classes, torch.device("cpu")) == 0.0  # no positive frame: 0, as sklearn
    with open(valid.files[0], "wb") as f:
        f.write(b"not audio")
    with pytest.raises(DataError, match="no usable validation recordings"):
        valid_frame_map(enc, head, valid, valid.classes, torch.device("cpu"), skips=SkipLog())
    assert detect_events(np.zeros((0, 2)), ["a", "b"]) == []
