"""export.py: probes and bare encoders to ONNX, checked against PyTorch with onnxruntime.

One export per kind (module-scoped fixtures, a tiny encoder of width 64 and depth 2) keeps this file at
well under a minute on two cores; everything else reads those files.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export as export_script
from bat.checkpoint import CheckpointError, save_encoder
from bat.demo import demo_clip
from bat.frontend import Frontend, spectrogram
from bat.model import Encoder, EncoderConfig
from bat.probes import CGP, Probe, load_probe, save_probe

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
# The interface's lengths plus 10.4 s (65 time patches: a second chunk of one patch).
LENGTHS = (0.5, 1.0, 5.0, 10.24, 10.4, 30.0)
TOL = 1e-4
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
    cfg = export_script.Config(checkpoint=str(checkpoint), out=str(out), check_seconds=LENGTHS, batch_size=3, **kw)
    return export_script.main(cfg)


@pytest.fixture(scope="module")
def probe_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_export")
    torch.manual_seed(1)
    head = CGP(64, 2, len(LABELS), num_prototypes=32)
    with torch.no_grad():  # a gate that is not uniform, so the graph's gate is really exercised
        head.gate_logits.copy_(torch.tensor([0.8, -0.4]))
        head.fc.weight.mul_(20.0)  # scores far from uniform: differences would show
    probe = Probe(tiny_encoder(), head, Frontend("bat"), LABELS, "multiclass").eval()
    save_probe(d / "probe.safetensors", probe)
    result = run_export(d / "probe.safetensors", d / "tagger.onnx")
    return {"dir": d, "path": d / "tagger.onnx", "result": result, "probe": load_probe(d / "probe.safetensors")}


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder_export")
    enc = tiny_encoder(3)
    save_encoder(d / "encoder.safetensors", enc)
    result = run_export(d / "encoder.safetensors", d / "encoder.onnx")
    return {"dir": d, "path": d / "encoder.onnx", "result": result, "encoder": enc}


def assert_check_rows(result):
    rows = result["rows"]
    assert {(r["seconds"], r["batch"]) for r in rows} == {(s, b) for s in LENGTHS for b in (1, 3)}
    for r in rows:
        for name, diff in r["max_abs_diff"].items():
            assert diff <= TOL, f"{name} at {r['seconds']} s, batch {r['batch']}: {diff:.2e}"
    assert result["max_abs_diff"] <= TOL


def test_probe_export_matches_pytorch(probe_export):
    assert_check_rows(probe_export["result"])
    # Independently of export.py's own check: onnxruntime against the probe's public API, for short,
    # exactly-one-chunk and chunked inputs (target_frames is None, so predict() never crops).
    probe, sess = probe_export["probe"], session(probe_export["path"])
    for seconds in (0.5, 10.24, 30.0):
        x = clips(seconds, 2)
        scores, emb = sess.run(["scores", "embedding"], {"waveform": x})
        ref = probe.predict(torch.from_numpy(x)).numpy()
        assert scores.shape == (2, len(LABELS))
        assert np.abs(scores - ref).max() <= TOL
        np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)  # multiclass: softmax
        with torch.no_grad():  # embedding: the gate-weighted mix of the layers' L2-normalised CLS
            cls = probe.encoder.forward_layers(spectrogram(torch.from_numpy(x)))[:, :, 0]
            gate = probe.head.gate_logits.softmax(0)
            want = (gate[:, None, None] * F.normalize(cls, dim=-1)).sum(0).numpy()
        assert np.abs(emb - want).max() <= TOL
    assert np.abs(scores[0] - scores[1]).max() > 0.05  # different clips, different scores: not a constant


def test_probe_export_short_and_odd_inputs(probe_export):
    """Below 0.5 s the graph zero-pads to 0.5 s; any batch size and odd lengths run."""
    sess = session(probe_export["path"])
    ref = export_script.Exported(probe_export["probe"].encoder, {"kind": "bat"}, probe_export["probe"].head,
                                 "multiclass", export=False).eval()
    for samples, batch in ((1600, 1), (7999, 2), (8000, 5), (123457, 1)):
        x = clips(1.0, batch)[:, :samples] if samples <= 16000 else clips(samples / 16000, batch)
        got = sess.run(["scores"], {"waveform": x})[0]
        with torch.no_grad():
            want = ref(torch.from_numpy(x))[0].numpy()
        assert got.shape == (batch, len(LABELS)) and np.isfinite(got).all()
        assert np.abs(got - want).max() <= TOL


def test_probe_export_file_and_metadata(probe_export):
    path, probe = probe_export["path"], probe_export["probe"]
    assert not list(path.parent.glob("*.data")), "weights must be inside the one .onnx file"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,) = model.graph.input
    assert inp.name == "waveform" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(d.dim_param and not d.dim_value for d in inp.type.tensor_type.shape.dim)  # both axes dynamic
    assert [o.name for o in model.graph.output] == ["scores", "embedding"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["labels"]) == LABELS == probe.labels
    assert meta["sample_rate"] == "16000" and meta["task"] == "multiclass"
    assert json.loads(meta["model_config"]) == probe.encoder.cfg.to_dict()
    assert json.loads(meta["frontend_config"])["kind"] == "bat" and meta["probe"] == "cgp"
    assert int(meta["window_samples"]) == 64 * 16 * 160  # no training window: one encoder chunk
    # onnxruntime sees the same metadata (what bat.tag reads)
    assert json.loads(session(path).get_modelmeta().custom_metadata_map["labels"]) == LABELS
    cfg = json.loads((path.parent / "config.json").read_text())
    assert cfg["checkpoint"].endswith("probe.safetensors") and cfg["out"] == str(path)
    assert cfg["task"] == "multiclass" and cfg["num_classes"] == len(LABELS) and cfg["tolerance"] == TOL


def test_encoder_export(encoder_export):
    assert_check_rows(encoder_export["result"])
    path, enc = encoder_export["path"], encoder_export["encoder"]
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["embedding", "layers"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == [] and meta["task"] == "embedding" and meta["probe"] == "none"
    assert json.loads(meta["model_config"]) == enc.cfg.to_dict()
    x = clips(30.0, 2)
    emb, layers = sess.run(None, {"waveform": x})
    with torch.no_grad():
        cls = enc.forward_layers(spectrogram(torch.from_numpy(x)))[:, :, 0].transpose(0, 1).numpy()
    assert layers.shape == (2, 2, 64) and emb.shape == (2, 64)
    assert np.abs(layers - cls).max() <= TOL and np.array_equal(emb, layers[:, -1])


def test_check_catches_a_wrong_graph(probe_export):
    """The comparison fails when the graph and the PyTorch model disagree (here: a changed head bias)."""
    model, _ = export_script.load_model(str(probe_export["dir"] / "probe.safetensors"))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.fc.bias[0] += 0.5
    rows = export_script.compare(str(probe_export["path"]), other, (1.0,), (1,), seed=0)
    assert rows[0]["max_abs_diff"]["scores"] > 1e-3
    with pytest.raises(export_script.ExportError, match="differs from PyTorch"):
        export_script.check_rows(rows, TOL, str(probe_export["path"]))


def test_frame_wise_head_is_refused(tmp_path):
    probe = Probe(tiny_encoder(), CGP(64, 2, 3, num_prototypes=4, frame_wise=True), Frontend("bat"), ["a", "b", "c"],
                  "multilabel")
    save_probe(tmp_path / "probe.safetensors", probe)
    with pytest.raises(export_script.ExportError, match="frame-wise"):
        export_script.load_model(str(tmp_path / "probe.safetensors"))


def test_cli_bad_checkpoint_one_line_error(tmp_path):
    bad = tmp_path / "probe.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="no such file"):
        export_script.load_model(str(tmp_path / "missing.safetensors"))
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(bad), "--out",
                           str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "probe.safetensors" in lines[0], proc.stderr
    assert not (tmp_path / "m.onnx").exists()
