"""Export a probe, fine-tuned model or bare encoder to one ONNX file that runs without PyTorch.

    python export.py --checkpoint runs/cgp/probe.safetensors --out runs/cgp/tagger.onnx
    python export.py --checkpoint runs/pretrain/encoder.safetensors --out runs/pretrain/encoder.onnx
    python -m bat.tag runs/cgp/tagger.onnx clip.wav other.flac --top-k 3

The graph takes `waveform` float32 [batch, samples] (mono, at the front-end's rate, 16 kHz unless the
task says otherwise: 32 kHz for hsn; both axes dynamic) and, for probes, an optional `lengths` int64 [batch] (valid
samples per zero-padded row; default: every row is full). It holds the whole pipeline: front-end (BAT or
Kaldi, its DFT as matmuls), encoder, head.

Probes and fine-tuned models score any input as windows of their training clip W (bat.windows: every
--hop-seconds, default W/2, the last window zero-padded as in training), exactly as Probe.predict does:
  scores        [batch, classes]           windows pooled: mean (multiclass) or max (multilabel), --aggregate
  window_scores [batch, windows, classes]  softmax or sigmoid per window (window k starts at k * hop)
  embedding     [batch, D]                 mean over windows of the gate-weighted mix of the layers'
                                           L2-normalised CLS (CGP, LCGP), else of the last CLS
  frame_scores  [batch, patches, classes]  frame-wise (SED) heads only, one row per 0.16-s time patch
Frame-wise (SED) probes score the input whole, as they were trained and evaluated: one spectrogram
normalised over the whole recording, the encoder taking it in 10.24-s chunks; one window (window_samples
0 in the metadata, whole_input true), scores = the max over patches; no `lengths` input (each recording
is its own normalisation, so recordings of different lengths are scored one at a time).
Bare encoders encode the input whole (chunked at 10.24 s): embedding [batch, D] and layers [batch, L, D].

Metadata properties: labels, sample_rate, task, model_config, frontend_config, probe, head_config,
window_samples, hop_samples, aggregate, window_times, (whole_input, patch_seconds, patches_per_window), precision,
inputs, outputs, source. The resolved configuration goes next to the model under its name (tagger.onnx ->
tagger.json) and to DIR/config.json unless another run wrote that file (a probe folder's stays the
probe's). Then onnxruntime is compared with float32 PyTorch on demo
clips from 0.1 s to 60 s (batch 1, --batch-size, and a batch of mixed lengths): float32 graphs fail above
--tolerance, int8 / fp16 graphs below --min-agreement (top-1 agreement).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from bat import parity
from bat.audio import SAMPLE_RATE
from bat.checkpoint import CheckpointError, load_encoder, read_safetensors
from bat.demo import demo_clip
from bat.frontend import Frontend
from bat.model import PATCH
from bat.probes import Probe, load_probe
from bat.cpu import cpu_isa, isa_string
from bat.onnx_graph import (describe_int8, drop_softmax_nan_guards, fuse_graph, int8_scheme, optional_lengths,
                            quantize_int8, temp_path)
from bat.windows import default_aggregate

# The exporter warns about every torchvision op it cannot register; we use none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
# torch 2.13's own pytree code trips its LeafSpec deprecation inside torch.export; nothing for us to change.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*", category=UserWarning)


@dataclass
class Config:
    """Export a probe, fine-tuned model or bare encoder to one ONNX file (front-end, encoder and head in the
    graph) that runs with onnxruntime, without PyTorch; then check it against PyTorch."""

    checkpoint: str
    """probe.safetensors (probe_cgp.py), model.safetensors (finetune.py), encoder.safetensors
    (pretrain.py); also anything bat.load_encoder reads (REF/EAT checkpoints, random:tiny|small|base)"""
    out: str = "model.onnx"
    """the ONNX file; its resolved configuration goes next to it under the same name (.json)"""
    hop_seconds: float | None = None
    """hop between scoring windows (default: half the training window; frame-wise heads take no windows)"""
    aggregate: Literal["auto", "mean", "max"] = "auto"
    """how `scores` pools the windows' scores: auto = mean for multi-class, max for multi-label"""
    quantize: Literal["none", "int8"] = "none"
    """int8: dynamic int8 weights for the encoder's and head's matmuls (onnxruntime quantisation; CPU)"""
    int8_scheme: Literal["auto", "dynamic-8bit", "dynamic-7bit", "static-qdq"] = "auto"
    """auto: by this CPU's ISA (bat.cpu): 8-bit weights with VNNI/AMX or on ARM64, 7-bit (reduce_range) on
    x86 without VNNI, whose int16 sums saturate; static-qdq: weights and activations, calibrated on demo
    clips. The weights are fixed in the file: an 8-bit export run on a CPU without VNNI loses accuracy"""
    fp16: bool = False
    """float16 encoder and head (for the CUDA provider); the front-end stays float32"""
    min_agreement: float = 0.98
    """int8 / fp16: refuse when top-1 agreement with float32 PyTorch on the check clips is below this"""
    fuse: bool = True
    """store the graph after onnxruntime's own fusions (LayerNorm, GELU, MatMul+Add, ...), checked like
    the rest; --no-fuse keeps the plain exported graph"""
    allow_pickle: bool = False
    """allow pickled checkpoints (EAT/SSLAM fairseq .pt files); only for files you trust"""
    opset: int = 18
    """ONNX opset of the graph (18: what onnxruntime's fusions and int8 kernels are tested with here)"""
    seed: int = 0
    """seed of the demo clips used for the check (and of random:* encoders)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """onnxruntime provider for the check; the PyTorch reference always runs in float32 on the CPU"""
    check: bool = True
    """compare onnxruntime with PyTorch after writing (--no-check skips it)"""
    check_seconds: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 10.24, 10.4, 30.0, 60.0)
    """clip lengths of the check (10.4 s = 65 time patches: a second, ragged chunk)"""
    batch_size: int = 3
    """the check runs every length at batch 1 and at this batch size, plus one batch of mixed lengths"""
    tolerance: float | None = None
    """largest allowed absolute difference (float32 exports), any output, any length; default: derived
    per output from float32 rounding over the graph's depth and the output's scale (bat.parity)"""


MIN_SECONDS = 0.5
MAX_INLINE_BYTES = 2**31 - 2**27  # protobuf's 2 GB limit with room for the graph itself


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or a failed numerical check."""


