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


# ---------------------------------------------------------------------------------- the hsn recipe's data


def write_ramp(path, seconds, lo=0.0, hi=1.0):
    import soundfile as sf

    n = int(seconds * SR)
    sf.write(str(path), np.linspace(lo, hi, n, dtype=np.float32), SR, subtype="FLOAT")
    return n


def test_hsn_training_window_and_noise_follow_ref(tmp_path):
    from bat.listing import list_dataset
    from bat.tasks import TASKS, clip_geometry, datasets, frontend_config

    task = TASKS["hsn"]
    n_long = write_ramp(tmp_path / "long.wav", 8.0)
    write_ramp(tmp_path / "short.wav", 2.0, 0.5, 1.0)
    (tmp_path / "train.csv").write_text("path,labels\nlong.wav,a\nshort.wav,b\n")
    items = list_dataset(tmp_path / "train.csv")
    clip_samples, frames = clip_geometry(task, items)
    assert (clip_samples, frames) == (160000, 512)
    fcfg = frontend_config({"kind": "bat"}, task, frames)
    assert fcfg["sample_rate"] == SR and Frontend.from_config(fcfg).n_fft == 2048
    ds = datasets(task, items, items.classes, clip_samples, fcfg, train=True)
    torch.manual_seed(0)
    for _ in range(3):
        w = ds[0].waveform.double().numpy()
        assert w.shape == (160000,)
        # a random 5 s window of the ramp (no circular roll: no wrap-around jump) plus N(0, 0.02^2) noise
        t = np.arange(w.size)
        slope, icpt = np.polyfit(t, w, 1)
        assert abs(slope * (n_long - 1) - 1) < 0.01 and 0.015 < np.std(w - (slope * t + icpt)) < 0.025
        s = ds[1].waveform.numpy()  # 2 s clip: zero-padded to 5 s, rolled within the padding, noise on top
        on = np.flatnonzero(s > 0.3)
        assert on[-1] - on[0] + 1 == 64000 and len(on) == 64000
    plain = datasets(task, items, items.classes, clip_samples, fcfg, train=False)[0].waveform.numpy()
    assert np.array_equal(plain, np.linspace(0, 1, n_long, dtype=np.float32)[:160000])  # test: first window, no noise


def test_soundscape_windows_from_a_csv(tmp_path):
    from bat.listing import DataError, list_dataset
    from bat.tasks import TASKS, datasets, frontend_config

    n = write_ramp(tmp_path / "scape.wav", 20.0)
    (tmp_path / "test.csv").write_text("path,labels,start_s,end_s\nscape.wav,a;b,0,5\nscape.wav,,5,10\n"
                                       "scape.wav,b,15,20\n")
    items = list_dataset(tmp_path / "test.csv")
    assert items.task == "multilabel" and items.segments == [(0.0, 5.0), (5.0, 5.0), (15.0, 5.0)]
    assert items.targets(["a", "b"]).tolist() == [[1, 1], [0, 0], [0, 1]]
    task = TASKS["hsn"]
    ds = datasets(task, items, ["a", "b"], 160000, frontend_config({"kind": "bat"}, task, 512))
    w = ds[2].waveform.numpy()
    assert w.shape == (160000,) and abs(w[0] - 15 * SR / (n - 1)) < 1e-4  # the window starts at 15 s
    for start, end in ((5, 2), (0, "inf"), ("nan", 5)):
        (tmp_path / "bad.csv").write_text(f"path,labels,start_s,end_s\nscape.wav,a,{start},{end}\n")
        with pytest.raises(DataError, match="bad.csv:2: need 0 <= start_s < end_s"):
            list_dataset(tmp_path / "bad.csv")
