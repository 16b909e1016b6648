"""A deterministic synthetic sound-event data set, generated in code (no download).

Used by `pretrain.py` without `--data`, by the tests and by the README demo. Every clip is a pure
function of (index, seed): the class is `index % len(DEMO_CLASSES)` and everything else (timing,
pitch, level, background) is drawn from a generator seeded with (seed, index), so a worker process
can make clip 1234 without having made clips 0..1233 and two runs agree bit for bit.

The classes are chosen to be separable by their spectro-temporal shape, not by loudness: levels are
randomised over a wide range for every class and all clips sit on a faint noise floor (a spectrogram
min-max normalises each clip, so absolute level carries no information anyway).

Imports only numpy and bat.audio (numpy, soundfile, soxr; no torch).
"""
import os
import re

import numpy as np

from bat.audio import SAMPLE_RATE

DEMO_CLASSES = ("tone", "chirp", "noise_burst", "click_train", "harmonic_note", "am_texture")


def _envelope(n, attack, release):
    """Linear attack / release ramps (in samples) so events start and end without clicks."""
    env = np.ones(n, dtype=np.float64)
    a, r = max(1, min(attack, n // 2)), max(1, min(release, n // 2))
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    env[n - r:] = np.linspace(1.0, 0.0, r)
    return env


def _band_noise(rng, n, lo_hz, hi_hz, sr):
    """White noise band-limited to [lo_hz, hi_hz] by zeroing FFT bins (exact, no filter design)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < lo_hz) | (freqs > hi_hz)] = 0.0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-12)


def _event(kind, rng, n, sr):
    """One sound event of `kind`, n samples long, peak about 1."""
    t = np.arange(n) / sr
    if kind == "tone":  # steady sinusoid with a little vibrato
        f0 = rng.uniform(300, 3000)
        vib = rng.uniform(0, 0.01) * f0 * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
        x = np.sin(2 * np.pi * np.cumsum(f0 + vib) / sr)
        return x * _envelope(n, int(0.01 * sr), int(0.02 * sr))
    if kind == "chirp":  # exponential sweep up or down over 2-5 octaves
        f_start, octaves = rng.uniform(150, 600), rng.uniform(2, 5)
        f_end = min(f_start * 2**octaves, 7000.0)
        if rng.random() < 0.5:
            f_start, f_end = f_end, f_start
        freq = f_start * (f_end / f_start) ** (t / t[-1])
        return np.sin(2 * np.pi * np.cumsum(freq) / sr) * _envelope(n, int(0.01 * sr), int(0.01 * sr))
    if kind == "noise_burst":  # band-limited noise with a fast attack and exponential decay
        lo = rng.uniform(100, 3000)
        x = _band_noise(rng, n, lo, min(lo * rng.uniform(2, 6), 7900), sr)
        return x * np.exp(-t / rng.uniform(0.05, 0.4)) * _envelope(n, int(0.002 * sr), int(0.005 * sr))
    if kind == "click_train":  # short broadband clicks at a regular rate with jitter
        x = np.zeros(n)
        period = sr / rng.uniform(4, 25)
        starts = np.arange(rng.uniform(0, period), n - 64, period)
        starts = (starts + rng.normal(0, 0.05 * period, starts.shape)).clip(0, n - 64).astype(int)
        click = rng.standard_normal(64) * np.exp(-np.arange(64) / 8.0)
        for s in starts:  # a few dozen clicks per clip: cheap, and only the demo generator
            x[s:s + 64] += click
        return x / (np.abs(x).max() + 1e-12)
    if kind == "harmonic_note":  # plucked-string-like note: harmonics decaying faster the higher they are
        f0 = rng.uniform(80, 500)
        k = np.arange(1, int(min(20, 7500 // f0)) + 1)[:, None]
        amps = (1.0 / k) * np.exp(-t[None, :] * k * rng.uniform(1, 4))
        x = (amps * np.sin(2 * np.pi * f0 * k * t[None, :] + rng.uniform(0, 2 * np.pi, k.shape))).sum(0)
        return x / (np.abs(x).max() + 1e-12) * _envelope(n, int(0.003 * sr), int(0.02 * sr))
    if kind == "am_texture":  # band noise amplitude-modulated at a slow rate (engine / rain-like texture)
        lo = rng.uniform(200, 2000)
        x = _band_noise(rng, n, lo, lo * rng.uniform(1.5, 3), sr)
        am = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2, 12) * t + rng.uniform(0, 2 * np.pi)))
        return x * am * _envelope(n, int(0.05 * sr), int(0.05 * sr))
    raise ValueError(f"unknown demo class {kind!r}; expected one of {DEMO_CLASSES}")


def demo_clip(index, seed=0, seconds=1.0, sample_rate=SAMPLE_RATE):
    """Clip `index` of the demo set -> (waveform float32 [samples], label name).

    The event covers 30-100% of the clip at a random onset and a level of -30..-3 dBFS, over a
    noise floor 35-60 dB below the event.
    """
    if index < 0:
        raise ValueError(f"demo clip index must be >= 0, got {index}")
    n = int(round(seconds * sample_rate))
    if n < 256:
        raise ValueError(f"demo clips need at least 256 samples, got {seconds} s at {sample_rate} Hz")
    label = DEMO_CLASSES[index % len(DEMO_CLASSES)]
    rng = np.random.default_rng([seed, index])
    length = int(n * rng.uniform(0.3, 1.0))
    onset = int(rng.integers(0, n - length + 1))
    gain = 10 ** (rng.uniform(-30, -3) / 20)
    x = np.zeros(n)
    x[onset:onset + length] = gain * _event(label, rng, length, sample_rate)
    x += gain * 10 ** (-rng.uniform(35, 60) / 20) * rng.standard_normal(n)
    return np.clip(x, -1.0, 1.0).astype(np.float32), label


def demo_dataset(num_clips, seconds=1.0, seed=0, sample_rate=SAMPLE_RATE):
    """The first `num_clips` demo clips -> (waveforms float32 [num_clips, samples], label names)."""
    clips = [demo_clip(i, seed, seconds, sample_rate) for i in range(num_clips)]
    return np.stack([c[0] for c in clips]), [c[1] for c in clips]


def write_demo_dataset(root, clips_per_class=6, seconds=1.0, seed=0, sample_rate=SAMPLE_RATE):
    """Write clips_per_class clips of every class as 16-bit WAV in class-per-folder layout:
    root/<class>/<class>_<k>.wav. Returns the list of written paths (class-major order)."""
    import soundfile as sf

    paths = []
    for c, name in enumerate(DEMO_CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(clips_per_class):
            wave, label = demo_clip(k * len(DEMO_CLASSES) + c, seed, seconds, sample_rate)
            assert label == name
            path = os.path.join(root, name, f"{name}_{k:03d}.wav")
            sf.write(path, wave, sample_rate, subtype="PCM_16")
            paths.append(path)
    return paths


def foreign_files(root, clips_per_class: int) -> list[str]:
    """Files under root that are not a demo clip (<class>/<class>_NNN.wav); demo clips beyond
    clips_per_class (a re-run asking for fewer) are removed, so the folder holds exactly the new set."""
    found = []
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), root)
            parts = rel.split(os.sep)
            match = len(parts) == 2 and parts[0] in DEMO_CLASSES and re.fullmatch(
                re.escape(parts[0]) + r"_(\d{3})\.wav", parts[1])
            if not match:
                found.append(rel)
            elif int(match.group(1)) >= clips_per_class:
                os.remove(os.path.join(root, rel))
    return found


def main(argv=None):
    """`python -m bat.demo --out DIR`: write DIR/train and DIR/test (different seeds, so no clip repeats)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m bat.demo", description="Write the synthetic demo set as "
                                "class-per-folder wav files. A folder holding other files is refused: the set "
                                "would mix with them.")
    p.add_argument("--out", required=True)
    p.add_argument("--clips-per-class", type=int, default=16)
    p.add_argument("--test-clips-per-class", type=int, default=6)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag, n in (("--clips-per-class", args.clips_per_class), ("--test-clips-per-class", args.test_clips_per_class)):
        if not 1 <= n <= 999:  # the names hold three digits
            p.error(f"{flag} must lie in [1, 999], got {n}")
    if not 256 / SAMPLE_RATE <= args.seconds <= 600:  # NaN fails too
        p.error(f"--seconds must lie in [{256 / SAMPLE_RATE}, 600], got {args.seconds}")
    if not 0 <= args.seed < 2**31:  # the test set's seed is seed + 1
        p.error(f"--seed must lie in [0, 2**31 - 1], got {args.seed}")
    try:
        for split, n in (("train", args.clips_per_class), ("test", args.test_clips_per_class)):
            foreign = foreign_files(os.path.join(args.out, split), n)
            if foreign:
                raise FileExistsError(0, "not a demo clip; choose another --out (the demo set would mix with it)",
                                      os.path.join(args.out, split, foreign[0]))
        train = write_demo_dataset(os.path.join(args.out, "train"), args.clips_per_class, args.seconds, args.seed)
        test = write_demo_dataset(os.path.join(args.out, "test"), args.test_clips_per_class, args.seconds,
                                  args.seed + 1)
    except OSError as e:  # another's files, a read-only or full disk, --out under a file
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(train)} training and {len(test)} test clips of {len(DEMO_CLASSES)} classes to {args.out}")


if __name__ == "__main__":
    main()
