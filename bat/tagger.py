"""An exported model (export.py) in onnxruntime, for services: the Python API of the tagger, no PyTorch.

    from bat.tagger import Tagger                  # also importable as bat.tag.Tagger
    tagger = Tagger("tagger.onnx")                 # device="cuda" uses the CUDA provider where it loads
    probs = tagger.scores(waveform)                # float [samples] -> [classes]; [batch, samples] -> [batch, classes]
    result = tagger.tag(waveform)                  # scores, per-window timeline (and events for SED models)
    tagger.top_k(probs, 5)                         # -> [(label, score), ...]
    pieces, seconds = read_blocks("long.flac", tagger.sample_rate, 480000)
    result = tagger.tag_stream(pieces)             # a long file, read and scored block by block

Imports only numpy, onnxruntime, soundfile and soxr (through bat.audio): services install no torch, and
a test runs this module with torch made unimportable. The command line is `python -m bat.tag`.

What a score means: the model was trained on clips of W samples (`window_samples` in the model file). Any
input is scored as windows of W every `hop_samples` (the last one zero-padded, as in training), and
`scores` pools the windows (mean for multi-class, max for multi-label, as exported). Long inputs are
scored in blocks of windows (about BLOCK_SECONDS of audio per onnxruntime run), so memory does not grow
with the input's length; the result is the same as scoring it whole. Frame-wise (SED) models
(`window_samples` 0) score a recording whole, normalised over all of it as in training.

Input rules: float samples in [-1, 1] at the model's rate (`sample_rate` in the model file: 16 kHz, 32 kHz
for hsn probes), mono. float64/float16 are converted to float32; integer PCM is refused, not guessed (int16
would need / 32768): convert it yourself. A 2-D array is a batch of clips (rows), not channels. Empty or
non-finite input is an error.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from typing import Iterator, Sequence

import numpy as np

from bat.audio import (SAMPLE_RATE, AudioError, bad_rows, check_regular_file, check_samples, decode_error, error_line,
                       load_audio)
from bat.events import decode_events

BLOCK_SECONDS = 30.0  # audio per onnxruntime run when scoring long inputs (bounds memory: base ~1 GB)


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
    if x.ndim == 2 and x.shape[1] <= 8 < x.shape[0]:  # soundfile's (frames, channels): not 16,000 clips
        raise ValueError(f"waveform: shape {x.shape} looks like (frames, channels) audio; pass one mono clip "
                         "[samples] (e.g. x.mean(axis=1)) or a batch [batch, samples]")
    was_1d = x.ndim == 1
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported just below
        x = np.ascontiguousarray(x.reshape(1, -1) if was_1d else x, dtype=np.float32)
    if x.size == 0:
        raise ValueError(f"waveform: empty (shape {x.shape})")
    bad = bad_rows(x)  # as bat.audio refuses such files (a NaN, or a spectrum overflowing to NaN)
    if bad is not None:
        rows, what = bad
        where = "" if was_1d else f" in row(s) {', '.join(map(str, rows[:5]))}" + (" ..." if len(rows) > 5 else "")
        raise ValueError(f"waveform: {what}{where}")
    return x, was_1d


def num_windows(samples: int, window: int, hop: int) -> int:
    """Windows of an input of `samples` samples (bat.windows.num_windows: 1 + ceil(max(0, S - W) / hop))."""
    return 1 + -(-max(0, samples - window) // hop)


# ----------------------------------------------------------------------------------- the model

def default_threads() -> int:
    """onnxruntime's intra-op threads when none are asked for: the CPUs this process may use where a
    container's CPU quota or an affinity mask limits it, else 0 (onnxruntime's own choice). onnxruntime
    counts the machine's cores and ignores both limits: in a container with 2 CPUs of quota on a 64-core
    node it would start 64 threads, which the kernel throttles (and it pins them to cores, which fights a
    taskset mask). On an unlimited machine its choice is kept: one thread per physical core, not per
    hyperthread, which bat.cpu cannot tell apart."""
    from bat.cpu import cpu_limits

    cpus = cpu_limits()
    return cpus.usable if cpus.usable < cpus.machine else 0


def create_session(path: str, device: str = "cpu", threads: int = 0):
    """(InferenceSession, notice or None). CUDA counts only when the session really holds its provider.
    threads: onnxruntime's intra-op threads; 0 picks default_threads() (the container's CPU quota counts).
    Leaves onnxruntime's process-wide default log level at "error" (its warnings are fallback chatter)."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0: automatic), got {threads!r}")
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the session's read forever
        raise ValueError(f"{path}: cannot load the model (not a regular file)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads) or default_threads()
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    # A CUDA provider that fails to load is logged by onnxruntime as several multi-line errors, and its
    # Python fallback prints "EP Error ... Falling back" to stdout (where `bat.tag --json` writes); we
    # check get_providers() below and say it in one line instead.
    ort.set_default_logger_severity(4 if device == "cuda" else 3)
    chatter = contextlib.redirect_stdout(io.StringIO()) if device == "cuda" else contextlib.nullcontext()
    try:
        with chatter:
            if device == "cuda" and "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
                # Without PyTorch nothing has loaded CUDA and cuDNN yet: from pip's nvidia-* packages where
                # present, else the system's library path (onnxruntime's advice for a torch-free process).
                with contextlib.suppress(Exception):
                    ort.preload_dlls()
            session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - missing file, not ONNX, unsupported opset
        raise ValueError(f"{path}: cannot load the model ({error_line(e)})") from None
    finally:
        ort.set_default_logger_severity(3)
    notice = None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        notice = "note: the CUDA execution provider did not load (no GPU or CUDA libraries); running on the CPU"
    return session, notice


class Tagger:
    """An exported model in onnxruntime. Attributes: labels, task, sample_rate, window_samples,
    hop_samples, outputs, metadata, frame_wise, device ("cuda" only when the CUDA provider really
    loaded), notice.

    Thread-safe: calls share one InferenceSession (whose run() is thread-safe) and keep no state of
    their own, so a service can call one Tagger from many threads."""

    def __init__(self, path, device: str = "cpu", threads: int = 0):
        self.path = str(path)
        self.session, self.notice = create_session(self.path, device, threads)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != "bat.onnx":
            raise ValueError(f"{self.path}: not a model written by export.py (no bat metadata: labels, "
                             "sample_rate, window_samples)")
        self.metadata = {k: _json_or_str(v) for k, v in meta.items()}
        self.inputs = [i.name for i in self.session.get_inputs()]
        if self.inputs[:1] != ["waveform"]:
            raise ValueError(f"{self.path}: not a bat export (inputs {self.inputs}, expected waveform first)")
        self.takes_lengths = "lengths" in self.inputs or "lengths" in [
            i.name for i in self.session.get_overridable_initializers()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.labels = self._labels()
        self.task = self.metadata.get("task", "embedding")
        self.sample_rate = self._number("sample_rate", SAMPLE_RATE)
        self.window_samples = self._number("window_samples", 163840, positive=False)  # 0: frame-wise
        self.hop_samples = self._number("hop_samples", self.window_samples, positive=self.window_samples > 0)
        self.frame_wise = "frame_scores" in self.outputs
        if self.window_samples <= 0 or ("scores" in self.outputs and "window_scores" not in self.outputs):
            # Frame-wise (SED) exports (window_samples 0) and exports from before windowed scoring: the
            # graph scores the whole clip as one window, so tag() reads a file whole and runs it at once.
            self.window_samples = self.hop_samples = 2**62
        self.patch_seconds = self._number("patch_seconds", 0.16, kind=float)
        self.patches_per_window = self._number("patches_per_window", 0, positive=False)
        if self.metadata.get("int8_scheme") in ("dynamic-8bit", "static-qdq") and self.device == "cpu":
            from bat.cpu import cpu_isa, isa_string

            if cpu_isa().x86 and not cpu_isa().int8_dot_int32:  # int16 sums of 8-bit weights saturate here
                self.notice = "; ".join(filter(None, [self.notice, (
                    f"note: {self.path} has 8-bit int8 weights (exported on {self.metadata.get('int8_isa', '?')}); "
                    f"this CPU ({isa_string()}) has no VNNI, so scores may saturate: export again here")]))

    # --------------------------------------------------------------------------- metadata
    # Checked once here: a hand-edited model would otherwise fail every file with "division by zero".
    def _bad_metadata(self, key, what):
        raw = self.session.get_modelmeta().custom_metadata_map.get(key)
        got = "it is missing" if raw is None else f"got {raw!r}"
        return ValueError(f"{self.path}: metadata {key} must be {what}, {got}; re-export it with export.py")

    def _number(self, key, default, kind=int, positive=True):
        """metadata[key] (`default` where absent): an int (kind float: or a finite float), > 0 (or >= 0)."""
        value = self.metadata.get(key, default)
        number = type(value) in ((int,) if kind is int else (int, float)) and value == value and abs(value) != math.inf
        if not (number and (value > 0 if positive else value >= 0)):  # (type(), not isinstance(): no bools)
            sign = "a positive" if positive else "a non-negative"
            raise self._bad_metadata(key, f"{sign} {'integer' if kind is int else 'number'}")
        return kind(value)

    def _labels(self):
        """metadata labels: the class names, one per class of the scores output (none for encoder exports)."""
        labels = self.metadata.get("labels", [])
        scores = next((o.shape for o in self.session.get_outputs() if o.name == "scores"), None)
        classes = scores[-1] if scores and isinstance(scores[-1], int) else None  # a name where the graph leaves it open
        names = isinstance(labels, list) and all(isinstance(name, str) for name in labels)
        if not names or (scores is not None and (not labels or classes not in (None, len(labels)))):
            raise self._bad_metadata("labels", f"a JSON list of the model's {f'{classes} ' if classes else ''}class names")
        return labels

    # --------------------------------------------------------------------------- one run
    def run(self, waveform, outputs: Sequence[str] | None = None, lengths=None) -> dict[str, np.ndarray]:
        """All (or the named) outputs for one clip [samples] (batch axis dropped) or a batch [B, samples]
        (rows zero-padded to a common length, `lengths` = valid samples per row)."""
        x, was_1d = as_batch(waveform)
        names = list(outputs or self.outputs)
        missing = [n for n in names if n not in self.outputs]
        if missing:
            raise ValueError(f"{self.path}: the model has no output {missing[0]!r} (it has {', '.join(self.outputs)})")
        feed = {"waveform": x}
        if lengths is not None:
            if not self.takes_lengths:
                raise ValueError(f"{self.path}: this export takes no lengths (re-export it with export.py)")
            feed["lengths"] = np.asarray(lengths, dtype=np.int64).reshape(-1)
            n = feed["lengths"]
            if n.shape != (x.shape[0],) or not ((n > 0) & (n <= x.shape[1])).all():
                raise ValueError(f"lengths: expected {x.shape[0]} value(s) in [1, {x.shape[1]}], got {n.tolist()}")
        got = self.session.run(names, feed)
        return {n: (g[0] if was_1d else g) for n, g in zip(names, got)}

    def scores(self, waveform) -> np.ndarray:
        """Class probabilities pooled over the model's windows: [C] or [B, C], in one onnxruntime run
        (memory grows with the input: for long recordings use tag(), which scores them in blocks)."""
        self._need_head()
        return self.run(waveform, ["scores"])["scores"]

    def embedding(self, waveform) -> np.ndarray:
        """The clip embedding: [D] or [B, D] (see export.py for what it is for each head)."""
        return self.run(waveform, ["embedding"])["embedding"]

    def top_k(self, scores: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        """The k best (label, score) pairs of one clip's scores [C], best first."""
        scores = np.asarray(scores)
        if scores.shape != (len(self.labels),):
            raise ValueError(f"top_k(): expected one clip's scores [{len(self.labels)}], got shape {scores.shape}")
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.labels[i], float(scores[i])) for i in order]

    def _need_head(self):
        if "scores" not in self.outputs:
            raise ValueError(f"{self.path}: encoder-only export, no classifier head (use embedding())")

    # --------------------------------------------------------------------------- long inputs
    def block_samples(self) -> int:
        """Audio per onnxruntime run for long inputs: BLOCK_SECONDS at the model's rate."""
        return int(BLOCK_SECONDS * self.sample_rate)

    def block_windows(self) -> int:
        """Windows per onnxruntime run for long inputs: about BLOCK_SECONDS of audio."""
        return max(1, self.block_samples() // self.window_samples)

    def tag(self, clip) -> dict:
        """One clip [samples] of any length -> {"scores" [C], "windows" [(start_s, end_s, scores [C])],
        "events" [(label, onset_s, offset_s)] (frame-wise models)}, scored block by block."""
        x, was_1d = as_batch(clip)
        if not was_1d:
            raise ValueError("tag(): expected one clip [samples]")
        return self.tag_stream(iter([x[0]]))

    def tag_stream(self, chunks: Iterator[np.ndarray]) -> dict:
        """tag() for audio arriving in pieces (a file read block by block): only one block of windows
        (about BLOCK_SECONDS) is held and scored at a time; the result equals scoring the clip whole."""
        self._need_head()
        W, hop, K = self.window_samples, self.hop_samples, self.block_windows()
        span = (K - 1) * hop + W  # the samples K windows cover
        names = ["window_scores"] + (["frame_scores"] if self.frame_wise else [])
        if "window_scores" not in self.outputs:  # an older export: the whole clip is its one window
            clip = np.concatenate([np.asarray(c, np.float32) for c in chunks])
            return self._result([(0, self.scores(clip))], [], len(clip))
        buf, offset, window_rows, frame_rows, exhausted = np.zeros(0, np.float32), 0, [], [], False
        while True:
            while not exhausted and len(buf) <= span:  # one sample past the span: is this the last block?
                piece = next(chunks, None)
                exhausted = piece is None
                if piece is not None:
                    buf = np.concatenate([buf, np.asarray(piece, np.float32)])
            final = exhausted and len(buf) <= span
            seg = buf if final else buf[:span]
            out = self.run(seg, names)
            n = num_windows(len(seg), W, hop)  # K unless final
            window_rows.extend((offset + k * hop, out["window_scores"][k]) for k in range(n))
            if self.frame_wise:
                frame_rows.append((offset, out["frame_scores"]))
            if final:
                return self._result(window_rows, frame_rows, offset + len(seg))
            buf, offset = buf[K * hop:], offset + K * hop

    def tag_many(self, clips: Sequence[np.ndarray]) -> list[dict]:
        """tag() for several clips in one onnxruntime run (zero-padded to the longest, with their lengths:
        each result equals the clip's own). Meant for short clips: the run holds them all at once."""
        self._need_head()
        checked = [as_batch(c)[0][0] for c in clips]
        if not checked:
            return []
        if len(checked) == 1 or not self.takes_lengths or "window_scores" not in self.outputs:
            return [self.tag(c) for c in checked]
        n = max(len(c) for c in checked)
        x = np.stack([np.pad(c, (0, n - len(c))) for c in checked])
        names = ["window_scores"] + (["frame_scores"] if self.frame_wise else [])
        out = self.run(x, names, lengths=[len(c) for c in checked])
        results = []
        for b, c in enumerate(checked):
            k = num_windows(len(c), self.window_samples, self.hop_samples)
            rows = [(i * self.hop_samples, out["window_scores"][b, i]) for i in range(k)]
            frames = [(0, out["frame_scores"][b, : k * self.patches_per_window])] if self.frame_wise else []
            results.append(self._result(rows, frames, len(c)))
        return results

    def _result(self, window_rows, frame_rows, samples: int) -> dict:
        sr = self.sample_rate
        stack = np.stack([s for _, s in window_rows])
        how = self.metadata.get("aggregate") or ("mean" if self.task == "multiclass" else "max")
        result = {"scores": stack.mean(0) if how == "mean" else stack.max(0), "duration": samples / sr,
                  "windows": [(a / sr, min(a + self.window_samples, samples) / sr, s) for a, s in window_rows]}
        if self.frame_wise:
            times, scores = frame_times(frame_rows, self.hop_samples, self.patches_per_window, self.patch_seconds, sr)
            keep = times < samples / sr  # patches that only cover the last window's padding
            result["frames"] = (times[keep], scores[keep])
            result["events"] = decode_events(times[keep], scores[keep], self.labels)
        return result


def frame_times(frame_rows, hop: int, per_window: int, patch_seconds: float, sr: int):
    """(start time of every patch [N], scores [N, C]) from the blocks' frame_scores [n * P, C]."""
    times, scores = [], []
    for offset, fs in frame_rows:
        i = np.arange(len(fs))
        P = per_window or len(fs)
        times.append((offset + (i // P) * hop) / sr + (i % P) * patch_seconds)
        scores.append(fs)
    return np.concatenate(times), np.concatenate(scores)


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


# ----------------------------------------------------------------------------------- reading files

def read_blocks(source, sample_rate: int, block: int) -> tuple[Iterator[np.ndarray], float]:
    """(iterator of mono float32 pieces at `sample_rate`, duration in seconds) without holding the file:
    soundfile reads about `block` samples' worth of it at a time, soxr resamples them as a stream (the same
    samples as bat.audio.load_audio's one-shot resampling). `source`: a path, or a file-like object such as
    a request's body (io.BytesIO). A file that is short at both rates is read whole, by load_audio."""
    import soundfile as sf

    named = isinstance(source, (str, os.PathLike))
    name = str(source) if named else "the audio"
    if named:
        check_regular_file(source)
    try:
        info = sf.info(source)
    except Exception as e:  # noqa: BLE001 - libsndfile's messages mislead (a missing file: "System error")
        raise decode_error(source, e) if named else AudioError(name, f"cannot decode ({error_line(e)})") from None
    if info.frames <= 0:
        raise AudioError(name, "empty (0 samples)")
    target = int(np.ceil(info.frames * (float(sample_rate) / info.samplerate)))  # librosa's length rule
    if named and info.frames <= block and target <= block:  # (a 1-Hz header makes 5,000 frames 80 M samples)
        clip = load_audio(source, sample_rate)
        return iter([clip]), len(clip) / sample_rate
    return _pieces(source, name, info, sample_rate, block, target), target / sample_rate


def _pieces(source, name, info, sample_rate, block, target):
    """read_blocks' stream: file frames in steps of about `block` output samples, mono, resampled, cut or
    zero-padded to `target` samples (librosa's length, as load_audio)."""
    import soundfile as sf
    import soxr

    stream = None if info.samplerate == sample_rate else soxr.ResampleStream(
        info.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
    step, produced = max(1, block * info.samplerate // sample_rate), 0
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)  # sf.info read its header
    with sf.SoundFile(source) as f:
        while True:
            try:
                data = f.read(step, dtype="float32", always_2d=True)
            except Exception as e:  # noqa: BLE001 - a file corrupt past its header
                raise AudioError(name, f"cannot decode ({error_line(e)})") from None
            last = len(data) < step or f.tell() >= info.frames
            if data.size:
                check_samples(data, name)
            y = data.mean(axis=1, dtype=np.float32)
            if stream is not None:
                y = stream.resample_chunk(y, last=last)
            y = y[: max(0, target - produced)]
            produced += len(y)
            if last and produced < target:  # soxr's tail can be a few samples short: librosa pads
                y = np.concatenate([y, np.zeros(target - produced, np.float32)])
                produced = target
            yield y
            if last:
                return
