"""pretrain.py end to end on the CPU: torchrun with 2 processes (demo data and a folder of audio files),
exact resumption after SIGKILL, SIGTERM handling, and a kill in the middle of a checkpoint write.

Runs use the tiny model on 0.64 s spectrograms (32 patches), 4 clips x 2 views, so a step takes
milliseconds and the time goes into starting Python."""
import json
import math
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

import bat
import bat.checkpoint
import bat.pretraining
import pretrain
from bat import demo
from bat.files import load_state

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--target-frames", "64", "--batch-size", "4", "--views", "2", "--log-every", "1"]
LOG_KEYS = {"step", "loss", "loss_global", "loss_local", "lr", "ema_decay", "target_std", "pred_std", "clips_per_s"}
DETERMINISTIC = ("loss", "loss_global", "loss_local", "lr", "ema_decay", "target_std", "pred_std")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cmd(*args, torchrun=False):
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "pretrain.py"), *args]
    return [sys.executable, str(ROOT / "pretrain.py"), *args]


def run(args, torchrun=False, timeout=240):
    res = subprocess.run(cmd(*args, torchrun=torchrun), capture_output=True, text=True, cwd=ROOT, env=env(),
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def read_log(out):
    return [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines()]


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def check_outputs(out, steps):
    out = Path(out)
    for name in ("config.json", "log.jsonl", "encoder.safetensors", "state.pt"):
        assert (out / name).is_file(), name
    log = read_log(out)
    assert LOG_KEYS <= set(log[-1]) and log[-1]["step"] == steps
    assert all(math.isfinite(r[k]) for r in log if r["step"] for k in LOG_KEYS)
    enc = bat.load_encoder(out / "encoder.safetensors")  # the student encoder, as the other scripts read it
    state = load_state(out / "state.pt")
    assert state["optimized_steps"] == steps
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state["encoder"][k]), k
    assert enc.cfg.dim == 192 and enc.cfg.chunk_patches == 4  # tiny; positional grid of 64 frames
    return log, json.loads((out / "config.json").read_text())


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_config(["--model", "tiny", "--help"])
    text = capsys.readouterr().out
    for field in pretrain.Config.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in text, field
    for flag in ("--out", "--seed", "--steps", "--batch-size", "--device", "--data", "--model",
                 "--checkpoint-every", "--log-every"):
        assert flag in text
    tiny, base = pretrain.parse_config(["--model", "tiny"]), pretrain.parse_config([])
    assert (base.batch_size, base.views, base.steps, base.warmup_steps, base.lr) == (48, 16, 400_000, 53_000, 5e-4)
    assert (base.ema_start, base.ema_end, base.ema_anneal_steps, base.target_frames) == (0.9998, 0.99999, 100_000, 1024)
    assert tiny.model == "tiny" and tiny.batch_size < 48 and tiny.target_frames < 1024
    assert pretrain.parse_config(["--model", "tiny", "--views", "3"]).views == 3  # flags override presets


def run_torchrun_demo(folder):
    return run([*SMALL, "--steps", "20", "--out", str(folder / "run"), "--checkpoint-every", "10", "--workers", "1",
                "--probe-data", "demo", "--probe-clips", "60", "--probe-every", "10"], torchrun=True)


@pytest.fixture(scope="module")
def torchrun_demo(shared):
    folder, res = shared("torchrun_demo", run_torchrun_demo)  # once per session, not once per xdist worker
    return folder / "run", res


def test_torchrun_two_processes_on_demo_data(torchrun_demo):
    out, res = torchrun_demo
    log, config = check_outputs(out, 20)
    assert [r["step"] for r in log] == list(range(0, 21))  # step 0: the probe of the random-init encoder
    assert LOG_KEYS <= set(log[0]) and all(log[0][k] is None for k in LOG_KEYS - {"step"})  # nothing trained yet
    assert config["world_size"] == 2 and config["micro_batch_size"] == 2 and config["data"] is None
    assert log[-1]["loss"] < log[1]["loss"]  # it learns
    assert [r["step"] for r in log if "probe_acc" in r] == [0, 10, 20]
    assert (out / "curves.png").stat().st_size > 10_000  # losses, spreads and probe accuracy, drawn
    assert all(0.0 <= r["probe_acc"] <= 1.0 for r in log if "probe_acc" in r)
    assert res.stdout.count("done: 20 steps") == 1  # rank 0 only
    assert "pretrain:" in res.stderr  # the progress bar


def test_one_process_with_accumulation_matches_two_processes(torchrun_demo, reference):
    """The clips, crops and masks of a step do not depend on how the batch is split, so one process
    accumulating 2 micro-batches of 2 clips computes what 2 DDP processes of 2 clips compute."""
    log, stdout = reference
    assert "1 process(es) x 2 clips x 2 accumulation(s)" in stdout
    ddp = [r for r in read_log(torchrun_demo[0]) if r["loss"] is not None][:len(log)]  # all in the warm-up, whose LR does not depend on --steps
    assert [r["step"] for r in log] == [r["step"] for r in ddp] == list(range(1, 13))
    for a, b in zip(log, ddp):
        for k in ("loss", "loss_global", "loss_local", "lr", "ema_decay"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=0), (a["step"], k)


