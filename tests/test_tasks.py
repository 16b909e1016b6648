"""REF's per-task protocols (bat/tasks.py): exact model inputs per data set, recipes, and the scripts' use of them.

Small AudioSet-CSV, ESC-50 and Speech Commands layouts are written to disk from the golden waveforms (so the
spectrograms can be compared with REF's stored outputs) plus clips shorter and longer than the task length,
44.1 kHz files, `_background_noise_` and an unknown word, which are checked against the front-ends applied
with REF's rules by hand.
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import bat
import bat.features
import bat.listing
import finetune
import probe_cgp
from bat.audio import load_audio
from bat.checkpoint import CheckpointError
from bat.files import json_safe
from bat.listing import DataError
from bat.frontend import Frontend, kaldi_fbank, spectrogram
from bat.model import Encoder, config_for
from bat.sampler import class_frequencies, epoch_sampler
from bat.tasks import TASKS, clip_geometry, plan_runs, resolve_task, warmup_steps
from bat.optim import lr_at
from ref_names import fairseq_model

AS_SAMPLES = 163_680  # 10.23 s: REF's AudioSet clip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def waves(golden_dir):
    g = load_file(golden_dir / "frontend.safetensors")
    return {k[len("wave."):]: v.numpy() for k, v in g.items() if k.startswith("wave.")}


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {**load_file(golden_dir / "frontend.safetensors"), **load_file(golden_dir / "frontend_legacy.safetensors")}


def write(path, x, sr=16000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.asarray(x, dtype=np.float32), sr, subtype="FLOAT")  # float: the golden samples exactly
    return str(path)


def tone(seconds, sr=16000, f=440.0, seed=0):
    t = np.arange(int(round(seconds * sr))) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size) + 0.02).astype(np.float32)


def fit(x, n):
    """REF's evaluation rule: zero-pad at the end or keep the first n samples."""
    x = torch.as_tensor(x, dtype=torch.float32)
    return torch.nn.functional.pad(x, (0, n - x.shape[0])) if x.shape[0] < n else x[:n]


def close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < atol, (a - b).abs().max().item()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, waves):
    root = tmp_path_factory.mktemp("layouts")
    # AudioSet-style CSV (multi-label): REF's exact 10.23 s clip, a 2 s clip at 44.1 kHz, an 11 s clip
    write(root / "as" / "a.wav", waves["as_clip"])
    write(root / "as" / "b.wav", tone(2.0, 44100, 300), 44100)
    write(root / "as" / "c.wav", tone(11.0, 16000, 900, seed=1))
    (root / "as" / "eval.csv").write_text("path,labels\na.wav,Speech;Music\nb.wav,Music\nc.wav,\n")
    # ESC-50: the golden 5 s clip (fold 1), a 44.1 kHz clip (fold 1), a 4 s clip (fold 2)
    esc = root / "ESC-50"
    write(esc / "audio" / "1-1-A-0.wav", waves["esc_clip"])
    write(esc / "audio" / "1-2-A-1.wav", tone(5.0, 44100, 500), 44100)
    write(esc / "audio" / "2-3-A-0.wav", tone(4.0, 16000, 700))
    os.makedirs(esc / "meta")
    (esc / "meta" / "esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n"
                                            "1-1-A-0.wav,1,0,dog,True,1,A\n1-2-A-1.wav,1,1,rain,True,2,A\n"
                                            "2-3-A-0.wav,2,0,dog,True,3,A\n")
    # Speech Commands: golden clips in the test list; an unknown word at 44.1 kHz and 1.2 s; background noise
    sc = root / "scv2"
    write(sc / "no" / "0.wav", waves["silence"])
    write(sc / "no" / "1.wav", waves["click"])
    write(sc / "yes" / "0.wav", waves["scv2_clip"])
    write(sc / "yes" / "1.wav", waves["short"])
    write(sc / "bird" / "0.wav", tone(1.2, 44100, 600), 44100)
    write(sc / "yes" / "2.wav", tone(1.0, 16000, 800))
    write(sc / "yes" / "3.wav", tone(1.0, 16000, 850))  # in no list: training, beside the background's seconds
    write(sc / "_background_noise_" / "noise.wav", 0.1 * np.random.default_rng(3).standard_normal(10 * 16000))
    (sc / "testing_list.txt").write_text("no/0.wav\nno/1.wav\nyes/0.wav\nyes/1.wav\nbird/0.wav\n")
    (sc / "validation_list.txt").write_text("yes/2.wav\n")
    return root


