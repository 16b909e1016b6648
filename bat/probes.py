"""A probe: an encoder with a head (bat.heads), and its file.

`Probe` is encoder + head (+ the front-end config, labels and task); `save_probe` / `load_probe` write
and read it as one safetensors file with JSON metadata. finetune.py saves its fine-tuned model the same
way with an `lp` head, so `bat.load_probe` opens both.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from bat.heads import HEADS, Features, Head, mix_normalised


class Probe(nn.Module):
    """A frozen (or fine-tuned) encoder with a head: probe(spec (B, 1, T, 128)) -> logits.

    Attributes: .encoder, .head, .frontend (a bat.frontend.Frontend: waveform -> spec), .labels,
    .task ("multiclass" | "multilabel"), .kind (head type), .clip_samples (the training clip length in
    samples, when the file stores it).

    `predict(waveform)` scores inputs of any length as windows of the training clip (bat.windows); the
    exported ONNX graph (export.py) runs this same code."""

    def __init__(self, encoder, head, frontend, labels, task, clip_samples=None):
        super().__init__()
        self.encoder, self.head, self.frontend = encoder, head, frontend
        self.labels, self.task, self.kind = list(labels), task, head.kind
        self.clip_samples = None if clip_samples is None else int(clip_samples)
        if self.frame_wise:  # SED probes score whole recordings (bat.sed): their front-end never crops
            frontend.target_frames = None

    def features(self, spec):
        return self.head.features(self.encoder, spec)

    def forward(self, spec):
        return self.head(self.features(spec))

    @property
    def frame_wise(self) -> bool:
        """Heads whose logits keep the time axis (B, T', C): sound event detection."""
        return bool(getattr(self.head, "frame_wise", False)) or getattr(self.head, "mode", "cls") == "frame"

    def window_samples(self) -> int:
        """W: the training clip in samples (at frontend.sample_rate) when stored, else the longest clip that fills the training
        spectrogram (target_frames) without cropping; without either, one encoder chunk (1024 frames,
        10.24 s: REF's AudioSet geometry). Frame-wise heads take no windows (see windowed())."""
        if self.clip_samples:
            return self.clip_samples
        frames = self.frontend.target_frames or self.encoder.cfg.chunk_patches * 16
        return (frames - 1) * self.frontend.hop

    def default_hop(self) -> int:
        """W / 2."""
        return self.window_samples() // 2

    def windowed(self, waveform, lengths=None, hop=None, aggregate=None, export=False) -> dict:
        """Waveforms [B, S] at frontend.sample_rate (rows zero-padded to S; `lengths` = valid samples per row) -> dict:
        scores [B, C], window_scores [B, n, C], valid [B, n] (windows inside each clip), embedding [B, D]
        (mean over valid windows of the gate-weighted mix of the layers' L2-normalised CLS, or the last
        CLS without a gate), and for frame-wise heads frame_scores [B, T', C].
        Every window has the same, fixed number of frames, so the encoder's branches on the input length
        are static here: torch.export traces this very code with only the batch axis dynamic.

        Frame-wise (SED) heads score the input whole, as bat.sed trains and evaluates them: one
        spectrogram normalised over the whole recording, encoded in 10.24-s chunks (export=True: the
        encoder's branch-free path), n = 1 window, frame_scores one row per time patch (0.16 s)."""
        from bat.windows import aggregate as pool_windows, cut_windows, default_aggregate, lengths_or_full

        h = self.head
        if self.frame_wise:
            spec, valid = self._whole_input(waveform, lengths), None
            B, n = spec.shape[0], 1
        else:
            W, hop = self.window_samples(), hop or self.default_hop()
            windows, valid = cut_windows(waveform, lengths_or_full(waveform, lengths), W, hop)
            B, n = valid.shape
            spec = self.frontend(windows.reshape(B * n, W))
        spec = spec.to(next(self.encoder.parameters()).dtype)  # float16 exports: the front-end stays float32
        if type(h).features is Head.features:  # one encoder pass serves the head and the embedding
            layers = self.encoder.forward_layers(spec, export=export)  # (L, B * n, 1 + N, D)
            f = Features.from_layers(layers, h.all_layers, h.reads_cls, h.reads_tokens)
            cls = layers[:, :, 0]
        else:  # heads that run the encoder themselves (VQT's query tokens)
            f = h.features(self.encoder, spec, export=export)
            cls = f.cls
        logits = h(f).float()
        probs = logits.softmax(-1) if self.task == "multiclass" else logits.sigmoid()
        out = {"logits": logits}  # not a graph output: the scale of the export check's tolerance (bat.parity)
        if self.frame_wise:  # (B, T', C): the recording's score is its best patch
            out["frame_scores"] = probs
            probs = probs.amax(1)
            valid = torch.ones(B, 1, dtype=torch.bool, device=probs.device)
        window_scores = probs.reshape(B, n, -1)
        gate = h.gate_weights()
        emb = (cls[-1] if gate is None else mix_normalised(cls, gate)).float().reshape(B, n, -1)
        out.update(scores=pool_windows(window_scores, valid, aggregate or default_aggregate(self.task)),
                   window_scores=window_scores, valid=valid,
                   embedding=pool_windows(emb, valid, "mean"))
        return out

    def _whole_input(self, waveform, lengths=None):
        """[B, S] -> the spectrogram of each whole row, at least one time patch long (a shorter input is
        zero-padded after normalising, as bat.sed pads its training recordings). Rows of different lengths cannot share one
        normalisation: they are refused, not scored wrongly."""
        if lengths is not None and bool((torch.as_tensor(lengths).reshape(-1) < waveform.shape[1]).any()):
            raise ValueError("frame-wise (SED) probes score every recording whole: score recordings of "
                             "different lengths one at a time, not as a zero-padded batch")
        spec = self.frontend(waveform)
        # max(T, 16) - T, not max(0, 16 - T): the same amount, smaller symbolic sizes for torch.export (export.py)
        return F.pad(spec, (0, 0, 0, torch.sym_max(spec.shape[2], 16) - spec.shape[2]))

    @torch.no_grad()
    def predict(self, waveform, lengths=None, hop=None, aggregate=None, precision="fp32"):
        """Waveforms [B, S] (or [S]) at frontend.sample_rate -> probabilities [B, C] (softmax or sigmoid by task), any
        length: windows of the training clip every `hop` samples (default W / 2), aggregated by mean
        (multi-class) or max (multi-label) unless `aggregate` says. See bat.windows and windowed().
        precision: fp32 (what export.py checks against), bf16 (autocast), or auto (bf16 on CUDA and on CPUs
        with native bf16, bat.precision)."""
        from bat.precision import autocast

        if waveform.dim() == 1:
            waveform = waveform.unsqueeze(0)
        with autocast(waveform.device, precision):
            return self.windowed(waveform, lengths, hop, aggregate)["scores"].float()


def save_probe(path, probe, metadata=None, fmt="bat.probe"):
    """One safetensors file: `encoder.*` and `head.*` tensors; JSON metadata with the head type and
    config, labels, task, model and front-end config. Written atomically."""
    from bat.checkpoint import atomic_save_safetensors

    tensors = {f"encoder.{k}": v for k, v in probe.encoder.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in probe.head.state_dict().items()})
    meta = {"format": fmt, "probe": probe.kind, "head_config": probe.head.config(), "labels": probe.labels,
            "task": probe.task, "model_config": probe.encoder.cfg.to_dict(),
            "frontend_config": probe.frontend.config()}
    if probe.clip_samples:
        meta["clip_samples"] = probe.clip_samples
    meta.update(metadata or {})
    atomic_save_safetensors(tensors, path, meta)