def test_torchrun_on_a_folder_of_audio(tmp_path):
    data = tmp_path / "audio"
    demo.write_demo_dataset(data, clips_per_class=2, seconds=1.0)
    rng = np.random.default_rng(0)
    sf.write(data / "tone" / "stereo_44k.flac", rng.standard_normal((30000, 2)).astype(np.float32) * 0.1, 44100)
    (data / "chirp" / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")
    out = tmp_path / "run"
    # 10 steps of 4 clips from 14 files: each file, the broken one too, is drawn at least twice (StreamBatches)
    res = run([*SMALL, "--data", str(data), "--steps", "10", "--out", str(out), "--checkpoint-every", "10",
               "--workers", "1"], torchrun=True)
    log, config = check_outputs(out, 10)
    assert config["data"] == str(data)
    warned = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: skipped") and "broken.wav" in ln]
    assert 1 <= len(warned) <= 2  # one line per process that met it before the counts were shared
    assert log[-1]["skipped_files"] == 1
    assert "1 file(s) skipped" in res.stdout
    assert load_state(out / "state.pt")["skipped"][0][0].endswith("broken.wav")


# Single-process runs accumulate 2 micro-batches of 2 clips; the interrupted ones are compared exactly
# with an uninterrupted run of the same settings.
ACCUM = [*SMALL, "--steps", "12", "--checkpoint-every", "4", "--micro-batch-size", "2"]


def run_reference(folder):
    res = run([*ACCUM, "--workers", "0", "--out", str(folder / "run")])
    return read_log(folder / "run"), res.stdout


@pytest.fixture(scope="module")
def reference(shared):
    """An uninterrupted single-process run (no loader workers), once per session: (log, stdout)."""
    return shared("reference", run_reference)[1]


def same_losses(log, reference):
    reference = reference[0]
    assert [r["step"] for r in log] == [r["step"] for r in reference]
    for a, b in zip(log, reference):
        for k in DETERMINISTIC:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])


