"""Audio loading: good files load as mono float32 at 16 kHz, bad ones raise AudioError naming the file."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from bat.audio import AudioError, check_waveform, load_audio
from bat.frontend import spectrogram


def tone(seconds, sr, channels=1, freq=440.0):
    t = np.arange(int(round(seconds * sr))) / sr
    y = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([y, 0.5 * y], axis=1)[:, :channels].astype(np.float32)


def assert_bad(path, word):
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert word in err.value.reason
    assert isinstance(err.value, ValueError)


def test_empty_file(tmp_path):
    for name in ("empty.wav", "empty.mp3"):
        p = tmp_path / name
        p.write_bytes(b"")
        assert_bad(p, "empty file (0 bytes)")


def test_zero_samples(tmp_path):
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros(0, np.float32), 16000)
    assert_bad(p, "empty")


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_truncated_or_corrupt(tmp_path, ext):
    p = tmp_path / f"full.{ext}"
    sf.write(p, tone(1.0, 16000), 16000)
    data = p.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[:12])  # the header is cut
    assert_bad(cut, "cannot decode")
    junk = tmp_path / f"junk.{ext}"
    junk.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    assert_bad(junk, "cannot decode")
    if ext == "flac":  # flac frames cut mid-stream: the decoder loses sync
        cut.write_bytes(data[: len(data) // 2])
        assert_bad(cut, "cannot decode")


def test_nan_samples(tmp_path):
    y = tone(0.5, 16000)
    y[100] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, y, 16000, subtype="FLOAT")
    assert_bad(p, "non-finite")
    y[100] = np.inf
    sf.write(p, y, 16000, subtype="FLOAT")
    assert_bad(p, "non-finite")


def test_short_clip_loads(tmp_path):
    p = tmp_path / "short.wav"
    sf.write(p, tone(0.05, 16000), 16000)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.shape == (800,)
    spec = spectrogram(torch.from_numpy(y))
    assert spec.shape == (1, 1, 6, 128) and torch.isfinite(spec).all()


def test_silence_is_valid(tmp_path):
    p = tmp_path / "silence.wav"
    sf.write(p, np.zeros(16000, np.float32), 16000)
    y = load_audio(p)
    assert y.shape == (16000,) and not y.any()


def test_stereo_44k(tmp_path):
    p = tmp_path / "stereo.flac"
    y2 = tone(1.0, 44100, channels=2)
    sf.write(p, y2, 44100)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 16000  # ceil(44100 * 16000 / 44100)
    # the channels are averaged (0.75 x the left tone), then resampled
    left = load_audio(_write(tmp_path / "left.flac", y2[:, 0], 44100))
    np.testing.assert_allclose(y, 0.75 * left, atol=1e-4)


def test_8k_and_odd_lengths(tmp_path):
    y = load_audio(_write(tmp_path / "8k.wav", tone(0.5, 8000)[:, 0], 8000))
    assert len(y) == 8000
    y = load_audio(_write(tmp_path / "odd.wav", tone(1.0, 22050)[:1001, 0], 22050))
    assert len(y) == int(np.ceil(1001 * 16000 / 22050))  # librosa's length rule
    y = load_audio(_write(tmp_path / "vhq.wav", tone(0.5, 32000)[:, 0], 32000), quality="VHQ")
    assert len(y) == 8000


def test_int16_wav(tmp_path):
    pcm = (tone(0.25, 16000)[:, 0] * 32767).astype(np.int16)
    p = tmp_path / "int16.wav"
    sf.write(p, pcm, 16000, subtype="PCM_16")
    y = load_audio(p)
    np.testing.assert_allclose(y, pcm / 32768.0, atol=1e-6)  # scaled to [-1, 1), no resampling


def best_correlation(y, want, max_lag):
    """The largest normalised correlation of y delayed by 0..max_lag samples with want (codec delay)."""
    best = -1.0
    for lag in range(max_lag + 1):
        n = min(len(y) - lag, len(want))
        a, b = y[lag:lag + n].astype(np.float64), want[:n].astype(np.float64)
        best = max(best, float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-30)))
    return best


@pytest.mark.parametrize("fmt,ext,lossless", [("FLAC", "flac", True), ("OGG", "ogg", False), ("AIFF", "aiff", True),
                                              ("MP3", "mp3", False)])
def test_other_formats(tmp_path, fmt, ext, lossless):
    p = tmp_path / f"x.{ext}"
    try:
        sf.write(p, tone(0.5, 22050)[:, 0], 22050, format=fmt)
    except (sf.LibsndfileError, TypeError, ValueError):
        pytest.skip(f"this libsndfile cannot write {fmt}")
    y = load_audio(p)
    assert y.dtype == np.float32 and abs(len(y) - 8000) < 1200 and np.isfinite(y).all()  # mp3 adds padding
    want = tone(0.5, 16000)[:, 0]  # the same 440 Hz tone, sampled at 16 kHz
    if lossless:  # 16-bit PCM and the resampler: equal away from the resampler's edge transients
        assert len(y) == len(want)
        assert np.abs(y - want)[200:-200].max() < 1e-3 and np.abs(y - want).max() < 0.02
    else:  # lossy codecs: the same tone (pitch and level), up to the decoder's delay
        assert best_correlation(y, want, 1200) > 0.9
        assert np.sqrt(np.mean(y ** 2)) == pytest.approx(np.sqrt(np.mean(want ** 2)), rel=0.1)


def test_missing_file(tmp_path):
    assert_bad(tmp_path / "nope.wav", "no such file")
    assert_bad(tmp_path, "is a folder")


def test_corrupt_mp3_is_called_corrupt(tmp_path):
    """libsndfile calls a corrupt .mp3 "does not exist or is not a regular file"; the reason must be true."""
    p = tmp_path / "junk.mp3"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    assert_bad(p, "cannot decode")
    with pytest.raises(AudioError) as err:
        load_audio(p)
    assert "regular file" not in str(err.value) and "System error" not in str(err.value)


def test_check_waveform():
    assert check_waveform(np.zeros(10)).dtype == np.float32
    assert check_waveform(np.ones((2, 10), np.float64)).shape == (10,)
    for bad, word in ((np.zeros(0), "empty"), (np.array([0.0, np.nan]), "non-finite"),
                      (np.zeros(10, np.int16), "floating"), (np.zeros((1, 2, 3)), "shape")):
        with pytest.raises(AudioError, match=word):
            check_waveform(bad, path="mem.wav")


def test_no_torch_import():
    # the ONNX tagger reuses bat.audio without torch
    code = "import sys, bat.audio; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _write(path, y, sr):
    sf.write(path, y, sr)
    return path
