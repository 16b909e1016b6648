"""export.py: probes and bare encoders to ONNX, checked against PyTorch with onnxruntime.

One export per kind (fixtures made once per session, conftest.py's shared; a tiny encoder of width 64 and
depth 2) keeps this file at well under a minute on two cores; everything else reads those files.
"""
import copy
import errno
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export as export_script
from bat import exporting
from bat.checkpoint import CheckpointError, save_encoder
from bat.demo import demo_clip
from bat.frontend import Frontend, spectrogram
from bat.heads import CGP
from bat.model import Encoder, EncoderConfig
from bat.probes import Probe, load_probe, save_probe
from bat.cli import FlagError
from ref_names import fairseq_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
# From below the 0.5 s minimum to 60 s; 10.4 s = 65 time patches (a ragged second encoder chunk).
LENGTHS = (0.1, 1.0, 5.0, 10.4, 60.0)
ENCODER_LENGTHS = (0.5, 10.4, 30.0)  # unchanged path (no windows): fewer lengths
TOL = 1e-4  # a fixed tolerance, only to test check_rows' override (export.py --tolerance)
LABELS = ["dog", "rain", "siren", "speech", "engine"]


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    enc = Encoder(EncoderConfig(dim=64, depth=2, num_heads=1))
    enc.init_pretraining_weights()  # xavier weights: larger activations than the default init
    return enc.eval()


def clips(seconds, batch, seed=7):
    return np.stack([demo_clip(i, seed=seed, seconds=seconds)[0] for i in range(batch)])


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_export(checkpoint, out, **kw):
    cfg = export_script.Config(**{"checkpoint": str(checkpoint), "out": str(out), "check_seconds": LENGTHS,
                                  "batch_size": 3, **kw})
    return export_script.main(cfg)


WINDOW = 16000  # the windowed probe's training clip: 1 s (-> 101 frames, padded to 112 as REF's SCV2)


def windowed_probe(seed=1, frame_wise=False):
    torch.manual_seed(seed)
    head = CGP(64, 2, len(LABELS), num_prototypes=32, frame_wise=frame_wise)
    with torch.no_grad():  # a gate that is not uniform, so the graph's gate is really exercised
        head.gate_logits.copy_(torch.tensor([0.8, -0.4]))
        head.fc.weight.mul_(20.0)  # scores far from uniform: differences would show
    return Probe(tiny_encoder(), head, Frontend("bat", target_frames=112), LABELS,
                 "multilabel" if frame_wise else "multiclass", clip_samples=WINDOW).eval()


def export_probe(d):
    """A probe trained on 1-s windows, exported into its own folder (the README's example)."""
    save_probe(d / "probe.safetensors", windowed_probe())
    (d / "config.json").write_text('{"written_by": "probe_cgp.py"}\n')  # the probe run's own file
    return run_export(d / "probe.safetensors", d / "tagger.onnx")


def export_encoder(d):
    save_encoder(d / "encoder.safetensors", tiny_encoder(3))
    return run_export(d / "encoder.safetensors", d / "encoder.onnx", check_seconds=ENCODER_LENGTHS)


# Once per session (conftest.py's shared), not once per pytest-xdist worker that runs a test reading them.
@pytest.fixture(scope="module")
def probe_export(shared):
    d, result = shared("probe_export", export_probe)
    return {"dir": d, "path": d / "tagger.onnx", "result": result, "probe": load_probe(d / "probe.safetensors")}


@pytest.fixture(scope="module")
def encoder_export(shared):
    d, result = shared("encoder_export", export_encoder)
    return {"dir": d, "path": d / "encoder.onnx", "result": result, "encoder": tiny_encoder(3)}  # seeded: the same


def assert_check_rows(result, lengths=LENGTHS, mixed=True):
    rows = result["rows"]
    want = {(s, b) for s in lengths for b in (1, 3)} | ({("mixed", 3)} if mixed else set())
    assert {(r["seconds"], r["batch"]) for r in rows} == want
    for r in rows:
        for name, diff in r["max_abs_diff"].items():
            assert diff <= r["tolerance"][name], f"{name} at {r['seconds']} s, batch {r['batch']}: {diff:.2e}"
    assert result["tolerance_share"] <= 1.0 and result["top1_agreement"] == 1.0


