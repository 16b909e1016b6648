"""ASR probe library (bat/asr.py): text, WER/CER (hand-worked and jiwer's recorded results), greedy CTC
decoding, the head's shapes and gradients, and the data layouts."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bat.asr import (SpeechDataset, collate_speech, decode_ids, edit_distance, encode_text, error_rates, greedy_decode,
                     list_transcripts)
from bat.frontend import Frontend
from bat.heads import CHARS, ASRHead, Features
from bat.listing import DataError, is_speech_data
from bat.losses import ctc_loss
from bat.optim import param_groups

CASES = json.loads((Path(__file__).parent / "golden" / "metric_cases.json").read_text())


def test_characters_as_ref():
    assert len(CHARS) == 29 and CHARS[:3] == ("<blank>", " ", "'") and CHARS[3] == "a" and CHARS[28] == "z"
    ids = encode_text("It's 2 DOGS!")
    assert decode_ids(ids) == "it's  dogs"  # digits and punctuation dropped, spaces kept
    assert decode_ids([0, 3, 0, 0, 4]) == "ab"


def test_edit_distance_hand_worked():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2 and edit_distance(["a"], []) == 1
    assert edit_distance("abc", "abc") == 0 and edit_distance("ab", "ba") == 2
    assert edit_distance("flaw", "lawn") == 2


def test_wer_cer_hand_worked():
    m = error_rates(["the cat sat", "on a mat"], ["the bat sat down", "on mat"])
    assert m["wer"] == pytest.approx(3 / 6)  # cat->bat, +down; -a
    assert m["cer"] == pytest.approx(8 / 19)  # c->b and " down" (6); "a " removed (2); 11 + 8 reference chars
    assert error_rates(["a b"], [""]) == {"wer": 1.0, "cer": 1.0}


def test_wer_cer_equal_jiwer():
    for case in CASES["wer_cer"]:
        m = error_rates(case["refs"], case["hyps"])
        assert m["wer"] == pytest.approx(case["wer"], abs=1e-12) and m["cer"] == pytest.approx(case["cer"], abs=1e-12)


def test_greedy_decode_collapses_repeats_then_drops_blanks():
    seq = torch.tensor([[3, 3, 0, 3, 1, 1, 4, 0, 0, 5, 5, 5]])  # a a _ a ' ' ' ' b _ _ c c c
    logp = torch.nn.functional.one_hot(seq, 29).float().log_softmax(-1)
    assert greedy_decode(logp) == ["aa bc"]
    assert greedy_decode(logp, lengths=[7]) == ["aa b"]


def features(L=3, B=2, T=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Features(None, torch.randn(L, B, T * 8, D, generator=g), T)


def test_asr_head_shapes_mix_and_gradients():
    torch.manual_seed(0)
    head = ASRHead(16, 3, hidden=32)
    f = features()
    out = head(f)
    assert out.shape == (2, 40, 29)  # 5 patches x 8 steps of 20 ms
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 40))
    torch.testing.assert_close(head.gate_weights(), torch.full((3,), 1 / 3))
    # the mix is a convex combination of the layers' frequency means, before the upsampling
    head.eval()
    with torch.no_grad():
        head.gate_logits.copy_(torch.tensor([0.0, 50.0, 0.0]))
        only1 = Features(None, f.tokens[1:2].expand(3, -1, -1, -1).clone(), 5)
        torch.testing.assert_close(head(f), head(only1), atol=1e-5, rtol=1e-4)
    head.train()
    targets = torch.tensor([[3, 4, 5], [6, 6, 0]])
    loss = ctc_loss(head(f), targets, torch.tensor([40, 40]), torch.tensor([3, 2]))
    ref = torch.nn.CTCLoss(blank=0, zero_infinity=True)(head(f).transpose(0, 1), targets, torch.tensor([40, 40]),
                                                        torch.tensor([3, 2]))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    decayed = {id(p) for p in param_groups(head, 0.05)[0]["params"]}
    assert id(head.gate_logits) not in decayed and id(head.fc.weight) in decayed and id(head.fc.bias) not in decayed
    del ref


def test_ctc_loss_is_torch_ctcloss_mean():
    torch.manual_seed(1)
    logp = torch.randn(3, 24, 29).log_softmax(-1)
    tg, il, tl = torch.randint(1, 29, (3, 5)), torch.tensor([24, 20, 16]), torch.tensor([5, 3, 4])
    want = torch.nn.CTCLoss(blank=0, zero_infinity=True)(logp.transpose(0, 1), tg, il, tl)
    torch.testing.assert_close(ctc_loss(logp, tg, il, tl), want)


def write_wav(path, seconds=0.5):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32), 16000)


def test_librispeech_layout_and_csv(tmp_path):
    ls = tmp_path / "LibriSpeech" / "test-clean" / "19" / "198"
    write_wav(ls / "19-198-0000.flac")
    write_wav(ls / "19-198-0001.flac", 1.0)
    (ls / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 IT'S ME\n")
    assert is_speech_data(tmp_path / "LibriSpeech")
    items = list_transcripts(tmp_path / "LibriSpeech")
    assert items.texts == ["HELLO WORLD", "IT'S ME"] and items.files[1].endswith("19-198-0001.flac")
    (tmp_path / "s.csv").write_text("path,text\nLibriSpeech/test-clean/19/198/19-198-0000.flac,yes\n")
    assert list_transcripts(tmp_path / "s.csv").files[0] == str(ls / "19-198-0000.flac")
    (tmp_path / "bad.csv").write_text("path,text\nx.wav,123\n")
    with pytest.raises(DataError, match="without any letters"):
        list_transcripts(tmp_path / "bad.csv")
    (ls / "19-198.trans.txt").write_text("19-198-0000\tHELLO WORLD\n19-198-0001 IT'S ME\n")  # a tab
    assert list_transcripts(tmp_path / "LibriSpeech").texts == ["HELLO WORLD", "IT'S ME"]
    (ls / "19-198.trans.txt").write_bytes(b"19-198-0000 CAF\xc9\n")
    with pytest.raises(DataError, match=r"19-198.trans.txt: not UTF-8 text \(byte 0xc9\)"):
        list_transcripts(tmp_path / "LibriSpeech")
    (ls / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 IT'S ME\n")

    ds = SpeechDataset(items, Frontend("bat"))
    spec, ids, _ = ds[1]
    assert spec.shape == (112, 128) and decode_ids(ids.tolist()) == "it's me"  # 101 frames -> 112
    x, tg, il, tl, idx, skipped = collate_speech([ds[0], ds[1]])
    assert x.shape == (2, 1, 112, 128) and il.tolist() == [64 // 16 * 8, 112 // 16 * 8]  # 51 -> 64 frames, 101 -> 112
    assert tl.tolist() == [11, 7] and tg.shape == (2, 11) and idx == [0, 1] and skipped == []
    assert x[0, 0, 51:].abs().max() == 0  # 0.5 s = 51 frames, padded with zeros


def test_asr_probe_file_round_trip_and_export_refusal(tmp_path):
    import export
    from bat.asr import speech_frontend
    from bat.exporting import ExportError
    from bat.model import Encoder, config_for
    from bat.probes import Probe, load_probe, save_probe

    torch.manual_seed(0)
    enc = Encoder(config_for("tiny", depth=2)).eval()
    enc.frontend_config = {"kind": "bat", "target_frames": None}
    head = ASRHead(192, 2, hidden=16).eval()
    save_probe(tmp_path / "p.safetensors", Probe(enc, head, speech_frontend(enc), list(CHARS), "asr"))
    probe = load_probe(tmp_path / "p.safetensors")
    spec = torch.rand(1, 1, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(probe(spec), head(Features.from_layers(enc.forward_layers(spec), cls=False)))
    with pytest.raises(ExportError, match="ASR probe"):
        export.main(export.Config(checkpoint=str(tmp_path / "p.safetensors"), out=str(tmp_path / "p.onnx")))
