"""Front-end parity with REF (tests/golden/frontend*.safetensors) and ONNX export."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bat.audio import resample
from bat.frontend import Frontend, kaldi_fbank, spectrogram

SCV2_CLIPS = ("scv2_clip", "short", "silence", "click")  # the 4 rows of bat.scv2 / eat.scv2 / beats.scv2


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(golden_dir / "frontend.safetensors")


@pytest.fixture(scope="module")
def legacy(golden_dir):
    return load_file(golden_dir / "frontend_legacy.safetensors")


@pytest.fixture(scope="module")
def waves(golden):
    return {k[len("wave."):]: v for k, v in golden.items() if k.startswith("wave.")}


def fix_length(x, n):
    """The datasets' waveform fix: zero-pad at the end or keep the first n samples."""
    return F.pad(x, (0, max(0, n - x.shape[0])))[:n]


def scv2_batch(waves, remove_mean=False):
    """REF's Speech Commands collate: each clip padded/cut to 16000 samples (EAT removes the
    clip's mean before that)."""
    clips = [waves[k] - waves[k].mean() if remove_mean else waves[k] for k in SCV2_CLIPS]
    return torch.stack([fix_length(c, 16000) for c in clips])


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- BAT front-end vs REF


def test_bat_audioset_eval(golden, waves):
    out = spectrogram(fix_length(waves["as_clip"], 163680).unsqueeze(0), target_frames=1024)
    assert max_diff(out, golden["bat.audioset_eval"]) < 1e-3


def test_bat_esc50(golden, waves):
    out = spectrogram(waves["esc_clip"].unsqueeze(0), target_frames=512)  # 501 frames + 11 zero frames
    assert max_diff(out, golden["bat.esc50"]) < 1e-3
    assert (out[:, :, 501:] == 0).all()


def test_bat_scv2_batch(golden, waves):
    out = spectrogram(scv2_batch(waves), target_frames=112)
    ref = golden["bat.scv2"]
    for i, name in enumerate(SCV2_CLIPS):
        assert max_diff(out[i], ref[i]) < 1e-3, name
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()  # exact silence -> all zeros, no NaN


def test_bat_crop_demo(golden, waves):
    # 101 frames > 96: min-max over all 101 frames, then the extra frames are dropped
    out = spectrogram(waves["scv2_clip"], target_frames=96)
    assert max_diff(out, golden["bat.crop_demo"]) < 1e-3
    assert torch.equal(out[0], spectrogram(waves["scv2_clip"], target_frames=112)[0, :, :96])


