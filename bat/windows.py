"""Windowed scoring: how a model trained on clips of W samples scores an input of any length.

One definition, used by `Probe.predict` and by the exported ONNX graph alike:
- the input is cut into windows of exactly W samples starting every `hop` samples (0, hop, 2 hop, ...)
  until the input is covered; a window that runs past the end is zero-padded, exactly as training pads
  a short clip (bat.data.fit_length), and an input no longer than W is one zero-padded window;
- every window is scored on its own (front-end, encoder, head): `window_scores` [B, windows, C];
- `scores` [B, C] aggregates the windows: the mean (the default for multi-class) or the max (the
  default for multi-label: "present somewhere in the recording").
A batch may hold clips of different lengths zero-padded to the longest; `lengths` (valid samples per
row) keeps each clip's result equal to the clip scored alone: samples past a row's length are zeroed
(as padding would be) and only the windows the clip alone would have enter the aggregate.

Everything is tensor arithmetic on symbolic sizes (no Python branch on the input length), so
torch.export keeps the batch and time axes dynamic in the ONNX graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATES = ("mean", "max")


def default_aggregate(task: str) -> str:
    return "mean" if task == "multiclass" else "max"


def num_windows(samples, window: int, hop: int):
    """1 + ceil(max(0, samples - window) / hop); works on Python ints and symbolic sizes."""
    extra = torch.sym_max(samples, window) - window  # = max(0, S - W), in the form torch.export keeps small
    return 1 + (extra + hop - 1) // hop


def cut_windows(waveform: torch.Tensor, lengths: torch.Tensor, window: int, hop: int):
    """waveform [B, S], lengths [B] (int) -> (windows [B, n, window], valid [B, n] bool).

    Slices of whole hops when the hop divides the window, else a gather with an index grid; not
    unfold, whose ONNX form fixes the shape."""
    B, S = waveform.shape
    n = num_windows(S, window, hop)
    total = (n - 1) * hop + window
    x = F.pad(waveform, (0, total - S))
    pos = torch.arange(total, device=x.device)
    x = x * (pos.unsqueeze(0) < lengths.unsqueeze(1)).to(x.dtype)  # past a clip's end: zeros, as padding
    starts = torch.arange(n, device=x.device) * hop
    if window % hop == 0:  # the default (hop = W / 2): windows are runs of whole hops, cheap slices
        r = window // hop
        hops = x.reshape(B, n - 1 + r, hop)  # total = (n - 1 + r) hops
        windows = torch.cat([hops[:, j:j + n] for j in range(r)], dim=2)  # window k = hops k .. k + r - 1
    else:
        windows = x[:, starts.unsqueeze(1) + torch.arange(window, device=x.device)]
    # The windows the clip alone would have (num_windows of its length): k = 0, or (k - 1) hop < L - W.
    valid = (starts.unsqueeze(0) < (lengths - window + hop).unsqueeze(1)) | (starts == 0).unsqueeze(0)
    return windows, valid


def aggregate(window_scores: torch.Tensor, valid: torch.Tensor, how: str) -> torch.Tensor:
    """[B, n, C] over the valid windows -> [B, C]: their mean or their max."""
    w = valid.unsqueeze(-1).to(window_scores.dtype)
    if how == "mean":
        return (window_scores * w).sum(1) / w.sum(1)
    if how == "max":  # scores are probabilities in [0, 1]: -1 never wins
        return torch.where(valid.unsqueeze(-1), window_scores, torch.full_like(window_scores, -1.0)).amax(1)
    raise ValueError(f"unknown aggregate {how!r}; one of {', '.join(AGGREGATES)}")


def lengths_or_full(waveform: torch.Tensor, lengths=None) -> torch.Tensor:
    """lengths as int64 [B]; None or a negative entry means the row's full length."""
    B, S = waveform.shape
    full = torch.full((B,), S, dtype=torch.int64, device=waveform.device)
    if lengths is None:
        return full
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=waveform.device).reshape(-1)
    return torch.where(lengths < 0, full, lengths.clamp(max=S))
