"""finetune.py end to end on small generated data sets (tiny random encoder, a few steps on the CPU)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import bat
import finetune
from bat import demo
from bat.data import AudioDataset, collate
from bat.finetuning import finished_run, loss_fn
from bat.listing import DataError, list_dataset
from bat.metrics import classification_metrics
from bat.tasks import TaskError, warmup_steps
from bat.optim import lr_at
from synth_sets import make_esc50, with_an_unreadable_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERFACE_KEYS = {"task", "mAP", "macro_f1", "num_train", "num_test", "skipped_files", "gate_weights"}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    threads that wait for each other make these runs 10-20x slower; one thread keeps them fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, **flags):
    """finetune.main in this process, from CLI-style arguments (so presets and parsing are exercised)."""
    argv = ["--encoder", "random:tiny", "--workers", "0", "--log-every", "1", *args]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    cfg = finetune.parse_config(argv)
    return cfg, finetune.main(cfg)


def test_cli_end_to_end_writes_the_interface_files_and_the_model_reproduces_its_metrics(demo_sets, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(demo_sets / "train", data)
    (data / "tone" / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")  # skipped with a warning
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "finetune.py"), "--encoder", "random:tiny", "--train", str(data),
           "--test", str(demo_sets / "test"), "--out", str(out), "--steps", "4", "--batch-size", "8",
           "--warmup-steps", "2", "--workers", "0", "--log-every", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert sum("broken.wav" in ln for ln in res.stderr.splitlines() if ln.startswith("warning: skipped")) == 1
    for name in ("config.json", "model.safetensors", "metrics.json", "log.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "state.pt").exists()  # the training state goes once the outputs are written

    config = json.loads((out / "config.json").read_text())
    assert config["encoder"] == "random:tiny" and config["task"] == "generic" and config["steps"] == 4
    # generic = AS-20k's recipe: mixup, SpecAugment, waveform roll in the loader (no spectrogram roll), warm-up 10 %
    assert config["mixup"] and config["specaug"] and not config["time_roll"] and not config["noise"]
    assert config["layer_decay"] == 0.75 and config["drop_path"] == 0.1 and config["mask_repeats"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert INTERFACE_KEYS | {"accuracy"} <= set(metrics)
    assert metrics["task"] == "multiclass" and metrics["skipped_files"] == 1
    assert metrics["num_train"] == 30 and metrics["num_test"] == 12  # the broken file is not counted
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # lr used by each step: REF's rule (warm-up 2 steps, cosine to 4), head group at full scale
    assert [r["lr"] for r in log] == pytest.approx([lr_at(s, 5e-5, 2, 4, 1e-6) for s in range(4)])

    # the saved model alone (bat.load_probe + its own front-end) gives the same test metrics
    probe = bat.load_probe(out / "model.safetensors")
    assert probe.task == "multiclass" and probe.labels == sorted(demo.DEMO_CLASSES) and probe.kind == "lp"
    assert probe.frontend.config()["target_frames"] == 112  # 1 s clips -> 101 frames -> 112
    assert probe.metadata["format"] == "bat.finetuned"
    ds = AudioDataset(list_dataset(demo_sets / "test"), probe.labels, clip_samples=16000)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = probe(probe.frontend(batch.waveforms))
    again = classification_metrics(logits, batch.targets, probe.task)
    for key, value in again.items():
        assert value == pytest.approx(metrics[key], abs=1e-6), key
    # fine-tuning changed the encoder itself, not only the head
    base = bat.load_encoder("random:tiny")
    assert probe.encoder.cfg == base.cfg


def test_resumed_run_reproduces_the_uninterrupted_run(demo_sets, tmp_path):
    # every augmentation on (random draws on both sides of the interruption), accumulation, evaluations
    flags = ["--noise", "--gain"]
    args = dict(train=demo_sets / "train", test=demo_sets / "test", steps=5, batch_size=8, warmup_steps=2,
                accum_steps=2, eval_every=2)
    _, straight = run(*flags, out=tmp_path / "a", **args)
    assert run(*flags, out=tmp_path / "b", stop_after=3, **args)[1] is None  # "interrupted" after step 3
    assert (tmp_path / "b" / "state.pt").is_file() and not (tmp_path / "b" / "metrics.json").exists()
    # the optimiser really runs REF's layer-wise decay: tiny has 6 blocks -> scales 0.75^7 .. 0.75^0,
    # and the last step (index 2) ran at lr_at(2) x scale in every group, min_lr floor scaled too
    groups = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert sorted({round(g["lr_scale"], 12) for g in groups}) == sorted(round(0.75 ** k, 12) for k in range(8))
    for g in groups:
        assert g["lr"] == pytest.approx(lr_at(2, 5e-5, 2, 5, 1e-6, g["lr_scale"]))
        assert g["betas"] == (0.9, 0.95) and g["weight_decay"] in (0.0, 0.05)
    # killed (SIGKILL, OOM) after logging step 4 but before its checkpoint: the resumed run logs 4 again
    with open(tmp_path / "b" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "loss": -1.0}) + "\n" + '{"step": 5, "lo')
    _, resumed = run(*flags, out=tmp_path / "b", **args)  # the same command again resumes
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == straight  # incl. the test evaluations at steps 2 and 4 (history)
    assert [h["step"] for h in straight["history"]] == [2, 4]
    log_a = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    losses = lambda lines: [json.loads(ln)["loss"] for ln in lines]  # noqa: E731
    assert losses(log_b) == losses(log_a) and [json.loads(ln)["step"] for ln in log_b] == [1, 2, 3, 4, 5]
    # a finished run is not overwritten by a run with other settings (nor re-trained by the same command)
    model_a = (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"finished finetune.py run with other settings \(--lr\)"):
        run(*flags, out=tmp_path / "a", **{**args, "lr": 1e-4})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == model_a
    run(*flags, out=f"{tmp_path}/./a", **args)  # the same run, its folder spelled otherwise: not "other settings"
    # a changed setting that the state depends on is refused, not silently mixed
    run(*flags, out=tmp_path / "c", stop_after=1, **args)
    config = (tmp_path / "c" / "config.json").read_text()
    with pytest.raises(DataError, match="other settings"):
        run(*flags, out=tmp_path / "c", **{**args, "steps": 7})
    assert (tmp_path / "c" / "config.json").read_text() == config  # refused before it was rewritten


def test_resumed_run_with_loader_workers_reproduces_the_uninterrupted_run(demo_sets, tmp_path):
    """The clips' random rolls are drawn in the loader workers, keyed on each clip's place in the stream of
    batches: a run resumed with workers takes the same draws as an uninterrupted one (they were drawn afresh
    after a resume, from worker seeds that depended on where the loader started)."""
    flags = ["--noise", "--gain"]  # the device-side draws, from the main process's saved RNG, on both sides too
    args = dict(train=demo_sets / "train", test=demo_sets / "test", steps=4, batch_size=8, warmup_steps=2,
                workers=2)
    cfg, straight = run(*flags, out=tmp_path / "a", **args)
    assert cfg.workers == 2 and cfg.augment
    assert run(*flags, out=tmp_path / "b", stop_after=2, **args)[1] is None
    _, resumed = run(*flags, out=tmp_path / "b", **args)
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == straight


def test_out_holding_files_finetune_did_not_write_is_refused_and_left_as_it_is(demo_sets, tmp_path):
    args = dict(train=demo_sets / "train", test=demo_sets / "test", steps=1, batch_size=4)
    cases = {"all": ("config.json", "metrics.json", "model.safetensors", "log.jsonl"),
             "results": ("metrics.json", "model.safetensors"),  # was read back as a finished run: a JSON traceback
             "state": ("state.pt",)}
    for name, files in cases.items():
        out = tmp_path / name
        out.mkdir()
        for f in files:
            (out / f).write_text("user data")
        with pytest.raises(FileExistsError, match="not written by finetune.py"):
            run(out=out, **args)
        assert sorted(os.listdir(out)) == sorted(files), name
        assert all((out / f).read_text() == "user data" for f in files), name
    # --fold all writes into one sub-folder per fold: those files are claimed too
    out = tmp_path / "folds"
    (out / "fold2").mkdir(parents=True)
    (out / "fold2" / "log.jsonl").write_text("user data")
    with pytest.raises(FileExistsError, match="fold2/log.jsonl"):
        run(train=make_esc50(tmp_path / "ESC-50"), fold="all", steps=1, batch_size=4, target_frames=64, out=out)
    assert (out / "fold2" / "log.jsonl").read_text() == "user data" and os.listdir(out) == ["fold2"]
    # its own folder: config.json says who wrote it, and the same command again reads the finished run back
    _, first = run(out=tmp_path / "own", **args)
    assert json.loads((tmp_path / "own" / "config.json").read_text())["written_by"] == "finetune.py"
    assert run(out=tmp_path / "own", **args)[1] == first


def test_an_unreadable_metrics_json_of_its_own_run_means_not_finished(demo_sets, tmp_path):
    out = tmp_path / "o"
    args = dict(train=demo_sets / "train", test=demo_sets / "test", steps=1, batch_size=4, out=out)
    cfg, first = run(**args)
    for damaged in (b'{"accuracy": 0.5, "fingerp', b"[1, 2]", b"\xff\xfe"):
        (out / "metrics.json").write_bytes(damaged)
        assert finished_run(str(out), finetune.fingerprint(cfg)) is None, damaged
    assert run(**args)[1] == first  # trained again, and its metrics.json written again
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == first["accuracy"]


def test_a_torn_training_state_is_one_line_refused_before_config_json_is_rewritten(demo_sets, tmp_path):
    out = tmp_path / "o"
    args = dict(train=demo_sets / "train", test=demo_sets / "test", steps=2, batch_size=4, out=out)
    assert run(stop_after=1, **args)[1] is None
    (out / "state.pt").write_bytes((out / "state.pt").read_bytes()[:1000])  # a copy cut short
    config = (out / "config.json").read_text()
    with pytest.raises(DataError, match=r"state.pt: cannot read the training state \(.*\); delete it") as err:
        run(eval_batch_size=3, **args)  # a setting a resumed run may change: config.json would say so
    assert "\n" not in str(err.value)
    assert (out / "config.json").read_text() == config


def test_esc50_preset_and_fold_all(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    cfg = finetune.parse_config(["--encoder", "x", "--train", str(root)])
    # --task auto recognises ESC-50 and takes REF's ESC-50 recipe
    assert (cfg.task, cfg.steps, warmup_steps(cfg), cfg.mixup, cfg.noise, cfg.time_roll, cfg.time_mask,
            cfg.mask_repeats) == ("esc50", 4000, 400, False, True, True, 32, 1)
    cfg, metrics = run(train=root, fold="all", steps=2, batch_size=4, target_frames=64, out=tmp_path / "out")
    assert sorted(metrics["folds"]) == [f"fold{k}" for k in range(1, 6)]
    accs = [metrics["folds"][f]["accuracy"] for f in sorted(metrics["folds"])]
    assert metrics["accuracy"] == pytest.approx(np.mean(accs))
    assert metrics["std"]["accuracy"] == pytest.approx(np.std(accs))
    assert metrics["num_train"] == 8 and metrics["num_test"] == 2
    for k in range(1, 6):
        assert (tmp_path / "out" / f"fold{k}" / "model.safetensors").is_file()
        assert json.loads((tmp_path / "out" / f"fold{k}" / "metrics.json").read_text())["num_test"] == 2
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert INTERFACE_KEYS | {"accuracy", "std", "folds"} <= set(saved)
    assert bat.load_probe(tmp_path / "out" / "model.safetensors").frontend.config()["target_frames"] == 64
    with pytest.raises(DataError, match="--fold"):
        run(train=root, out=tmp_path / "o2")  # ESC-50 needs a fold


def test_multilabel_csv_balanced_sampling_and_asymmetric_loss(tmp_path):
    rows = ["path,labels"]
    for i in range(16):
        wave, name = demo.demo_clip(i, seed=5, seconds=0.5)
        other, name2 = demo.demo_clip(i + 1 + i % 3, seed=6, seconds=0.5)
        sf.write(tmp_path / f"{i}.wav", 0.5 * (wave + other), 16000)
        rows.append(f"{i}.wav,{name};{name2}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows[:1] + rows[1:9]) + "\n")
    cfg, metrics = run("--balanced", train=tmp_path / "train.csv", test=tmp_path / "test.csv", steps=3,
                       batch_size=4, epoch_clips=8, out=tmp_path / "out")
    assert cfg.balanced and cfg.mixup  # mixup's soft multi-hot targets into the asymmetric BCE
    assert metrics["task"] == "multilabel" and "accuracy" not in metrics
    assert np.isfinite(metrics["mAP"]) and 0 <= metrics["macro_f1"] <= 1
    probe = bat.load_probe(tmp_path / "out" / "model.safetensors")
    assert probe.task == "multilabel" and len(probe.labels) == len(demo.DEMO_CLASSES)


def test_loss_functions():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    p = logits.sigmoid()
    # asymmetric BCE (gamma_neg 1, gamma_pos 0): positives plain BCE, negatives weighted by p
    want = -(torch.log(p[0, 0]) + p[0, 1] * torch.log(1 - p[0, 1]) + p[0, 2] * torch.log(1 - p[0, 2])) / 3
    assert loss_fn(logits, y, "multilabel").item() == pytest.approx(want.item(), rel=1e-6)
    # cross-entropy: integer and one-hot targets agree; label smoothing as torch defines it
    ce = loss_fn(logits, torch.tensor([2]), "multiclass")
    assert ce.item() == pytest.approx(loss_fn(logits, torch.tensor([[0.0, 0, 1]]), "multiclass").item())
    smooth = loss_fn(logits, torch.tensor([2]), "multiclass", label_smoothing=0.3)
    soft = torch.tensor([[0.1, 0.1, 0.8]])
    assert smooth.item() == pytest.approx(-(soft * logits.log_softmax(-1)).sum().item(), rel=1e-6)


def make_scv2(root, words=("yes", "no", "up", "bird"), per_word=4):
    val, test = [], []
    for w, word in enumerate(words):
        os.makedirs(root / word)
        for k in range(per_word):
            wave, _ = demo.demo_clip(w, seed=100 + k, seconds=1.0)
            sf.write(root / word / f"{k}.wav", wave, 16000)
        val.append(f"{word}/0.wav")
        test.append(f"{word}/1.wav")
    os.makedirs(root / "_background_noise_")
    noise = 0.05 * np.random.default_rng(0).standard_normal(5 * 16000)
    sf.write(root / "_background_noise_" / "noise.wav", noise, 16000)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    return root


def test_speech_commands_preset_selects_the_best_validation_model(tmp_path):
    root = make_scv2(tmp_path / "scv2")
    cfg, metrics = run(train=root, steps=4, batch_size=8, val_every=2, out=tmp_path / "out")
    assert (cfg.task, cfg.head_dropout, cfg.mixup, cfg.noise, cfg.batch_size) == ("scv2", 0.0, False, True, 8)
    assert metrics["target_frames"] == 112 and metrics["clip_samples"] == 16000
    assert metrics["num_train"] == 2 * 4 + 4 and metrics["num_test"] == 4  # 2 per word + 4 background chunks
    assert [h["step"] for h in metrics["history"] if h["split"] == "val"] == [2, 4]
    best = max((h for h in metrics["history"] if h["split"] == "val"), key=lambda h: (h["accuracy"], h["step"]))
    assert metrics["selected"]["step"] == best["step"]
    probe = bat.load_probe(tmp_path / "out" / "model.safetensors")
    assert probe.labels[-2:] == ["_unknown_", "_silence_"] and len(probe.labels) == 12


def test_bad_settings_give_clear_errors(demo_sets, tmp_path):
    data = dict(train=demo_sets / "train", test=demo_sets / "test", out=tmp_path / "o", steps=2)
    with pytest.raises(DataError, match="multiple of processes x --accum-steps"):
        run(batch_size=8, accum_steps=3, **data)
    with pytest.raises(TaskError, match="multiple of 16"):
        run(batch_size=8, target_frames=100, **data)
    with pytest.raises(DataError, match="ESC-50"):
        run(batch_size=8, fold="1", **data)
    cmd = [sys.executable, os.path.join(ROOT, "finetune.py"), "--encoder", "random:tiny", "--train",
           str(demo_sets / "train"), "--out", str(tmp_path / "o3"), "--mixup-prob", "1.5"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=subprocess_env())
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["error: --mixup-prob must lie in [0, 1], got 1.5"]


def test_torchrun_ddp_matches_a_single_process(demo_sets, tmp_path):
    # Without random draws (no augmentation, dropout or drop-path) two processes with 4 clips each must
    # train the same model as one process with 8: DistributedSampler splits one permutation, so each
    # step sees the same 8 clips, and DDP averages the two halves' gradients.
    common = ["--encoder", "random:tiny", "--train", str(demo_sets / "train"), "--test", str(demo_sets / "test"),
              "--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0",
              "--no-augment", "--drop-path", "0", "--head-dropout", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run(torchrun + [os.path.join(ROOT, "finetune.py"), *common, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es) x 4 clips" in res.stdout
    run(*common[2:], out=tmp_path / "one")
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    base = bat.load_encoder("random:tiny").state_dict()
    assert any(not torch.equal(b[f"encoder.{k}"], v) for k, v in base.items())  # it did train
    dim = bat.load_encoder("random:tiny").cfg.dim
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has no true gradient (softmax ignores a constant shift of the scores): Adam
            # amplifies its float-noise gradient to +-lr whatever the summation order, so skip it
            x, y = torch.cat([x[:dim], x[2 * dim:]]), torch.cat([y[:dim], y[2 * dim:]])
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5), (k, (x - y).abs().max())
    ma = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert ma["num_test"] == mb["num_test"] == 12 and ma["accuracy"] == mb["accuracy"]


def test_slow_torchrun_resume_reproduces_the_uninterrupted_run(demo_sets, tmp_path):
    """Two processes, loader workers, augmentation: a run stopped at step 2 and resumed by the same command takes
    the same steps as an uninterrupted one (each rank's clip draws are keyed on its stream, each rank's
    device-side draws come back from the state). ~30 s: three torchrun starts."""
    common = ["--encoder", "random:tiny", "--train", str(demo_sets / "train"), "--test", str(demo_sets / "test"),
              "--steps", "4", "--batch-size", "8", "--warmup-steps", "2", "--workers", "1", "--log-every", "1",
              "--noise", "--gain"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                os.path.join(ROOT, "finetune.py"), *common]
    for out, extra in (("a", []), ("b", ["--stop-after", "2"]), ("b", [])):
        res = subprocess.run(torchrun + ["--out", str(tmp_path / out), *extra], capture_output=True, text=True,
                             cwd=ROOT, timeout=300, env=subprocess_env())
        assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_class_whose_every_clip_is_unreadable_is_named(demo_sets, tmp_path, capsys):
    lost, n = with_an_unreadable_class(demo_sets / "train", tmp_path / "train")
    train = tmp_path / "train"
    # 10 steps x 8 clips: an epoch and more, so every file has been tried (a file never tried is not known bad)
    _, metrics = run(train=train, test=demo_sets / "test", steps=10, batch_size=8, out=tmp_path / "o")
    assert metrics["untrained_classes"] == [lost] and metrics["skipped_files"] == n
    assert f"no readable training clip of {lost}: the model never learned this class" in capsys.readouterr().out
    _, metrics = run(train=demo_sets / "train", test=demo_sets / "test", steps=1, batch_size=4, out=tmp_path / "p")
    assert "untrained_classes" not in metrics


def test_sigint_saves_the_state_and_exits_128_plus_the_signal(demo_sets, tmp_path):
    """As Ctrl-C does (to the process group, loader workers included): the state is saved at the end of the
    step, the run says how to resume, and the exit status (130) tells a scheduler it is not done."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "finetune.py"), "--encoder", "random:tiny", "--train",
           str(demo_sets / "train"), "--test", str(demo_sets / "test"), "--out", str(out), "--steps", "5000",
           "--batch-size", "4", "--workers", "1", "--log-every", "1", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log, t0 = out / "log.jsonl", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended or stalled before the signal"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "run the same command again to resume" in stdout + stderr and "Traceback" not in stderr
    assert (out / "state.pt").is_file() and not (out / "metrics.json").exists()