# ------------------------------------------------------------------------------ exact model inputs


def test_audioset_inputs_pad_or_cut_the_waveform_to_163680_samples(layouts, golden):
    csv = str(layouts / "as" / "eval.csv")
    x, y, classes = bat.task_inputs(csv, task="audioset")
    assert x.dtype == torch.float32 and x.shape == (3, 1, 1024, 128)
    assert classes == ["Music", "Speech"] and y.tolist() == [[1, 1], [1, 0], [0, 0]]
    close(x[:1], golden["bat.audioset_eval"], 1e-3)  # REF's own spectrogram of the same waveform
    for row, name in ((1, "b.wav"), (2, "c.wav")):  # 2 s at 44.1 kHz padded, 11 s cut to the first 10.23 s
        wave = load_audio(layouts / "as" / name, 16000, "HQ")
        close(x[row:row + 1], spectrogram(fit(wave, AS_SAMPLES)[None], target_frames=1024), 1e-5)
    # padding the spectrogram instead (what a clip-length rule does) gives other numbers
    short = spectrogram(torch.as_tensor(load_audio(layouts / "as" / "b.wav", 16000, "HQ"))[None], target_frames=1024)
    assert (short - x[1:2]).abs().max() > 0.05

    e, _, _ = bat.task_inputs(csv, task="audioset", frontend="eat")
    assert e.shape == (3, 1, 1024, 128)
    close(e[:1], golden["eat.audioset_eval"], 2e-3)
    # REF's legacy order: remove the clip's mean, then pad or cut (the cut window keeps the clip's mean)
    wave = torch.as_tensor(load_audio(layouts / "as" / "c.wav", 16000, "HQ"))
    ref = Frontend("eat", 1024, "audioset")(fit(wave - wave.mean(), AS_SAMPLES)[None], centred=True)
    close(e[2:3], ref, 1e-5)


def test_esc50_inputs_pad_the_spectrogram_to_512(layouts, golden):
    esc = layouts / "ESC-50"
    x, y, classes = bat.task_inputs(esc, split="test", fold=1)  # auto: the ESC-50 layout
    assert x.shape == (2, 1, 512, 128) and classes == ["dog", "rain"] and y.tolist() == [0, 1]
    close(x[:1], golden["bat.esc50"], 1e-3)
    wave = load_audio(esc / "audio" / "1-2-A-1.wav", 16000, "VHQ")  # REF resamples ESC-50 with soxr VHQ
    close(x[1:], spectrogram(torch.as_tensor(wave)[None], target_frames=512), 1e-5)
    train, _, _ = bat.task_inputs(esc, split="train", fold=1)  # the 4 s clip: padded to 5 s like REF's legacy loader
    wave = load_audio(esc / "audio" / "2-3-A-0.wav", 16000, "VHQ")
    close(train, spectrogram(fit(wave, 80000)[None], target_frames=512), 1e-5)
    e, _, _ = bat.task_inputs(esc, split="test", fold=1, frontend="sslam")  # ESC-50's own statistics
    esc_clip = torch.as_tensor(load_audio(esc / "audio" / "1-1-A-0.wav", 16000, "VHQ"))
    close(e[:1], kaldi_fbank(esc_clip[None], "sslam", "esc50", 512), 1e-4)
    assert (e[:1] - kaldi_fbank(esc_clip[None], "sslam", "audioset", 512)).abs().max() > 0.1
    with pytest.raises(bat.listing.DataError, match="fold"):
        bat.task_inputs(esc)


