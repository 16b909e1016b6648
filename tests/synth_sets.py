"""Small generated data sets with known answers for the SED and ASR end-to-end tests (no downloads).

- make_event_task: a HEAR-layout task folder of recordings with 1 kHz beeps and noise bursts at random,
  known times on a quiet noise floor; test recordings are longer than 64 patches (10.24 s), so they go
  through the encoder in chunks.
- make_word_set: the ten Speech Commands words spoken in a tone alphabet (every letter its own two-tone
  chord; "voices" differ in pitch, speed and loudness), as a path,text CSV. Generated here, so the suite
  needs no speech synthesiser installed.
- make_esc50: ESC-50's layout with a few demo clips per fold.
- with_an_unreadable_class: a copy of a class-per-folder set whose first class's files are all unreadable.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from bat import demo

SR = 16000
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def make_event_task(root, n_train=12, n_valid=3, n_test=4, train_s=6.0, test_s=11.0, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "labelvocabulary.csv"), "w") as fh:
        fh.write("idx,label\n0,beep\n1,hiss\n")
    with open(os.path.join(root, "task_metadata.json"), "w") as fh:
        json.dump({"task_name": "synthetic_events", "embedding_type": "event", "prediction_type": "multilabel",
                   "split_mode": "trainvaltest", "sample_duration": None}, fh)
    for split, n, secs in (("train", n_train, train_s), ("valid", n_valid, train_s), ("test", n_test, test_s)):
        table = {}
        os.makedirs(os.path.join(root, "16000", split), exist_ok=True)
        for i in range(n):
            x = 0.003 * rng.standard_normal(int(secs * SR))
            events, t = [], 0.2 + rng.uniform(0, 0.8)
            while t < secs - 1.0:
                dur = rng.uniform(0.5, 1.2)
                label = ("beep", "hiss")[rng.integers(2)]
                a, b = int(t * SR), int(min(t + dur, secs) * SR)
                if label == "beep":
                    x[a:b] += 0.3 * np.sin(2 * np.pi * 1000 * np.arange(b - a) / SR)
                else:
                    x[a:b] += 0.2 * rng.standard_normal(b - a)
                events.append({"label": label, "start": round(1000 * t, 1), "end": round(1000 * (t + dur), 1)})
                t += dur + rng.uniform(0.4, 1.5)
            name = f"{split}{i:02d}.wav"
            sf.write(os.path.join(root, "16000", split, name), x.astype(np.float32), SR)
            table[name] = events
        with open(os.path.join(root, f"{split}.json"), "w") as fh:
            json.dump(table, fh)
    return root


def shuffle_labels(root, out):
    """A copy of a task whose training recordings carry the next recording's events (the control run)."""
    shutil.copytree(root, out)
    with open(os.path.join(out, "train.json")) as fh:
        table = json.load(fh)
    names = sorted(table)
    with open(os.path.join(out, "train.json"), "w") as fh:
        json.dump({n: table[names[(i + 1) % len(names)]] for i, n in enumerate(names)}, fh)
    return out


# Voices of the tone alphabet: (pitch factor, letters per second, loudness). Pitch moves by at most 3 %,
# well inside the 20 % (or more) between neighbouring letters' tones, so an unseen voice says the same letters.
VOICES = {"low": (0.97, 11.0, 0.3), "mid": (1.0, 12.5, 0.2), "high": (1.03, 14.0, 0.25), "fast": (1.0, 16.0, 0.35),
          "unseen-a": (0.98, 13.0, 0.22), "unseen-b": (1.02, 11.5, 0.28)}


def tone_speech(text, voice="mid", rng=None):
    """`text` (lowercase letters and spaces) as audio: each letter a chord of two tones, the first from six
    pitches (250 Hz x 1.6^i) and the second from five (3 kHz x 1.2^j), so the 26 letters are 26 chords; a
    space is a short pause. A faint noise floor keeps the front-end's dB range sensible."""
    pitch, rate, loud = VOICES[voice]
    rng = rng or np.random.default_rng(0)
    n = int(SR / rate)
    t = np.arange(n) / SR
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10-ms ramps: no clicks between letters
    parts = [np.zeros(n // 2)]
    for ch in text:
        if ch == " ":
            parts.append(np.zeros(n // 2))
            continue
        k = ord(ch) - ord("a")
        f1, f2 = pitch * 250 * 1.6 ** (k // 5), pitch * 3000 * 1.2 ** (k % 5)
        parts.append(loud * envelope * (np.sin(2 * np.pi * f1 * t) + 0.6 * np.sin(2 * np.pi * f2 * t)) / 1.6)
    parts.append(np.zeros(n // 2))
    x = np.concatenate(parts)
    return (x + 0.003 * rng.standard_normal(len(x))).astype(np.float32)


def make_word_set(root, n, voices=("low", "mid", "high", "fast"), words_per_utterance=3, seed=0):
    """n utterances of `words_per_utterance` distinct command words each, in the tone alphabet, spoken in
    turn by `voices`; a path,text CSV. (Three words per utterance: more letters per second of audio gets a
    CTC head past its all-blank start sooner than single words do.)"""
    os.makedirs(root, exist_ok=True)
    rng, rows = np.random.default_rng(seed), []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, words_per_utterance, replace=False))
        name = f"u{i:03d}.wav"
        sf.write(os.path.join(root, name), tone_speech(text, voices[i % len(voices)], rng), SR, subtype="PCM_16")
        rows.append(f"{name},{text}")
    with open(os.path.join(root, "words.csv"), "w") as fh:
        fh.write("path,text\n" + "\n".join(rows) + "\n")
    return os.path.join(root, "words.csv")


def with_an_unreadable_class(root, out):
    """Copy the class-per-folder set `root` to `out` with every file of its first class emptied (as a format
    this libsndfile cannot decode would be); returns (that class, its number of files)."""
    shutil.copytree(root, out)
    lost = sorted(os.listdir(out))[0]
    files = list((Path(out) / lost).iterdir())
    for f in files:
        f.write_bytes(b"")
    return lost, len(files)


def make_esc50(root, per_fold=2, categories=("dog", "rain", "clock")):
    """ESC-50's layout (audio/, meta/esc50.csv) with `per_fold` demo clips of three categories in each of 5 folds."""
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    os.makedirs(root / "audio")
    os.makedirs(root / "meta")
    for fold in range(1, 6):
        for k in range(per_fold):
            target = (fold + k) % len(categories)
            wave, _ = demo.demo_clip(target, seed=fold * 10 + k, seconds=0.5)
            name = f"{fold}-{k}-A-{target}.wav"
            sf.write(root / "audio" / name, wave, 16000)
            rows.append(f"{name},{fold},{target},{categories[target]},False,{k},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root
