"""Audio loading: any file soundfile reads -> mono float32 at 16 kHz.

This module imports only numpy, soundfile and soxr (no torch) so that the ONNX
tagger, which ships without torch, can reuse it.

It reproduces what REF gets from `librosa.load(path, sr=16000, res_type="soxr_hq")`:
decode to float32, average the channels, resample with soxr, then fix the length
to ceil(N * sr / sr_native) exactly as librosa does. Bad files raise `AudioError`
(a ValueError) whose message is one line, "path: reason", so a data loader can
log it and skip the file.
"""
import os
import stat

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # the one sample rate of the project (REF's); a task may say another (bat.tasks)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")  # what a dataset folder lists
# The largest sample magnitude a file may hold. Audio lies in [-1, 1]; some float WAVs hold integer-scaled
# samples (int16: 32768, 24-bit: 8.4e6). A corrupt float file can hold anything: from ~1e13 (BEATs' front-end
# scales by 32768) or ~1e17 (BAT's) the power spectrum overflows float32 and losses or logits turn NaN without
# naming the file. 1e8 is ten times any integer scaling below 32 bits and 1e5 below the first overflow.
MAX_SAMPLE = 1e8


class AudioError(ValueError):
    """A file (or in-memory waveform) that cannot be used as audio."""

    def __init__(self, path, reason):
        self.path = None if path is None else str(path)
        self.reason = " ".join(str(reason).split())  # keep the message on one line
        super().__init__(f"{self.path or '<waveform>'}: {self.reason}")


def error_line(error: BaseException) -> str:
    """An error's message cut to its first line (libsndfile's own words where it has them), or its type's name."""
    text = str(getattr(error, "error_string", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def decode_error(path, error):
    """The AudioError for a file soundfile failed to open or read, with the true reason.

    libsndfile's own messages mislead: a missing file is "System error", an empty or corrupt .mp3
    "does not exist or is not a regular file". So the file system is asked first (missing, a folder,
    unreadable, 0 bytes); only a real file with bad contents gets libsndfile's word for it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return AudioError(path, "no such file")
    except OSError as e:
        return AudioError(path, f"cannot open ({e.strerror})")
    if stat.S_ISDIR(st.st_mode):
        return AudioError(path, "is a folder, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        return AudioError(path, "not a regular file (a pipe or device?)")
    if not os.access(path, os.R_OK):
        return AudioError(path, "cannot open (permission denied)")
    if st.st_size == 0:
        return AudioError(path, "empty file (0 bytes)")
    msg = error_line(error).rstrip(".") if error is not None else ""
    if "not a regular file" in msg or msg in ("System error", ""):  # libsndfile's words for bad contents
        msg = "unrecognised or corrupt data"
    return AudioError(path, f"cannot decode ({msg})")


def check_regular_file(path):
    """Raise decode_error's AudioError unless `path` is a regular file (or a link to one). Called before
    soundfile opens a path: libsndfile blocks forever opening a FIFO that has no writer."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return
    except OSError:
        pass  # decode_error asks again and names the reason (missing, permission denied, ...)
    raise decode_error(path, None)


def resample(y, sr_native, sr=SAMPLE_RATE, quality="HQ"):
    """librosa.resample(res_type="soxr_<quality>"): soxr, then fix length to ceil(N*sr/sr_native)."""
    y = np.asarray(y, dtype=np.float32)
    if sr_native == sr:
        return y
    y_hat = soxr.resample(y, sr_native, sr, quality=quality)
    # The same float expression as librosa, so the rounding of the target length agrees.
    n = int(np.ceil(y.shape[-1] * (float(sr) / sr_native)))
    if y_hat.shape[-1] >= n:
        return np.ascontiguousarray(y_hat[:n], dtype=np.float32)
    return np.pad(y_hat, (0, n - y_hat.shape[-1])).astype(np.float32)


def check_samples(data, path=None):
    """Raise AudioError unless every sample of the non-empty array `data` is finite and at most MAX_SAMPLE
    in magnitude. Call it before averaging and resampling: one NaN would smear over the whole clip."""
    peak = np.maximum(-data.min(), data.max())  # NaN when a sample is: min and max propagate it
    if not np.isfinite(peak):
        raise AudioError(path, "non-finite samples (NaN or Inf)")
    if peak > MAX_SAMPLE:
        raise AudioError(path, f"implausibly large samples (up to {float(peak):.3g}; audio stays below "
                               f"{MAX_SAMPLE:.0e}): corrupt float data?")


def bad_rows(x):
    """The clips (rows of a 2-D batch `x`) that check_samples would refuse, and why: (row indices, reason) of
    the first check some row fails, or None. For in-memory batches, whose errors name rows, not files."""
    x = np.asarray(x)
    if x.size == 0:
        return None
    peak = np.maximum(-x.min(axis=1), x.max(axis=1))
    for bad, what in ((~np.isfinite(peak), "non-finite samples (NaN or Inf)"),
                      (peak > MAX_SAMPLE, f"implausibly large samples (beyond {MAX_SAMPLE:.0e})")):
        if bad.any():
            return np.flatnonzero(bad), what
    return None


def check_waveform(x, path=None):
    """Validate an in-memory waveform: float, [samples] or [channels, samples], non-empty, finite and
    not implausibly large (check_samples). Returns a mono float32 1-D array (channels averaged)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioError(path, f"expected floating-point samples, got {x.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=0, dtype=np.float32)  # [channels, samples] -> mono
    if x.ndim != 1:
        raise AudioError(path, f"expected shape [samples] or [channels, samples], got {tuple(x.shape)}")
    x = x.astype(np.float32, copy=False)
    if x.size == 0:
        raise AudioError(path, "empty (0 samples)")
    check_samples(x, path)
    return x


def load_audio(path, sample_rate=SAMPLE_RATE, quality="HQ"):
    """Read wav/flac/ogg/mp3/aiff (anything soundfile reads) -> mono float32 1-D at `sample_rate`.

    quality: soxr quality, "HQ" (REF's AudioSet path) or "VHQ" (REF's ESC-50 and
    Speech Commands paths); "soxr_hq"/"soxr_vhq" also work. Silence is valid.
    Raises AudioError for files that cannot be decoded, are empty or contain NaN/Inf or implausibly large
    samples (see MAX_SAMPLE).
    """
    check_regular_file(path)
    try:
        data, sr_native = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt/truncated/unknown files in many ways
        raise decode_error(path, e) from e
    if data.size == 0:
        raise AudioError(path, "empty (0 samples)")
    check_samples(data, path)
    y = data.mean(axis=1, dtype=np.float32)  # librosa.to_mono: plain channel average
    y = resample(y, sr_native, sample_rate, quality)
    if y.size == 0:
        raise AudioError(path, "zero length after decoding")
    return y