def test_speech_commands_inputs_pad_to_one_second_then_112_frames(layouts, golden):
    sc = layouts / "scv2"
    x, y, classes = bat.task_inputs(sc, split="test")
    assert classes[-2:] == ["_unknown_", "_silence_"] and len(classes) == 12
    # listing order (sorted folders): bird (unknown word), no/0 (silence), no/1 (click), yes/0 (scv2 clip),
    # yes/1 (short), then the last 10 % of the background recording's 1 s segments (labelled _silence_)
    assert [classes[i] for i in y] == ["_unknown_", "no", "no", "yes", "yes", "_silence_"]
    close(x[1:5], golden["bat.scv2"][[2, 3, 0, 1]], 1e-3)  # golden rows: scv2_clip, short, silence, click
    bird = load_audio(sc / "bird" / "0.wav", 16000, "VHQ")  # 1.2 s at 44.1 kHz: the first second
    close(x[:1], spectrogram(fit(bird, 16000)[None], target_frames=112), 1e-5)
    noise = bat.data.load_segment(sc / "_background_noise_" / "noise.wav", 9.0, 1.0, 16000, "VHQ")
    close(x[5:6], spectrogram(fit(noise, 16000)[None], target_frames=112), 1e-5)
    e, _, _ = bat.task_inputs(sc, split="test", frontend="eat")
    close(e[1:5], golden["eat.scv2"][[2, 3, 0, 1]], 2e-3)
    assert bat.task_inputs(sc, split="val")[0].shape[0] == 2  # yes/2 and the 9th background second
    assert bat.task_inputs(sc, split="train")[0].shape[0] == 9  # yes/3 and 8 background seconds


def test_generic_takes_the_longest_clip_and_whole_patches(tmp_path):
    write(tmp_path / "a" / "x.wav", tone(1.5))
    write(tmp_path / "b" / "y.wav", tone(0.5))
    x, y, classes = bat.task_inputs(tmp_path)  # auto -> generic
    assert x.shape == (2, 1, 160, 128)  # 1.5 s -> 151 frames -> padded to 160
    close(x[1:], spectrogram(fit(tone(0.5), 24000)[None], target_frames=160), 1e-5)
    task = resolve_task("generic")
    items = bat.listing.list_dataset(tmp_path)
    assert clip_geometry(task, items) == (24000, 160)
    assert clip_geometry(task, items, max_seconds=1.0) == (16000, 112)
    assert clip_geometry(TASKS["audioset"], None, target_frames=512) == (511 * 160, 512)


# ------------------------------------------------------------------------------ the scripts use the same path


class Opaque:  # what a real fairseq checkpoint holds besides tensors (its cfg): needs full unpickling
    pass


def fairseq_checkpoint(path, seed=0):
    """An EAT/SSLAM fairseq-layout checkpoint of a random tiny ungated encoder (REF's EAT key names)."""
    torch.manual_seed(seed)
    enc = Encoder(config_for("tiny", gated=False))
    model = fairseq_model(enc.state_dict())  # REF's names from tests/golden/vit_b_keys.json, not bat's map
    torch.save({"model": model, "cfg": Opaque()}, path)
    return str(path)


def test_probe_loads_fairseq_checkpoints_with_allow_pickle_and_feeds_task_inputs(layouts, tmp_path, monkeypatch):
    ckpt = fairseq_checkpoint(tmp_path / "eat.pt")
    data = dict(encoder=ckpt, train=str(layouts / "scv2"), steps=2, batch_size=4, workers=0)
    common = dict(data, prototypes=8, val_every=1, no_cache=True)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        probe_cgp.main(probe_cgp.config(out=str(tmp_path / "refused"), **common))
    with pytest.raises(CheckpointError, match="allow-pickle"):
        finetune.main(finetune.config(out=str(tmp_path / "refused_ft"), **data))

    seen = []  # every spectrogram the probe's evaluation feeds the encoder

    def spy(frontend, batch, device=None):
        spec = real(frontend, batch, device)
        seen.append(spec.detach().cpu())
        return spec

    real = bat.features.model_inputs
    monkeypatch.setattr(bat.features, "model_inputs", spy)  # the probe's encoder pass (bat.features.encode)
    cfg = probe_cgp.config(out=str(tmp_path / "p"), allow_pickle=True, **common)
    assert cfg.task == "scv2" and cfg.batch_size == 4 and cfg.val_every == 1
    metrics = probe_cgp.main(cfg)
    # last evaluation = the test split: exactly bat.task_inputs(..., frontend="eat") with SCV2's statistics
    want, _, _ = bat.task_inputs(layouts / "scv2", split="test", frontend="eat")
    close(torch.cat(seen)[-want.shape[0]:], want, 1e-5)
    assert metrics["num_test"] == 6 and metrics["num_train"] == 9 and metrics["selected"]["step"] in (1, 2)
    probe = bat.load_probe(tmp_path / "p" / "probe.safetensors")
    fe = probe.frontend.config()
    assert (fe["kind"], fe["target_frames"], fe["dataset"]) == ("eat", 112, "scv2")
    assert (probe.metadata["task_name"], probe.metadata["clip_samples"], probe.metadata["target_frames"]) == \
        ("scv2", 16000, 112)


