"""The dataset layer: every dataset path of INTERFACE.md, splits, loading, skipping bad files."""
import io
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from bat import demo
from bat.audio import AudioError
from bat.data import (AudioDataset, DemoDataset, Example, SkipLog, Skipped, collate, fit_length, load_segment,
                      make_loader, next_usable)
from bat.listing import (SCV2_CLASSES, DataError, detect_source, durations, is_event_data, is_speech_data, list_dataset,
                         stratified_split)
from bat.tasks import resolve_task

SR = 16000


def tone(seconds=0.25, f=440.0, sr=SR, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


def write(path, seconds=0.25, sr=SR, f=440.0, channels=1, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, tone(seconds, f, sr, channels), sr, format=fmt)
    return str(path)


def corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"RIFF\x00\x00\x00\x00WAVEjunk-not-audio")
    return str(path)


# ------------------------------------------------------------------------------ demo


def test_demo_clips_are_deterministic_and_distinct():
    a, la = demo.demo_clip(7, seed=3, seconds=0.5)
    b, lb = demo.demo_clip(7, seed=3, seconds=0.5)
    c, _ = demo.demo_clip(7, seed=4, seconds=0.5)
    assert a.dtype == np.float32 and a.shape == (8000,)
    assert np.array_equal(a, b) and la == lb == demo.DEMO_CLASSES[7 % len(demo.DEMO_CLASSES)]
    assert not np.array_equal(a, c)
    assert len(demo.DEMO_CLASSES) >= 5
    waves, labels = demo.demo_dataset(2 * len(demo.DEMO_CLASSES), seconds=0.5, seed=0)
    assert np.isfinite(waves).all() and np.abs(waves).max() <= 1.0
    assert (np.abs(waves).max(1) > 1e-3).all()  # every clip holds an audible event
    assert labels[: len(demo.DEMO_CLASSES)] == list(demo.DEMO_CLASSES)


def test_write_demo_dataset_is_a_labelled_folder(tmp_path):
    paths = demo.write_demo_dataset(tmp_path / "d", clips_per_class=2, seconds=0.5, seed=1)
    items = list_dataset(tmp_path / "d")
    assert len(items) == len(paths) == 2 * len(demo.DEMO_CLASSES)
    assert items.classes == sorted(demo.DEMO_CLASSES) and items.task == "multiclass"
    assert all(os.path.basename(os.path.dirname(f)) == lab[0] for f, lab in zip(items.files, items.labels))


def test_demo_dataset_in_memory_matches_generator():
    ds = DemoDataset(4, seconds=0.5, seed=2)
    ex = ds[3]
    wave, label = demo.demo_clip(3, 2, 0.5)
    assert torch.equal(ex.waveform, torch.from_numpy(wave)) and ds.classes[ex.target] == label
    assert DemoDataset(4, 0.5, 2, labelled=False)[0].target is None


# ------------------------------------------------------------------------------ listing


def test_folder_labels_are_the_first_subfolder(tmp_path):
    write(tmp_path / "dog" / "a.wav")
    write(tmp_path / "dog" / "deep" / "b.flac", fmt="FLAC")
    write(tmp_path / "cat" / "c.ogg", fmt="OGG")
    (tmp_path / "cat" / "notes.txt").write_text("not audio")
    items = list_dataset(tmp_path)
    assert detect_source(tmp_path) == "folder"
    assert sorted(os.path.relpath(f, tmp_path) for f in items.files) == ["cat/c.ogg", "dog/a.wav", "dog/deep/b.flac"]
    assert dict(zip((os.path.basename(f) for f in items.files), (lab[0] for lab in items.labels))) == {
        "c.ogg": "cat", "a.wav": "dog", "b.flac": "dog"}
    assert items.classes == ["cat", "dog"]
    assert items.targets().tolist() == [items.classes.index(lab[0]) for lab in items.labels]


def test_folder_with_audio_in_the_root_is_refused_for_labels_but_fine_unlabelled(tmp_path):
    write(tmp_path / "loose.wav")
    write(tmp_path / "x" / "a.wav")
    with pytest.raises(DataError, match="subfolder per class"):
        list_dataset(tmp_path)
    items = list_dataset(tmp_path, labelled=False)
    assert len(items) == 2 and items.task == "unlabelled" and items.labels == [[], []]


def test_a_source_without_labels_is_told_apart_from_one_with_a_bad_label(tmp_path):
    """NoLabels (bat.shards then writes the audio alone) only where the source holds no labels at all; a
    labelled source with one bad entry is a plain DataError (its labels must not be dropped silently)."""
    from bat.listing import NoLabels

    write(tmp_path / "flat" / "a.wav")
    write(tmp_path / "flat" / "b.wav")
    write(tmp_path / "mixed" / "loose.wav")
    write(tmp_path / "mixed" / "dog" / "a.wav")
    (tmp_path / "no_label.csv").write_text("path\nflat/a.wav\n")
    (tmp_path / "empty_label.csv").write_text("path,label\nflat/a.wav,dog\nflat/b.wav,\n")
    for src in ("flat", "no_label.csv"):
        with pytest.raises(NoLabels):
            list_dataset(tmp_path / src)
    for src, reason in (("mixed", "subfolder per class"), ("empty_label.csv", "empty 'label'")):
        with pytest.raises(DataError, match=reason) as e:
            list_dataset(tmp_path / src)
        assert not isinstance(e.value, NoLabels)


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no audio"):
        list_dataset(tmp_path / "empty")


