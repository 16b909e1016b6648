"""Spectrogram front-ends in pure PyTorch: BAT's and the Kaldi one of EAT/SSLAM, as REF computes them.

- `spectrogram`: the BAT front-end (log-mel, per-example 80 dB floor, per-example min-max).
- `kaldi_fbank`: the legacy Kaldi fbank that EAT / SSLAM / BEATs checkpoints expect.
- `Frontend`: either one as an nn.Module whose config is plain JSON (stored in checkpoints).

Why not torchaudio: it has no CPU build matching the pinned torch, and plain tensor ops
(torch.stft, torch.fft.rfft, matmul, pad, gather) run batched on any device and export to
ONNX with `torch.onnx.export(dynamo=True)`. The filter banks below are built with the same
float32 operations as torchaudio, so the results agree with REF to float32 rounding.

Everything is batched: [B, samples] in, [B, 1, T, 128] out, no Python loop over examples.
"""
import math

import torch
import torch.nn.functional as F

from bat.audio import SAMPLE_RATE

N_MELS = 128

# BAT front-end (torchaudio.transforms.MelSpectrogram arguments used by REF)
N_FFT = 1024
HOP = 160
TOP_DB = 80.0

# Kaldi fbank (torchaudio.compliance.kaldi.fbank with REF's arguments)
KALDI_WIN = 400  # 25 ms
KALDI_HOP = 160  # 10 ms
KALDI_N_FFT = 512  # window zero-padded to the next power of two
KALDI_LOW_HZ = 20.0
PREEMPH = 0.97
BEATS_SCALE = 2.0**15  # BEATs feeds int16-scaled samples

# REF's LEGACY_STATS: (mean, std) of the log-mel per model family and dataset.
# SSLAM uses EAT's front-end and numbers.
LEGACY_STATS = {
    "eat": {
        "audioset": (-4.59864076, 4.357353477),
        "scv2": (-9.03415996, 4.57304508),
        "esc50": (-6.85408831, 5.39770323),
        "librispeech": (-7.32925959, 4.0610049),
        "birdset": (-8.5504812, 4.04533479),
        "dcase": (-10.68592022, 2.06164972),
    },
    "beats": {
        "audioset": (15.41663, 6.55582),
        "scv2": (11.42262215, 5.65233194),
        "esc50": (11.72161352, 10.60385933),
        "librispeech": (13.30096596, 4.97074609),
        "birdset": (11.82694931, 5.40055698),
        "dcase": (10.01597327, 3.07065857),
    },
}
LEGACY_STATS["sslam"] = LEGACY_STATS["eat"]
KINDS = ("bat", "eat", "sslam", "beats")


# ----------------------------------------------------------------------------
# filter banks and windows (built once, stored as buffers by Frontend)


def mel_filterbank(n_freqs=N_FFT // 2 + 1, n_mels=N_MELS, sample_rate=SAMPLE_RATE, f_min=0.0, f_max=8000.0):
    """HTK mel triangles, no normalisation: torchaudio.functional.melscale_fbanks(norm=None,
    mel_scale="htk"), same float32 operations. Returns [n_freqs, n_mels]."""
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.min(down, up), min=0.0)