# ------------------------------------------------------------------------------ recipes


def test_recipes_follow_ref_configs():
    a, e, s = TASKS["audioset"], TASKS["esc50"], TASKS["scv2"]
    assert (a.clip_samples, a.target_frames, a.random_window, a.quality) == (AS_SAMPLES, 1024, True, "HQ")
    assert (e.clip_samples, e.target_frames, e.quality, e.stats) == (80000, 512, "VHQ", "esc50")
    assert (s.clip_samples, s.target_frames, s.quality, s.stats) == (16000, 112, "VHQ", "scv2")
    p = probe_cgp.config(encoder="x", train="y", task="audioset")  # configs/as20k/as20k_cgp_config.yaml
    assert (p.steps, p.batch_size, warmup_steps(p), p.weight_decay, p.lr) == (20000, 48, 500, 0.05, 1e-3)
    p = probe_cgp.config(encoder="x", train="y", task="esc50")
    assert (p.steps, warmup_steps(p), p.weight_decay) == (4000, 400, 0.2)
    p = probe_cgp.config(encoder="x", train="y", task="scv2")
    assert (p.steps, p.batch_size, warmup_steps(p), p.val_every) == (10000, 256, 1000, 500)
    p = probe_cgp.config(encoder="x", train="y", task="as2m")
    assert p.balanced and p.epoch_clips == 200_000
    assert p.balance_by == "labels"
    for task in ("audioset", "as2m"):  # REF's as20k_vqt config alone has no LayerNorm before the Linear
        assert probe_cgp.config(encoder="x", train="y", task=task, probe="vqt").head_norm is False
        assert probe_cgp.config(encoder="x", train="y", task=task, probe="lp").head_norm is True
    assert probe_cgp.config(encoder="x", train="y", task="esc50", probe="vqt").head_norm is True
    for make in (probe_cgp.config, finetune.config):  # REF's data factory: BirdSet weighs the first ebird code
        h = make(encoder="x", train="y", task="hsn")
        assert h.balanced and h.balance_by == "first-label" and h.epoch_clips is None
    f = finetune.config(encoder="x", train="y", task="audioset")  # as20k_finetune_config.yaml
    assert (f.steps, warmup_steps(f), f.lr, f.layer_decay, f.adam_beta2, f.drop_path, f.mixup, f.time_mask,
            f.mask_repeats) == (40000, 4000, 5e-5, 0.75, 0.95, 0.1, True, 64, 2)
    with pytest.raises(bat.tasks.TaskError, match="--task must be one of"):
        resolve_task("as20")