def test_csv_single_label_relative_and_absolute_paths(tmp_path):
    a = write(tmp_path / "audio" / "a.wav")
    b = write(tmp_path / "elsewhere" / "b.wav")
    (tmp_path / "m.csv").write_text(f"path,label,extra\naudio/a.wav,bird,1\n{b},car,2\n")
    items = list_dataset(tmp_path / "m.csv")
    assert items.task == "multiclass" and items.classes == ["bird", "car"]
    assert [os.path.realpath(f) for f in items.files] == [os.path.realpath(a), os.path.realpath(b)]
    assert items.targets().tolist() == [0, 1]


def test_csv_multilabel(tmp_path):
    write(tmp_path / "a.wav")
    write(tmp_path / "b.wav")
    write(tmp_path / "c.wav")
    (tmp_path / "m.csv").write_text('path,labels\na.wav,speech;music\nb.wav,music\nc.wav,\n')
    items = list_dataset(tmp_path / "m.csv")
    assert items.task == "multilabel" and items.classes == ["music", "speech"]
    assert items.targets().tolist() == [[1, 1], [1, 0], [0, 0]]
    # targets for a test set use the training classes; an unknown label is an error
    assert items.targets(["speech", "music", "dog"]).tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(DataError, match="not among"):
        items.targets(["music"])