def kaldi_mel_filterbank(n_mels=N_MELS, n_fft=KALDI_N_FFT, sample_rate=SAMPLE_RATE, low_freq=KALDI_LOW_HZ):
    """Kaldi mel triangles (mel = 1127 ln(1 + f/700)) up to Nyquist: kaldi.get_mel_banks
    without VTLN, same float32 operations, plus the zero row for the Nyquist bin that
    kaldi.fbank appends. Returns [n_fft // 2 + 1, n_mels]."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
    lo, hi = mel(low_freq), mel(0.5 * sample_rate)
    delta = (hi - lo) / (n_mels + 1)
    b = torch.arange(n_mels).unsqueeze(1)
    left, center, right = lo + b * delta, lo + (b + 1.0) * delta, lo + (b + 2.0) * delta
    fft_mel = 1127.0 * (1.0 + (sample_rate / n_fft) * torch.arange(n_fft / 2) / 700.0).log()
    fft_mel = fft_mel.unsqueeze(0)
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))  # [n_mels, n_fft // 2]
    return F.pad(banks, (0, 1)).T.contiguous()


def kaldi_window(style, length=KALDI_WIN):
    """Symmetric Hann ("hanning", EAT/SSLAM) or Povey = Hann^0.85 (BEATs), 25 ms (400 samples at 16 kHz)."""
    w = torch.hann_window(length, periodic=False)
    return w.pow(0.85) if style == "beats" else w


def legacy_stats(style, dataset):
    """(mean, std) for `style` on `dataset` (a name in LEGACY_STATS or a (mean, std) pair)."""
    if isinstance(dataset, str):
        try:
            return LEGACY_STATS[style][dataset.lower()]
        except KeyError:
            raise ValueError(f"unknown dataset {dataset!r} for {style}; "
                             f"one of {sorted(LEGACY_STATS[style])} or a (mean, std) pair") from None
    mean, std = dataset
    return float(mean), float(std)


# ----------------------------------------------------------------------------
# the two front-ends, written against explicit window / filter-bank tensors


def _as_batch(waveform):
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.dim() != 2:
        raise ValueError(f"expected a waveform [B, samples] or [samples], got {tuple(waveform.shape)}")
    if not waveform.is_floating_point():  # int16 PCM would need scaling: refuse, don't guess
        raise ValueError(f"expected a floating-point waveform, got {waveform.dtype}")
    return waveform


def fix_frames(spec, target_frames):
    """Zero-pad or crop [B, 1, T, F] to target_frames in time. One F.pad call does both
    (a negative amount crops), which is REF's call and exports to ONNX without a branch."""
    if target_frames is None:
        return spec
    return F.pad(spec, (0, 0, 0, target_frames - spec.shape[2]))


