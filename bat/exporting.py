"""The exporter's machinery (export.py is its command line): the whole pipeline as one module
(`Exported`: front-end, encoder, head, windows), loading it from a probe / model / encoder file, writing
it as ONNX with dynamic batch and length, and checking onnxruntime against float32 PyTorch on demo clips.

    model, info = load_model("runs/cgp/probe.safetensors")
    export_onnx(model, "tagger.onnx", opset=18, metadata={...})
    rows = compare("tagger.onnx", model, seconds=(1.0, 10.24), batches=(1, 3), seed=0)
    summary = check_rows(rows, tolerance=None, path="tagger.onnx")   # raises ExportError when it fails
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from bat import parity
from bat.audio import SAMPLE_RATE
from bat.checkpoint import CheckpointError, load_encoder, read_safetensors
from bat.demo import demo_clip
from bat.frontend import Frontend
from bat.model import PATCH
from bat.onnx_graph import drop_softmax_nan_guards, optional_lengths, temp_path
from bat.probes import Probe, load_probe
from bat.windows import default_aggregate

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
        # Pad amounts as symbolic maxima, not Python ifs: a branch on the length would freeze it. max(S, min) - S
        # rather than max(0, min - S): the same amount, but the padded length is then max(S, min) itself, which
        # keeps torch.export's shape expressions, and the time it spends on them, smaller.
        waveform = F.pad(waveform, (0, torch.sym_max(waveform.shape[1], self.min_samples) - waveform.shape[1]))
        spec = self.frontend(waveform)
        if self.target_frames:  # without a target no pad at all (a max(0, -T) term would grow every later size)
            spec = F.pad(spec, (0, 0, 0, torch.sym_max(spec.shape[2], self.target_frames) - spec.shape[2]))
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
    external = nbytes > MAX_INLINE_BYTES  # the .data file is named after the model file: write in place
    tmp = path if external else temp_path(path)
    try:
        if external:
            program.save(path, external_data=True)
        else:  # write, check and rename: a failed export never leaves a half-written model behind
            program.save(tmp, external_data=False)
            proto = onnx.load(tmp)
            drop_softmax_nan_guards(proto)
            if "lengths" in model.input_names():
                optional_lengths(proto)
            onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)  # the path form also handles external data
    except BaseException:  # a full disk, an interrupt: remove what was half written (in place: the model too)
        for p in (tmp, tmp + ".data") if external else (tmp,):
            with contextlib.suppress(OSError):  # best effort (missing, read-only): the first error is the one
                os.remove(p)
        raise
    if not external:
        os.replace(tmp, path)


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
    for s, b, x, lengths in tqdm(cases, desc="checking against PyTorch", unit="case", leave=False, dynamic_ncols=True):
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
                raise ExportError(f"{path} failed the check: {name}: onnxruntime shape {g.shape} != PyTorch "
                                  f"{r.shape} at {s} s, batch {b}")
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
    scores = f"scores {score_diff:.3e}; " if "scores" in names else ""  # an encoder-only graph has none
    agree = f"; top-1 agreement {agreement:.2%} over {total} clips and windows" if total else ""
    print(f"largest difference onnxruntime vs float32 PyTorch: {worst:.3e} ({scores}at most {share:.2f} of its "
          f"tolerance){agree}")
    summary = {"max_abs_diff": worst, "max_score_diff": score_diff, "top1_agreement": agreement,
               "tolerance_share": share}
    if min_agreement is None:
        if share > 1.0:
            tol = tolerance if tolerance is not None else row["tolerance"][name]
            raise ExportError(f"{path} failed the check: onnxruntime differs from PyTorch by "
                              f"{row['max_abs_diff'][name]:.3e} > tolerance {tol:.3g} ({name}, {row['seconds']} s, "
                              f"batch {row['batch']})")
    elif not agreement >= min_agreement:
        raise ExportError(f"{path} failed the check: top-1 agreement with float32 PyTorch is {agreement:.2%} < "
                          f"--min-agreement {min_agreement:.2%}")
    return summary
