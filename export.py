"""Export a probe, fine-tuned model or bare encoder to one ONNX file that runs without PyTorch.

    python export.py --checkpoint runs/cgp/probe.safetensors --out runs/cgp/tagger.onnx
    python export.py --checkpoint runs/pretrain/encoder.safetensors --out runs/pretrain/encoder.onnx
    python -m bat.tag runs/cgp/tagger.onnx clip.wav other.flac --top-k 3

The graph takes `waveform` float32 [batch, samples] (mono, 16 kHz; both axes dynamic) and holds the
whole pipeline: front-end (BAT or legacy Kaldi), encoder (inputs longer than 64 time patches = 10.24 s
are cut into chunks inside the graph, as Encoder.forward_layers does), the head. Outputs:
  scores    [batch, classes]  softmax (multiclass) or sigmoid (multilabel)      -- probes / fine-tuned
  embedding [batch, D]        gate-weighted mix of the layers' L2-normalised CLS (CGP, LCGP), else last CLS
  layers    [batch, L, D]     every layer's CLS                                  -- bare encoders
Input length: clips shorter than 0.5 s are zero-padded to 0.5 s (waveform, in the graph). A front-end
with `target_frames` (the probe's training window) zero-pads shorter spectrograms to that length as in
training (the same numbers as probe.predict); longer inputs are never cropped, they are chunked.
Metadata properties: labels, sample_rate, task, model_config (+ frontend_config, probe, head_config,
window_samples, min_samples, outputs, source). Writes config.json next to the model, then compares
onnxruntime with PyTorch on demo clips of several lengths and fails above --tolerance.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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

from bat.audio import SAMPLE_RATE
from bat.checkpoint import CheckpointError, load_encoder, read_safetensors
from bat.demo import demo_clip
from bat.frontend import HOP, Frontend
from bat.model import PATCH
from bat.probes import Features, load_probe, mix_normalised

# The exporter warns about every torchvision op it cannot register; we use none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
# torch 2.13's own pytree code trips its LeafSpec deprecation inside torch.export; nothing for us to change.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


@dataclass
class Config:
    checkpoint: str
    """probe.safetensors (probe_cgp.py), model.safetensors (finetune.py), encoder.safetensors
    (pretrain.py); also anything bat.load_encoder reads (REF/EAT checkpoints, random:tiny|small|base)"""
    out: str = "model.onnx"
    """the ONNX file; config.json is written to the same folder"""
    opset: int = 18
    seed: int = 0
    """seed of the demo clips used for the check (and of random:* encoders)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """onnxruntime provider for the check; the PyTorch reference always runs in float32 on the CPU"""
    check: bool = True
    """compare onnxruntime with PyTorch after writing (--no-check skips it)"""
    check_seconds: tuple[float, ...] = (0.5, 1.0, 5.0, 10.24, 10.4, 30.0)
    """clip lengths of the check (10.4 s = 65 time patches: a second, ragged chunk)"""
    batch_size: int = 3
    """the check runs every length at batch 1 and at this batch size"""
    tolerance: float = 1e-4
    """largest allowed absolute difference, any output, any length"""


MIN_SECONDS = 0.5
MIN_SAMPLES = int(MIN_SECONDS * SAMPLE_RATE)
MAX_INLINE_BYTES = 2**31 - 2**27  # protobuf's 2 GB limit with room for the graph itself


class ExportError(ValueError):
    """A checkpoint that cannot be exported (e.g. a frame-wise head), or a failed numerical check."""


# ------------------------------------------------------------------------------------- the graph