def check_tol(result, name):
    """The export check's own tolerance for `name` (bat.parity, from float32 rounding over this graph's depth
    and the output's scale), the largest over its rows: what an independent comparison may allow too."""
    return max(r["tolerance"][name] for r in result["rows"])


def test_probe_export_matches_predict(probe_export):
    """The graph against Probe.predict (torch.stft front-end, eager encoder), independently of export.py's
    own check: short, exactly one window, ragged (a last window past the end) and 60-s inputs."""
    assert_check_rows(probe_export["result"])
    probe, sess = probe_export["probe"], session(probe_export["path"])
    for samples in (1600, WINDOW, WINDOW + 3 * 160 + 7, 60 * 16000):
        x = clips(samples / 16000, 2)[:, :samples]
        scores, window_scores, emb = sess.run(["scores", "window_scores", "embedding"], {"waveform": x})
        ref = probe.predict(torch.from_numpy(x)).numpy()
        assert scores.shape == (2, len(LABELS)) and np.abs(scores - ref).max() <= check_tol(probe_export["result"], "scores")
        np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)  # multiclass: softmax, then the mean
        n = 1 + -(-max(0, samples - WINDOW) // (WINDOW // 2))  # windows of 1 s every 0.5 s
        assert window_scores.shape == (2, n, len(LABELS))
        np.testing.assert_allclose(scores, window_scores.mean(1), atol=1e-6)  # multiclass: mean of windows
    # window k of the graph is the probe on the k-th 1-s slice (zero-padded past the end), as in training
    k = 5
    piece = torch.from_numpy(x[:, k * 8000:k * 8000 + WINDOW].copy())
    with torch.no_grad():
        alone = probe(probe.frontend(piece)).softmax(-1).numpy()
    assert np.abs(window_scores[:, k] - alone).max() <= check_tol(probe_export["result"], "window_scores")
    assert np.abs(scores[0] - scores[1]).max() > 0.01  # different clips, different scores: not a constant


def test_mixed_lengths_batch_honours_lengths(probe_export):
    """Clips of different lengths zero-padded into one batch: with `lengths`, each row equals the clip alone
    (graph and Probe.predict); without, the graph scores the padded rows (what it was given)."""
    sess, probe = session(probe_export["path"]), probe_export["probe"]
    parts = [clips(s, 1, seed=20 + i)[0] for i, s in enumerate((0.3, 2.7, 7.0))]
    n = max(map(len, parts))
    x = np.stack([np.pad(p, (0, n - len(p))) for p in parts])
    lengths = np.array([len(p) for p in parts], np.int64)
    batch = sess.run(["scores", "window_scores"], {"waveform": x, "lengths": lengths})
    ref = probe.predict(torch.from_numpy(x), torch.from_numpy(lengths)).numpy()
    tol = check_tol(probe_export["result"], "scores")
    assert np.abs(batch[0] - ref).max() <= tol
    for i, p in enumerate(parts):
        alone, alone_windows = sess.run(["scores", "window_scores"], {"waveform": p[None]})
        assert np.abs(batch[0][i] - alone[0]).max() <= tol
        assert np.abs(batch[1][i, :alone_windows.shape[1]] - alone_windows[0]).max() <= tol
    unpadded = sess.run(["scores"], {"waveform": x})[0]  # `lengths` is optional: default = full rows
    assert np.abs(unpadded[0] - batch[0][0]).max() > 1e-3


def test_matmul_dft_frontend_matches_reference():
    """The graph's front-end (frames @ windowed DFT basis, no FFT op) against bat.spectrogram / kaldi_fbank:
    both are compared with a float64 computation, and the matmul stays within float32 rounding of it."""
    from bat.frontend import kaldi_fbank

    x = torch.from_numpy(clips(3.0, 2))
    for kind, ref in (("bat", spectrogram), ("eat", kaldi_fbank)):
        exact = Frontend(kind).double()(x.double())
        fast = Frontend(kind).use_matmul_dft()(x)
        reference = ref(x)
        assert fast.shape == reference.shape
        err_fft = (reference.double() - exact).abs().max().item()
        err_matmul = (fast.double() - exact).abs().max().item()
        assert err_matmul <= max(3 * err_fft, 1e-5), (kind, err_matmul, err_fft)
        for n in (100, 513, 8000, 12345):  # short and odd lengths: the same frame count
            assert Frontend(kind).use_matmul_dft()(x[:, :n]).shape == ref(x[:, :n]).shape


def test_matmul_dft_power_equals_the_fft_for_every_geometry():
    """The factored DFT (power-of-two n_fft: two small matmuls) and the one-basis fallback against
    torch.fft in float64, for BAT at 16 and 32 kHz, the Kaldi 400-sample window in 512, and odd sizes."""
    from bat.frontend import MatmulDFT

    for n_fft, window in ((1024, torch.hann_window(1024)), (2048, torch.hann_window(2048)),
                          (512, torch.hann_window(400)), (400, torch.hann_window(400)), (48, torch.rand(30))):
        frames = torch.randn(3, 5, len(window), dtype=torch.float64)
        exact = torch.fft.rfft(frames * window.double(), n=n_fft).abs().pow(2)
        for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):  # constants are float32
            power = MatmulDFT(window, n_fft).to(dtype)(frames.to(dtype)).double()
            assert power.shape == exact.shape
            assert (power - exact).abs().max() <= tol * exact.abs().max(), (n_fft, len(window), dtype)