def test_a_300_step_finetune_reaches_its_peak_lr(tmp_path):
    cfg = finetune.parse_config(["--encoder", "x", "--train", "y", "--steps", "300"])
    assert warmup_steps(cfg) == 30  # REF: 10 % of the steps (was a fixed 4,000: 4 % of the peak at most)
    assert max(lr_at(s, cfg.lr, warmup_steps(cfg), 300, cfg.min_lr) for s in range(300)) == cfg.lr
    # and the script's own log of a short run shows the peak
    data = tmp_path / "d"
    for c, f in (("lo", 300), ("hi", 2000)):
        for k in range(3):
            write(data / c / f"{k}.wav", tone(0.5, f=f + 37 * k, seed=k))
    out = tmp_path / "o"
    finetune.main(finetune.parse_config(["--encoder", "random:tiny", "--train", str(data), "--test", str(data),
                                         "--steps", "10", "--batch-size", "2", "--workers", "0", "--log-every", "1",
                                         "--lr", "1e-3", "--out", str(out)]))
    lrs = [json.loads(ln)["lr"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert len(lrs) == 10 and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 1  # warm-up 1 step


def test_balanced_sampling_moves_class_frequencies_towards_uniform():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)  # a skewed single-label set of 100 clips
    data = class_frequencies(labels, range(100), 3)
    sampler = epoch_sampler(100, labels, balanced=True, num_classes=3, seed=0)  # what the scripts build
    assert sampler.num_samples == 200_000 and sampler.replacement  # REF's epoch, drawn with replacement here
    drawn = class_frequencies(labels, list(sampler)[:30000], 3)
    assert data.tolist() == pytest.approx([0.9, 0.09, 0.01])
    assert drawn.tolist() == pytest.approx([1 / 3] * 3, abs=0.02)
    plain = class_frequencies(labels, list(epoch_sampler(100, labels, balanced=False, seed=0)), 3)
    assert plain.tolist() == pytest.approx(data.tolist())  # a shuffle keeps the data's frequencies


# ------------------------------------------------------------------------------ runs, flags, outputs


def test_speech_commands_runs_count_what_is_used(layouts):
    (run,) = plan_runs(str(layouts / "scv2"))
    assert (len(run.train), len(run.val), len(run.test)) == (9, 2, 6)


@pytest.mark.parametrize("flag,value", [("batch_size", 0), ("prototypes", -1), ("prototypes", 0), ("steps", 0),
                                        ("warmup_share", 1.5), ("lr", 0.0)])
def test_out_of_range_flags_are_refused_before_any_work(tmp_path, flag, value):
    cfg = probe_cgp.Config(encoder="random:tiny", train=str(tmp_path / "missing"), out=str(tmp_path / "o"),
                           **{flag: value})
    with pytest.raises(bat.cli.FlagError, match=f"--{flag.replace('_', '-')} must"):
        probe_cgp.main(cfg)
    assert not (tmp_path / "o").exists()


def test_metrics_json_has_no_nan():
    safe = json_safe({"mAP": float("nan"), "folds": [{"x": float("inf")}, 1.5], "n": 3})
    assert safe == {"mAP": None, "folds": [{"x": None}, 1.5], "n": 3}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe


def test_audioset_manifests_from_refs_download_layout(tmp_path):
    from bat.audioset import write_manifests

    root = tmp_path / "AudioSet"
    (root).mkdir()
    (root / "ontology.json").write_text(json.dumps([{"id": "/m/a", "name": "Speech"},
                                                     {"id": "/m/b", "name": "Male speech, man speaking"},
                                                     {"id": "/m/z", "name": "Zither"}]))
    head = "# Segments csv\n# num_ytids\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (root / "eval_segments.csv").write_text(head + 'e1, 0.000, 10.000, "/m/a,/m/b"\ne2, 0.000, 10.000, "/m/a"\n'
                                            'mW3S0u8bj58, 0.000, 10.000, "/m/a"\n')
    (root / "balanced_train_segments.csv").write_text(head + 'b1, 0.000, 10.000, "/m/b,/m/z"\nmissing, 0.0, 10.0, "/m/a"\n')
    for split, ids in (("eval_segments", ("e1", "e2", "mW3S0u8bj58")), ("balanced_train_segments", ("b1",))):
        for i in ids:
            write(root / split / f"Y{i}.wav", tone(0.2))
    counts = write_manifests(str(root), str(tmp_path / "out"))
    # REF: clips without audio and REF's known corrupt eval file are left out; classes outside eval dropped
    assert counts == {"as20k_train.csv": 1, "as_eval.csv": 2}
    items = bat.listing.list_dataset(tmp_path / "out" / "as_eval.csv")
    assert items.task == "multilabel" and items.labels == [["Male speech, man speaking", "Speech"], ["Speech"]]
    train = bat.listing.list_dataset(tmp_path / "out" / "as20k_train.csv")
    assert train.labels == [["Male speech, man speaking"]] and os.path.isfile(train.files[0])