def dft_basis(window, n_fft):
    """[len(window), 2 * (n_fft // 2 + 1)]: the windowed real DFT as one matrix, cosines then sines.
    frames @ basis gives the real and imaginary parts of rfft(frames * window, n=n_fft) (a window
    shorter than n_fft is zero-padded, as rfft pads). Built in float64, stored in float32."""
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    n = torch.arange(len(window), dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(n, k).remainder(n_fft) / n_fft  # remainder: exact phase for large n*k
    w = window.to(torch.float64).unsqueeze(1)
    return torch.cat([w * torch.cos(angle), -w * torch.sin(angle)], dim=1).float()


class MatmulDFT(torch.nn.Module):
    """|rfft(frames * window, n=n_fft)|^2 from matrix products only: no FFT/STFT/DFT op, so every ONNX
    execution provider runs it on its own device (onnxruntime's CUDA provider has no DFT kernel).

    A power-of-two n_fft takes one Cooley-Tukey step: n_fft = a * b (a ~ b ~ sqrt(n_fft)), sample
    n = b * n1 + n2, bin k = k1 + a * k2. Stage 1 is a DFT of size a over n1 for each n2, with the window
    and the twiddle factors exp(-2 pi i n2 k1 / n_fft) folded into its b matrices; stage 2 a DFT of size
    b over n2, of which only the bins up to n_fft / 2 are computed. For n_fft 1024 that is ~0.27 MFLOP per
    frame instead of the 2.3 of one [n_fft, n_fft + 2] basis: the front-end took ~16 % of a tiny
    tagger's time in onnxruntime, and this halves its wall time there. Other sizes use that basis.
    Constants are built in float64 and stored in float32; both stay within float32 rounding of the FFT."""

    def __init__(self, window, n_fft):
        super().__init__()
        self.n_fft, self.size = int(n_fft), len(window)
        self.a = 2 ** (int(math.log2(n_fft)) // 2) if n_fft >= 4 and n_fft & (n_fft - 1) == 0 else None
        if self.a is None:
            self.register_buffer("basis", dft_basis(window, n_fft), persistent=False)
            return
        a, b = self.a, n_fft // self.a
        n1 = torch.arange(a, dtype=torch.float64)
        n2 = torch.arange(b, dtype=torch.float64)
        # stage 1, [b (n2), a (n1), 2a (re | im of k1)]: window * exp(-2 pi i (n1 k1 / a + n2 k1 / n_fft))
        angle = 2 * math.pi * (torch.outer(n1, n1) / a + torch.outer(n2, n1).unsqueeze(1) / n_fft)
        w = F.pad(window.to(torch.float64), (0, n_fft - len(window))).reshape(a, b).T.unsqueeze(2)
        self.register_buffer("basis_stage1", torch.cat([w * angle.cos(), -w * angle.sin()], 2).float(),
                             persistent=False)
        # stage 2, [2 (b/2 + 1) (cos | -sin of k2), b (n2)]: the left factor of one wide matmul
        angle = 2 * math.pi * torch.outer(torch.arange(b // 2 + 1, dtype=torch.float64), n2) / b
        self.register_buffer("basis_stage2", torch.cat([angle.cos(), -angle.sin()], 0).float(), persistent=False)

    def forward(self, frames):
        """frames [B, T, len(window)] -> power [B, T, n_fft // 2 + 1]."""
        if self.a is None:
            return power_of(frames @ self.basis.to(frames.dtype))
        (B, T, _), a, b = frames.shape, self.a, self.n_fft // self.a
        x = F.pad(frames, (0, self.n_fft - self.size)) if self.size < self.n_fft else frames
        x = x.reshape(B * T, a, b).permute(2, 0, 1)  # [n2, frame, n1]
        y = (x @ self.basis_stage1.to(x.dtype)).reshape(b, B * T * 2 * a)  # [n2, (frame, re | im, k1)]
        z = (self.basis_stage2.to(x.dtype) @ y).reshape(2, b // 2 + 1, B * T, 2, a)  # [cos | sin, k2, frame, ., k1]
        re = z[0, :, :, 0] - z[1, :, :, 1]  # complex product (y_re + i y_im)(cos - i sin), real part
        im = z[1, :, :, 0] + z[0, :, :, 1]
        power = (re * re + im * im).transpose(0, 1).reshape(B, T, (b // 2 + 1) * a)  # bin k1 + a k2 at a k2 + k1
        return power[..., : self.n_fft // 2 + 1]


def hop_frames(x, size, hop, n_frames):
    """[B, S] -> frames [B, n_frames, size], frame t = x[t hop : t hop + size] (zero beyond the end). x is cut
    into whole hops and frame t is hops t .. t + r - 1 (r = ceil(size / hop)): slices and one concat
    instead of a gather over an index grid, much faster in onnxruntime."""
    r = -(-size // hop)
    x = F.pad(x, (0, (n_frames - 1 + r) * hop - x.shape[-1]))  # a negative amount crops unused samples
    hops = x.reshape(x.shape[0], n_frames - 1 + r, hop)
    last = size - (r - 1) * hop  # samples the last hop adds (cut there, not after the concat: one copy less)
    return torch.cat([hops[:, j:j + n_frames] for j in range(r - 1)] + [hops[:, r - 1:r - 1 + n_frames, :last]], dim=-1)


def power_of(z):
    """[..., 2F] (real parts, then imaginary parts) -> [..., F] squared magnitudes."""
    re, im = z.chunk(2, dim=-1)
    return re * re + im * im


def bat_spectrogram(waveform, window, fbank, target_frames=None, hop=HOP, dft=None):
    """[B, S] -> [B, 1, T, n_mels] with T = 1 + S // hop, values in [0, 1]; n_fft = len(window).
    With `dft` (a MatmulDFT of the window) the STFT is matrix products instead of torch.stft: the same
    numbers to float32 rounding."""
    x = _as_batch(waveform)
    n, n_fft = x.shape[-1], window.shape[0]
    if n <= n_fft // 2:  # reflect padding needs more than n_fft/2 samples: zero-extend, keep T
        x = F.pad(x, (0, n_fft // 2 + 1 - n))
    if dft is None:
        stft = torch.stft(x, n_fft, hop, n_fft, window.to(x.dtype), center=True, pad_mode="reflect",
                          return_complex=True)
        power = stft.abs().pow(2.0)[:, :, : 1 + n // hop].transpose(1, 2)  # [B, T, n_fft/2 + 1]
    else:  # center=True: reflect-pad n_fft/2 on both sides, frames every hop samples
        padded = F.pad(x.unsqueeze(1), (n_fft // 2, n_fft // 2), mode="reflect").squeeze(1)
        power = dft(hop_frames(padded, n_fft, hop, 1 + n // hop))
    mel = power @ fbank.to(x.dtype)  # [B, T, n_mels]
    db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    # The 80 dB floor is per example: REF's AmplitudeToDB sees a 4-D batch, and a batch-wide
    # floor would make one clip's features depend on the loudest clip it is batched with.
    db = torch.max(db, db.amax(dim=(1, 2), keepdim=True) - TOP_DB)
    lo, hi = db.amin(dim=(1, 2), keepdim=True), db.amax(dim=(1, 2), keepdim=True)
    # 1e-8 as a 1-element tensor, not a Python scalar: onnxscript's optimizer drops "x + c" for
    # scalar |c| <= 1e-8 (its "add 0" rule uses abs_tol=1e-8), and silence would become 0/0 = NaN.
    eps = torch.full((1,), 1e-8, dtype=db.dtype, device=db.device)
    spec = (db - lo) / (hi - lo + eps)  # silence: 0 / 1e-8 = 0, never NaN
    # Pad/crop only after normalising, as REF does: padded frames are exactly 0 and do not
    # take part in the min/max.
    return fix_frames(spec.unsqueeze(1), target_frames)


def _frames(x, size, hop):
    """Kaldi framing with snip_edges: only whole frames, [B, S] -> [B, 1 + (S - size) // hop, size].
    A gather with an index grid rather than Tensor.unfold: it exports to ONNX as one Gather."""
    n_frames = 1 + (x.shape[-1] - size) // hop
    idx = torch.arange(n_frames, device=x.device).unsqueeze(1) * hop + torch.arange(size, device=x.device)
    return x[:, idx]


def _remove_clip_mean(x, lengths=None):
    """EAT/SSLAM subtract each clip's mean first. REF does it before zero-padding the clip to
    the batch length, so with `lengths` the mean is over the valid samples and pads stay 0
    (on a short padded clip the difference is large: 0.26 on a 0.3 s clip in 1 s)."""
    if lengths is None:
        return x - x.mean(dim=1, keepdim=True)
    lengths = torch.as_tensor(lengths, device=x.device).reshape(-1, 1)
    valid = (torch.arange(x.shape[1], device=x.device) < lengths).to(x.dtype)
    mean = (x * valid).sum(dim=1, keepdim=True) / lengths.clamp(min=1).to(x.dtype)
    return (x - mean) * valid


def legacy_fbank(waveform, window, fbank, style, mean, std, target_frames=None, lengths=None, centred=False,
                 hop=KALDI_HOP, dft=None):
    """[B, S] -> [B, 1, 1 + (S - win) // hop, 128], REF's Kaldi fbank then (x - mean) / (2 std); win =
    len(window) (400 at 16 kHz), n_fft = 2 * (len(fbank) - 1) (512 at 16 kHz).
    centred=True: the clips' means were removed already (REF does it before padding or cutting a clip).
    With `dft` (a MatmulDFT of the window) the FFT is matrix products (see bat_spectrogram)."""
    win, n_fft = window.shape[0], 2 * (fbank.shape[0] - 1)
    x = _as_batch(waveform)
    if style == "beats":
        x = x * BEATS_SCALE
    elif not centred:
        x = _remove_clip_mean(x, lengths)
    if x.shape[-1] < win:  # shorter than one frame (Kaldi would return nothing): zero-extend
        x = F.pad(x, (0, win - x.shape[-1]))
    frames = _frames(x, win, hop)
    frames = frames - frames.mean(dim=-1, keepdim=True)  # per-frame DC removal
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # first sample replicated
    frames = frames - PREEMPH * prev
    if dft is None:
        power = torch.fft.rfft(frames * window.to(x.dtype), n=n_fft).abs().pow(2.0)  # zero-pads to n_fft
    else:
        power = dft(frames)
    mel = power @ fbank.to(x.dtype)
    eps = torch.finfo(torch.float32).eps  # Kaldi's floor, float32 eps even for float64 input
    logmel = torch.clamp(mel, min=eps).log()
    spec = (logmel - mean) / (2.0 * std)
    return fix_frames(spec.unsqueeze(1), target_frames)  # pad after normalising: pads are 0


# ----------------------------------------------------------------------------
# public API


def spectrogram(waveform, target_frames=None):
    """BAT front-end: float32 [B, samples] (or [samples]) at 16 kHz -> [B, 1, T, 128] in [0, 1].

    T = 1 + samples // 160; with target_frames the normalised spectrogram is zero-padded or
    cropped at the end to that many frames (REF: AudioSet 1024, ESC-50 512, SCV2 112).
    """
    x = _as_batch(waveform)
    window = torch.hann_window(N_FFT, device=x.device)
    return bat_spectrogram(x, window, mel_filterbank().to(x.device), target_frames)


def kaldi_fbank(waveform, style="eat", dataset="audioset", target_frames=None, lengths=None):
    """Legacy front-end for EAT / SSLAM / BEATs: [B, samples] at 16 kHz -> [B, 1, T, 128].

    T = 1 + (samples - 400) // 160. `dataset` names REF's statistics ("audioset", "esc50",
    "scv2", "librispeech", "birdset", "dcase") or is a (mean, std) pair. Padding/cropping
    as in `spectrogram`. EAT/SSLAM remove each clip's mean first; if rows are clips zero-padded
    to a common length, pass `lengths` (valid samples per row) so the mean is the clip's own,
    as in REF (or remove the means yourself before padding). BEATs ignores `lengths`.
    """
    style = _check_kind(style, legacy=True)
    x = _as_batch(waveform)
    mean, std = legacy_stats(style, dataset)
    window = kaldi_window(style).to(x.device)
    return legacy_fbank(x, window, kaldi_mel_filterbank().to(x.device), style, mean, std, target_frames, lengths)


def _check_kind(kind, legacy=False):
    kinds = KINDS[1:] if legacy else KINDS
    if kind not in kinds:
        raise ValueError(f"unknown front-end {kind!r}; one of {kinds}")
    return kind


def frame_geometry(kind, sample_rate, n_fft=None, hop=None):
    """(n_fft, hop) at a sample rate. BAT: REF scales both with the rate (16 kHz: 1024 / 160, BirdSet's
    32 kHz: 2048 / 320); Kaldi: 25 ms windows zero-padded to a power of two, 10 ms hop (REF's
    frame_length / frame_shift at every rate), so only the defaults are allowed."""
    if sample_rate <= 0 or sample_rate % 100:
        raise ValueError(f"sample_rate must be a positive multiple of 100 Hz, got {sample_rate}")
    if kind == "bat":
        n_fft, hop = n_fft or N_FFT * sample_rate // SAMPLE_RATE, hop or sample_rate // 100
        if n_fft < 2 or hop < 1:
            raise ValueError(f"n_fft and hop must be positive, got {n_fft}, {hop}")
        return int(n_fft), int(hop)
    win = sample_rate * 25 // 1000
    derived = (1 << (win - 1).bit_length(), sample_rate // 100)
    if (n_fft or derived[0], hop or derived[1]) != derived:
        raise ValueError(f"the {kind} front-end uses 25 ms windows (n_fft {derived[0]}) and a 10 ms hop "
                         f"({derived[1]}) at {sample_rate} Hz; got n_fft {n_fft}, hop {hop}")
    return derived


class Frontend(torch.nn.Module):
    """One front-end as a module: forward(waveform [B, S]) -> [B, 1, T, 128].

    Frontend("bat") is the BAT spectrogram; "eat" / "sslam" / "beats" the Kaldi fbank with
    `dataset` statistics. `sample_rate` is the rate of the waveform it takes (16 kHz unless a task
    says otherwise: REF's BirdSet HSN runs at 32 kHz with n_fft 2048, hop 320); the mel filters then
    reach that rate's Nyquist frequency. The configuration is JSON (config() / from_config()), so it
    is stored in checkpoint metadata instead of the buffers, which are non-persistent.

    use_matmul_dft() switches the FFT to a windowed-DFT matmul (export.py does this for the ONNX
    graph); the default torch.stft / torch.fft path stays the reference.
    """

    def __init__(self, kind="bat", target_frames=None, dataset="audioset", sample_rate=SAMPLE_RATE, n_fft=None,
                 hop=None):
        super().__init__()
        self.dft = None  # a MatmulDFT after use_matmul_dft()
        self.kind = _check_kind(kind)
        self.target_frames = None if target_frames is None else int(target_frames)
        self.sample_rate = int(sample_rate)
        self.n_fft, self.hop = frame_geometry(self.kind, self.sample_rate, n_fft, hop)
        if self.kind == "bat":
            self.dataset = None  # the BAT front-end needs no dataset statistics
            window = torch.hann_window(self.n_fft)
            fbank = mel_filterbank(self.n_fft // 2 + 1, sample_rate=self.sample_rate, f_max=self.sample_rate // 2)
        else:
            self.dataset = dataset if isinstance(dataset, str) else list(legacy_stats(kind, dataset))
            self.mean, self.std = legacy_stats(kind, dataset)
            window = kaldi_window(kind, self.sample_rate * 25 // 1000)
            fbank = kaldi_mel_filterbank(n_fft=self.n_fft, sample_rate=self.sample_rate)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("fbank", fbank, persistent=False)

    def use_matmul_dft(self):
        """Compute the spectrum with matrix products (MatmulDFT) from now on. Returns self."""
        n_fft = self.n_fft if self.kind == "bat" else 2 * (self.fbank.shape[0] - 1)
        self.dft = MatmulDFT(self.window.cpu(), n_fft).to(self.window.device)
        return self

    def forward(self, waveform, lengths=None, centred=False):
        """lengths: valid samples per row, used only by EAT/SSLAM's clip-mean removal (see
        kaldi_fbank); the BAT front-end treats zero padding as part of the clip, as REF does.
        centred=True: EAT/SSLAM skip the mean removal (the data loader removed each clip's own mean
        before cutting it to the task's length, as REF's loaders do)."""
        x = _as_batch(waveform)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if torch.is_autocast_enabled(x.device.type):
            # The dB floor and min-max stretch small errors: keep the front-end in float32.
            with torch.autocast(x.device.type, enabled=False):
                return self._features(x.float(), lengths, centred)
        return self._features(x, lengths, centred)

    def _features(self, x, lengths, centred=False):
        if self.kind == "bat":
            return bat_spectrogram(x, self.window, self.fbank, self.target_frames, self.hop, self.dft)
        return legacy_fbank(x, self.window, self.fbank, self.kind, self.mean, self.std,
                            self.target_frames, lengths, centred, self.hop, self.dft)

    def config(self):
        cfg = {"kind": self.kind, "target_frames": self.target_frames}
        if self.kind != "bat":
            cfg["dataset"] = self.dataset
        cfg.update(sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop)
        return cfg

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())