# ------------------------------------------------------------------------------------- the graph

class Exported(nn.Module):
    """(waveform [B, S], lengths [B]) -> outputs, the whole pipeline as one module.

    With a head it is Probe.windowed (windows of the training clip, bat.windows): the graph and
    Probe.predict run the same code. Without one (a bare encoder) the input is encoded whole, long
    inputs chunked as Encoder.forward_layers does. `export=True` takes the encoder's branch-free path
    (what the graph holds); False is the plain eager path (the reference)."""

    def __init__(self, encoder, frontend_config: dict, probe: Probe | None = None, hop: int | None = None,
                 aggregate: str | None = None, export: bool = True):
        super().__init__()
        self.target_frames = frontend_config.get("target_frames") or 0
        self.frontend = Frontend.from_config({**frontend_config, "target_frames": None})
        self.min_samples = int(MIN_SECONDS * self.frontend.sample_rate)
        self.encoder, self.probe, self.export = encoder, probe, export
        if export:  # the graph computes the spectrum as a matmul: no STFT/DFT op, runs on every provider
            (probe.frontend if probe is not None else self.frontend).use_matmul_dft()
        whole = probe is None or probe.frame_wise  # no windows: the input is encoded whole
        self.hop = None if whole else hop or probe.default_hop()
        self.aggregate = aggregate or (default_aggregate(probe.task) if probe is not None else None)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None):
        out = self.outputs(waveform, lengths)
        return tuple(out[name] for name in self.output_names())

    def outputs(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        """Every output by name, plus the head's `logits` (the check's scale; not in the graph)."""
        if self.probe is not None:
            return self.probe.windowed(waveform, lengths, self.hop, self.aggregate, export=self.export)
        # Pad amounts as symbolic max(0, ...), not Python ifs: a branch on the length would freeze it.
        waveform = F.pad(waveform, (0, torch.sym_max(0, self.min_samples - waveform.shape[1])))
        spec = self.frontend(waveform)
        spec = F.pad(spec, (0, 0, 0, torch.sym_max(0, self.target_frames - spec.shape[2])))
        spec = spec.to(next(self.encoder.parameters()).dtype)  # float16 exports: the front-end stays float32
        cls = self.encoder.forward_layers(spec, export=self.export)[:, :, 0].float()  # (L, B, D)
        return {"embedding": cls[-1], "layers": cls.transpose(0, 1)}

    def output_names(self) -> list[str]:
        if self.probe is None:
            return ["embedding", "layers"]
        return ["scores", "window_scores", "embedding"] + (["frame_scores"] if self.probe.frame_wise else [])

    def input_names(self) -> list[str]:
        return ["waveform"] if self.probe is None or self.probe.frame_wise else ["waveform", "lengths"]

    def reference(self) -> "Exported":
        """The same model on PyTorch's eager path, float32, torch.stft front-end: what the graph is checked against."""
        if self.probe is None:
            return Exported(self.encoder, {**self.frontend.config(), "target_frames": self.target_frames or None},
                            export=False).eval()
        p = self.probe
        eager = Probe(p.encoder, p.head, Frontend.from_config(p.frontend.config()), p.labels, p.task, p.clip_samples)
        return Exported(p.encoder, p.frontend.config(), eager, self.hop, self.aggregate, export=False).eval()


def load_model(path: str, allow_pickle: bool = False, hop_seconds: float | None = None,
               aggregate: str = "auto") -> tuple[Exported, dict]:
    """(module, metadata) from a probe / model / encoder file. A probe is recognised by its metadata."""
    meta = {}
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        try:
            _, meta = read_safetensors(path)
        except Exception as e:  # noqa: BLE001 - truncated / not safetensors
            raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from None
    if meta.get("probe") == "asr":  # per-20 ms character log-probabilities and a decoder: not a tagger
        raise ExportError(f"{path}: an ASR probe (probe_cgp.py --task librispeech) cannot be exported as a tagger")
    if "probe" in meta:
        probe = load_probe(path)
        hop = None
        if hop_seconds is not None and probe.frame_wise:
            raise ExportError("--hop-seconds: a frame-wise (SED) probe scores the input whole, it has no windows")
        if hop_seconds is not None:
            hop = int(round(hop_seconds * probe.frontend.sample_rate))
            if hop <= 0:
                raise ExportError(f"--hop-seconds must be positive, got {hop_seconds}")
        model = Exported(probe.encoder, probe.frontend.config(), probe, hop, None if aggregate == "auto" else aggregate)
        info = {"labels": probe.labels, "task": probe.task, "probe": probe.kind,
                "head_config": probe.head.config(), "frontend_config": probe.frontend.config(),
                "window_samples": probe.window_samples(), "hop_samples": model.hop, "aggregate": model.aggregate,
                "frame_wise": probe.frame_wise}
        if probe.frame_wise:  # one window, the whole input: bat.tag reads it whole (window_samples 0)
            fe = probe.frontend
            info.update(window_samples=0, hop_samples=0, whole_input=True, patches_per_window=0,
                        patch_seconds=PATCH * fe.hop / fe.sample_rate)
    else:
        encoder = load_encoder(path, allow_pickle=allow_pickle)
        model = Exported(encoder, encoder.frontend_config)
        info = {"labels": [], "task": "embedding", "probe": "none", "head_config": None,
                "frontend_config": encoder.frontend_config,
                "window_samples": (model.target_frames or encoder.cfg.chunk_patches * PATCH) * model.frontend.hop}
    info["model_config"] = model.encoder.cfg.to_dict()
    info["sample_rate"] = model.frontend.sample_rate  # the front-end's (hsn: 32 kHz), not always 16 kHz
    info["min_samples"] = model.min_samples
    return model.eval().requires_grad_(False), info


# ------------------------------------------------------------------------------------ exporting

def export_onnx(model: Exported, path: str, opset: int, metadata: dict) -> None:
    """torch.export with dynamic batch and samples -> ONNX, metadata added, one file when < 2 GB."""
    import onnx

    # The example is longer than one window/chunk and batch > 1 so nothing is specialised to 0/1 sizes.
    example = torch.from_numpy(check_inputs(12.0, 2, 0, model.frontend.sample_rate))
    batch, samples = torch.export.Dim("batch", min=1), torch.export.Dim("samples", min=2)
    args, shapes = (example,), ({0: batch, 1: samples},)
    if "lengths" in model.input_names():
        args, shapes = (example, torch.full((2,), example.shape[1], dtype=torch.int64)), (*shapes, {0: batch})
    program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, verbose=False,
                                input_names=model.input_names(), output_names=model.output_names(),
                                dynamic_shapes=shapes, optimize=True)
    program.model.metadata_props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if nbytes > MAX_INLINE_BYTES:  # the .data file is named after the model file: write in place
        program.save(path, external_data=True)
    else:  # write and rename: an interrupted export never leaves a half-written model behind
        tmp = temp_path(path)
        program.save(tmp, external_data=False)
        proto = onnx.load(tmp)
        drop_softmax_nan_guards(proto)
        if "lengths" in model.input_names():
            optional_lengths(proto)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    onnx.checker.check_model(path, full_check=True)  # the path form also handles external data