def test_bat_frames_and_batching(waves):
    for n in (800, 4800, 16000, 16159, 16160):
        assert spectrogram(torch.zeros(n)).shape == (1, 1, 1 + n // 160, 128)
    batch = scv2_batch(waves)
    together = spectrogram(batch)
    alone = torch.cat([spectrogram(row) for row in batch])
    assert max_diff(together, alone) < 1e-6


def test_silence_is_zero_not_nan():
    out = spectrogram(torch.zeros(2, 8000), target_frames=64)
    assert torch.isfinite(out).all() and (out == 0).all()
    out = kaldi_fbank(torch.zeros(1, 8000), "eat", "scv2")
    assert torch.isfinite(out).all()


def test_short_clips_do_not_crash():
    # shorter than the 512-sample reflect pad / the 400-sample Kaldi frame
    assert spectrogram(torch.randn(300), target_frames=16).shape == (1, 1, 16, 128)
    assert kaldi_fbank(torch.randn(300), target_frames=16).shape == (1, 1, 16, 128)


# ---------------------------------------------------------------- legacy front-ends vs REF


def test_eat_audioset_eval(legacy, waves):
    x = waves["as_clip"] - waves["as_clip"].mean()
    out = kaldi_fbank(fix_length(x, 163680), "eat", "audioset", target_frames=1024)
    assert max_diff(out, legacy["eat.audioset_eval"]) < 2e-3
    assert (out[:, :, 1021:] == 0).all()  # 1 + (163680 - 400) // 160 = 1021 frames, then zeros


def test_eat_scv2(legacy, waves):
    ref = legacy["eat.scv2"]
    # REF removes each clip's mean before padding to 16000 samples: both ways of saying so agree.
    by_hand = kaldi_fbank(scv2_batch(waves, remove_mean=True), "eat", "scv2", target_frames=112)
    lengths = torch.tensor([min(len(waves[k]), 16000) for k in SCV2_CLIPS])
    by_lengths = kaldi_fbank(scv2_batch(waves), "sslam", "scv2", target_frames=112, lengths=lengths)
    for out in (by_hand, by_lengths):
        for i, name in enumerate(SCV2_CLIPS):
            assert max_diff(out[i], ref[i]) < 2e-3, name


def test_beats_scv2(legacy, waves):
    out = kaldi_fbank(scv2_batch(waves), "beats", "scv2", target_frames=112)
    ref = legacy["beats.scv2"]
    for i, name in enumerate(SCV2_CLIPS):
        assert max_diff(out[i], ref[i]) < 1e-2, name


def test_legacy_stats_and_frames(golden_dir):
    facts = json.loads((golden_dir / "frontend_legacy.json").read_text())["facts"]["LEGACY_STATS"]
    names = {"audioset": "AudioSet", "esc50": "ESC50", "scv2": "SpeechCommands",
             "librispeech": "LibriSpeech", "birdset": "BirdSet", "dcase": "DCASE"}
    x = torch.randn(2, 4000) * 0.1
    for style, key in (("eat", "EAT"), ("sslam", "SSLAM"), ("beats", "BEATs")):
        for name, ref_name in names.items():
            mu, std = facts[key][ref_name]["mu"], facts[key][ref_name]["std"]
            out = kaldi_fbank(x, style, name)
            assert out.shape == (2, 1, 1 + (4000 - 400) // 160, 128)
            assert torch.allclose(out, kaldi_fbank(x, style, (mu, std)))
    with pytest.raises(ValueError):
        kaldi_fbank(x, "eat", "nope")


# ---------------------------------------------------------------- resampling, module, ONNX


@pytest.mark.parametrize("quality", ["hq", "vhq"])
def test_resample_matches_librosa_soxr(golden, quality):
    y = resample(golden["wave.resample_src"].numpy(), 44100, 16000, quality.upper())
    ref = golden[f"bat.resample.soxr_{quality}"].numpy()
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.abs(y - ref).max() <= 1e-6


def test_frontend_module_config(waves):
    x = scv2_batch(waves)
    for kind in ("bat", "eat", "sslam", "beats"):
        fe = Frontend(kind, target_frames=112, dataset="scv2")
        cfg = json.loads(json.dumps(fe.config()))  # must survive JSON (checkpoint metadata)
        fe2 = Frontend.from_config(cfg)
        assert fe2.config() == fe.config()
        assert not fe.state_dict()  # buffers are non-persistent: nothing to store
        ref = spectrogram(x, 112) if kind == "bat" else kaldi_fbank(x, kind, "scv2", 112)
        assert torch.equal(fe2(x), ref)
    fe = Frontend("eat", dataset=(-5.0, 4.0))
    assert Frontend.from_config(json.loads(json.dumps(fe.config()))).config() == fe.config()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stays float32 under AMP
        assert Frontend("bat")(x).dtype == torch.float32


@pytest.mark.parametrize("kind,atol", [("bat", 1e-4), ("eat", 1e-3)])
def test_onnx_export(tmp_path, waves, kind, atol):
    # Legacy atol: onnxruntime's DFT and torch's FFT round differently, and the log of the
    # quietest Kaldi bins turns that into ~1e-4 (the same size as torch float32 vs float64).
    ort = pytest.importorskip("onnxruntime")
    fe = Frontend(kind).eval()
    path = tmp_path / f"{kind}.onnx"
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("samples", min=1024)}
    torch.onnx.export(fe, (torch.randn(2, 16000),), str(path), dynamo=True, opset_version=18,
                      dynamic_shapes={"waveform": dims}, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (scv2_batch(waves), waves["esc_clip"][None, :54321]):
        (out,) = sess.run(None, {"waveform": x.numpy()})
        ref = fe(x).numpy()
        assert out.shape == ref.shape and np.isfinite(out).all()
        assert np.abs(out - ref).max() < atol
