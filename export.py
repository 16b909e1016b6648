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
probe's). An existing tagger.onnx or tagger.json is replaced only by a re-export (tagger.json written by
export.py); anything else is refused before the export starts. Then onnxruntime is compared with float32
PyTorch on demo clips from 0.1 s to 60 s (batch 1, --batch-size, and a batch of mixed lengths): float32 graphs
fail above --tolerance, int8 / fp16 graphs below --min-agreement (top-1 agreement). A graph that fails the
check stays for inspection, and the error says "tagger.onnx failed the check".
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from bat.checkpoint import CheckpointError
from bat.cli import FlagError, check_flags, error_exit, parse_flags
from bat.cpu import cpu_isa, isa_string
from bat.exporting import ExportError, check_inputs, check_rows, compare, export_onnx, load_model
from bat.files import check_writable, claim_out, file_sha256, written_by
from bat.onnx_graph import describe_int8, fuse_graph, int8_scheme, quantize_int8, temp_path
from bat.run_control import exit_interrupted

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
    """the ONNX file; its resolved configuration goes next to it under the same name (.json). Existing ones
    are replaced only by a re-export (that .json written by export.py)"""
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
    """ONNX opset of the graph, 18 to 22 (18: what onnxruntime's fusions and int8 kernels are tested with here)"""
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


def config_paths(out: str) -> tuple[str, str]:
    """The model's own configuration (tagger.onnx -> tagger.json) and its folder's config.json."""
    return out[: -len(".onnx")] + ".json", os.path.join(os.path.dirname(os.path.abspath(out)), "config.json")


def write_config(out: str, resolved: dict) -> str:
    """The resolved configuration, named after the model (tagger.onnx -> tagger.json), and as DIR/config.json
    like every script's, unless that file belongs to another run (a probe folder's config.json stays the
    probe's: an export never overwrites a file it did not write). Returns the model's .json path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    resolved = {**resolved, "written_by": "export.py"}
    path, shared = config_paths(out)
    ours = written_by(shared, "export.py") is not False  # missing, or an earlier export's
    for p in ([path, shared] if ours else [path]):
        with open(p, "w") as f:
            json.dump(resolved, f, indent=2)
    if not ours:
        print(f"note: {shared} belongs to another run and is left as it is; this export's configuration is {path}")
    return path


# The opsets written correctly: torch.onnx builds the graph at opset 18 (below, the file silently stays at 18),
# and from 23 on it writes attention as ONNX's Attention op, whose masked form onnxruntime 1.31 refuses to run.
OPSETS = range(18, 23)
DEMO_MIN_SAMPLES = 256  # bat.demo.demo_clip's shortest clip


def check_config(cfg: Config) -> None:
    """Every flag's range, before any work: a FlagError naming the flag. --seed: bat.cli.check_flags."""
    check_flags(cfg, at_least={"batch_size": 1}, fractions=("min_agreement",))
    if cfg.fp16 and cfg.quantize != "none":
        raise FlagError("--fp16 and --quantize int8 exclude each other (int8 is for CPUs, fp16 for CUDA)")
    if cfg.opset not in OPSETS:
        raise FlagError(f"--opset must lie in [{OPSETS[0]}, {OPSETS[-1]}] (what torch.onnx and onnxruntime run "
                        f"here), got {cfg.opset}")
    if not cfg.check_seconds:
        raise FlagError("--check-seconds needs at least one clip length")
    for flag, v in [("hop-seconds", cfg.hop_seconds), ("tolerance", cfg.tolerance),
                    *(("check-seconds", s) for s in cfg.check_seconds)]:
        if v is not None and not 0 < v < math.inf:  # NaN fails too
            raise FlagError(f"--{flag} must be a positive finite number, got {v}")


def check_out(out: str) -> None:
    """Before any work: --out is an .onnx file in a folder (or in one to make), and this run replaces no file
    it did not write. The model's .json must be missing or this script's; the model (and the external weights
    of a > 2 GB one, X.onnx.data) may only be replaced by a re-export, i.e. next to a .json of ours."""
    if not out.endswith(".onnx"):
        raise FlagError(f"--out should name the .onnx file to write, got {out!r}")
    made = folders_to_make(out)
    folder = os.path.dirname(made[-1] if made else os.path.abspath(out))  # the nearest existing one
    if not os.path.isdir(folder):
        raise FlagError(f"--out {out}: {folder} is a file, not a folder")
    check_writable(folder, out)  # a read-only folder or disk, found now rather than after the export's work
    config = os.path.basename(config_paths(out)[0])
    claim_out(os.path.dirname(os.path.abspath(out)), "export.py",
              [config, os.path.basename(out), os.path.basename(out) + ".data"], config=config)