def test_graph_has_no_fft_op(probe_export):
    ops = {n.op_type for n in onnx.load(str(probe_export["path"])).graph.node}
    assert not ops & {"STFT", "DFT"}, ops
    assert "MatMul" in ops or "FusedMatMul" in ops
    assert "Softmax" in ops and "IsNaN" not in ops  # the exporter's softmax NaN guards are removed
    assert "BiasGelu" in ops and "Erf" not in ops  # every MLP's erf GELU folded into one node (fuse_gelu)


def test_probe_export_file_and_metadata(probe_export):
    path, probe = probe_export["path"], probe_export["probe"]
    assert not list(path.parent.glob("*.data")), "weights must be inside the one .onnx file"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["waveform", "lengths"]
    wav = inputs["waveform"].type.tensor_type
    assert wav.elem_type == onnx.TensorProto.FLOAT
    assert all(d.dim_param and not d.dim_value for d in wav.shape.dim)  # both axes dynamic
    assert "lengths" in {t.name for t in model.graph.initializer}  # optional: [-1] = full rows by default
    assert [o.name for o in model.graph.output] == ["scores", "window_scores", "embedding"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["labels"]) == LABELS == probe.labels
    assert meta["sample_rate"] == "16000" and meta["task"] == "multiclass" and meta["format"] == "bat.onnx"
    assert json.loads(meta["model_config"]) == probe.encoder.cfg.to_dict()
    assert json.loads(meta["frontend_config"])["kind"] == "bat" and meta["probe"] == "cgp"
    assert int(meta["window_samples"]) == WINDOW and int(meta["hop_samples"]) == WINDOW // 2
    assert meta["aggregate"] == "mean" and "window_times" in meta
    assert json.loads(session(path).get_modelmeta().custom_metadata_map["labels"]) == LABELS
    # the resolved configuration is named after the model; the probe folder's config.json is untouched
    cfg = json.loads((path.parent / "tagger.json").read_text())
    assert cfg["checkpoint"].endswith("probe.safetensors") and cfg["out"] == str(path)
    assert cfg["task"] == "multiclass" and cfg["num_classes"] == len(LABELS) and cfg["tolerance"] is None
    assert (path.parent / "config.json").read_text() == '{"written_by": "probe_cgp.py"}\n'