def test_sigkill_then_rerun_logs_the_losses_of_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    args = [*ACCUM, "--workers", "1", "--out", str(out)]  # another worker count than the reference
    proc = subprocess.Popen(cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = out / "log.jsonl"
    # kill after the first checkpoint, once the log is past it (so the resumed run must drop those lines)
    wait_for(lambda: (out / "state.pt").exists() and log_path.exists() and len(log_path.read_text().splitlines()) >= 6,
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_log(out))
    saved = load_state(out / "state.pt")["optimized_steps"]
    assert 4 <= saved < 12 and saved % 4 == 0 and killed_at > saved
    run(args)
    same_losses(read_log(out), reference)


def test_sigterm_to_the_process_group_saves_a_checkpoint_and_exits(tmp_path):
    """As a batch scheduler (or Ctrl-C) does: the signal reaches the loader workers too."""
    out = tmp_path / "run"
    args = [*SMALL, "--steps", "400", "--checkpoint-every", "1000", "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log_path = out / "log.jsonl"
    wait_for(lambda: log_path.exists() and len(log_path.read_text().splitlines()) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "re-run the same command to resume" in stdout
    state = load_state(out / "state.pt")
    assert state["optimized_steps"] == read_log(out)[-1]["step"] < 400
    assert (out / "encoder.safetensors").is_file()


# Run in a child: pretrain.py with torch.save slowed down from its second call on (the second
# checkpoint): half of the bytes are written, then it stalls so the test can kill it mid-write.
SLOW_SAVE = r"""
import io, runpy, sys, time, torch
real_save, calls = torch.save, [0]
def slow_save(obj, f, *a, **k):
    calls[0] += 1
    if calls[0] < 2:
        return real_save(obj, f, *a, **k)
    buf = io.BytesIO(); real_save(obj, buf, *a, **k)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
    time.sleep(600)
torch.save = slow_save
sys.argv = ["pretrain.py"] + sys.argv[1:]
runpy.run_path("pretrain.py", run_name="__main__")
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(reference, tmp_path):
    out = tmp_path / "run"
    args = [*ACCUM, "--workers", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_files = lambda: [p for p in out.glob(".state.pt.partial") if p.stat().st_size > 0]  # noqa: E731
    wait_for(lambda: (out / "state.pt").exists() and bool(tmp_files()), proc)  # in the second write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_files(), "the torn temporary file is left behind"
    state = load_state(out / "state.pt")  # the previous checkpoint, intact
    assert state["optimized_steps"] == 4
    run(args)  # resumes from it (and clears the torn file)
    assert not list(out.glob(".state.pt.partial"))
    same_losses(read_log(out), reference)


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    def nan_targets(teacher, spec, center):  # what a diverged teacher would give: (B, N, D) of NaN
        return torch.full((spec.shape[0], spec.shape[2] // 16 * 8, teacher.cfg.dim), float("nan"))

    monkeypatch.setattr(bat.pretraining, "teacher_targets", nan_targets)
    cfg = pretrain.parse_config([*SMALL, "--steps", "3", "--workers", "0", "--demo-clips", "8",
                                 "--out", str(tmp_path / "run")])
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 1 \(lr .*\); no checkpoint was written yet$"):
        pretrain.main(cfg)
    assert not (tmp_path / "run" / "state.pt").exists() and not (tmp_path / "run" / "encoder.safetensors").exists()


def nan_from(call, real):
    """teacher_targets whose call number `call` and later give NaN, as a teacher diverging mid-run would."""
    calls = []

    def targets(teacher, spec, center):
        calls.append(1)
        good = real(teacher, spec, center)
        return good if len(calls) < call else torch.full_like(good, float("nan"))
    return targets


def assert_finite_checkpoint(out, step):
    """`out` holds the checkpoint of `step`, every tensor of both files finite."""
    tensors, meta = bat.checkpoint.read_safetensors(out / "encoder.safetensors")
    state = load_state(out / "state.pt")
    assert meta["optimized_steps"] == state["optimized_steps"] == step
    parts = {"encoder.safetensors": tensors, **{f"state.pt {k}": state[k] for k in ("encoder", "decoder", "ema_encoder")}}
    for name, part in parts.items():
        assert all(torch.isfinite(v).all() for v in part.values()), name


def test_a_loss_gone_non_finite_between_logged_steps_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    """Logged every 5 steps, saved every 2: the loss turns NaN at step 3, the run stops at the checkpoint of step 4
    before saving it, and names step 3 and the checkpoint of step 2, which keeps its finite weights."""
    monkeypatch.setattr(bat.pretraining, "teacher_targets", nan_from(3, bat.pretraining.teacher_targets))
    monkeypatch.setattr(pretrain, "save_curves", lambda *args: None)  # matplotlib: seconds, not under test
    out = tmp_path / "run"
    cfg = pretrain.parse_config(["--model", "tiny", "--target-frames", "64", "--batch-size", "4", "--views", "2",
                                 "--steps", "6", "--log-every", "5", "--checkpoint-every", "2", "--workers", "0",
                                 "--demo-clips", "8", "--out", str(out)])
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 3 \(lr .*\); the last good checkpoint, "
                                                 r"of step 2, is left as it is$"):
        pretrain.main(cfg)
    assert_finite_checkpoint(out, 2)


def test_weights_gone_non_finite_under_a_finite_loss_are_not_saved(tmp_path, monkeypatch):
    """The teacher's update of step 2 gives NaN (as an overflowing gradient could) after a finite loss: the
    checkpoint of step 2 is refused, the one of step 1 kept."""
    calls = []

    def poisoning_ema_update(teacher, student, decay):
        real_ema_update(teacher, student, decay)
        calls.append(decay)
        if len(calls) == 2:
            for p in teacher.parameters():
                p.data.fill_(float("nan"))

    real_ema_update = pretrain.ema_update
    monkeypatch.setattr(pretrain, "ema_update", poisoning_ema_update)
    monkeypatch.setattr(pretrain, "save_curves", lambda *args: None)
    out = tmp_path / "run"
    cfg = pretrain.parse_config([*SMALL, "--steps", "4", "--checkpoint-every", "1", "--workers", "0",
                                 "--demo-clips", "8", "--out", str(out)])
    with pytest.raises(FloatingPointError, match=r"^the weights are not finite after step 2, with every loss finite "
                                                 r".*; the last good checkpoint, of step 1, is left as it is$"):
        pretrain.main(cfg)
    assert_finite_checkpoint(out, 1)


def test_a_second_copy_of_a_running_command_is_refused(tmp_path):
    # a job submitted twice: the copy that finds --out locked by a live run stops before touching it
    from bat.files import lock_out, unlock_all

    out = tmp_path / "run"
    flags = (*SMALL, "--steps", "1", "--workers", "0", "--demo-clips", "4", "--out", str(out))
    lock_out(out)  # the first copy, still running (this process holds its lock)
    try:
        res = subprocess.run(cmd(*flags), capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    finally:
        unlock_all()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"error: {out} is being written by another run right now: wait " \
                                                  "for it to end, or choose another --out"
    assert os.listdir(out) == []
    res = subprocess.run(cmd(*flags), capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]  # the lock goes with the process that held it


def test_out_holding_another_runs_files_is_refused_and_left_as_it_is(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "encoder.safetensors").write_text("someone's encoder")
    res = subprocess.run(cmd(*SMALL, "--steps", "1", "--workers", "0", "--demo-clips", "8", "--out", str(out)),
                         capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert res.returncode != 0 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "holds encoder.safetensors, not written by pretrain.py" in res.stderr and "Traceback" not in res.stderr
    assert os.listdir(out) == ["encoder.safetensors"] and (out / "encoder.safetensors").read_text() == "someone's encoder"