def write_config(out: str, resolved: dict) -> str:
    """The resolved configuration, named after the model (tagger.onnx -> tagger.json), and as DIR/config.json
    like every script's, unless that file belongs to another run (a probe folder's config.json stays the
    probe's: an export never overwrites a file it did not write). Returns the model's .json path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    resolved = {**resolved, "written_by": "export.py"}
    path = out[: -len(".onnx")] + ".json"
    shared = os.path.join(os.path.dirname(os.path.abspath(out)), "config.json")
    try:
        with open(shared) as f:
            ours = json.load(f).get("written_by") == "export.py"
    except FileNotFoundError:
        ours = True
    except (OSError, ValueError, AttributeError):
        ours = False
    for p in ([path, shared] if ours else [path]):
        with open(p, "w") as f:
            json.dump(resolved, f, indent=2)
    if not ours:
        print(f"note: {shared} belongs to another run and is left as it is; this export's configuration is {path}")
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- checking

def check_inputs(seconds: float, batch: int, seed: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Demo clips (tones, chirps, noise bursts, ... over a noise floor): real-looking, not white noise,
    so the front-end's dB floor and min-max stretch see what they see in use."""
    return np.stack([demo_clip(i, seed=seed, seconds=seconds, sample_rate=sample_rate)[0] for i in range(batch)])


