"""benchmarks/voices_set.py: a class-per-folder speaker set that probe_cgp.py lists, test words unseen."""
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


def test_voices_set_builds_a_set_probe_cgp_lists(tmp_path):
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
