"""Speech recognition probe (LibriSpeech-style): characters, the ASR head, CTC, greedy decoding, WER/CER.

As in the BAT reference implementation (github.com/houtan-ghaffari/BAT_ICML2026: models/heads.py
ASR_Head, data/bat_audio_datasets.py LibriSpeechDataset and CharTokenizer, engine/evaluator.py):

- text: lower-cased, everything but a-z, space and apostrophe removed; 29 symbols, 0 = CTC blank;
- head (bat.heads.ASRHead, trained with bat.losses.ctc_loss): a softmax mix of all layers' patch tokens
  (no normalisation), mean over the 8 frequency patches, a transposed convolution (kernel = stride = 8)
  that turns each 160 ms patch into 8 steps of 20 ms, a 2-layer bidirectional LSTM (512 units each way,
  dropout 0.2, run in float32), LayerNorm, dropout, Linear -> log-probabilities per 20 ms step;
- input: the whole utterance's spectrogram, normalised on its own, zero-padded to whole patches (and to
  the longest utterance of its batch); CTC input length = 8 x the utterance's own patches;
- decoding: greedy (arg-max per step, repeats collapsed, blanks dropped);
- WER / CER over the whole test set (jiwer's definition): total word (character) edits / total
  reference words (characters).

Data: a CSV manifest `path,text`, or LibriSpeech's folder layout (`<speaker>/<chapter>/*.trans.txt`
lines "<utterance-id> <TRANSCRIPT>" next to `<utterance-id>.flac`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bat.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, load_audio
from bat.data import Skipped
from bat.heads import CHARS, STEPS_PER_PATCH, Features, frozen_features
from bat.listing import DataError, is_speech_data, read_csv, read_text_lines, walk_files
from bat.losses import ctc_loss
from bat.model import eval_mode
from bat.precision import autocast


# ---------------------------------------------------------------------------------------------
# Text


def normalise_text(text):
    """Lower case; keep a-z, space and apostrophe only (REF's CharTokenizer)."""
    return re.sub(r"[^a-z ']", "", text.lower())


def encode_text(text):
    """Text -> token ids (1..28), after normalise_text."""
    return [CHARS.index(c) for c in normalise_text(text)]


def decode_ids(ids):
    """Token ids -> text, blanks (0) dropped."""
    return "".join(CHARS[i] for i in ids if i != 0)


def greedy_decode(log_probs, lengths=None):
    """(B, T, C) scores -> texts: arg-max per step, repeated symbols collapsed, then blanks dropped.
    lengths: valid steps per row (padding steps are ignored)."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, seq in enumerate(best):
        seq = seq[: int(lengths[row])] if lengths is not None else seq
        keep = torch.ones_like(seq, dtype=torch.bool)
        keep[1:] = seq[1:] != seq[:-1]
        out.append(decode_ids(seq[keep].tolist()))
    return out


def edit_distance(ref, hyp):
    """Levenshtein distance between two sequences (unit costs), one numpy row per reference item."""
    if len(ref) == 0 or len(hyp) == 0:
        return max(len(ref), len(hyp))
    vocab = {t: i for i, t in enumerate(set(ref) | set(hyp))}
    r, h = np.array([vocab[t] for t in ref]), np.array([vocab[t] for t in hyp])
    cols = np.arange(len(h) + 1)
    prev = cols.copy()
    for i in range(1, len(r) + 1):
        cand = np.empty_like(prev)
        cand[0] = i
        cand[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (h != r[i - 1]))  # deletion, substitution
        prev = np.minimum.accumulate(cand - cols) + cols  # insertions: row[j] = min_k (cand[k] + j - k)
    return int(prev[-1])


def error_rates(refs, hyps):
    """{"wer", "cer"} over a whole set: summed edits / summed reference length (words: split on
    whitespace; characters: the stripped text, spaces included), as jiwer.wer / jiwer.cer on lists."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    words = [(r.split(), h.split()) for r, h in zip(refs, hyps)]
    chars = [(list(r.strip()), list(h.strip())) for r, h in zip(refs, hyps)]
    n_words, n_chars = sum(len(r) for r, _ in words), sum(len(r) for r, _ in chars)
    if n_words == 0:
        raise ValueError("the references contain no words")
    return {"wer": sum(edit_distance(r, h) for r, h in words) / n_words,
            "cer": sum(edit_distance(r, h) for r, h in chars) / n_chars}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Transcripts:
    """Utterances and their texts; no audio is read."""

    files: list
    texts: list
    source: str  # "csv" | "librispeech"
    root: str
    skipped: list = field(default_factory=list)

    def __len__(self):
        return len(self.files)


def list_transcripts(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if not is_speech_data(path):
        raise DataError(f"{path}: not transcribed speech (a CSV with path,text columns or a LibriSpeech "
                        "folder with *.trans.txt files)")
    files, texts = [], []
    if os.path.isdir(path):
        for trans in walk_files(path, (".trans.txt",)):
            folder = os.path.dirname(trans)
            for line in read_text_lines(trans):
                if line.strip():
                    utt, text = (line.split(None, 1) + [""])[:2]  # "<utterance id> <TEXT>", space or tab
                    audio = [f"{os.path.join(folder, utt)}{ext}" for ext in AUDIO_EXTENSIONS]
                    files.append(next((a for a in audio if os.path.isfile(a)), audio[1]))  # .flac if none
                    texts.append(text.strip())
        source = "librispeech"
    else:
        base = os.path.dirname(os.path.abspath(path))
        for line, row in enumerate(read_csv(path)[1], start=2):
            p = (row.get("path") or "").strip()
            if not p:
                raise DataError(f"{path}:{line}: empty 'path'")
            files.append(p if os.path.isabs(p) else os.path.join(base, p))
            texts.append(row.get("text") or "")
        source = "csv"
    if not files:
        raise DataError(f"{path}: no utterances")
    empty = [f for f, t in zip(files, texts) if not normalise_text(t).strip()]
    if empty:
        raise DataError(f"{path}: {len(empty)} utterance(s) without any letters in their text, e.g. {empty[0]}")
    return Transcripts(files, texts, source, path)


LIBRISPEECH_SPLITS = ("train-clean-100", "dev-clean", "test-clean")  # REF: train.100, validation, test (clean)


def plan_splits(train, test=None):
    """(train, valid or None, test) Transcripts. A LibriSpeech root holding train-clean-100, dev-clean and
    test-clean gives REF's three splits (--test, when given, replaces test-clean); otherwise --train is
    the training set and --test is needed."""
    root = os.fspath(train)
    if os.path.isdir(root) and all(os.path.isdir(os.path.join(root, s)) for s in LIBRISPEECH_SPLITS):
        tr, va, te = (os.path.join(root, s) for s in LIBRISPEECH_SPLITS)
        return list_transcripts(tr), list_transcripts(va), list_transcripts(test or te)
    if test is None:
        raise DataError(f"{train}: give --test (a CSV path,text or a LibriSpeech folder), or a LibriSpeech root "
                        f"holding {', '.join(LIBRISPEECH_SPLITS)}")
    return list_transcripts(train), None, list_transcripts(test)


class SpeechDataset(torch.utils.data.Dataset):
    """Item: (spec (T, 128) with T a multiple of 16, token ids, index), or Skipped for a bad file."""

    def __init__(self, items, frontend):
        self.items, self.frontend = items, frontend

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            wave = torch.from_numpy(load_audio(self.items.files[i], SAMPLE_RATE))
        except AudioError as e:
            return Skipped(i, e.path, e.reason)
        with torch.no_grad():
            spec = self.frontend(wave[None])[0, 0]  # (T, 128), normalised over this utterance
        spec = F.pad(spec, (0, 0, 0, -spec.shape[0] % 16))  # whole patches (REF)
        return spec, torch.tensor(encode_text(self.items.texts[i]), dtype=torch.long), i


def collate_speech(items):
    """-> (spec (B, 1, T, 128), targets (B, S), input_lengths (B,) in 20 ms steps, target_lengths (B,),
    indices, skipped); None tensors when every item was unreadable."""
    good = [x for x in items if not isinstance(x, Skipped)]
    skipped = [(x.path, x.reason) for x in items if isinstance(x, Skipped)]
    if not good:
        return None, None, None, None, [], skipped
    spec = nn.utils.rnn.pad_sequence([x[0] for x in good], batch_first=True).unsqueeze(1)
    targets = nn.utils.rnn.pad_sequence([x[1] for x in good], batch_first=True)
    in_len = torch.tensor([x[0].shape[0] // 16 * STEPS_PER_PATCH for x in good])
    tgt_len = torch.tensor([len(x[1]) for x in good])
    return spec, targets, in_len, tgt_len, [x[2] for x in good], skipped


# ---------------------------------------------------------------------------------------------
# Training batches and scoring (probe_cgp.py trains)


def speech_frontend(encoder):
    """The encoder's front-end on whole inputs (no fixed length); legacy front-ends with REF's LibriSpeech
    statistics."""
    from bat.frontend import Frontend
    from bat.tasks import TASKS, frontend_config

    return Frontend.from_config(frontend_config(encoder.frontend_config, TASKS["librispeech"], None))


def _loader(dataset, batch_size, shuffle=False, workers=0, seed=0):
    from bat.data import make_loader

    return make_loader(dataset, batch_size, shuffle, workers, seed, collate_fn=collate_speech)


@torch.no_grad()
def transcribe(encoder, head, dataset, device, workers=0, skips=None):
    """Greedy transcripts of every readable utterance, one at a time (REF tests with batch size 1).
    Returns (hypotheses, indices into dataset.items)."""
    hyps, indices = [], []
    with eval_mode(encoder, head):  # each gets its own mode back
        for spec, _, in_len, _, idx, skipped in _loader(dataset, 1, workers=workers):
            if skips is not None:
                skips.add(skipped)
            if spec is None:
                continue
            with autocast(device, "cuda-bf16"):  # the head: bf16 on CUDA (REF)
                log_probs = head(frozen_features(encoder, head, spec.to(device)))
            hyps += greedy_decode(log_probs, in_len)
            indices += idx
    return hyps, indices


def score_transcripts(encoder, head, items, frontend, device, workers=0, skips=None):
    """{"wer", "cer", "num_utterances", "examples"} of the head's greedy transcripts of `items`."""
    hyps, idx = transcribe(encoder, head, SpeechDataset(items, frontend), device, workers, skips)
    if not hyps:
        raise DataError(f"{items.root}: no usable utterances (every file was skipped)")
    refs = [normalise_text(items.texts[i]) for i in idx]
    return {**error_rates(refs, hyps), "num_utterances": len(hyps),
            "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(refs, hyps))[:5]]}


def training_batches(encoder, head, dataset, batch_size, device, cache, seed=0, workers=0, skips=None):
    """Endless (Features, targets, input_lengths, target_lengths) in random order. Streaming (REF) runs the
    frozen encoder on each zero-padded batch; cache=True encodes every utterance once on its own (as REF
    tests) and pads the stored tokens per batch instead, which makes small sets train many times faster."""
    loader = _loader(dataset, 1 if cache else batch_size, shuffle=not cache, workers=workers, seed=seed)
    while not cache:
        for spec, targets, in_len, tgt_len, _, skipped in loader:
            skips.add(skipped)
            if spec is not None:  # None: every utterance of the batch was unreadable
                yield (frozen_features(encoder, head, spec.to(device)), targets.to(device), in_len.to(device),
                       tgt_len.to(device))
            elif skips.all_unreadable(dataset.items.files):  # never spin on unreadable data
                raise skips.nothing_usable(dataset.items.files, "the training utterances")
    tokens, texts = [], []
    for spec, targets, _, _, _, skipped in loader:
        skips.add(skipped)
        if spec is not None:
            tokens.append(frozen_features(encoder, head, spec.to(device)).tokens[:, 0].transpose(0, 1))  # (N, L, D)
            texts.append(targets[0].to(device))
    if not tokens:
        raise DataError("no usable training utterances (every file was skipped)")
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(tokens), generator=gen).split(batch_size):
            pick = idx.tolist()
            x = nn.utils.rnn.pad_sequence([tokens[i] for i in pick], batch_first=True)  # (B, N, L, D)
            y = nn.utils.rnn.pad_sequence([texts[i] for i in pick], batch_first=True)
            in_len = torch.tensor([tokens[i].shape[0] // 8 * STEPS_PER_PATCH for i in pick], device=device)
            tgt_len = torch.tensor([len(texts[i]) for i in pick], device=device)
            yield Features(None, x.permute(2, 0, 1, 3), x.shape[1] // 8), y, in_len, tgt_len


def probe_parts(encoder, head, train, valid, test, device, batch_size, cache, seed=0, workers=0, skips=None):
    """The ASR probe's side of probe_cgp.py's training loop: (endless (features, (targets, input lengths,
    target lengths), rows) batches of whole utterances, the CTC loss, validate() -> (WER, history record) or
    None without a validation split, test() -> WER and CER of greedy transcripts of the test utterances)."""
    frontend = speech_frontend(encoder)
    batches = ((f, (y, n, m), len(y)) for f, y, n, m in training_batches(
        encoder, head, SpeechDataset(train, frontend), batch_size, device, cache, seed, workers, skips))

    def validate():
        m = score_transcripts(encoder, head, valid, frontend, device, workers, skips)
        return m["wer"], {"split": "valid", "wer": m["wer"], "cer": m["cer"]}

    def test_():
        m = score_transcripts(encoder, head, test, frontend, device, workers, skips)
        m.update(num_train=sum(f not in skips.seen for f in train.files), num_test=m.pop("num_utterances"))
        return m

    loss = lambda log_probs, y: ctc_loss(log_probs, *y)  # noqa: E731
    return batches, loss, (validate if valid is not None else None), test_
