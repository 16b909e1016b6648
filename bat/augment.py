"""Fine-tuning augmentations as batched tensor ops on the training device.

Each function takes a whole batch and draws its random numbers per example on the batch's device, so
nothing loops over examples in Python and nothing moves to the CPU. They follow REF's
`data/augmentations.py` and `DataTransforms`; where this file differs from REF it says so and why.

Order used by finetune.py (REF's order):
    waveform [B, S]:       random_gain -> coloured_noise
    front-end              -> spectrogram [B, 1, T, 128]
    spectrogram:           time_roll -> (pad to the task's frame count) -> mixup -> spec_augment

Random numbers come from the global RNG of the batch's device, whose state finetune.py saves in its
training checkpoints, so a resumed run draws the same augmentations as an uninterrupted one. coloured_noise
also takes a generator of its own: bat.sed's data loader draws a recording's noise from one keyed on its
place in the stream of batches, which no loader worker's global RNG is.
"""

from __future__ import annotations

import torch


def _uniform(shape, lo, hi, ref: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(shape, device=ref.device, dtype=torch.float32, generator=generator) * (hi - lo) + lo


def _beta(shape, a: float, b: float, ref: torch.Tensor) -> torch.Tensor:
    """Beta(a, b) samples drawn on ref's device (the device's global RNG)."""
    conc = [torch.tensor(float(c), device=ref.device) for c in (a, b)]
    return torch.distributions.Beta(*conc).sample(shape)


# ----------------------------------------------------------------------------------- waveform


def valid_mask(lengths: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """[B, S] float mask of the samples that belong to each clip (1) rather than batch padding (0)."""
    if lengths is None:
        return torch.ones_like(x)
    lengths = torch.as_tensor(lengths, device=x.device).reshape(-1, 1)
    return (torch.arange(x.shape[1], device=x.device) < lengths).to(x.dtype)


def random_gain(x: torch.Tensor) -> torch.Tensor:
    """Scale each waveform by 0.5 + Beta(10, 10) (REF): a factor in (0.5, 1.5) with mean 1 and standard
    deviation 0.11, i.e. typically within +-1 dB.

    Note: the BAT front-end is invariant to gain (its dB floor is relative to each clip's maximum and
    it min-max normalises), so this only changes anything for the Kaldi front-ends of EAT/SSLAM/BEATs,
    whose dataset normalisation is absolute. REF leaves it off for every task.
    """
    return x * (_beta((x.shape[0], 1), 10.0, 10.0, x).to(x.dtype) + 0.5)


def coloured_noise(x: torch.Tensor, p: float = 0.3, exponent=(-2.0, 2.0), snr_db=(5.0, 25.0),
                   lengths: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add power-law noise (power spectrum ~ 1/f^e, e ~ U(exponent)) at an SNR ~ U(snr_db) dB to a
    fraction p of the waveforms in a batch [B, S]. e = 0 is white, 1 pink, 2 brown, -1 blue, -2 violet.

    As REF: white Gaussian noise is shaped in the rFFT domain by 1/k^(e/2) for bin k = 1, 2, ... (the
    amplitude is the square root of the power law), scaled to unit RMS, then to rms(x) / 10^(snr/20),
    so the SNR is exact per clip, not only on average. Unlike REF, with `lengths` (valid samples per
    row of a zero-padded batch) the RMS of the clip and of the noise are measured over the clip only
    and the padding stays silent: otherwise a short clip padded to a long batch would get noise
    scaled to its diluted RMS spread over seconds of padding.

    The draws come from `generator` (on x's device; None: the device's global RNG).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"coloured noise probability must be in [0, 1], got {p}")
    B, S = x.shape
    work = x.float()
    valid = valid_mask(lengths, work)
    n_valid = valid.sum(dim=1, keepdim=True).clamp(min=1)
    e = _uniform((B, 1), *exponent, work, generator)
    snr = _uniform((B, 1), *snr_db, work, generator)
    apply = (torch.rand((B, 1), device=x.device, generator=generator) < p).float()
    white = torch.randn((B, S), device=x.device, generator=generator)
    spec = torch.fft.rfft(white, dim=1)
    k = torch.arange(1, spec.shape[1] + 1, device=x.device, dtype=torch.float32)
    noise = torch.fft.irfft(spec * k.pow(-e / 2.0), n=S, dim=1) * valid
    noise = noise / (noise.square().sum(dim=1, keepdim=True) / n_valid).sqrt().clamp(min=1e-8)
    clean_rms = ((work.square() * valid).sum(dim=1, keepdim=True) / n_valid).sqrt()
    amp = clean_rms / 10.0 ** (snr / 20.0) * apply
    return (work + amp * noise).to(x.dtype)


# -------------------------------------------------------------------------------- spectrogram


def time_roll(spec: torch.Tensor, per_clip: bool = True) -> torch.Tensor:
    """Circularly roll spectrograms [B, 1, T, F] in time, out[t] = in[t - shift].

    REF's BAT transforms roll the whole batch by one shift, random.randint(0, T) (per_clip=False); its
    EAT/SSLAM/BEATs loaders roll each clip's waveform by its own shift, which per_clip=True does on the
    frames. Apply it before padding to the task's frame count (as REF), so the roll wraps the clip
    itself and the padding stays at the end.
    """
    B, _, T, _ = spec.shape
    if not per_clip:
        return torch.roll(spec, int(torch.randint(0, T + 1, ())), dims=2)  # T + 1 values, as randint(0, T)
    shift = torch.randint(0, T, (B, 1), device=spec.device)
    idx = (torch.arange(T, device=spec.device) - shift) % T
    return torch.gather(spec, 2, idx[:, None, :, None].expand_as(spec))


def mixup(x: torch.Tensor, y: torch.Tensor, p: float = 0.9, beta: float = 0.8):
    """Mix each example with its partner in the reversed batch: x' = (1 - a) x + a x[::-1] with
    a ~ Beta(beta, beta) for a fraction p of the examples (a = 0 otherwise); soft labels likewise
    (y: [B, C] multi-hot or one-hot floats), clamped to [0, 1]. Returns (x', y', a).

    Pairing with the reversed batch (REF) needs no permutation and keeps the draw per example; as
    the pairs are symmetric, example i and B-1-i share the same two sources with weights a_i, a_{B-1-i}.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mixup probability must be in [0, 1], got {p}")
    if not y.is_floating_point():
        raise ValueError("mixup needs float label vectors [B, C] (one-hot or multi-hot), got integer labels")
    B = x.shape[0]
    a = _beta((B,), beta, beta, x)
    a = a * (torch.rand(B, device=x.device) < p).float()
    ax = a.reshape(B, *([1] * (x.ndim - 1))).to(x.dtype)
    ay = a.reshape(B, *([1] * (y.ndim - 1))).to(y.dtype)
    x = (1 - ax) * x + ax * x.flip(0)
    y = ((1 - ay) * y + ay * y.flip(0)).clamp(0.0, 1.0)
    return x, y, a


def _axis_masks(B: int, size: int, width: int, repeats: int, device) -> torch.Tensor:
    """[B, size] bool: union of `repeats` bands per example, torchaudio's mask_along_axis_iid rule:
    w = U * width, s = U * (size - w), masked [floor(s), floor(s) + floor(w)) - so a band is 0 to
    width - 1 bins wide and lies inside the axis."""
    w = torch.rand(B, repeats, 1, device=device) * width
    s = torch.rand(B, repeats, 1, device=device) * (size - w)
    start = s.floor()
    pos = torch.arange(size, device=device, dtype=torch.float32)
    band = (pos >= start) & (pos < start + w.floor())
    return band.any(dim=1)


def spec_augment(spec: torch.Tensor, freq_width: int = 16, time_width: int = 64, repeats: int = 1) -> torch.Tensor:
    """SpecAugment on [B, 1, T, F]: `repeats` frequency bands of fewer than freq_width bins and `repeats`
    time bands of fewer than time_width frames, drawn independently per example, set to 0.

    0 is the value of silence and padding after the BAT front-end's min-max normalisation (REF's
    torchaudio masking also fills 0). Masks are a union, so REF's alternating freq/time application
    order does not matter.
    """
    B, _, T, F = spec.shape
    keep = torch.ones(B, 1, T, F, dtype=torch.bool, device=spec.device)
    if freq_width > 0 and repeats > 0:
        keep &= ~_axis_masks(B, F, freq_width, repeats, spec.device)[:, None, None, :]
    if time_width > 0 and repeats > 0:
        keep &= ~_axis_masks(B, T, time_width, repeats, spec.device)[:, None, :, None]
    return spec * keep.to(spec.dtype)