def test_encoder_export(encoder_export):
    assert_check_rows(encoder_export["result"], ENCODER_LENGTHS, mixed=False)
    path, enc = encoder_export["path"], encoder_export["encoder"]
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["waveform"]
    assert [o.name for o in sess.get_outputs()] == ["embedding", "layers"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == [] and meta["task"] == "embedding" and meta["probe"] == "none"
    # a folder without another run's config.json gets one, as from every script (and tagger-named too)
    shared = json.loads((path.parent / "config.json").read_text())
    assert shared == json.loads((path.parent / "encoder.json").read_text()) and shared["written_by"] == "export.py"
    assert json.loads(meta["model_config"]) == enc.cfg.to_dict()
    x = clips(30.0, 2)
    emb, layers = sess.run(None, {"waveform": x})
    with torch.no_grad():
        cls = enc.forward_layers(spectrogram(torch.from_numpy(x)))[:, :, 0].transpose(0, 1).numpy()
    assert layers.shape == (2, 2, 64) and emb.shape == (2, 64)
    assert np.abs(layers - cls).max() <= check_tol(encoder_export["result"], "layers") and np.array_equal(emb, layers[:, -1])


def test_check_catches_a_wrong_graph(probe_export):
    """The comparison fails when the graph and the PyTorch model disagree (here: a changed head bias)."""
    model, _ = exporting.load_model(str(probe_export["dir"] / "probe.safetensors"))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.probe.head.fc.bias[0] += 0.5
    rows = exporting.compare(str(probe_export["path"]), other, (1.0,), (1,), seed=0)
    assert rows[0]["max_abs_diff"]["scores"] > 1e-3
    with pytest.raises(exporting.ExportError, match="differs from PyTorch"):
        exporting.check_rows(rows, TOL, str(probe_export["path"]))
    with pytest.raises(exporting.ExportError, match="differs from PyTorch"):  # the derived tolerance too
        exporting.check_rows(rows, None, str(probe_export["path"]))
    assert exporting.check_rows(exporting.compare(str(probe_export["path"]), model, (1.0,), (1,), seed=0),
                                None, "m.onnx")["tolerance_share"] <= 1.0  # the right model passes
    # reduced precision is judged by top-1 agreement instead
    rows = rows[:1]
    rows[0].update(top1_agree=9, top1_total=10)
    assert exporting.check_rows(rows, TOL, "m.onnx", min_agreement=0.9)["top1_agreement"] == 0.9
    with pytest.raises(exporting.ExportError, match="top-1 agreement"):
        exporting.check_rows(rows, TOL, "m.onnx", min_agreement=0.95)


def test_slow_int8_and_fp16_exports(tmp_path, probe_export):
    """--quantize int8 (dynamic int8 MatMul weights, front-end kept float32) and --fp16: smaller or
    lower-precision graphs whose report gives the score difference and top-1 agreement."""
    ckpt = probe_export["dir"] / "probe.safetensors"
    q = run_export(ckpt, tmp_path / "int8.onnx", quantize="int8", check_seconds=(0.5, 3.0), batch_size=2)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert any(op in ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat") for op in ops)
    assert q["top1_agreement"] >= 0.98 and 0 < q["max_score_diff"] < 0.05
    assert q["bytes"] < probe_export["result"]["bytes"]
    h = run_export(ckpt, tmp_path / "fp16.onnx", fp16=True, check_seconds=(0.5, 3.0), batch_size=2)
    assert h["top1_agreement"] >= 0.98 and 0 < h["max_score_diff"] < 0.01
    meta = session(tmp_path / "fp16.onnx").get_modelmeta().custom_metadata_map
    assert meta["precision"] == "fp16"
    with pytest.raises(FlagError, match="exclude each other"):
        run_export(ckpt, tmp_path / "x.onnx", fp16=True, quantize="int8")


SED_LABELS = ["tone", "noise", "voice", "water", "wind"]


def export_frame_wise(d):
    """A frame-wise (SED) probe as probe_cgp.py --task dcase2016 saves it (no clip length, front-end without
    target_frames), exported to d/sed.onnx: the frame_wise_export fixture (conftest.py), once per session, read
    by test_tag.py's --events test too. Head weights x20: scores far from uniform, so differences would show;
    "tone" is always on and "noise" never (biases +-3, for test_tag.py), the other classes are free."""
    torch.manual_seed(2)
    head = CGP(64, 2, len(SED_LABELS), num_prototypes=32, frame_wise=True)
    with torch.no_grad():
        head.fc.weight.mul_(20.0)
        head.fc.bias[:2] = torch.tensor([3.0, -3.0])
    save_probe(d / "sed.safetensors", Probe(tiny_encoder(), head, Frontend("bat"), SED_LABELS, "multilabel"),
               {"frame_wise": True, "task_name": "dcase2016"})
    return run_export(d / "sed.safetensors", d / "sed.onnx", check_seconds=(0.1, 3.0), batch_size=1, fuse=False)


def test_frame_wise_export_scores_the_recording_whole(tmp_path, frame_wise_export):
    """Frame-wise (SED) probes, as probe_cgp.py --task dcase2016 saves them (no clip length, front-end
    without target_frames): the graph scores a 20-s recording whole, one spectrogram normalised over it and
    two encoder chunks, exactly as bat.sed evaluates the probe (predict_recordings on the wav file)."""
    import soundfile as sf

    from bat.audio import load_audio
    from bat.sed import EventDataset, EventList, predict_recordings

    exported, result = frame_wise_export
    assert result["tolerance_share"] <= 1.0
    sess = session(exported / "sed.onnx")
    assert [i.name for i in sess.get_inputs()] == ["waveform"]  # no lengths: every recording is its own window
    assert [o.name for o in sess.get_outputs()] == ["scores", "window_scores", "embedding", "frame_scores"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["whole_input"] == "true" and int(meta["window_samples"]) == 0 and float(meta["patch_seconds"]) == 0.16
    with pytest.raises(exporting.ExportError, match="hop-seconds"):
        exporting.load_model(str(exported / "sed.safetensors"), hop_seconds=1.0)

    wav = tmp_path / "recording.wav"
    sf.write(wav, clips(20.0, 1)[0], 16000, subtype="FLOAT")
    probe = load_probe(exported / "sed.safetensors")
    items = EventList(files=[str(wav)], events=[[]], classes=SED_LABELS, source="csv", root=str(tmp_path))
    (ref,), _ = predict_recordings(probe.encoder, probe.head, EventDataset(items, SED_LABELS, probe.frontend),
                                   torch.device("cpu"))
    x = load_audio(str(wav), 16000)[None]
    scores, windows, frames = sess.run(["scores", "window_scores", "frame_scores"], {"waveform": x})
    assert ref.shape == (125, len(SED_LABELS)) and frames.shape == (1, 125, len(SED_LABELS))  # 2001 frames // 16
    tol = check_tol(result, "frame_scores")
    assert np.abs(frames[0] - ref).max() <= tol
    assert windows.shape == (1, 1, len(SED_LABELS))
    np.testing.assert_allclose(scores[0], ref.max(0), atol=tol)  # multilabel: the best patch
    with torch.no_grad():
        out = probe.windowed(torch.from_numpy(x))
    assert np.abs(out["frame_scores"].numpy()[0] - ref).max() <= tol
    np.testing.assert_allclose(probe.predict(torch.from_numpy(x)).numpy(), scores, atol=tol)
    with pytest.raises(ValueError, match="one at a time"):  # a padded batch cannot be normalised per row
        probe.predict(torch.zeros(2, 16000), lengths=torch.tensor([16000, 8000]))


def export_vqt_32khz(d):
    """A VQT probe on a 32 kHz front-end: one export for the VQT head and the 32 kHz rate (each is what one
    of the two tests below is about; neither depends on the other)."""
    from bat.heads import VQT

    torch.manual_seed(3)
    head = VQT(64, 2, len(LABELS), num_queries=2)
    with torch.no_grad():
        head.fc.weight.mul_(20.0)
    probe = Probe(tiny_encoder(), head, Frontend("bat", target_frames=112, sample_rate=32000), LABELS, "multiclass",
                  clip_samples=32000)  # 1 s at 32 kHz -> 101 frames, padded to 112
    save_probe(d / "vqt.safetensors", probe.eval())
    return run_export(d / "vqt.safetensors", d / "vqt.onnx", check_seconds=(0.1, 2.5), batch_size=2, fuse=False)


@pytest.fixture(scope="module")
def vqt_32khz_export(shared):
    d, result = shared("vqt_32khz_export", export_vqt_32khz)
    return {"path": d / "vqt.onnx", "result": result, "probe": load_probe(d / "vqt.safetensors")}


def clips_32khz(seconds, batch, seed):
    return np.stack([demo_clip(i, seed=seed, seconds=seconds, sample_rate=32000)[0] for i in range(batch)])


def test_vqt_probe_export_matches_predict(vqt_32khz_export):
    """VQT heads run their query tokens through the encoder themselves (features()); the graph does too."""
    result, sess = vqt_32khz_export["result"], session(vqt_32khz_export["path"])
    assert sess.get_modelmeta().custom_metadata_map["probe"] == "vqt" and result["tolerance_share"] <= 1.0
    x = clips_32khz(2.5, 2, seed=7)
    (scores,) = sess.run(["scores"], {"waveform": x})
    ref = vqt_32khz_export["probe"].predict(torch.from_numpy(x)).numpy()
    assert np.abs(scores - ref).max() <= check_tol(result, "scores") and ref.std() > 0.01  # scores that really differ per class


def test_32khz_probe_exports_at_its_rate(tmp_path, vqt_32khz_export):
    """A probe on a 32 kHz front-end (the hsn task, BirdSet) exports with sample_rate 32000 and is checked
    on 32 kHz clips; bat.tag resamples a 16 kHz file to 32 kHz (soxr) before the graph sees it."""
    import soundfile as sf
    import soxr

    from bat.tag import Tagger, read_blocks

    sr = 32000
    result, probe = vqt_32khz_export["result"], vqt_32khz_export["probe"]
    assert result["tolerance_share"] <= 1.0
    sess = session(vqt_32khz_export["path"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["sample_rate"] == "32000" and meta["min_samples"] == "16000" and meta["window_samples"] == str(sr)
    x = clips_32khz(2.5, 2, seed=5)
    (scores,) = sess.run(["scores"], {"waveform": x})
    ref = probe.predict(torch.from_numpy(x)).numpy()
    assert np.abs(scores - ref).max() <= check_tol(result, "scores") and ref.std() > 0.01

    x16 = demo_clip(0, seed=6, seconds=2.5)[0]  # 16 kHz
    sf.write(tmp_path / "clip16k.wav", x16, 16000, subtype="FLOAT")
    tagger = Tagger(vqt_32khz_export["path"])
    assert tagger.sample_rate == sr
    pieces, seconds = read_blocks(str(tmp_path / "clip16k.wav"), tagger.sample_rate, 10 * sr)
    got = tagger.tag_stream(pieces)["scores"]
    up = soxr.resample(x16, 16000, sr, quality="HQ").astype(np.float32)
    (want,) = sess.run(["scores"], {"waveform": up[None]})
    assert seconds == pytest.approx(2.5) and np.abs(got - want[0]).max() <= 1e-5


def fairseq_checkpoint(path):
    """An EAT/SSLAM fairseq-layout checkpoint (EAT key names, pickled config object) of a tiny encoder."""
    enc = Encoder(EncoderConfig(dim=64, depth=2, num_heads=1, gated=False))
    model = fairseq_model(enc.state_dict())  # REF's names from tests/golden/vit_b_keys.json, not bat's map
    torch.save({"model": model, "cfg": Opaque()}, path)
    return enc


class Opaque:  # needs full unpickling, as fairseq's config objects do
    pass


def test_allow_pickle(tmp_path, monkeypatch, capsys):
    enc = fairseq_checkpoint(tmp_path / "eat.pt")
    model, info = exporting.load_model(str(tmp_path / "eat.pt"), allow_pickle=True)
    assert info["frontend_config"]["kind"] in ("eat", "sslam") and not model.encoder.cfg.gated
    torch.testing.assert_close(model.encoder.blocks[0].mlp.fc1.weight, enc.blocks[0].mlp.fc1.weight)
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(tmp_path / "eat.pt"),
                           "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--allow-pickle" in lines[0], proc.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "config.json").exists()
    monkeypatch.setattr(sys, "argv", ["export.py", "--help"])  # in this process: test_cli.py runs `export.py --help`
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "export.py"), run_name="__main__")
    assert "--allow-pickle" in capsys.readouterr().out


def test_cli_bad_checkpoint_one_line_error(tmp_path):
    bad = tmp_path / "probe.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="no such file"):
        exporting.load_model(str(tmp_path / "missing.safetensors"))
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(bad), "--out",
                           str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "probe.safetensors" in lines[0], proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def encoder_file(tmp_path):
    save_encoder(tmp_path / "encoder.safetensors", tiny_encoder(3))
    return tmp_path / "encoder.safetensors"


def run_cli(monkeypatch, capsys, *args):
    """export.py's command line in this process (so a test can patch what it calls): (exit code, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["export.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "export.py"), run_name="__main__")
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, match", [
    ({"check_seconds": (0.0,)}, "--check-seconds"), ({"check_seconds": (1.0, -1.0)}, "--check-seconds"),
    ({"check_seconds": (0.001,)}, "--check-seconds must be at least 0.016 s"), ({"check_seconds": ()}, "--check-seconds"),
    ({"batch_size": 0}, "--batch-size"), ({"opset": 99}, r"--opset must lie in \[18, 22\]"), ({"opset": 17}, "--opset"),
    ({"tolerance": -1.0}, "--tolerance"), ({"seed": -1}, "--seed"), ({"seed": 10**20}, "--seed"),
    ({"hop_seconds": float("nan")}, "--hop-seconds"), ({"min_agreement": 2.0}, "--min-agreement")])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, match):
    """Each out-of-range flag is one FlagError naming it, before anything is exported or written (they used to
    fail with a traceback after writing an unchecked model, or, --tolerance -1, to pass)."""
    ckpt = encoder_file(tmp_path)
    with pytest.raises(FlagError, match=match):
        run_export(ckpt, tmp_path / "m.onnx", **flags)
    assert sorted(os.listdir(tmp_path)) == ["encoder.safetensors"]


def test_cli_bad_flag_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "--checkpoint", encoder_file(tmp_path), "--out", tmp_path / "m.onnx",
                        "--opset", 99)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --opset must lie in"), err


def test_out_never_replaces_a_file_export_did_not_write(tmp_path):
    """X.json and X.onnx (and a > 2 GB model's X.onnx.data) are replaced only by a re-export (X.json written by
    export.py), refused before the export starts; --out under a file is refused too."""
    ckpt = encoder_file(tmp_path)
    (tmp_path / "mine.json").write_text('{"my": "precious"}')
    (tmp_path / "other.onnx").write_bytes(b"my model")
    (tmp_path / "big.onnx.data").write_bytes(b"my weights")
    (tmp_path / "afile").write_text("")
    for out, error, match in (("mine.onnx", FileExistsError, "holds mine.json, not written by export.py"),
                              ("other.onnx", FileExistsError, "holds other.onnx, not written by export.py: choose another"),
                              ("big.onnx", FileExistsError, "holds big.onnx.data, not written"),
                              ("afile/sub/m.onnx", FlagError, "afile is a file, not a folder"),
                              ("m.onx", FlagError, "--out should name the .onnx file")):
        with pytest.raises(error, match=match):
            run_export(ckpt, tmp_path / out)
    assert (tmp_path / "mine.json").read_text() == '{"my": "precious"}'
    assert (tmp_path / "other.onnx").read_bytes() == b"my model"
    assert sorted(os.listdir(tmp_path)) == ["afile", "big.onnx.data", "encoder.safetensors", "mine.json", "other.onnx"]


def test_reexport_replaces_its_own_files_and_a_failed_check_says_so(tmp_path, probe_export):
    """A re-export (X.json written by export.py) may replace X.onnx; when its check fails the model stays
    for inspection under its name, and the error says that file failed the check and is not to be used."""
    for name in ("probe.safetensors", "tagger.onnx", "tagger.json"):
        shutil.copy(probe_export["dir"] / name, tmp_path / name)
    before = (tmp_path / "tagger.onnx").read_bytes()
    with pytest.raises(exporting.ExportError, match=r"tagger.onnx failed the check: onnxruntime differs .*"
                                                    r"kept for inspection only, do not use it"):
        run_export(tmp_path / "probe.safetensors", tmp_path / "tagger.onnx", tolerance=1e-12, check_seconds=(0.5,),
                   batch_size=1, fuse=False)
    assert (tmp_path / "tagger.onnx").read_bytes() != before  # the new (unfused) graph replaced the old one
    assert json.loads((tmp_path / "tagger.json").read_text())["tolerance"] == 1e-12


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as onnx's own write raises it: no file name


def traced_graph(monkeypatch):
    """torch.onnx.export answered at once with a valid one-node graph, for tests of what export_onnx and
    export.py do with the file afterwards (every other export test runs the real, ~30-s trace)."""
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "samples"])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Identity", ["waveform"], ["embedding"])], "g", [value("waveform")],
                              [value("embedding")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)

    class Program:
        model = type("Model", (), {"metadata_props": {}})()

        def save(self, path, external_data=False):
            with open(path, "wb") as f:
                f.write(proto.SerializeToString())

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: Program())


def test_export_onnx_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt = encoder_file(tmp_path)
    model, _ = exporting.load_model(str(ckpt))
    traced_graph(monkeypatch)

    def save(proto, path, *args, **kwargs):  # the disk fills while the model is written
        with open(path, "wb") as f:
            f.write(b"half a model")
        full_disk()

    monkeypatch.setattr(onnx, "save", save)
    with pytest.raises(OSError, match="No space left"):
        exporting.export_onnx(model, str(tmp_path / "m.onnx"), 18, {})
    assert sorted(os.listdir(tmp_path)) == ["encoder.safetensors"]


def test_cli_failure_after_the_model_is_written_one_line_and_no_junk(tmp_path, monkeypatch, capsys):
    """A model without the fusions asked for is not this export: a failure in a later step (the disk fills)
    is one line naming the model, and removes it, the step's temporary file, the configuration and the
    folder made for them."""
    ckpt = encoder_file(tmp_path)

    def fuse_graph(path):
        with open(exporting.temp_path(path), "wb") as f:
            f.write(b"half a model")
        full_disk()

    monkeypatch.setattr("bat.onnx_graph.fuse_graph", fuse_graph)
    traced_graph(monkeypatch)
    out = tmp_path / "new" / "m.onnx"
    code, err = run_cli(monkeypatch, capsys, "--checkpoint", ckpt, "--out", out, "--no-check")
    assert code == 1 and err == [f"error: {out}: No space left on device"], err
    assert sorted(os.listdir(tmp_path)) == ["encoder.safetensors"]


def test_an_unwritable_out_folder_is_refused_before_the_export(tmp_path, monkeypatch, capsys):
    """/sys refuses new files even to root (as a read-only disk would): one line naming the folder, at once,
    before the checkpoint is even read."""
    called = []
    monkeypatch.setattr("bat.exporting.load_model", lambda *a, **k: called.append(1))
    code, err = run_cli(monkeypatch, capsys, "--checkpoint", encoder_file(tmp_path), "--out", "/sys/m.onnx")
    assert code == 1 and len(err) == 1 and err[0].startswith("error: /sys: Permission denied (--out /sys/m.onnx"), err
    assert not called and not os.path.exists("/sys/m.json")


def test_check_report_of_an_encoder_only_graph_names_no_scores(capsys):
    """No head, no scores: the report says nothing of scores or top-1 agreement (it said 'scores 0.000e+00,
    top-1 agreement 100.00% over 0 clips')."""
    row = {"seconds": 1.0, "batch": 1, "max_abs_diff": {"embedding": 2e-6, "layers": 3e-6},
           "tolerance": {"embedding": 1e-4, "layers": 1e-4}, "torch_ms": 1.0, "ort_ms": 1.0, "top1_total": 0,
           "top1_agree": 0}
    exporting.check_rows([row], None, "m.onnx")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "largest difference onnxruntime vs float32 PyTorch: 3.000e-06 (at most 0.03 of its tolerance)"
