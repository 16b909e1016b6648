"""Run an exported model (export.py) with onnxruntime: a tagger CLI and a small Python API, no PyTorch.

    python -m bat.tag tagger.onnx dog.wav street.flac --top-k 3
    python -m bat.tag tagger.onnx long_recording.wav --hop 5 --json

    from bat.tag import Tagger
    tagger = Tagger("tagger.onnx")                 # device="cuda" uses the CUDA provider where it loads
    probs = tagger.scores(waveform)                # float [samples] -> [classes]; [batch, samples] -> [batch, classes]
    vec = tagger.embedding(waveform)               # -> [D] / [batch, D]
    tagger.top_k(probs, 5)                         # -> [(label, score), ...]

Imports only numpy, onnxruntime, soundfile and soxr (through bat.audio): services install no torch, and
a test runs this module with torch made unimportable.

Input rules (Tagger and CLI alike): float samples in [-1, 1] at the model's rate (16 kHz), mono.
float64/float16 are converted to float32; integer PCM is refused, not guessed (int16 would need
/ 32768, int32 / 2**31): convert it yourself. A 2-D array is a batch of clips (rows), not channels.
Empty or non-finite input is an error. Clips shorter than 0.5 s are zero-padded to 0.5 s inside the
graph (a shorter clip has no 16-frame patch to encode). Longer clips are encoded whole (the graph
chunks them as the encoder does); `--hop` / `Tagger.windows` scores them window by window instead.

Batching: the CLI batches only clips of *exactly* equal length. Padding clips to a common length would
change their scores (the spectrogram is min-max normalised per clip and padding takes part in attention),
so results never depend on what a file happened to be batched with.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from bat.audio import AudioError, load_audio

SAMPLE_RATE = 16000
DEFAULT_WINDOW = 163840  # one encoder chunk (64 time patches, 10.24 s): models exported without metadata


# ------------------------------------------------------------------------------- input checking

def as_batch(waveform) -> tuple[np.ndarray, bool]:
    """Validate one clip [samples] or a batch [batch, samples] -> (float32 [B, S] C-contiguous, was_1d).
    Raises ValueError with a one-line message."""
    try:
        x = np.asarray(waveform)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"waveform: not a rectangular array ({e}); pass clips of different lengths "
                         "one at a time") from None
    if x.dtype == object:
        raise ValueError("waveform: not a numeric array (clips of different lengths? pass them one at a time)")
    if x.dtype.kind in "iub":
        raise ValueError(f"waveform: {x.dtype} samples refused; convert to float in [-1, 1] first "
                         "(e.g. x / 32768 for int16)")
    if x.dtype.kind != "f":
        raise ValueError(f"waveform: expected float samples, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"waveform: expected [samples] or [batch, samples], got shape {x.shape}")
    was_1d = x.ndim == 1
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported just below
        x = np.ascontiguousarray(x.reshape(1, -1) if was_1d else x, dtype=np.float32)
    if x.size == 0:
        raise ValueError(f"waveform: empty (shape {x.shape})")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        where = "" if was_1d else f" in row(s) {', '.join(map(str, rows[:5]))}" + (" ..." if len(rows) > 5 else "")
        raise ValueError(f"waveform: non-finite samples (NaN or Inf){where}")
    return x, was_1d


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Starts of windows of `window` samples every `hop` samples; the last window ends at the clip's
    end (it overlaps more), so every window has the model's length and the whole clip is covered."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window, hop))
    return starts + [n - window]


# ----------------------------------------------------------------------------------- the model

def create_session(path: str, device: str = "cpu", threads: int = 0):
    """(InferenceSession, notice or None). CUDA counts only when the session really holds its provider.
    Leaves onnxruntime's process-wide default log level at "error" (its warnings are fallback chatter)."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    # A CUDA provider that fails to load is logged by onnxruntime as several multi-line errors; we
    # check get_providers() below and say it in one line instead.
    ort.set_default_logger_severity(4 if device == "cuda" else 3)
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - missing file, not ONNX, unsupported opset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot load the model ({first})") from None
    finally:
        ort.set_default_logger_severity(3)
    notice = None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        notice = "note: the CUDA execution provider did not load (no GPU or CUDA libraries); running on the CPU"
    return session, notice


