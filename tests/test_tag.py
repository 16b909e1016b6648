"""bat.tag: the onnxruntime tagger (CLI and Python API), without PyTorch.

The model is a tiny random encoder whose linear head is set by hand to a nearest-centroid classifier
over three generated sound classes (a 1 kHz tone, white noise, a 10 Hz click train): a clip of a known
class must come out with its label. One export per session (conftest.py's tagger_export).
"""
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import export as export_script
from bat.frontend import Frontend
from bat.heads import LinearProbe
from bat.model import Encoder, EncoderConfig
from bat.probes import Probe, load_probe, save_probe

pytest.importorskip("onnxruntime")
from bat.events import decode_events, median3  # noqa: E402
from bat.tag import Tagger, as_batch, num_windows, read_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
LABELS = ["tone", "noise", "clicks"]
WINDOW_FRAMES = 160  # the model's training spectrogram: 160 frames
WINDOW = 25600  # its training clip: 1.6 s; windows every 0.8 s


def tone(seconds, rng, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (rng.uniform(0.05, 0.8) * np.sin(2 * np.pi * 1000 * t + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def noise(seconds, rng, sr=SR):
    return (rng.uniform(0.05, 0.5) * rng.standard_normal(int(seconds * sr))).clip(-1, 1).astype(np.float32)


def clicks(seconds, rng, sr=SR):
    x, period = np.zeros(int(seconds * sr), np.float32), sr // 10
    for s in range(int(rng.integers(0, period)), len(x) - 32, period):
        x[s:s + 32] += rng.uniform(0.3, 0.9) * np.hanning(32)
    return x


GENERATORS = {"tone": tone, "noise": noise, "clicks": clicks}


def hand_set_probe():
    """LP head (no LayerNorm) = nearest class centroid of the last CLS: logit_k = 2 c_k.x - |c_k|^2."""
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=64, depth=2, num_heads=1))
    enc.init_pretraining_weights()
    enc.eval()
    frontend = Frontend("bat", target_frames=WINDOW_FRAMES)
    head = LinearProbe(64, len(LABELS), norm=False)
    with torch.no_grad():
        centroids = []
        for name in LABELS:
            x = np.stack([GENERATORS[name](1.6, np.random.default_rng(100 + s)) for s in range(4)])
            centroids.append(enc.forward_layers(frontend(torch.from_numpy(x)))[-1, :, 0].mean(0))
        c = torch.stack(centroids)
        # x10: confident softmax scores (logits in the hundreds; export's tolerance scales with them, bat.parity).
        head.fc.weight.copy_(10 * 2 * c)
        head.fc.bias.copy_(-10 * (c * c).sum(1))
    return Probe(enc, head, frontend, LABELS, "multiclass", clip_samples=WINDOW).eval()


def export_tagger(d):
    """The hand-set probe saved as finetune.py saves its model, exported to d/model.onnx (the tagger_export
    fixture, conftest.py: once per session, read by test_serve.py and test_packaging.py too). Returns the
    export check's largest tolerance of `scores`."""
    save_probe(d / "model.safetensors", hand_set_probe(), fmt="bat.finetuned")  # finetune.py's file
    # test_export.py checks every length; here a few, including one that is chunked.
    result = export_script.main(export_script.Config(checkpoint=str(d / "model.safetensors"), out=str(d / "model.onnx"),
                                            check_seconds=(0.5, 1.6, 12.0), batch_size=2))
    return max(r["tolerance"]["scores"] for r in result["rows"])


@pytest.fixture(scope="module")
def model(tagger_export, tmp_path_factory):
    exported, scores_tol = tagger_export
    d = tmp_path_factory.mktemp("tagger")
    files = {  # (path, label): other instances than the centroids', other formats and rates
        "tone": d / "tone_44k_stereo.wav", "noise": d / "noise.flac", "clicks": d / "clicks.wav"}
    x = tone(3.0, np.random.default_rng(1), sr=44100)
    sf.write(files["tone"], np.stack([x, x], 1), 44100, subtype="FLOAT")
    sf.write(files["noise"], noise(1.6, np.random.default_rng(2)), SR)
    sf.write(files["clicks"], clicks(2.5, np.random.default_rng(3)), SR, subtype="PCM_16")
    both = np.concatenate([tone(3.0, np.random.default_rng(4)), noise(3.0, np.random.default_rng(5))])
    sf.write(d / "tone_then_noise.wav", both, SR)
    return {"dir": d, "path": exported / "model.onnx", "files": files, "checkpoint": exported / "model.safetensors",
            "scores_tol": scores_tol}


def run_tag(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "bat.tag", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def no_torch_env(tmp_path):
    """PYTHONPATH with a `torch` first whose import fails loudly: the tagger must never touch it."""
    stub = tmp_path / "no_torch" / "torch"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        "import sys\nsys.stderr.write('TORCH WAS IMPORTED\\n')\nraise ImportError('torch is unavailable (test stub)')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(ROOT)])}


# ------------------------------------------------------------------------------------------- CLI

def test_cli_prints_correct_labels(model):
    files = model["files"]
    proc = run_tag(model["path"], *files.values(), "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for (label, path), line in zip(files.items(), lines):
        head, _, top = line.partition(": ")
        assert head == str(path)
        (l1, s1), (l2, s2) = [item.rsplit(" ", 1) for item in top.split(", ")]
        assert l1 == label and l2 != label and float(s1) > 0.5 >= float(s2), line


def test_cli_json_without_torch(model, tmp_path):
    files = model["files"]
    proc = run_tag(model["path"], *files.values(), "--json", "--top-k", "3", env=no_torch_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH WAS IMPORTED" not in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["file"] for r in rows] == [str(p) for p in files.values()]
    for (label, _), r in zip(files.items(), rows):
        assert r["labels"][0]["label"] == label and len(r["labels"]) == 3
        assert abs(sum(x["score"] for x in r["labels"]) - 1.0) < 1e-4  # multiclass: mean of softmaxes
        assert "windows" not in r and "events" not in r
    assert [r["duration"] for r in rows] == [3.0, 1.6, 2.5]
    # and the stub really blocks torch in that environment
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env(tmp_path), capture_output=True,
                             text=True, cwd=tmp_path)
    assert blocked.returncode != 0 and "TORCH WAS IMPORTED" in blocked.stderr


TIMES = [(0.0, 1.6), (0.8, 2.4), (1.6, 3.2), (2.4, 4.0), (3.2, 4.8), (4.0, 5.6), (4.8, 6.0)]  # 1.6-s windows, hop 0.8


def test_cli_timeline(model):
    """--timeline: every window of the model's length with its times (the last one runs past the end and is
    zero-padded, as in training); JSON carries the same windows."""
    path = model["dir"] / "tone_then_noise.wav"  # 3 s of tone, then 3 s of noise
    proc = run_tag(model["path"], path, "--timeline", "--json", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(w["start"], w["end"]) for w in row["windows"]] == TIMES
    labels = [w["labels"][0]["label"] for w in row["windows"]]
    assert labels[:2] == ["tone", "tone"] and labels[-3:] == ["noise", "noise", "noise"]
    text = run_tag(model["path"], path, "--timeline", "--top-k", "1").stdout.splitlines()
    assert len(text) == 1 + len(TIMES) and text[0].startswith(f"{path}: ")
    assert text[1].startswith(f"{path} [0.00-1.60 s]: tone ") and text[-1].startswith(f"{path} [4.80-6.00 s]: noise ")
    # a file no longer than the window is one window
    short = run_tag(model["path"], model["files"]["noise"], "--timeline", "--json")
    assert [(w["start"], w["end"]) for w in json.loads(short.stdout)["windows"]] == [(0.0, 1.6)]


def test_cli_bad_files_one_line_each(model, tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    x = noise(1.0, np.random.default_rng(0))
    x[500] = np.nan
    sf.write(tmp_path / "nan.wav", x, SR, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("not audio at all")
    good = model["files"]["clicks"]
    bad = [tmp_path / "empty.wav", tmp_path / "nan.wav", tmp_path / "text.wav", tmp_path / "missing.wav"]
    proc = run_tag(model["path"], bad[0], good, *bad[1:], env=no_torch_env(tmp_path))
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines() == [line for line in proc.stdout.strip().splitlines() if str(good) in line]
    assert len(proc.stdout.strip().splitlines()) == 1 and ": clicks " in proc.stdout
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == len(bad) + 1, proc.stderr  # one per bad file, then the count
    for path, line, reason in zip(bad, errors, ["empty", "non-finite", "cannot decode", "no such file"]):
        assert line.startswith(f"error: {path}: ") and reason in line, line
    assert errors[-1] == "4 of 5 file(s) could not be tagged"
    alone = run_tag(model["path"], bad[2], env=no_torch_env(tmp_path))  # one file: one line, nothing else
    assert alone.returncode == 1 and alone.stdout == "" and alone.stderr.splitlines() == errors[2:3], alone.stderr


def test_cli_model_errors(model, tmp_path):
    proc = run_tag(tmp_path / "nope.onnx", model["files"]["tone"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot load the model" in proc.stderr
    import onnx  # an ONNX file that export.py did not write: same graph, our metadata removed
    foreign = onnx.load(str(model["path"]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    proc = run_tag(tmp_path / "foreign.onnx", model["files"]["tone"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a model written by export.py" in proc.stderr
    proc = run_tag(model["path"], model["files"]["tone"], "--events")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "frame-wise" in proc.stderr
    proc = run_tag(model["path"], model["files"]["tone"], "--top-k", "0")
    assert proc.returncode == 2 and "--top-k" in proc.stderr


BAD_METADATA = [  # (key, value, what the error says): a hand-edited model fails once, not every file
    ("window_samples", "abc", "must be a non-negative integer, got 'abc'"),
    ("sample_rate", "0", "must be a positive integer, got '0'"),
    ("hop_samples", "0", "must be a positive integer, got '0'"),
    ("patch_seconds", "nan", "must be a positive number, got 'nan'"),
    ("labels", '"abc"', "must be a JSON list of the model's 3 class names, got '\"abc\"'"),
    ("labels", '["a"]', "must be a JSON list of the model's 3 class names, got '[\"a\"]'"),
    ("labels", None, "must be a JSON list of the model's 3 class names, it is missing"),
]


def test_bad_model_metadata_is_one_error_naming_the_model_and_key(model, tmp_path):
    import onnx

    for i, (key, value, words) in enumerate(BAD_METADATA):
        edited = onnx.load(str(model["path"]))
        props = {p.key: p.value for p in edited.metadata_props if p.key != key}
        del edited.metadata_props[:]
        onnx.helper.set_model_props(edited, props if value is None else {**props, key: value})
        path = tmp_path / f"{i}.onnx"
        onnx.save(edited, str(path))
        with pytest.raises(ValueError) as err:
            Tagger(path)
        assert str(err.value) == f"{path}: metadata {key} {words}; re-export it with export.py"
    proc = run_tag(tmp_path / "0.onnx", model["files"]["tone"])  # window_samples "abc"
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / '0.onnx'}: metadata window_samples " \
        "must be a non-negative integer, got 'abc'; re-export it with export.py\n"


def test_cli_threads_has_an_upper_bound(capsys):
    """onnxruntime starts every thread asked for: --threads 100000 never got to the first file."""
    from bat.tag import parse_args

    cores = os.cpu_count() or 1
    assert parse_args(["m.onnx", "a.wav", "--threads", str(4 * cores)]).threads == 4 * cores
    assert parse_args(["m.onnx", "a.wav", "--threads", "0"]).threads == 0  # automatic (bat.tagger.default_threads)
    for bad in ("100000", "-1"):
        with pytest.raises(SystemExit):
            parse_args(["m.onnx", "a.wav", "--threads", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.endswith(f"--threads must be between 0 (automatic) and {4 * cores} "
                            f"(this machine has {cores} cores)"), err


def test_cli_cuda_falls_back_with_one_notice(model):
    proc = run_tag(model["path"], model["files"]["tone"], "--device", "cuda")
    assert proc.returncode == 0 and ": tone " in proc.stdout
    notes = proc.stderr.strip().splitlines()
    if Tagger(model["path"], device="cuda").device == "cuda":
        assert notes == []
    else:  # onnxruntime's own multi-line provider errors are silenced; we say it once
        assert len(notes) == 1 and notes[0].startswith("note:") and "CPU" in notes[0], proc.stderr


def test_cuda_fallback_chatter_stays_off_stdout(monkeypatch, capsys):
    """onnxruntime's Python fallback prints "EP Error ... Falling back" to stdout when the CUDA provider
    cannot be created (stdout is where `bat.tag --json` writes); without PyTorch in the process, CUDA's
    libraries are preloaded first (from pip's nvidia-* packages)."""
    import onnxruntime as ort

    from bat.tagger import create_session

    calls = []

    class FallingBack:
        def __init__(self, path, opts, providers):
            calls.append(providers)
            print("*************** EP Error ***************\nFalling back to ['CPUExecutionProvider'] and retrying.")

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    monkeypatch.setattr(ort, "preload_dlls", lambda: calls.append("preload") or print("preloading"), raising=False)
    monkeypatch.delitem(sys.modules, "torch")  # a torch-free service (the real module comes back after the test)
    session, notice = create_session("m.onnx", device="cuda")
    assert capsys.readouterr().out == "" and calls[0] == "preload" and calls[1][0] == "CUDAExecutionProvider"
    assert notice.startswith("note:") and "CPU" in notice


# -------------------------------------------------------------------------------------- Python API

def test_api_scores_match_pytorch(model):
    tagger = Tagger(model["path"])
    assert tagger.labels == LABELS and tagger.task == "multiclass" and tagger.sample_rate == SR
    assert tagger.window_samples == WINDOW and tagger.hop_samples == WINDOW // 2 and tagger.device == "cpu"
    probe = load_probe(model["checkpoint"])
    rng = np.random.default_rng(11)
    # within the training window predict() pads to it exactly as the graph does
    x = np.stack([tone(2.2, rng), noise(2.2, rng), clicks(2.2, rng)])  # two windows each
    got = tagger.scores(x)
    want = probe.predict(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 3) and np.abs(got - want).max() <= model["scores_tol"]  # export's own check
    one = tagger.scores(x[1])
    assert one.shape == (3,) and np.abs(one - got[1]).max() <= 1e-6
    assert tagger.embedding(x).shape == (3, 64) and tagger.embedding(x[0]).shape == (64,)
    assert [label for label, _ in tagger.top_k(one, 2)][0] == "noise" and len(tagger.top_k(one, 10)) == 3


def test_api_input_validation(model):
    tagger = Tagger(model["path"])
    x = tone(1.0, np.random.default_rng(0))
    cases = [
        ((x * 32767).astype(np.int16), "int16 samples refused"),
        (x > 0, "bool samples refused"),
        (x.astype(np.complex64), "expected float samples"),
        (x.reshape(1, 1, -1), "expected [samples] or [batch, samples]"),
        (np.stack([x, x], axis=1), "looks like (frames, channels)"),  # soundfile's layout: not 16,000 clips
        (np.float32(0.5), "expected [samples] or [batch, samples]"),
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((2, 0), np.float32), "empty"),
        (np.where(np.arange(x.size) == 7, np.nan, x), "non-finite"),
        (np.stack([x, np.full_like(x, np.inf)]), "non-finite samples (NaN or Inf) in row(s) 1"),
        (np.array([1e300], np.float64), "non-finite"),  # overflows float32
        ([x, x[:100]], "one at a time"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError) as info:
            tagger.scores(bad)
        assert message in str(info.value) and "\n" not in str(info.value), (message, str(info.value))
    # float64 and lists are converted; results equal the float32 ones
    assert np.array_equal(tagger.scores(x.astype(np.float64)), tagger.scores(x))
    assert np.array_equal(tagger.scores(x.tolist()), tagger.scores(x))
    # shorter than 0.5 s: zero-padded in the graph, still a valid result
    short = tagger.scores(x[:800])
    assert np.isfinite(short).all() and abs(short.sum() - 1) < 1e-5
    assert np.array_equal(short, tagger.scores(np.pad(x[:800], (0, 8000 - 800))))


def test_api_tag_streams_long_files_in_blocks(model, monkeypatch):
    """tag(): windows of 1.6 s every 0.8 s pooled by their mean. Read and scored in blocks (forced small
    here), a file gives the same windows and scores as the whole clip in one run; a 44.1 kHz stereo file
    is resampled as a stream to the same samples as bat.audio.load_audio."""
    import bat.tagger as tag_module
    from bat.audio import load_audio

    tagger = Tagger(model["path"])
    wav, _ = sf.read(model["dir"] / "tone_then_noise.wav", dtype="float32")
    whole = tagger.run(wav, ["scores", "window_scores"])
    result = tagger.tag(wav)
    assert [(a, b) for a, b, _ in result["windows"]] == TIMES
    assert np.abs(np.stack([s for _, _, s in result["windows"]]) - whole["window_scores"]).max() <= 1e-5
    assert np.abs(result["scores"] - whole["scores"]).max() <= 1e-5
    assert num_windows(len(wav), WINDOW, WINDOW // 2) == len(TIMES) and num_windows(10, WINDOW, 1) == 1
    monkeypatch.setattr(tag_module, "BLOCK_SECONDS", 2.0)  # 1 window per block, 0.5-s reads
    assert tagger.block_windows() == 1
    pieces, seconds = read_blocks(str(model["dir"] / "tone_then_noise.wav"), SR, 8000)
    streamed = tagger.tag_stream(pieces)
    assert seconds == 6.0 and [(a, b) for a, b, _ in streamed["windows"]] == TIMES
    assert np.abs(streamed["scores"] - whole["scores"]).max() <= 1e-5
    tone44 = model["files"]["tone"]
    pieces, _ = read_blocks(str(tone44), SR, 5000)
    np.testing.assert_array_equal(np.concatenate(list(pieces)), load_audio(tone44))
    # several clips in one run (zero-padded, with lengths): each result is the clip's own
    rng = np.random.default_rng(5)
    clips = [tone(1.0, rng), noise(4.0, rng), clicks(0.3, rng)]
    for c, r in zip(clips, tagger.tag_many(clips)):
        alone = tagger.tag(c)
        assert np.abs(r["scores"] - alone["scores"]).max() <= 1e-5 and len(r["windows"]) == len(alone["windows"])


def test_cli_files_short_at_the_model_rate_but_long_at_their_own_are_tagged_whole(model, tmp_path):
    """20 s at 48 kHz is more frames than a block (30 s at 16 kHz) and fewer samples after resampling: the CLI
    once took the first streamed piece of it as the whole clip (9.97 s tagged of 20)."""
    from bat.audio import load_audio

    path = tmp_path / "t48.wav"
    sf.write(path, np.tile(tone(2.0, np.random.default_rng(7), sr=48000), 10), 48000)
    proc = run_tag(model["path"], path, "--json", "--timeline")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["duration"] == 20.0 and got["windows"][-1]["end"] == 20.0
    whole = Tagger(model["path"]).tag(load_audio(path))
    assert abs(got["labels"][0]["score"] - float(whole["scores"].max())) < 1e-5


def test_read_blocks_streams_a_low_rate_file_in_bounded_pieces(tmp_path):
    """Fewer frames than a block at the file's rate, 16x more samples at the model's (a 1-Hz header would make
    5,000 frames 80 M samples): read in pieces of about a block, not whole; the same from a request's body."""
    import io

    path = tmp_path / "r1k.wav"
    sf.write(path, noise(50.0, np.random.default_rng(0), sr=1000), 1000)
    for source in (str(path), io.BytesIO(path.read_bytes())):
        pieces, seconds = read_blocks(source, SR, 16000)  # a block: 1 s at 16 kHz, 1,000 frames of the file
        lengths = [len(p) for p in pieces]
        assert seconds == 50.0 and sum(lengths) == 800000 and max(lengths) <= 2 * 16000, max(lengths)


def test_implausibly_large_samples_are_refused_read_whole_streamed_or_passed_in(tmp_path):
    """A corrupt float WAV's 1e18 spike (the spectrum would overflow to NaN scores) is refused naming the file,
    whether the file is read whole or in pieces; in a waveform too. int16-scaled floats (~30,000) are not."""
    from bat.audio import AudioError

    x = noise(3.0, np.random.default_rng(0))
    x[40_000] = 1e18
    path = tmp_path / "spike.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    for block in (16000, 10 * SR):  # in pieces of 1 s (the spike in the third), or whole
        with pytest.raises(AudioError, match=f"^{path}: implausibly large samples"):
            list(read_blocks(str(path), SR, block)[0])
    with pytest.raises(ValueError, match=r"^waveform: implausibly large samples \(beyond 1e\+08\) in row\(s\) 1$"):
        as_batch(np.stack([np.zeros_like(x), x]))
    sf.write(path, x.clip(-1, 1) * 30_000, SR, subtype="FLOAT")
    assert np.abs(np.concatenate(list(read_blocks(str(path), SR, 16000)[0]))).max() > 29_000
    assert np.abs(as_batch(x.clip(-1, 1) * 30_000)[0]).max() == 30_000


def test_cli_into_a_closed_pipe_stops_quietly(model):
    """`bat.tag ... | head -1`: once the reader is gone the rest is not wanted; no error per remaining file."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        files = list(model["files"].values())
        r = subprocess.run([sys.executable, "-m", "bat.tag", str(model["path"]), *map(str, files)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r.stderr[-2000:]


def test_cli_ctrl_c_is_one_line_and_status_130(model):
    import signal
    import time

    files = [str(model["files"]["clicks"])] * 2000
    proc = subprocess.Popen([sys.executable, "-m", "bat.tag", str(model["path"]), *files], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline()  # tagging has begun
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "stopped (Ctrl-C)", err[-2000:]


def test_cli_info_does_not_take_an_option_value_for_the_model(model):
    proc = run_tag("--top-k", "3", "--info", model["path"])
    assert proc.returncode == 0, proc.stderr
    assert f"model: {model['path']}: fp32" in proc.stdout


def test_api_refuses_bad_arguments_with_one_line(model, tmp_path):
    tagger = Tagger(model["path"])
    x = tone(1.0, np.random.default_rng(0))
    assert tagger.tag_many([]) == []
    for call, message in [
            (lambda: tagger.top_k(tagger.scores(np.stack([x, x])), 2), "expected one clip's scores [3]"),
            (lambda: tagger.run(np.stack([x, x]), lengths=[100, 100, 100]), "lengths: expected 2 value(s)"),
            (lambda: tagger.run(np.stack([x, x]), lengths=[100, -100]), "in [1, 16000]"),
            (lambda: tagger.run(np.stack([x, x]), lengths=[100, 10**9]), "in [1, 16000]"),
            (lambda: Tagger(model["path"], threads="2"), "threads must be an integer >= 0"),
            (lambda: Tagger(model["path"], threads=-1), "threads must be an integer >= 0")]:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), (message, str(info.value))
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)  # onnxruntime would wait forever for a writer
    with pytest.raises(ValueError, match="not a regular file"):
        Tagger(fifo)


def test_events_decoding_as_ref():
    """REF's tokens_to_events on hand-worked frame scores: median filter of 3 (zeros past the ends),
    threshold 0.3 inclusive, an event from its first to its last active patch's time."""
    s = np.array([[0.1, 0.9], [0.5, 0.9], [0.6, 0.0], [0.2, 0.9], [0.4, 0.9], [0.35, 0.9], [0.0, 0.2]], np.float32)
    times = np.arange(len(s)) * 0.16
    np.testing.assert_allclose(median3(s[:, 0]), [0.1, 0.5, 0.5, 0.4, 0.35, 0.35, 0.0])
    events = decode_events(times, s, ["a", "b"])
    # a: medians 0.1 0.5 0.5 0.4 0.35 0.35 0 -> patches 1..5; b: 0.9 0.9 0.9 0.9 0.9 0.9 0.2 -> 0..5
    assert events == [("b", 0.0, 0.8), ("a", 0.16, 0.8)]
    assert decode_events(times, np.zeros_like(s), ["a", "b"]) == []
    assert decode_events(times[:1], np.full((1, 2), 0.9, np.float32), ["a", "b"]) == []  # medfilt of one: 0


def test_api_thread_safety(model):
    tagger = Tagger(model["path"], threads=1)
    rng = np.random.default_rng(3)
    jobs = [np.stack([GENERATORS[LABELS[i % 3]](s, rng) for _ in range(b)])
            for i, (s, b) in enumerate([(0.7, 1), (1.6, 2), (2.3, 1), (1.0, 3)] * 4)]
    serial = [tagger.scores(x) for x in jobs]
    barrier = threading.Barrier(8)

    def work(i):
        if i < 8:
            barrier.wait()  # start the first four together, so runs really overlap
        return tagger.scores(jobs[i])

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(work, range(len(jobs))))
    for a, b in zip(serial, concurrent):
        assert np.array_equal(a, b)


def test_as_batch_shapes():
    x, was_1d = as_batch(np.zeros(10, np.float64))
    assert x.shape == (1, 10) and x.dtype == np.float32 and was_1d and x.flags.c_contiguous
    x, was_1d = as_batch(np.zeros((3, 10), np.float16)[:, ::2])
    assert x.shape == (3, 5) and not was_1d and x.flags.c_contiguous


def test_slow_e2e_cli_events_frame_wise_model(model, frame_wise_export):
    """A frame-wise (SED) export (test_export.py's, the frame_wise_export fixture): --events prints (label, onset,
    offset) decoded from frame_scores as REF does; the JSON events equal decode_events over the Tagger's frames."""
    from test_export import SED_LABELS

    sed = frame_wise_export[0] / "sed.onnx"  # "tone" always on, "noise" never, the other classes free
    path = model["dir"] / "tone_then_noise.wav"
    proc = run_tag(sed, path, "--events", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    tagger = Tagger(sed)
    wav, _ = sf.read(path, dtype="float32")
    result = tagger.tag(wav)
    times, frames = result["frames"]
    assert len(times) == 37 and times[-1] < 6.0  # 0.16-s patches over the whole 6 s (601 frames // 16)
    want = decode_events(times, frames, SED_LABELS)
    assert [(e["label"], e["onset"], e["offset"]) for e in row["events"]] == want
    assert any(e["label"] == "tone" for e in row["events"]) and not any(e["label"] == "noise" for e in row["events"])
    text = run_tag(sed, path, "--events").stdout.splitlines()
    assert text[1].startswith(f"{path} event tone: 0.00-")