def test_ctrl_c_during_probing_exits_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    for c, f in (("lo", 300), ("hi", 2000)):
        for k in range(2):
            write(tmp_path / "d" / c / f"{k}.wav", tone(0.5, f=f, seed=k))
    err = tmp_path / "err.txt"
    cmd = [sys.executable, "probe_cgp.py", "--encoder", "random:tiny", "--train", str(tmp_path / "d"), "--test",
           str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--steps", "100000", "--prototypes", "8",
           "--batch-size", "2", "--workers", "1", "--no-cache"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(err, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=fh,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while "probe test" not in err.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, err.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    last = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert rc == 130 and last == f"interrupted (Ctrl-C): {probe_cgp.STOPPED}" and "Traceback" not in text
    assert not (tmp_path / "o" / "probe.safetensors").exists()


def test_task_help_shows_the_recipe(capsys):
    with pytest.raises(SystemExit):
        probe_cgp.parse_config(["--task", "scv2", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10000)" in text and "(default: 256)" in text and "(default: 500)" in text
    with pytest.raises(SystemExit):
        finetune.parse_config(["--task", "esc50", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4000)" in text and "--allow-pickle" in text


def test_plan_runs_refuses_data_that_cannot_make_a_classifier(tmp_path):
    def wav(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.zeros(1600, np.float32), 16000)
        return path

    one = [wav(tmp_path / "one" / "dog" / f"{i}.wav") for i in range(3)]
    with pytest.raises(DataError, match=r"one: one class \(dog\); multiclass classification needs at least two"):
        plan_runs(str(tmp_path / "one"))
    (tmp_path / "empty.csv").write_text("path,labels\n" + "".join(f"{p},\n" for p in one))
    with pytest.raises(DataError, match=r"no labels \(every label cell is empty\); multilabel .* at least one label"):
        plan_runs(str(tmp_path / "empty.csv"))
    for c in ("a", "b"):
        wav(tmp_path / "single" / c / "0.wav")
    with pytest.raises(DataError, match=r"too few clips to hold out a test split \(one per class\).*--test"):
        plan_runs(str(tmp_path / "single"), log=lambda *_: None)
    assert len(plan_runs(str(tmp_path / "single"), test=str(tmp_path / "single"))) == 1  # with --test it runs


def test_dcase_probes_other_than_cgp_take_their_own_ref_recipe():
    """REF configs/dcase2016_task2/sed_{lp,lcgp,pb,h2t}_config.yaml: batch 16, 10 000 steps, warm-up 1 000,
    validation every 500, no head dropout; sed_cgp_config.yaml: batch 4, 4 000 steps, every 50, dropout 0.2."""
    import probe_cgp

    argv = ["--encoder", "random:tiny", "--train", "x", "--task", "dcase2016"]
    for head, want in (("cgp", (4000, 4, 400, 50, 0.2)), ("lp", (10000, 16, 1000, 500, 0.0)),
                       ("protobin", (10000, 16, 1000, 500, 0.0))):
        for cfg in (probe_cgp.config(encoder="e", train="x", task="dcase2016", probe=head),
                    probe_cgp.parse_config(argv + ["--probe", head])):
            assert (cfg.steps, cfg.batch_size, warmup_steps(cfg), cfg.val_every, cfg.dropout) == want, (head, cfg)
    cfg = probe_cgp.parse_config(argv + ["--probe", "lp", "--steps", "7"])  # a flag still wins
    assert cfg.steps == 7 and cfg.batch_size == 16
    assert probe_cgp.config(encoder="e", train="x", task="esc50", probe="lp").steps == 4000  # other tasks: one recipe