def test_csv_errors(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,label\na.wav,x\n")
    with pytest.raises(DataError, match="'path' column"):
        list_dataset(tmp_path / "nopath.csv")
    (tmp_path / "nolabel.csv").write_text("path\na.wav\n")
    with pytest.raises(DataError, match="'label' or 'labels'"):
        list_dataset(tmp_path / "nolabel.csv")
    assert len(list_dataset(tmp_path / "nolabel.csv", labelled=False)) == 1
    (tmp_path / "empty_label.csv").write_text("path,label\na.wav,\n")
    with pytest.raises(DataError, match=":2: empty 'label'"):
        list_dataset(tmp_path / "empty_label.csv")


def test_csv_that_is_not_utf8_is_one_data_error(tmp_path):
    """A Latin-1 manifest (or ESC-50 meta file): one line naming the file, not a UnicodeDecodeError."""
    write(tmp_path / "a.wav")
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("path,label\na.wav,caf\xe9\n".encode("latin-1"))
    for read in (list_dataset, is_event_data, is_speech_data):
        with pytest.raises(DataError) as err:
            read(manifest)
        assert str(err.value) == f"{manifest}: not UTF-8 text (byte 0xe9); save the CSV as UTF-8"
    assert resolve_task("auto", manifest).name == "generic"  # the listing reports it, with the script's other errors
    meta = make_esc50(tmp_path / "esc") / "meta" / "esc50.csv"
    meta.write_bytes(meta.read_bytes().replace(b"dog", b"d\xe9g"))
    with pytest.raises(DataError, match="esc50.csv: not UTF-8 text"):
        list_dataset(tmp_path / "esc")


def make_esc50(root, per_fold=2, categories=("dog", "rain", "clock")):
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for k in range(per_fold):
            target = (fold + k) % len(categories)
            name = f"{fold}-{k}-A-{target}.wav"
            write(root / "audio" / name, seconds=0.2, f=200.0 * (target + 1))
            rows.append(f"{name},{fold},{target},{categories[target]},False,{k},A")
    os.makedirs(root / "meta", exist_ok=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def test_esc50_layout_and_folds(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    items = list_dataset(root)
    assert items.source == "esc50" and items.quality == "VHQ"
    assert items.classes == ["dog", "rain", "clock"]  # in `target` order, as REF indexes them
    train, test = items.fold_split(3)
    assert len(test) == 2 and set(test.folds) == {3} and 3 not in set(train.folds) and len(train) == 8
    assert test.targets().tolist() == [(3 + k) % 3 for k in range(2)]
    with pytest.raises(DataError, match="fold 9"):
        items.fold_split(9)
    with pytest.raises(DataError, match="no predefined"):
        items.split("train")
    write(tmp_path / "folder" / "x" / "a.wav")
    with pytest.raises(DataError, match="--fold needs ESC-50"):
        list_dataset(tmp_path / "folder").fold_split(1)


def make_scv2(root, words=("yes", "no", "bed"), per_word=3, noise_seconds=10.4):
    val, test = [], []
    for w in words:
        for k in range(per_word):
            write(root / w / f"spk{k}_nohash_0.wav", seconds=0.5)
        val.append(f"{w}/spk1_nohash_0.wav")
        test.append(f"{w}/spk2_nohash_0.wav")
    write(root / "_background_noise_" / "white.wav", seconds=noise_seconds)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "README.md").write_text("speech commands")
    return root


def test_speech_commands_layout(tmp_path):
    items = list_dataset(make_scv2(tmp_path / "sc"))
    assert items.source == "scv2" and items.classes == list(SCV2_CLASSES) and len(items.classes) == 12
    words = [(os.path.basename(os.path.dirname(f)), lab[0], s) for f, lab, s in
             zip(items.files, items.labels, items.splits) if "_background_noise_" not in f]
    assert ("bed", "_unknown_", "train") in words  # a non-target word is _unknown_
    assert ("yes", "yes", "val") in words and ("no", "no", "test") in words
    # 10.4 s of background noise -> 10 one-second _silence_ segments, 80/10/10 by position (REF)
    silence = [(seg, s) for lab, seg, s in zip(items.labels, items.segments, items.splits) if lab == ["_silence_"]]
    assert [seg for seg, _ in silence] == [(float(i), 1.0) for i in range(10)]
    assert [s for _, s in silence] == ["train"] * 8 + ["val"] + ["test"]
    train, test = items.split("train"), items.split("test")
    assert len(train) == 3 + 8 and len(test) == 3 + 1
    ds = AudioDataset(test, clip_samples=SR)
    ex = ds[len(test) - 1]  # the test silence segment: seconds 9-10 of the noise file
    assert isinstance(ex, Example) and ex.waveform.shape == (SR,) and test.classes[ex.target] == "_silence_"


def test_load_segment_cuts_at_the_native_rate(tmp_path):
    t = np.arange(3 * 8000) / 8000
    x = np.where(t < 1, 0.1, np.where(t < 2, 0.5, 0.9)).astype(np.float32)
    sf.write(tmp_path / "steps.wav", x, 8000, subtype="FLOAT")
    y = load_segment(tmp_path / "steps.wav", 1.0, 1.0)
    assert y.shape == (SR,) and abs(float(np.median(y)) - 0.5) < 1e-3
    with pytest.raises(AudioError):
        load_segment(corrupt(tmp_path / "bad.wav"), 0.0, 1.0)


def test_durations_and_stratified_split(tmp_path):
    for c in ("a", "b"):
        for k in range(5):
            write(tmp_path / c / f"{k}.wav", seconds=0.25 + 0.25 * k)
    corrupt(tmp_path / "a" / "zz.wav")
    items = list_dataset(tmp_path)
    d = durations(items)
    assert np.isnan(d[items.files.index(str(tmp_path / "a" / "zz.wav"))])
    assert np.nanmax(d) == pytest.approx(1.25)
    train, test = stratified_split(items, 0.2, seed=0)
    assert len(train) + len(test) == len(items) and not set(train.files) & set(test.files)
    assert sorted(lab[0] for lab in test.labels) == ["a", "b"]  # one of each class held out
    assert stratified_split(items, 0.2, seed=0)[1].files == test.files  # deterministic


def test_stratified_split_keeps_the_copies_of_a_clip_on_one_side(tmp_path):
    rows = []
    for c in ("a", "b"):
        for k in range(6):
            write(tmp_path / f"{c}{k}.wav", seconds=0.1)
            rows.append(f"{c}{k}.wav,{c}")
    (tmp_path / "once.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    # Every clip listed again further down (as ./name), some three times.
    again = [f"./{r}" for r in rows] + [f"./{r}" for r in rows[::3]]
    (tmp_path / "twice.csv").write_text("path,label\n" + "\n".join(rows + again) + "\n")
    name = lambda items: sorted(os.path.basename(f) for f in items.files)  # noqa: E731
    for seed in range(5):
        train, test = stratified_split(list_dataset(tmp_path / "twice.csv"), 0.3, seed=seed)
        assert not set(name(train)) & set(name(test)), seed
        assert len(train) + len(test) == len(rows) + len(again)
        # The same clips as the list without repeated rows: a repeated row does not change the draw.
        assert sorted(set(name(test))) == name(stratified_split(list_dataset(tmp_path / "once.csv"), 0.3, seed=seed)[1])


# ------------------------------------------------------------------------------ loading


def test_fit_length_crops_and_pads():
    x = torch.arange(10.0)
    assert torch.equal(fit_length(x, 4, train=False), torch.arange(4.0))  # evaluation: first window
    torch.manual_seed(0)
    # training (REF's AudioSet rule): the clip is rolled circularly, then a random window is cut
    crops = {tuple(fit_length(x, 4, train=True).tolist()) for _ in range(60)}
    assert len(crops) > 5 and all(c == tuple((int(c[0]) + k) % 10 for k in range(4)) for c in crops)
    assert any(c[0] > c[-1] for c in crops)  # some windows wrap around the end of the clip
    assert torch.equal(fit_length(x, 12, train=False), torch.cat([x, torch.zeros(2)]))
    rolled = fit_length(x, 12, train=True)
    assert rolled.shape == (12,) and sorted(rolled.tolist()) == sorted(x.tolist() + [0.0, 0.0])
    assert fit_length(x, None, train=True) is x


def test_collate_pads_to_the_longest_and_drops_skipped():
    items = [Example(torch.ones(3), 1, 0), Skipped(1, "bad.wav", "cannot decode"), Example(torch.ones(5), 0, 2)]
    b = collate(items)
    assert b.waveforms.shape == (2, 5) and b.waveforms.dtype == torch.float32
    assert b.waveforms[0].tolist() == [1, 1, 1, 0, 0] and b.lengths.tolist() == [3, 5]
    assert b.targets.dtype == torch.long and b.targets.tolist() == [1, 0] and b.indices.tolist() == [0, 2]
    assert b.skipped == [("bad.wav", "cannot decode")]
    multi = collate([Example(torch.ones(2), torch.tensor([1.0, 0.0]), 0)])
    assert multi.targets.dtype == torch.float32 and multi.targets.shape == (1, 2)
    empty = collate([Skipped(0, "x.wav", "empty")])
    assert len(empty) == 0 and empty.targets is None


def test_stereo_and_other_rates_become_mono_16k(tmp_path):
    write(tmp_path / "c" / "st.wav", seconds=0.5, sr=44100, channels=2)
    ex = AudioDataset(list_dataset(tmp_path))[0]
    assert ex.waveform.shape == (8000,) and ex.waveform.dtype == torch.float32


def test_corrupt_files_are_skipped_counted_and_strict_raises(tmp_path, capsys):
    for c in ("a", "b"):
        for k in range(3):
            write(tmp_path / c / f"{k}.wav")
    bad = corrupt(tmp_path / "a" / "bad.wav")
    write(tmp_path / "b" / "empty.wav", seconds=0.0)
    items = list_dataset(tmp_path)
    ds = AudioDataset(items, clip_samples=2000, train=True)
    log = SkipLog()
    seen = 0
    for epoch in range(2):  # workers > 0: items, markers and batches must pickle
        for batch in make_loader(ds, batch_size=3, shuffle=True, workers=2, seed=epoch):
            log.add(batch.skipped)
            seen += len(batch)
            assert batch.waveforms.shape[1] == 2000
    assert seen == 2 * 6 and log.count == 2  # counted once per file, not once per epoch
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and any(bad in line and "cannot decode" in line for line in err)
    assert any("empty.wav" in line and "empty" in line for line in err)
    with pytest.raises(AudioError, match="bad.wav"):
        strict = SkipLog(strict=True)
        for batch in make_loader(ds, batch_size=8):
            strict.add(batch.skipped)


def test_a_float_file_with_implausibly_large_samples_is_skipped_naming_it(tmp_path, capsys):
    spiked = tone(0.5)
    spiked[1000] = 1e18  # a corrupt float WAV: finite, but the power spectrum would overflow to inf/NaN
    os.makedirs(tmp_path / "a")
    sf.write(tmp_path / "a" / "spike.wav", spiked, SR, subtype="FLOAT")
    sf.write(tmp_path / "a" / "int16_scaled.wav", tone(0.5) * 1e5, SR, subtype="FLOAT")  # ~30,000: int16-scaled
    write(tmp_path / "b" / "ok.wav")
    ds = AudioDataset(list_dataset(tmp_path))
    log = SkipLog()
    batches = list(make_loader(ds, batch_size=3))
    for batch in batches:
        log.add(batch.skipped)
    assert sum(len(b) for b in batches) == 2 and log.count == 1
    assert np.abs(ds[ds.items.files.index(str(tmp_path / "a" / "int16_scaled.wav"))].waveform.numpy()).max() > 29_000
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(tmp_path / "a" / "spike.wav") in line and "implausibly large samples (up to 1e+18" in line
    with pytest.raises(AudioError, match=r"spike\.wav: implausibly large samples"):
        load_segment(tmp_path / "a" / "spike.wav", 0.0, 0.25)  # a window of a long file, as SED reads it


def test_unlabelled_dataset_has_no_targets(tmp_path):
    write(tmp_path / "a" / "x.wav")
    ds = AudioDataset(list_dataset(tmp_path), labelled=False)
    assert ds[0].target is None and collate([ds[0]]).targets is None


def _batch(good, bad):
    """A Batch of `good` (index list) usable clips and `bad` [(path, reason)] skipped ones."""
    return collate([Example(torch.ones(4), 0, i) for i in good] + [Skipped(0, p, r) for p, r in bad])


def test_next_usable_gives_up_once_every_file_is_unreadable(capsys):
    files = ["a.wav", "b.wav", "c.mp3"]
    reasons = {"a.wav": "cannot decode (Format not recognised)", "b.wav": "cannot decode (Format not recognised)",
               "c.mp3": "empty file (0 bytes)"}
    stream = iter([_batch([], [(f, reasons[f])]) for f in files * 100])
    log = SkipLog()
    with pytest.raises(DataError) as err:
        next_usable(stream, log, files)
    msg = str(err.value)
    assert "\n" not in msg and "all 3 file(s) were tried" in msg
    assert "2 x cannot decode (Format not recognised)" in msg and "1 x empty file (0 bytes)" in msg
    assert next(stream) is not None and log.count == 3  # it stopped right after the last file failed
    assert len(capsys.readouterr().err.strip().splitlines()) == 3  # one warning per file


def test_next_usable_never_gives_up_while_one_file_is_good():
    """Two epochs whose only good clip sits at the start of one and the end of the next: many empty
    batches in a row, more than an epoch holds, and still no error."""
    files = [f"{i}.wav" for i in range(6)]
    bad = lambda i: _batch([], [(files[i], "cannot decode")])  # noqa: E731
    stream = iter([_batch([0], []), bad(1), bad(2), bad(3), bad(4), bad(5),
                   bad(5), bad(4), bad(3), bad(2), bad(1), _batch([0], [])])
    log = SkipLog()
    first, taken = next_usable(stream, log, files)
    assert first.indices.tolist() == [0] and taken == 1
    second, taken = next_usable(stream, log, files)
    assert second.indices.tolist() == [0] and taken == 11


def test_skip_report_tells_found_bad_from_never_read():
    files = [f"{i}.wav" for i in range(10)]
    log = SkipLog(stream=io.StringIO())
    stream = iter([_batch([0, 1], [("2.wav", "cannot decode")]), _batch([3], [])])
    for _ in range(2):
        next_usable(stream, log, files)
    report = log.report(files)
    assert report == {"skipped_files": 1, "unreadable_files": [["2.wav", "cannot decode"]], "unread_files": 6}
    restored = SkipLog()
    restored.load(log.state())
    assert restored.report(files) == report


def test_audioset_manifests_from_refs_layout_and_a_malformed_segments_line(tmp_path):
    """python -m bat.audioset: one path,labels manifest per split, class names from the ontology, only the eval
    list's classes, only clips whose wav exists; a line that is not YTID,start,end,labels names its place."""
    from bat.audioset import write_manifests
    import json as json_
    root = tmp_path / "AudioSet"
    (root / "eval_segments").mkdir(parents=True)
    (root / "balanced_train_segments").mkdir()
    (root / "ontology.json").write_text(json_.dumps([{"id": "/m/dog", "name": "Dog"}, {"id": "/m/cat", "name": "Cat"},
                                                     {"id": "/m/car", "name": "Car"}]))
    header = "# Segments csv\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (root / "eval_segments.csv").write_text(header + 'aaa, 0.000, 10.000, "/m/dog,/m/cat"\nmissing, 0, 10, "/m/dog"\n')
    (root / "balanced_train_segments.csv").write_text(header + 'bbb, 0.000, 10.000, "/m/car,/m/dog"\n')
    for path in ("eval_segments/Yaaa.wav", "balanced_train_segments/Ybbb.wav"):
        (root / path).write_bytes(b"")
    counts = write_manifests(str(root), str(tmp_path / "out"))
    assert counts == {"as20k_train.csv": 1, "as_eval.csv": 1}
    lines = (tmp_path / "out" / "as20k_train.csv").read_text().splitlines()
    assert lines == ["path,labels", f"{root / 'balanced_train_segments' / 'Ybbb.wav'},Dog"]  # Car: not in eval
    write_manifests(str(root), str(tmp_path / "out"))  # a re-run replaces its own manifests
    (tmp_path / "out" / "as_eval.csv").write_text("my,own\nnotes,here\n")
    with pytest.raises(FileExistsError, match="is not a manifest of"):
        write_manifests(str(root), str(tmp_path / "out"))
    assert (tmp_path / "out" / "as_eval.csv").read_text() == "my,own\nnotes,here\n"
    (root / "eval_segments.csv").write_text(header + "aaa 0.000 10.000\n")
    with pytest.raises(ValueError, match=r"eval_segments.csv:3: not a segments line"):
        write_manifests(str(root), str(tmp_path / "out2"))


def test_demo_cli_refuses_bad_flags_and_folders_holding_other_files(tmp_path, capsys):
    """python -m bat.demo: bad flags are one usage error; a re-run writes exactly the new set (fewer clips:
    the extra ones go); a folder holding anything but demo clips is refused and left as it was."""
    for flags in (["--clips-per-class", "0"], ["--seconds", "nan"], ["--seconds", "1e9"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as e:
            demo.main(["--out", str(tmp_path / "bad"), *flags])
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
            "python -m bat.demo: error: " + flags[0])
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "d"
    demo.main(["--out", str(out), "--clips-per-class", "3", "--test-clips-per-class", "1"])
    demo.main(["--out", str(out), "--clips-per-class", "2", "--test-clips-per-class", "1"])
    assert sorted(os.listdir(out / "train" / "tone")) == ["tone_000.wav", "tone_001.wav"]
    (out / "test" / "tone" / "mine.wav").write_bytes(b"my recording")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: {out / 'test' / 'tone' / 'mine.wav'}: not a demo clip; choose " \
                                        "another --out (the demo set would mix with it)", err
    assert (out / "test" / "tone" / "mine.wav").read_bytes() == b"my recording"
    assert len(os.listdir(out / "train" / "tone")) == 2  # nothing written before the refusal


class _Stalls(torch.utils.data.Dataset):
    """Item 1 never arrives in time (a worker stuck in a read)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 1:
            import time
            time.sleep(60)
        return torch.zeros(1)


def test_a_stalled_loader_worker_ends_the_loop_with_a_reason(monkeypatch):
    """No loop waits forever for data: a batch that does not come from the workers within the timeout is a
    one-line TimeoutError (an OSError, which the scripts print as `error: ...`)."""
    import time

    from bat import data as data_module
    monkeypatch.setattr(data_module, "LOADER_TIMEOUT", 2.0)
    loader = data_module.Loader(_Stalls(), batch_size=1, num_workers=1)
    t0, got = time.time(), []
    with pytest.raises(TimeoutError, match=r"no batch from the data loader workers in 2 s") as e:
        for batch in loader:
            got.append(batch)
    assert isinstance(e.value, OSError) and len(got) == 1 and time.time() - t0 < 30
    assert [len(b) for b in data_module.Loader(_Stalls(), batch_size=2, num_workers=0, sampler=[0, 2, 3])] == [2, 1]


def test_linked_folders_are_listed_once_and_a_loop_of_links_ends(tmp_path):
    """Folders reached through links are followed (a data set may link its parts in), each real folder once:
    a link back up listed every file again (a -> ..), a loop of links never ended."""
    for name in ("dog", "cat"):
        write(tmp_path / "data" / name / "0.wav")
    os.symlink("..", tmp_path / "data" / "dog" / "up")  # back up to data/
    os.symlink(".", tmp_path / "data" / "cat" / "self")
    write(tmp_path / "elsewhere" / "bird" / "1.wav")
    os.symlink(tmp_path / "elsewhere" / "bird", tmp_path / "data" / "bird")  # a linked-in class
    items = list_dataset(tmp_path / "data")
    assert [os.path.relpath(f, tmp_path / "data") for f in items.files] == ["bird/1.wav", "cat/0.wav", "dog/0.wav"]
    assert not is_speech_data(tmp_path / "data")  # walks the same way


def test_esc50_and_speech_commands_lists_that_are_broken(tmp_path):
    root = make_esc50(tmp_path / "esc")
    meta = root / "meta" / "esc50.csv"
    good = meta.read_text()
    meta.write_text(good + "1-00-A-0.wav,1\n")  # a short row
    with pytest.raises(DataError, match="not ESC-50's format"):
        list_dataset(root)
    meta.write_text(good + "1-9-A-0.wav,1,0,cat,False,9,A\n")  # target 0 is dog elsewhere
    with pytest.raises(DataError, match=r"esc50.csv:12: target 0 is 'cat' here but 'dog' above"):
        list_dataset(root)
    meta.write_text(good.splitlines()[0] + "\n")
    with pytest.raises(DataError, match="esc50.csv: no rows"):
        list_dataset(root)
    sc = make_scv2(tmp_path / "sc")
    (sc / "validation_list.txt").write_bytes(b"yes/caf\xe9.wav\n")
    with pytest.raises(DataError, match=r"validation_list.txt: not UTF-8 text \(byte 0xe9\)"):
        list_dataset(sc)
    write(tmp_path / "a.wav")
    (tmp_path / "twice.csv").write_text("path,label\na.wav,dog\n./a.wav,cat\n")
    assert list_dataset(tmp_path / "twice.csv").notes == [
        f"note: {tmp_path / 'twice.csv'} lists 1 clip(s) more than once, e.g. ./a.wav (lines 2 and 3): each copy "
        "counts in training and in its split",
        f"warning: {tmp_path / 'twice.csv'} gives ./a.wav other labels on line 3 (cat) than on line 2 (dog)"]
    (tmp_path / "same.csv").write_text("path,labels\na.wav,dog;cat\n./a.wav,cat;dog\n")  # the same labels: a note
    assert [n.split(":")[0] for n in list_dataset(tmp_path / "same.csv").notes] == ["note"]
    (tmp_path / "windows.csv").write_text("path,label,start_s,end_s\na.wav,dog,0,0.1\na.wav,cat,0.1,0.2\n")
    assert len(list_dataset(tmp_path / "windows.csv")) == 2  # other windows of one file are other clips
    (tmp_path / "header_only.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="header_only.csv: no rows below the header"):
        list_dataset(tmp_path / "header_only.csv")



def test_runs_with_nothing_to_train_or_test_on_or_unknown_test_labels_are_refused_when_planned(tmp_path):
    """plan_runs refuses, before any encoder pass or training step, what used to fail only after training
    (or as a traceback): an empty test split, an empty training split, test labels train does not have."""
    from bat.tasks import plan_runs

    esc = make_esc50(tmp_path / "esc")
    meta = esc / "meta" / "esc50.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:1] + [ln for ln in lines[1:] if ln.split(",")[1] == "1"]) + "\n")  # fold 1 only
    with pytest.raises(DataError, match="no training clips \\(fold1\\): every clip is in fold 1"):
        plan_runs(str(esc), fold="1", log=lambda *_: None)
    sc = make_scv2(tmp_path / "sc", noise_seconds=0.5)
    with open(sc / "testing_list.txt", "a") as fh:
        fh.write("yes/gone.wav\nzzz/a.wav\n")
    said = []
    plan_runs(str(sc), log=said.append)
    assert said == [f"note: {sc}/testing_list.txt names 2 file(s) not present, e.g. yes/gone.wav (a partial "
                    "download?): the split is smaller than the list"]
    (sc / "testing_list.txt").write_text("")
    with pytest.raises(DataError, match=r"the test split is empty \(testing_list.txt names no clip\)"):
        plan_runs(str(sc))
    (sc / "testing_list.txt").write_text("\n".join(f"{w}/spk{k}_nohash_0.wav" for w in ("yes", "no", "bed")
                                                   for k in (0, 2)) + "\n")
    with pytest.raises(DataError, match="no training clips: every clip is in the validation or test list"):
        plan_runs(str(sc))
    noise_only = make_scv2(tmp_path / "noise_only", words=(), noise_seconds=12.0)
    with pytest.raises(DataError, match=r"the training clips hold one class \(_silence_\)"):
        plan_runs(str(noise_only))
    for name in ("dog", "cat"):
        write(tmp_path / "train" / name / "a.wav")
        write(tmp_path / "train" / name / "b.wav")
    write(tmp_path / "test" / "cow" / "a.wav")
    with pytest.raises(DataError, match=r"labels \['cow'\] are not among the 2 training classes"):
        plan_runs(str(tmp_path / "train"), str(tmp_path / "test"))
    (tmp_path / "multi.csv").write_text("path,labels\ntrain/dog/a.wav,dog;cat\n")
    with pytest.raises(DataError, match="is multiclass but .*multi.csv is multilabel; both need the same"):
        plan_runs(str(tmp_path / "train"), str(tmp_path / "multi.csv"))


class _SignalDispositions(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import signal
        return torch.tensor([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                             signal.getsignal(signal.SIGTERM) == signal.SIG_IGN])


def test_loader_workers_leave_stop_signals_to_the_run():
    """torchrun and batch schedulers signal the whole process group: a worker that died of SIGTERM would crash
    the run before it saved its state (finetune.py's loaders had no such guard; pretrain.py's had)."""
    from bat.data import Loader

    batches = list(Loader(_SignalDispositions(), batch_size=1, num_workers=1))
    assert all(b.all() for b in batches) and len(batches) == 2


class _WorkerDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.randint(0, 2**30, (1,))  # as a clip's random roll and window are drawn in the worker


def test_batch_stream_workers_draw_differently_on_every_rank():
    """Under torchrun each rank's loader workers must not repeat the other ranks' random rolls and windows;
    one process (rank 0) keeps the draws it always had, and a rank repeats its own."""
    from bat.sampler import batch_stream
    from bat.run_control import kill_worker_processes

    class Epochs(list):  # the same 4 clips every epoch
        def set_epoch(self, epoch):
            pass

    def draws(rank):
        stream, _ = batch_stream(_WorkerDraws(), Epochs(range(4)), 2, workers=1, seed=3, rank=rank)
        return torch.cat([next(stream) for _ in range(2)]).flatten().tolist()

    try:
        assert draws(0) == draws(0) and draws(1) == draws(1) and draws(0) != draws(1)
    finally:  # the endless streams' workers ignore SIGTERM (as the scripts' do): reap them, or pytest -n 0 hangs at exit
        kill_worker_processes()


def test_keyed_training_draws_depend_on_the_stream_position_not_on_the_loader(tmp_path):
    """finetune.py's exact resume with loader workers: a training clip's random window (a long file's, read one
    window at a time), roll, crop, padding and noise are a function of (seed, rank, its place in the stream of
    batches) alone, not of the worker that reads it, where the loader started or the main process's RNG."""
    from bat.data import ClipKey
    from bat.run_control import kill_worker_processes
    from bat.sampler import batch_stream, epoch_sampler

    rng = np.random.default_rng(0)
    for name, samples in (("long", 6 * 4000), ("longer", 6000), ("shorter", 3000)):  # windows of 4000 samples
        sf.write(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(samples)).astype(np.float32), SR, subtype="FLOAT")
    items = list_dataset(tmp_path, labelled=False)
    ds = AudioDataset(items, clip_samples=4000, train=True, labelled=False, noise_std=0.01)

    def stream(workers, start=0, rank=0, batches=4):  # 3 clips in batches of 2: two batches per epoch
        it, _ = batch_stream(ds, epoch_sampler(len(ds), seed=3), 2, workers, 3, start, collate, rank, keyed=True)
        return [next(it) for _ in range(batches)]

    try:
        straight = stream(0)
        torch.manual_seed(123)  # the main process's RNG (the device-side augmentations' draws) plays no part
        for other in (stream(0), stream(2), [*straight[:2], *stream(2, start=2, batches=2)]):
            assert [(b.indices.tolist(), b.waveforms.tolist()) for b in other] == \
                [(b.indices.tolist(), b.waveforms.tolist()) for b in straight]
        assert not torch.equal(stream(0, rank=1, batches=1)[0].waveforms, straight[0].waveforms)  # each rank its own
    finally:  # the endless streams' workers ignore SIGTERM (as the scripts' do): reap them
        kill_worker_processes()
    # the row of the stream's batch b, slot j is the item ClipKey(index, (seed, rank, b, j)), whoever asks for it
    assert torch.equal(ds[ClipKey(int(straight[3].indices[0]), (3, 0, 3, 0))].waveform, straight[3].waveforms[0])
    # each draw differs from clip to clip and epoch to epoch: every clip is seen in two ways over two epochs
    rows = {(int(i), tuple(x.tolist())) for b in straight for i, x in zip(b.indices, b.waveforms)}
    assert len(rows) == 6
    # evaluation draws nothing: a key gives the clip's first window, as its index does
    test = AudioDataset(items, clip_samples=4000, labelled=False)
    assert all(torch.equal(test[ClipKey(i, (3, 0, 5, 1))].waveform, test[i].waveform) for i in range(len(test)))


def test_default_workers_share_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    import bat.cpu
    from bat import data

    monkeypatch.setattr(bat.cpu.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(bat.cpu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(bat.cpu, "cgroup_quota", lambda root="/": None)  # whatever limits the machine running this
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.default_workers() == 4 and data.default_workers(most=32) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes on this node share its 16 CPUs
    assert data.default_workers() == 2
    monkeypatch.setattr(bat.cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # a SLURM allocation
    assert data.default_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.default_workers() == 3
    # A container limited to 2 CPUs (docker --cpus 2) on the 64-CPU node: 2 workers, not 4 (or 64).
    monkeypatch.setattr(bat.cpu.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert data.default_workers() == 4
    monkeypatch.setattr(bat.cpu, "cgroup_quota", lambda root="/": 2.0)
    assert data.default_workers() == 2 and data.default_workers(most=32) == 2


def test_a_long_file_gives_its_window_without_being_decoded_whole(tmp_path, monkeypatch):
    """Probing and fine-tuning on long recordings: training takes a random window (as fit_length's roll and
    cut), evaluation the first (as fit_length), and neither decodes the rest of the file."""
    import bat.data
    from bat.data import AudioDataset, fit_length
    from bat.listing import list_dataset

    n, clip = 16000 * 30, 16000
    ramp = (np.arange(n) / n).astype(np.float32)
    sf.write(tmp_path / "a.wav", ramp, 16000, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", np.sin(np.arange(44100 * 10) * 0.05).astype(np.float32), 44100, subtype="FLOAT")
    items = list_dataset(tmp_path, labelled=False)
    whole = {f: bat.data.load_audio(f) for f in items.files}
    monkeypatch.setattr(bat.data, "load_audio", lambda path, *a, **k: pytest.fail(f"{path} decoded whole"))
    test = AudioDataset(items, clip_samples=clip, labelled=False)
    for i, f in enumerate(items.files):  # the first window, as fit_length cuts it from the whole file
        np.testing.assert_allclose(test[i].waveform.numpy(), fit_length(torch.from_numpy(whole[f]), clip, False),
                                   atol=1e-5)
    a = [str(f) for f in items.files].index(str(tmp_path / "a.wav"))
    for roll in (True, False):  # REF's AudioSet rule (circular) and BirdSet's (a window inside the recording)
        train = AudioDataset(items, clip_samples=clip, train=True, labelled=False, roll=roll)
        torch.manual_seed(0)
        starts = []
        for _ in range(60):
            x = train[a].waveform.numpy().astype(np.float64)
            jumps = np.flatnonzero(np.abs(np.diff(x) - 1 / n) > 1e-6)
            assert len(x) == clip and len(jumps) <= int(roll), jumps  # contiguous (circular: one wrap at most)
            starts.append(x[0])
        assert min(starts) < 0.15 and max(starts) > 0.8
    import soundfile
    from types import SimpleNamespace

    info = soundfile.info(str(tmp_path / "a.wav"))  # a header promising more frames than the file holds:
    monkeypatch.setattr(soundfile, "info", lambda p: SimpleNamespace(frames=3 * info.frames, samplerate=info.samplerate))
    assert AudioDataset(items, clip_samples=clip, labelled=False).load_window(a, clip, 0.9) is None  # read it whole


def test_iterating_a_loader_leaves_the_global_rng_alone(tmp_path):
    """Scoring a validation or test set (make_loader, shuffled or not) must not move torch's global RNG, which the
    training's augmentations draw from: a resumed run that validates more or less often (--eval-every may change
    on resume) would otherwise train on other draws."""
    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", np.zeros(800, dtype=np.float32), SR)
    ds = AudioDataset(list_dataset(tmp_path, labelled=False), labelled=False)
    for shuffle in (False, True):
        torch.manual_seed(0)
        want = torch.rand(3)
        torch.manual_seed(0)
        assert len(list(make_loader(ds, batch_size=2, shuffle=shuffle))) == 2
        assert torch.equal(torch.rand(3), want), shuffle


def test_a_large_multilabel_set_keeps_label_ids_not_a_dense_matrix():
    """AudioSet-2M has 2M clips x 527 classes: a float32 multi-hot matrix is 4.2 GB, and the training set built it
    up to three times per process (targets, balanced-sampling weights, the data set). Label ids are kept instead;
    each clip's row is built when it is loaded, and the sampling weights come from the ids."""
    import tracemalloc

    from bat.listing import AudioList
    from bat.sampler import balanced_weights

    rng = np.random.default_rng(0)
    classes = [f"class {c}" for c in range(527)]
    labels = [[classes[c] for c in rng.choice(527, rng.integers(1, 4), replace=False)] for _ in range(20_000)]
    items = AudioList(files=[f"/data/{i}.wav" for i in range(20_000)], labels=labels, classes=classes,
                      task="multilabel", source="csv", root="/data")
    tracemalloc.start()
    ds = AudioDataset(items, classes, clip_samples=16000, train=True)
    ids = items.sampling_labels(classes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5e6  # a dense [20000, 527] float32 matrix alone is 42 MB
    dense = items.targets(classes)
    assert all(np.array_equal(ds._targets.row(i), dense[i]) for i in (0, 1, 19_999))
    assert torch.allclose(balanced_weights(ids), balanced_weights(torch.from_numpy(dense)), rtol=1e-12, atol=0)


class _FrozenCount(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import gc

        return torch.tensor([gc.get_freeze_count()])


def test_loader_workers_see_the_listing_frozen_and_this_process_does_not():
    """Loader workers must not copy the listing's Python objects when they collect garbage (about 0.6 GB per worker
    for AudioSet-2M): they are forked with the objects frozen out of collection; this process unfreezes after."""
    import gc

    from bat.data import Loader

    seen = [int(b) for b in Loader(_FrozenCount(), batch_size=1, num_workers=1)]
    assert min(seen) > 1000 and gc.get_freeze_count() == 0