def folders_to_make(out: str) -> list[str]:
    """The folders that writing `out` creates, innermost first (none when its folder exists)."""
    folders, folder = [], os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(folder):
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


# ----------------------------------------------------------------------------------------- main

def main(cfg: Config) -> dict:
    check_config(cfg)
    check_out(cfg.out)
    torch.manual_seed(cfg.seed)  # random:* encoders are drawn from this seed
    model, info = load_model(cfg.checkpoint, cfg.allow_pickle, cfg.hop_seconds, cfg.aggregate)
    rate = info["sample_rate"]  # known only now: the check clips are at the model's rate
    if round(min(cfg.check_seconds) * rate) < DEMO_MIN_SAMPLES:
        raise FlagError(f"--check-seconds must be at least {DEMO_MIN_SAMPLES / rate:g} s ({DEMO_MIN_SAMPLES} samples "
                        f"at {rate} Hz), got {min(cfg.check_seconds)}")
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

    t0 = time.time()
    # What a failure removes: the files and folders this run creates, and the model once it is replaced (a
    # model without the fusions, int8 weights or configuration asked for is not this export). Until
    # export_onnx has replaced it, a re-export's old model and configuration are left as they were.
    new = [p for p in config_paths(cfg.out) if not os.path.lexists(p)]
    made, replaced = folders_to_make(cfg.out), False
    print(f"exporting to {cfg.out} (torch.export traces the model: about a minute on a CPU) ...", flush=True)
    try:
        export_onnx(graph, cfg.out, cfg.opset, metadata)
        replaced = True
        if cfg.quantize == "int8":
            print(describe_int8(scheme, why))
            calibration = [{"waveform": check_inputs(s, 2, cfg.seed + 1, rate)} for s in (1.0, 3.0, 10.24)]
            quantize_int8(cfg.out, scheme, calibration if scheme == "static-qdq" else None)
        if cfg.fuse and not cfg.fp16:  # fp16 targets CUDA: its session fuses for its own kernels at load
            fuse_graph(cfg.out)
        config_path = write_config(cfg.out, resolved)
    except BaseException as e:
        # (quantize_int8 and fuse_graph write next to the model under temp_path's name)
        for path in [*new, temp_path(cfg.out)] + ([cfg.out, cfg.out + ".data"] if replaced else []):
            with contextlib.suppress(OSError):  # best effort (missing, read-only): `e` is the error to report
                os.remove(path)
        for folder in made:  # innermost first; one that is not empty stops it
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if isinstance(e, OSError) and e.filename in (None, temp_path(cfg.out)):  # name the file asked for
            raise OSError(e.errno, e.strerror, cfg.out) from e
        raise
    size = os.path.getsize(cfg.out)
    print(f"wrote {cfg.out} ({size / 2**20:.1f} MiB, {precision}, {', '.join(model.output_names())}; "
          f"{len(info['labels'])} labels, task {info['task']}) and {config_path} in {time.time() - t0:.0f} s")
    result = {"path": cfg.out, "config": config_path, "bytes": size, "outputs": model.output_names()}
    if cfg.check:
        batches = sorted({1, cfg.batch_size})
        try:
            rows = compare(cfg.out, model, cfg.check_seconds, batches, cfg.seed, cfg.device)
            summary = check_rows(rows, cfg.tolerance, cfg.out, None if precision == "fp32" else cfg.min_agreement)
        except ExportError as e:  # "X failed the check: ...": the file stays to be looked into, not to be used
            kernels = f" ({describe_int8(scheme, why)}; CPU: {isa_string()})" if precision == "int8" else ""
            raise ExportError(f"{e}{kernels}; the file is kept for inspection only, do not use it") from None
        result.update(rows=rows, **summary)
    return result


if __name__ == "__main__":
    try:
        main(parse_flags(Config))
    except (FlagError, CheckpointError) as e:  # refused before any work, as in the other scripts
        error_exit(e)
    except (ExportError, OSError) as e:  # the export failed (its check, a full or read-only disk); `--help | head`
        error_exit(e, 1)
    except KeyboardInterrupt:
        exit_interrupted("nothing was exported")
