"""Build `voices`: a small speaker-identification set spoken by espeak-ng, for probe benchmarks.

15 espeak-ng voice variants (the classes) each speak 24 training and 8 test sentences of 4-7 words, at
a random speed (140-180 words a minute). Test sentences are drawn from a separate half of the word
list, so no test sentence (nor any of its content words) is heard in training: the probe must tell
speakers apart, not sentences. Written as class-per-folder 16-kHz WAV files, as probe_cgp.py reads them:

    python benchmarks/voices_set.py --out DATA/voices          # needs espeak-ng (apt-get install espeak-ng)
    python benchmarks/converged_probes.py --data DATA --sets voices

Deterministic for one espeak-ng version; about 20 s on one core.
"""
from __future__ import annotations

import argparse
import io
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

VOICES = ("Adam", "Alex", "Andy", "Annie", "Belinda", "Benjamin", "Boris", "Caleb", "David", "Ed", "Edward", "Gene",
          "John", "Linda", "Michael")
WORDS = ("apple river morning garden yellow window paper silver orange market little ocean winter bright "
         "station pocket thunder basket candle mirror forest letter quiet planet bottle purple jacket rabbit "
         "kitchen summer engine doctor island butter copper meadow pencil castle marble valley rocket "
         "cotton number finger dragon jungle ladder monkey pepper velvet walnut harbor lemon tiger violin "
         "carpet hollow anchor blanket cherry feather helmet lantern napkin parrot saddle tunnel wagon zebra").split()
SR = 16000


def sentences(words: list[str], n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.sample(words, rng.randint(4, 7))) for _ in range(n)]


def speak(voice: str, text: str, speed: int) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", f"en+{voice}", "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(x, sr, SR, quality="HQ").astype(np.float32)


def plan(train_per_voice: int, test_per_voice: int, seed: int = 0) -> list[tuple[str, str, int, str, int]]:
    """(split, voice, index, sentence, speed) of every clip; test sentences use the other half of the words."""
    rng = random.Random(seed)
    words = list(WORDS)
    rng.shuffle(words)
    half = len(words) // 2
    return [(split, voice, i, text, rng.randint(140, 180))
            for voice in VOICES
            for split, pool, n in (("train", words[:half], train_per_voice), ("test", words[half:], test_per_voice))
            for i, text in enumerate(sentences(pool, n, rng))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to create (train/, test/ inside)")
    p.add_argument("--train-per-voice", type=int, default=24)
    p.add_argument("--test-per-voice", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        sys.exit("error: espeak-ng is not installed (apt-get install espeak-ng)")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} exists and is not empty; pick a new folder")
    if args.train_per_voice < 1 or args.test_per_voice < 1:
        sys.exit("error: --train-per-voice and --test-per-voice must be >= 1")
    for split, voice, i, text, speed in plan(args.train_per_voice, args.test_per_voice, args.seed):
        folder = args.out / split / voice
        try:
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{voice}_{i:03d}.wav", speak(voice, text, speed), SR, subtype="PCM_16")
        except subprocess.CalledProcessError as e:
            sys.exit(f"error: espeak-ng failed for voice en+{voice}: {e.stderr.decode(errors='replace').strip()}")
        except OSError as e:
            sys.exit(f"error: cannot write {folder}: {e.strerror or e}")
    print(f"{args.out}: {len(VOICES)} voices x ({args.train_per_voice} train + {args.test_per_voice} test) clips")


if __name__ == "__main__":
    main()