def test_ctrl_c_during_the_final_test_stops_at_once_and_a_rerun_tests(demo_sets, tmp_path):
    """After the last step the state is saved and only the test remains: Ctrl-C there stopped nothing (it
    waited for a step boundary that never came); now it ends the run with one line, and the same command
    tests the saved model."""
    import signal
    import time

    out, marker = tmp_path / "out", tmp_path / "testing"
    slow_test = (f"import runpy, sys, time, pathlib, bat.finetuning\n"
                 f"def test_best(*a, **k):\n"
                 f"    pathlib.Path({str(marker)!r}).touch()\n"
                 f"    time.sleep(120)\n"
                 f"bat.finetuning.test_best = test_best\n"
                 f"sys.argv = sys.argv[1:]\n"
                 f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = ["--encoder", "random:tiny", "--train", str(demo_sets / "train"), "--test", str(demo_sets / "test"),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--workers", "0"]
    proc = subprocess.Popen([sys.executable, "-c", slow_test, os.path.join(ROOT, "finetune.py"), *args], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended or stalled before its test"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)  # not the 120 s the test would take
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C): re-run the same command to go on from the " \
                                              "last saved state"
    assert (out / "state.pt").is_file() and not (out / "metrics.json").exists()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), *args], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (out / "metrics.json").is_file(), res.stderr[-2000:]


def test_a_signal_before_the_final_test_of_a_resumed_run_stops_it(demo_sets, tmp_path, monkeypatch):
    """A run resumed at its last step goes straight to the test: a SIGTERM that came while it started (the
    loop, which asks every step, never ran) must still stop it, with the scheduler's exit status."""
    import bat.run_control

    args = dict(train=demo_sets / "train", test=demo_sets / "test", steps=2, batch_size=4, out=tmp_path / "o")

    def interrupted_test(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C during the final test: the state of step 2 is on disk

    monkeypatch.setattr(finetune, "test_best", interrupted_test)
    with pytest.raises(KeyboardInterrupt):
        run(**args)
    monkeypatch.undo()
    assert (tmp_path / "o" / "state.pt").is_file() and not (tmp_path / "o" / "metrics.json").exists()
    monkeypatch.setattr(bat.run_control.StopFlag, "any", lambda self: 15)  # SIGTERM seen by the time it would test
    assert run(**args)[1] == 128 + 15 and not (tmp_path / "o" / "metrics.json").exists()
    monkeypatch.undo()
    assert run(**args)[1]["num_test"] > 0 and (tmp_path / "o" / "metrics.json").exists()  # the same command tests