def load_probe(path, device="cpu"):
    """A Probe (eval mode) from a probe.safetensors (probe_cgp.py) or model.safetensors (finetune.py)."""
    from bat.checkpoint import CheckpointError, build_encoder, load_state_strict, read_safetensors
    from bat.frontend import Frontend

    tensors, meta = read_safetensors(path)  # CheckpointError naming the file for a missing or bad file
    missing = [k for k in ("probe", "head_config", "labels", "task", "model_config", "frontend_config") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a probe or model file (metadata lacks {', '.join(missing)})")
    if meta["probe"] not in HEADS:
        raise CheckpointError(f"{path}: unknown probe type {meta['probe']!r}")
    encoder = build_encoder(meta["model_config"], path)
    load_state_strict(encoder, {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}, path)
    try:
        head = HEADS[meta["probe"]](**meta["head_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata 'head_config' does not describe a {meta['probe']} head ({e})") from None
    head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    result = head.load_state_dict(head_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: head tensors do not match (missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys})")
    frontend = Frontend.from_config(meta["frontend_config"])
    encoder.frontend_config = meta["frontend_config"]
    probe = Probe(encoder, head, frontend, meta["labels"], meta["task"], meta.get("clip_samples"))
    probe.metadata = meta
    return probe.to(device).eval()


def read_finished_run(run_dir, weights: str, fingerprint: str):
    """(Probe, metrics) of a run that completed in run_dir with these settings (metrics.json carries their
    fingerprint, beside the weights file), so an interrupted --fold all goes on after it; else None, also
    for an unreadable metrics.json (the run's own file, written again by training the run again)."""
    mpath, wpath = os.path.join(run_dir, "metrics.json"), os.path.join(run_dir, weights)
    if not (os.path.exists(mpath) and os.path.exists(wpath)):
        return None
    try:
        with open(mpath) as fh:
            metrics = json.load(fh)
    except (OSError, ValueError):  # unreadable (edited by hand, damaged): not a finished run
        return None
    if not isinstance(metrics, dict) or metrics.get("fingerprint") != fingerprint or "folds" in metrics:
        return None
    for key in ("fingerprint", "task"):  # added for the file: the model carries its task
        metrics.pop(key, None)
    return load_probe(wpath), metrics