class Exported(nn.Module):
    """waveform [B, S] -> outputs, the whole pipeline as one module. `export=True` takes the encoder's
    branch-free chunking path (what the graph holds); False is the plain eager path (the reference)."""

    def __init__(self, encoder, frontend_config: dict, head=None, task: str | None = None, export: bool = True):
        super().__init__()
        # The front-end never crops here: long inputs are chunked by the encoder. Its target length
        # becomes a minimum, applied below with the same zero padding that Frontend applies.
        self.target_frames = frontend_config.get("target_frames") or 0
        self.frontend = Frontend.from_config({**frontend_config, "target_frames": None})
        self.encoder, self.head, self.task, self.export = encoder, head, task, export

    def forward(self, waveform: torch.Tensor):
        # Pad amounts as symbolic max(0, ...), not Python ifs: a branch on the length would freeze it.
        waveform = F.pad(waveform, (0, torch.sym_max(0, MIN_SAMPLES - waveform.shape[1])))
        spec = self.frontend(waveform)
        spec = F.pad(spec, (0, 0, 0, torch.sym_max(0, self.target_frames - spec.shape[2])))
        layers = self.encoder.forward_layers(spec, export=self.export)  # (L, B, 1 + N, D)
        cls = layers[:, :, 0]  # (L, B, D)
        if self.head is None:
            return cls[-1], cls.transpose(0, 1)
        h = self.head
        logits = h(Features.from_layers(layers, h.all_layers, h.reads_cls, h.reads_tokens)).float()
        scores = logits.softmax(-1) if self.task == "multiclass" else logits.sigmoid()
        gate = h.gate_weights()
        return scores, (cls[-1] if gate is None else mix_normalised(cls, gate))

    def output_names(self) -> list[str]:
        return ["embedding", "layers"] if self.head is None else ["scores", "embedding"]


def frame_wise(head) -> bool:
    """Heads whose logits keep a time axis (B, T', C); the graph's `scores` is [batch, classes]."""
    return bool(getattr(head, "frame_wise", False)) or getattr(head, "mode", "cls") == "frame"


def load_model(path: str) -> tuple[Exported, dict]:
    """(module, metadata) from a probe / model / encoder file. A probe is recognised by its metadata."""
    meta = {}
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        try:
            _, meta = read_safetensors(path)
        except Exception as e:  # noqa: BLE001 - truncated / not safetensors
            raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from None
    if "probe" in meta:
        probe = load_probe(path)
        if frame_wise(probe.head):
            raise ExportError(f"{path}: frame-wise {probe.kind} heads give logits per time step; "
                              "export supports clip-level heads only")
        model = Exported(probe.encoder, probe.frontend.config(), probe.head, probe.task)
        info = {"labels": probe.labels, "task": probe.task, "probe": probe.kind,
                "head_config": probe.head.config(), "frontend_config": probe.frontend.config()}
    else:
        encoder = load_encoder(path)
        model = Exported(encoder, encoder.frontend_config)
        info = {"labels": [], "task": "embedding", "probe": "none", "head_config": None,
                "frontend_config": encoder.frontend_config}
    info["model_config"] = model.encoder.cfg.to_dict()
    return model.eval().requires_grad_(False), info


def window_samples(model: Exported) -> int:
    """The model's natural window in samples: its training length, else one encoder chunk (10.24 s).
    bat.tag --hop cuts long files into windows of this length."""
    frames = model.target_frames or model.encoder.cfg.chunk_patches * PATCH
    return frames * HOP


# ------------------------------------------------------------------------------------ exporting

def export_onnx(model: Exported, path: str, opset: int, metadata: dict) -> None:
    """torch.export with dynamic batch and samples -> ONNX, metadata added, one file when < 2 GB."""
    # The example is longer than one chunk and batch > 1 so nothing is specialised to 0/1 sizes.
    example = torch.from_numpy(np.stack([demo_clip(i, seconds=12.0)[0] for i in range(2)]))
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("samples", min=2)}
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, verbose=False,
                                input_names=["waveform"], output_names=model.output_names(),
                                dynamic_shapes=({**dims},), optimize=True)
    program.model.metadata_props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = nbytes > MAX_INLINE_BYTES
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if external:  # the .data file is named after the model file: write in place
        program.save(path, external_data=True)
    else:  # write and rename: an interrupted export never leaves a half-written model behind
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    import onnx

    onnx.checker.check_model(path, full_check=True)  # the path form also handles external data


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- checking

def check_inputs(seconds: float, batch: int, seed: int) -> np.ndarray:
    """Demo clips (tones, chirps, noise bursts, ... over a noise floor): real-looking, not white noise,
    so the front-end's dB floor and min-max stretch see what they see in use."""
    return np.stack([demo_clip(i, seed=seed, seconds=seconds)[0] for i in range(batch)])


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


