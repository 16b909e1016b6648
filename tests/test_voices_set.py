"""benchmarks/voices_set.py: a class-per-folder speaker set that probe_cgp.py lists, test words unseen."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import soundfile as sf

from bat.listing import list_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import voices_set  # noqa: E402


def test_voices_set_test_sentences_share_no_word_with_training():
    clips = voices_set.plan(24, 8)
    words = {split: {w for s, _, _, text, _ in clips if s == split for w in text.split()} for split in ("train", "test")}
    assert words["train"] and words["test"] and not words["train"] & words["test"]
    assert len(clips) == 32 * len(voices_set.VOICES) and clips == voices_set.plan(24, 8)  # deterministic


# A stand-in for espeak-ng on PATH, so the script's own work (plan, resampling, folders, refusals) is tested on
# machines without it: it answers `espeak-ng -v VOICE -s SPEED --stdout TEXT` with a 22.05-kHz WAV (espeak-ng's
# rate) whose length follows the text and the speed, and fails for the voice "nobody" (as for a voice it lacks).
FAKE_ESPEAK = """#!{python}
import io, sys
import numpy as np, soundfile as sf
args = sys.argv[1:]
voice, speed, text = args[args.index("-v") + 1], int(args[args.index("-s") + 1]), args[-1]
if voice == "en+nobody":
    sys.exit("Failed to read voice " + voice)
t = np.arange(int(22050 * 60 * len(text.split()) / speed)) / 22050
buf = io.BytesIO()
sf.write(buf, 0.3 * np.sin(2 * np.pi * (100 + len(voice) * 20) * t), 22050, format="WAV", subtype="PCM_16")
sys.stdout.buffer.write(buf.getvalue())
"""


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "espeak-ng"
    exe.write_text(FAKE_ESPEAK.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return exe


def test_voices_set_builds_a_set_probe_cgp_lists(tmp_path, fake_espeak):
    out = tmp_path / "voices"
    voices_set.main(["--out", str(out), "--train-per-voice", "2", "--test-per-voice", "1"])
    train, test = list_dataset(out / "train"), list_dataset(out / "test")
    assert train.task == test.task == "multiclass"
    assert sorted(train.classes) == sorted(test.classes) == sorted(voices_set.VOICES)
    assert len(train.files) == 2 * len(voices_set.VOICES) and len(test.files) == len(voices_set.VOICES)
    info = sf.info(train.files[0])
    assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.5
    with pytest.raises(SystemExit, match="not empty"):  # never writes into a folder it did not create
        voices_set.main(["--out", str(out)])
    with pytest.raises(SystemExit, match="must be >= 1"):
        voices_set.main(["--out", str(tmp_path / "none"), "--test-per-voice", "0"])


def test_voices_set_refuses_without_espeak_and_reports_its_failures(tmp_path, monkeypatch, fake_espeak):
    monkeypatch.setattr(voices_set, "VOICES", ("Adam", "nobody"))
    with pytest.raises(SystemExit, match="espeak-ng failed for voice en\\+nobody"):
        voices_set.main(["--out", str(tmp_path / "v"), "--train-per-voice", "1", "--test-per-voice", "1"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("espeak-ng") is None
    with pytest.raises(SystemExit, match="espeak-ng is not installed"):
        voices_set.main(["--out", str(tmp_path / "w")])