def ort_session(path: str, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda":  # TF32 off: the comparison is against float32 and would not hold 1e-4 otherwise
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No busy-waiting between runs: spinning ORT threads would steal the cores the PyTorch reference
    # runs on next and distort its timing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        print("note: the CUDA execution provider did not load; checking on the CPU")
    return sess


def mixed_batch(seconds, seed: int, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """Clips of the check's shortest, a middle and the longest length, zero-padded to the longest, with
    their lengths: each row must score as if it were alone."""
    picks = sorted({min(seconds), sorted(seconds)[len(seconds) // 2], max(seconds)})
    clips = [check_inputs(s, 1, seed + i, sample_rate)[0] for i, s in enumerate(picks)]
    n = max(len(c) for c in clips)
    return np.stack([np.pad(c, (0, n - len(c))) for c in clips]), np.array([len(c) for c in clips], np.int64)


def compare(path: str, model: Exported, seconds, batches, seed: int, device: str = "cpu") -> list[dict]:
    """ORT vs the eager float32 PyTorch path (Probe.predict's code with torch.stft; the encoder's usual
    branches) for every length and batch size, and one batch of mixed lengths. One row per run: the
    largest difference per output, top-1 agreement of the scores (clips and windows) and both timings."""
    sess = ort_session(path, device)
    reference = model.reference()
    names = model.output_names()
    budget = parity.graph_budget(model.encoder.cfg.to_dict(), model.frontend.n_fft)
    task = model.probe.task if model.probe is not None else None
    sr = model.frontend.sample_rate  # check clips at the model's own rate
    cases = [(s, b, check_inputs(s, b, seed, sr), None) for s in seconds for b in batches]
    if "lengths" in model.input_names():
        cases.append(("mixed", None, *mixed_batch(seconds, seed, sr)))
    sess.run(None, {"waveform": check_inputs(1.0, 1, seed, sr)})  # warm-up: first-run allocations
    rows = []
    for s, b, x, lengths in cases:
        feed = {"waveform": x} if lengths is None else {"waveform": x, "lengths": lengths}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = reference.outputs(torch.from_numpy(x), None if lengths is None else torch.from_numpy(lengths))
            out = {k: out[k].float().numpy() for k in [*names, "logits"] if k in out}
        t1 = time.perf_counter()
        got = sess.run(names, feed)
        t2 = time.perf_counter()
        ref = [out[name] for name in names]
        diffs, agree, total = {}, 0, 0
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise ExportError(f"{name}: onnxruntime shape {g.shape} != PyTorch {r.shape} at {s} s, batch {b}")
            diffs[name] = float(np.abs(r.astype(np.float64) - g).max()) if r.size else 0.0
            if name in ("scores", "window_scores"):
                agree += int((r.argmax(-1) == g.argmax(-1)).sum())
                total += r[..., 0].size
        rows.append({"seconds": s, "batch": b if b else len(x), "lengths": None if lengths is None else lengths.tolist(),
                     "max_abs_diff": diffs, "tolerance": parity.output_tolerances(out, budget, task),
                     "top1_agree": agree, "top1_total": total,
                     "torch_ms": 1e3 * (t1 - t0), "ort_ms": 1e3 * (t2 - t1)})
    return rows


def tolerance_share(diff: float, tol: float) -> float:
    """diff / tol; NaN and any difference where nothing is allowed are infinitely far."""
    if not diff == diff:
        return math.inf
    return diff / tol if tol > 0 else (0.0 if diff == 0 else math.inf)


def check_rows(rows: list[dict], tolerance: float | None, path: str, min_agreement: float | None = None) -> dict:
    """Print the comparison table. Float32 graphs must stay within `tolerance` (None: each row's own
    per-output tolerance from bat.parity); reduced-precision graphs (min_agreement set) must agree on the
    top-1 class at least that often. Returns the summary."""
    names = list(rows[0]["max_abs_diff"])
    print(f"{'seconds':>8} {'batch':>5} " + " ".join(f"{n:>13}" for n in names) + f" {'torch ms':>9} {'ort ms':>9}")
    for r in rows:
        sec = r["seconds"] if isinstance(r["seconds"], str) else f"{r['seconds']:.2f}"
        print(f"{sec:>8} {r['batch']:>5} " + " ".join(f"{r['max_abs_diff'][n]:>13.2e}" for n in names)
              + f" {r['torch_ms']:>9.1f} {r['ort_ms']:>9.1f}")
    worst = max(max(r["max_abs_diff"].values()) for r in rows)
    total = sum(r["top1_total"] for r in rows)
    agreement = sum(r["top1_agree"] for r in rows) / total if total else 1.0
    score_diff = max((r["max_abs_diff"].get("scores", 0.0) for r in rows), default=0.0)
    # Each difference as a share of its tolerance (> 1 fails; NaN counts as infinitely far).
    share, name, row = max(((tolerance_share(r["max_abs_diff"][n], tolerance if tolerance is not None
                                             else r["tolerance"][n]), n, r) for r in rows for n in names),
                           key=lambda t: t[0])
    print(f"largest difference onnxruntime vs float32 PyTorch: {worst:.3e} (scores {score_diff:.3e}; "
          f"at most {share:.2f} of its tolerance); top-1 agreement {agreement:.2%} over {total} clips and windows")
    summary = {"max_abs_diff": worst, "max_score_diff": score_diff, "top1_agreement": agreement,
               "tolerance_share": share}
    if min_agreement is None:
        if share > 1.0:
            tol = tolerance if tolerance is not None else row["tolerance"][name]
            raise ExportError(f"onnxruntime differs from PyTorch by {row['max_abs_diff'][name]:.3e} > tolerance "
                              f"{tol:.3g} ({name}, {row['seconds']} s, batch {row['batch']}); {path} is written "
                              f"but should not be trusted")
    elif not agreement >= min_agreement:
        raise ExportError(f"top-1 agreement with float32 PyTorch is {agreement:.2%} < --min-agreement "
                          f"{min_agreement:.2%}; {path} is written but should not be trusted")
    return summary


# ----------------------------------------------------------------------------------------- main

def main(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    if not cfg.out.endswith(".onnx"):
        raise ExportError(f"--out should name the .onnx file to write, got {cfg.out!r}")
    if cfg.fp16 and cfg.quantize != "none":
        raise ExportError("--fp16 and --quantize int8 exclude each other (int8 is for CPUs, fp16 for CUDA)")
    if not 0.0 <= cfg.min_agreement <= 1.0:
        raise ExportError(f"--min-agreement is a fraction in [0, 1], got {cfg.min_agreement}")
    model, info = load_model(cfg.checkpoint, cfg.allow_pickle, cfg.hop_seconds, cfg.aggregate)
    graph = model
    if cfg.fp16:  # a float16 copy of encoder and head; `model` stays the float32 reference
        graph = copy.deepcopy(model)
        graph.encoder.half()
        if graph.probe is not None:
            graph.probe.head.half()
    precision = "fp16" if cfg.fp16 else cfg.quantize if cfg.quantize != "none" else "fp32"
    metadata = {
        "format": "bat.onnx", "labels": info["labels"], "sample_rate": str(info["sample_rate"]), "task": info["task"],
        "model_config": info["model_config"], "frontend_config": info["frontend_config"], "probe": info["probe"],
        "head_config": info["head_config"], "min_samples": str(info["min_samples"]), "outputs": model.output_names(),
        "inputs": model.input_names(), "precision": precision, "source": os.path.basename(cfg.checkpoint),
        "source_sha256": file_sha256(cfg.checkpoint) if os.path.isfile(cfg.checkpoint) else "",
        **{k: info[k] if isinstance(info[k], str) else json.dumps(info[k]) for k in
           ("window_samples", "hop_samples", "aggregate", "frame_wise", "whole_input", "patch_seconds",
            "patches_per_window")
           if k in info},
    }
    if cfg.quantize == "int8":  # the scheme and the ISA it was chosen for go into the metadata
        scheme, why = int8_scheme(cpu_isa()) if cfg.int8_scheme == "auto" else (cfg.int8_scheme, "--int8-scheme")
        metadata.update(int8_scheme=scheme, int8_isa=isa_string())
    if info.get("hop_samples"):  # window k covers [k hop, k hop + window) samples
        metadata["window_times"] = "start = k * hop_samples / sample_rate, end = start + window_samples / sample_rate"
    resolved = {**dataclasses.asdict(cfg), **{k: metadata[k] for k in ("task", "probe", "outputs", "inputs",
                                                                        "precision", "model_config",
                                                                        "frontend_config", "head_config")},
                "num_classes": len(info["labels"]), **{k: info[k] for k in ("window_samples", "hop_samples",
                                                                             "aggregate") if k in info}}
    config_path = write_config(cfg.out, resolved)

    t0 = time.time()
    export_onnx(graph, cfg.out, cfg.opset, metadata)
    if cfg.quantize == "int8":
        print(describe_int8(scheme, why))
        calibration = [{"waveform": check_inputs(s, 2, cfg.seed + 1, info["sample_rate"])} for s in (1.0, 3.0, 10.24)]
        quantize_int8(cfg.out, scheme, calibration if scheme == "static-qdq" else None)
    if cfg.fuse and not cfg.fp16:  # fp16 targets CUDA: its session fuses for its own kernels at load
        fuse_graph(cfg.out)
    size = os.path.getsize(cfg.out)
    print(f"wrote {cfg.out} ({size / 2**20:.1f} MiB, {precision}, {', '.join(model.output_names())}; "
          f"{len(info['labels'])} labels, task {info['task']}) and {config_path} in {time.time() - t0:.0f} s")
    result = {"path": cfg.out, "config": config_path, "bytes": size, "outputs": model.output_names()}
    if cfg.check:
        batches = sorted({1, cfg.batch_size})
        rows = compare(cfg.out, model, cfg.check_seconds, batches, cfg.seed, cfg.device)
        try:
            summary = check_rows(rows, cfg.tolerance, cfg.out, None if precision == "fp32" else cfg.min_agreement)
        except ExportError as e:  # int8: which kernels were judged, and on what CPU
            if precision != "int8":
                raise
            raise ExportError(f"{e} ({describe_int8(scheme, why)}; CPU: {isa_string()})") from None
        result.update(rows=rows, **summary)
    return result


if __name__ == "__main__":
    config = tyro.cli(Config)
    try:
        main(config)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