class Tagger:
    """An exported model in onnxruntime. Attributes: labels, task, sample_rate, window_samples,
    outputs, metadata, device ("cuda" only when the CUDA provider really loaded), notice.

    Thread-safe: calls share one InferenceSession (whose run() is thread-safe) and keep no state of
    their own, so a service can call one Tagger from many threads."""

    def __init__(self, path, device: str = "cpu", threads: int = 0):
        self.path = str(path)
        self.session, self.notice = create_session(self.path, device, threads)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.metadata = {k: _json_or_str(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != ["waveform"]:
            raise ValueError(f"{self.path}: not a bat export (inputs {inputs}, expected ['waveform'])")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.labels = list(self.metadata.get("labels") or [])
        self.task = self.metadata.get("task", "multilabel" if "scores" in self.outputs else "embedding")
        self.sample_rate = int(self.metadata.get("sample_rate", SAMPLE_RATE))
        self.window_samples = int(self.metadata.get("window_samples", DEFAULT_WINDOW))
        if "scores" in self.outputs and not self.labels:  # no metadata: name the classes by index
            self.labels = [str(i) for i in range(self.session.get_outputs()[0].shape[-1])]

    def run(self, waveform, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All (or the named) outputs for one clip [samples] (batch axis dropped) or a batch [B, samples]."""
        x, was_1d = as_batch(waveform)
        names = list(outputs or self.outputs)
        missing = [n for n in names if n not in self.outputs]
        if missing:
            raise ValueError(f"{self.path}: the model has no output {missing[0]!r} (it has {', '.join(self.outputs)})")
        got = self.session.run(names, {"waveform": x})
        return {n: (g[0] if was_1d else g) for n, g in zip(names, got)}

    def scores(self, waveform) -> np.ndarray:
        """Class probabilities (softmax for multiclass, sigmoid for multilabel): [C] or [B, C]."""
        if "scores" not in self.outputs:
            raise ValueError(f"{self.path}: encoder-only export, no classifier head (use embedding())")
        return self.run(waveform, ["scores"])["scores"]

    def embedding(self, waveform) -> np.ndarray:
        """The clip embedding: [D] or [B, D] (see export.py for what it is for each head)."""
        return self.run(waveform, ["embedding"])["embedding"]

    def top_k(self, scores: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        """The k best (label, score) pairs of one clip's scores [C], best first."""
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.labels[i], float(scores[i])) for i in order]

    def windows(self, waveform, hop_seconds: float, batch_size: int = 8) -> list[tuple[float, float, np.ndarray]]:
        """Scores of one clip [samples] window by window: [(start_s, end_s, scores [C])]. Windows are the
        model's length (its training window, else 10.24 s), `hop_seconds` apart; a clip no longer than
        one window gives one row for the whole clip."""
        x, was_1d = as_batch(waveform)
        if not was_1d:
            raise ValueError("windows(): expected one clip [samples]")
        segments = self.spans(x[0], hop_seconds)
        scores = self.scores_many([x[0][a:b] for a, b in segments], batch_size)
        return [(a / self.sample_rate, b / self.sample_rate, s) for (a, b), s in zip(segments, scores)]

    def scores_many(self, clips: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Scores of clips of any lengths, batching those of exactly equal length; in input order."""
        return self._many(clips, "scores", batch_size)

    def embedding_many(self, clips: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        return self._many(clips, "embedding", batch_size)

    def _many(self, clips, output, batch_size):
        if output == "scores" and "scores" not in self.outputs:
            raise ValueError(f"{self.path}: encoder-only export, no classifier head (use embedding())")
        checked = []
        for c in clips:
            x, was_1d = as_batch(c)
            if not was_1d:
                raise ValueError(f"expected one clip [samples] per item, got shape {np.shape(c)}")
            checked.append(x[0])
        clips = checked
        results: list[np.ndarray | None] = [None] * len(clips)
        for idx in equal_length_batches([len(c) for c in clips], batch_size):
            out = self.session.run([output], {"waveform": np.stack([clips[i] for i in idx])})[0]
            for i, row in zip(idx, out):
                results[i] = row
        return results

    def spans(self, clip: np.ndarray, hop_seconds: float) -> list[tuple[int, int]]:
        """(start, end) samples of the windows `windows()` scores."""
        hop = int(round(hop_seconds * self.sample_rate))
        if hop <= 0:
            raise ValueError(f"hop must be a positive number of seconds, got {hop_seconds}")
        return [(a, min(a + self.window_samples, len(clip))) for a in window_starts(len(clip), self.window_samples, hop)]


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def equal_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by exactly equal length, at most batch_size per group (first-seen order)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


# ------------------------------------------------------------------------------------------ CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bat.tag", description=(
        "Tag audio files with a model exported by export.py (onnxruntime, no PyTorch). Prints the top-k "
        "labels with scores per file (or per window with --hop). Unreadable files get a one-line error on "
        "stderr, the others are still tagged, and the exit status is 1."))
    p.add_argument("model", help="MODEL.onnx written by export.py")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (any format and rate soundfile reads)")
    p.add_argument("--top-k", type=int, default=5, help="labels to print per file or window (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: file, start, end, labels")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the CUDA execution provider where it loads, else the CPU with a notice")
    p.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                   help="files longer than the model's window are scored window by window, SECONDS apart")
    p.add_argument("--batch-size", type=int, default=8, help="clips of equal length run together (default 8)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be at least 1")
    if args.hop is not None and not args.hop > 0:
        p.error("--hop must be a positive number of seconds")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def format_result(path: str, start: float, end: float, top: list[tuple[str, float]], as_json: bool,
                  windowed: bool) -> str:
    if as_json:
        return json.dumps({"file": path, "start": round(start, 3), "end": round(end, 3),
                           "labels": [{"label": l, "score": round(s, 6)} for l, s in top]})
    span = f" [{start:.2f}-{end:.2f} s]" if windowed else ""
    return f"{path}{span}: " + ", ".join(f"{l} {s:.3f}" for l, s in top)


def tag_files(tagger: Tagger, files: Sequence[str], top_k: int, as_json: bool, hop: float | None,
              batch_size: int, out=sys.stdout, err=sys.stderr, files_per_block: int = 64) -> int:
    """Tag files block by block (bounded memory); results in input order. Returns the number of failures."""
    failed = 0
    for b in range(0, len(files), files_per_block):
        block = files[b:b + files_per_block]
        segments = []  # (file index in block, start sample, end sample)
        clips = {}
        for i, path in enumerate(block):
            try:
                if not os.path.isfile(path):  # soundfile says only "System error" for a missing file
                    raise AudioError(path, "no such file")
                clips[i] = load_audio(path, tagger.sample_rate)
            except AudioError as e:  # one line per bad file; the other files go on
                print(f"error: {e}", file=err)
                failed += 1
                continue
            spans = tagger.spans(clips[i], hop) if hop else [(0, len(clips[i]))]
            segments.extend((i, a, e) for a, e in spans)
        scores = tagger.scores_many([clips[i][a:e] for i, a, e in segments], batch_size)
        for (i, a, e), s in zip(segments, scores):
            windowed = hop is not None and len(clips[i]) > tagger.window_samples
            line = format_result(block[i], a / tagger.sample_rate, e / tagger.sample_rate,
                                 tagger.top_k(s, top_k), as_json, windowed)
            print(line, file=out, flush=True)
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tagger = Tagger(args.model, args.device, args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tagger.notice:
        print(tagger.notice, file=sys.stderr)
    if "scores" not in tagger.outputs:
        print(f"error: {args.model}: encoder-only export (no classifier head): nothing to tag", file=sys.stderr)
        return 2
    failed = tag_files(tagger, args.files, args.top_k, args.json, args.hop, args.batch_size)
    if failed:
        print(f"{failed} of {len(args.files)} file(s) could not be tagged", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