def compare(path: str, model: Exported, seconds, batches, seed: int, device: str = "cpu") -> list[dict]:
    """ORT vs the eager PyTorch path (export=False: the encoder's usual branches) for every length and
    batch size. Returns one row per run with the largest difference per output and both timings."""
    sess = ort_session(path, device)
    reference = Exported(model.encoder, {**model.frontend.config(), "target_frames": model.target_frames or None},
                         model.head, model.task, export=False).eval()
    names = model.output_names()
    sess.run(None, {"waveform": check_inputs(1.0, 1, seed)})  # warm-up: first-run allocations
    rows = []
    for s in seconds:
        for b in batches:
            x = check_inputs(s, b, seed)
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref = [t.numpy() for t in reference(torch.from_numpy(x))]
            t1 = time.perf_counter()
            got = sess.run(names, {"waveform": x})
            t2 = time.perf_counter()
            diffs = {}
            for name, r, g in zip(names, ref, got):
                if r.shape != g.shape:
                    raise ExportError(f"{name}: onnxruntime shape {g.shape} != PyTorch {r.shape} at {s} s, batch {b}")
                diffs[name] = float(np.abs(r.astype(np.float64) - g).max()) if r.size else 0.0
            rows.append({"seconds": s, "batch": b, "max_abs_diff": diffs, "torch_ms": 1e3 * (t1 - t0),
                         "ort_ms": 1e3 * (t2 - t1)})
    return rows


def check_rows(rows: list[dict], tolerance: float, path: str) -> float:
    """Print the comparison table; return the largest difference, or raise when it is too large."""
    names = list(rows[0]["max_abs_diff"])
    print(f"{'seconds':>8} {'batch':>5} " + " ".join(f"{n:>10}" for n in names) + f" {'torch ms':>9} {'ort ms':>9}")
    for r in rows:
        print(f"{r['seconds']:>8.2f} {r['batch']:>5} " + " ".join(f"{r['max_abs_diff'][n]:>10.2e}" for n in names)
              + f" {r['torch_ms']:>9.1f} {r['ort_ms']:>9.1f}")
    worst = max(max(r["max_abs_diff"].values()) for r in rows)
    print(f"largest difference onnxruntime vs PyTorch: {worst:.3e} (tolerance {tolerance:g})")
    if not worst <= tolerance:  # written so that NaN fails too
        raise ExportError(f"onnxruntime differs from PyTorch by {worst:.3e} > tolerance {tolerance:g}; "
                          f"{path} is written but should not be trusted")
    return worst


# ----------------------------------------------------------------------------------------- main

def main(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    if not cfg.out.endswith(".onnx"):
        raise ExportError(f"--out should name the .onnx file to write, got {cfg.out!r}")
    model, info = load_model(cfg.checkpoint)
    source = os.path.basename(cfg.checkpoint)
    metadata = {
        "format": "bat.onnx", "labels": info["labels"], "sample_rate": str(SAMPLE_RATE), "task": info["task"],
        "model_config": info["model_config"], "frontend_config": info["frontend_config"], "probe": info["probe"],
        "head_config": info["head_config"], "window_samples": str(window_samples(model)),
        "min_samples": str(MIN_SAMPLES), "outputs": model.output_names(), "source": source,
        "source_sha256": file_sha256(cfg.checkpoint) if os.path.isfile(cfg.checkpoint) else "",
    }
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    os.makedirs(out_dir, exist_ok=True)
    resolved = {**dataclasses.asdict(cfg), **{k: metadata[k] for k in ("task", "probe", "outputs", "model_config",
                                                                        "frontend_config", "head_config")},
                "num_classes": len(info["labels"]), "window_samples": int(metadata["window_samples"]),
                "min_samples": MIN_SAMPLES}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)

    t0 = time.time()
    export_onnx(model, cfg.out, cfg.opset, metadata)
    size = os.path.getsize(cfg.out)
    print(f"wrote {cfg.out} ({size / 2**20:.1f} MiB, {', '.join(model.output_names())}; "
          f"{len(info['labels'])} labels, task {info['task']}) in {time.time() - t0:.0f} s; onnx.checker passed")
    result = {"path": cfg.out, "bytes": size, "outputs": model.output_names()}
    if cfg.check:
        batches = sorted({1, cfg.batch_size})
        rows = compare(cfg.out, model, cfg.check_seconds, batches, cfg.seed, cfg.device)
        result.update(rows=rows, max_abs_diff=check_rows(rows, cfg.tolerance, cfg.out))
    return result


if __name__ == "__main__":
    config = tyro.cli(Config)
    try:
        main(config)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
