"""BirdSet HSN at 32 kHz: the front-ends at REF's HSN geometry, checked against float64 NumPy versions of
the definitions REF calls (torchaudio MelSpectrogram + AmplitudeToDB + min-max; Kaldi fbank)."""
import json

import numpy as np
import pytest
import torch

from bat.frontend import LEGACY_STATS, Frontend

SR = 32000


def bird_like(seconds=5.0, seed=0):
    """A chirp train over noise: energy up to 12 kHz, beyond what a 16 kHz front-end can see."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    chirp = np.sin(2 * np.pi * (3000 + 9000 * (t % 0.25) / 0.25) * t) * (np.sin(2 * np.pi * 4 * t) > 0)
    return (0.3 * chirp + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def htk_mel_fbank(n_freqs, sr, n_mels=128):
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    f_pts = 700.0 * (10 ** (np.linspace(mel(0.0), mel(sr // 2), n_mels + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0, sr // 2, n_freqs)[:, None]
    down = (freqs - f_pts[None, :-2]) / (f_pts[1:-1] - f_pts[:-2])
    up = (f_pts[None, 2:] - freqs) / (f_pts[2:] - f_pts[1:-1])
    return np.maximum(0.0, np.minimum(down, up))


def ref_bat(x, sr, n_fft, hop, target_frames):
    """torchaudio MelSpectrogram(sr, n_fft, hop, 128 mels, periodic Hann, centre/reflect, power 2), dB with
    an 80 dB floor, min-max, zero-pad in time (REF's BirdSet + DataTransforms), in float64."""
    x = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (x.size - n_fft) // hop
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(x[idx] * win, axis=1)) ** 2
    db = 10 * np.log10(np.maximum(power @ htk_mel_fbank(n_fft // 2 + 1, sr), 1e-10))
    db = np.maximum(db, db.max() - 80)
    spec = (db - db.min()) / (db.max() - db.min() + 1e-8)
    return np.pad(spec, ((0, target_frames - spec.shape[0]), (0, 0)))


def ref_kaldi_beats(x, sr, stats, target_frames):
    """torchaudio.compliance.kaldi.fbank(x * 2^15, povey window, 25 ms / 10 ms, 128 mels from 20 Hz,
    no dither, no energy) then (x - mu) / (2 std), padded (REF's LegacyBirdSet for BEATs), float64."""
    win, hop = sr * 25 // 1000, sr // 100
    n_fft = 1 << (win - 1).bit_length()
    x = x.astype(np.float64) * 2**15
    frames = x[np.arange(1 + (x.size - win) // hop)[:, None] * hop + np.arange(win)]
    frames = frames - frames.mean(1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    d = (hi - lo) / 129
    fft_mel = mel(np.arange(n_fft // 2) * sr / n_fft)[None]
    left = lo + np.arange(128)[:, None] * d
    banks = np.maximum(0, np.minimum((fft_mel - left) / d, (left + 2 * d - fft_mel) / d))
    banks = np.pad(banks, ((0, 0), (0, 1)))  # Nyquist bin
    logmel = np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))
    mu, std = stats
    return np.pad((logmel - mu) / (2 * std), ((0, target_frames - logmel.shape[0]), (0, 0)))


def test_bat_frontend_at_hsn_geometry_matches_ref_definition():
    fe = Frontend("bat", target_frames=512, sample_rate=SR)
    assert (fe.n_fft, fe.hop) == (2048, 320)  # REF configs/hsn: n_fft 2048, hop_length 320
    x = bird_like()
    out = fe(torch.from_numpy(x)[None])
    assert out.shape == (1, 1, 512, 128)  # 5 s -> 501 frames -> 512
    ref = ref_bat(x, SR, 2048, 320, 512)
    assert np.abs(out[0, 0].double().numpy() - ref).max() < 1e-3
    assert (out[0, 0, 501:] == 0).all()
    # the top mel bands (above 8 kHz) carry the chirps: a 16 kHz front-end would not see them
    assert out[0, 0, :501, 100:].mean() > 0.3


def test_beats_frontend_at_32khz_matches_kaldi_definition():
    fe = Frontend("beats", target_frames=512, dataset="birdset", sample_rate=SR)
    assert (fe.n_fft, fe.hop) == (1024, 320)  # 800-sample windows padded to 1024
    x = bird_like(seed=1)
    out = fe(torch.from_numpy(x)[None])
    assert out.shape == (1, 1, 512, 128)  # 498 frames -> 512
    ref = ref_kaldi_beats(x, SR, LEGACY_STATS["beats"]["birdset"], 512)
    assert np.abs(out[0, 0].double().numpy() - ref).max() < 1e-2


def test_frontend_config_carries_rate_and_geometry():
    for kind in ("bat", "eat", "beats"):
        fe = Frontend(kind, target_frames=512, dataset="birdset", sample_rate=SR)
        cfg = json.loads(json.dumps(fe.config()))
        assert cfg["sample_rate"] == SR and cfg["hop"] == 320
        again = Frontend.from_config(cfg)
        assert again.config() == cfg
        x = torch.from_numpy(bird_like(1.0))[None]
        assert torch.equal(again(x), fe(x))
    assert Frontend("bat").config()["sample_rate"] == 16000 and Frontend("bat").n_fft == 1024
    with pytest.raises(ValueError, match="10 ms hop"):
        Frontend("eat", sample_rate=SR, hop=160)
    with pytest.raises(ValueError, match="multiple of 100"):
        Frontend("bat", sample_rate=22050)
