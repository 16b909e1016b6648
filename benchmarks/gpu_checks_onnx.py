"""The ONNX checks of benchmarks/gpu_check.py: export_parity (export.py's fp32 and fp16 graphs on the
run's execution provider against fp32 PyTorch, and where ORT placed their nodes) and tagger_latency
(onnxruntime with I/O binding against PyTorch eager). The graphs are exported once per precision by
export.py's command line, the public interface of the exporter, and shared by the two checks.
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bat
from gpu_checks_common import (ROOT, Context, Skip, last_line, median_seconds, part, random_head, synthetic_waves,
                               top1_agreement)


# ------------------------------------------------------------------------------ ONNX graphs

FP32_TOLERANCE = 1e-3  # CUDA sums in other orders than the CPU: 10x export.py's own CPU tolerance of ~1e-4
# fp16 graphs are judged by how close their embeddings stay, not by top-1 agreement: over the plan's 18 clips
# one flipped near-tie of a random 527-class head is 5.6 points, so agreement is reported, not judged.
MIN_COSINE = 0.999
SHAPE_OP_ELEMENTS = 1024  # a float tensor this small on the CPU is shape arithmetic, not a fallback


def onnxruntime(cuda: bool = False):
    import onnxruntime as ort
    if cuda and hasattr(ort, "preload_dlls"):  # ORT >= 1.21: CUDA/cuDNN from the nvidia-* wheels torch brought
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    return ort


def ort_device(ctx: Context) -> str:
    """"cuda" or "cpu": the provider this run measures. On CUDA a missing CUDA provider skips the ORT parts."""
    if not ctx.cuda:
        return "cpu"
    ort = onnxruntime(cuda=True)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no CUDA execution provider "
                   f"({', '.join(ort.get_available_providers())}): "
                   "install onnxruntime-gpu")
    return "cuda"


def ort_session(ctx: Context, path: Path, strict: bool = False, profile: str | None = None):
    """A session on this run's provider. TF32 off: the graph is compared with fp32 PyTorch. strict: the
    CPU provider may take no node (session creation fails otherwise)."""
    device = ort_device(ctx)
    ort = onnxruntime(cuda=device == "cuda")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if strict:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    providers = [("CUDAExecutionProvider", {"use_tf32": "0"})] if device == "cuda" else []
    sess = ort.InferenceSession(str(path), opts, providers=providers + ([] if strict else ["CPUExecutionProvider"]))
    if sess.get_providers()[0] != {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]:
        raise Skip(f"the CUDA execution provider did not load (providers: {sess.get_providers()}; "
                   "CUDA/cuDNN libraries?)")
    return sess


def exported_graph(ctx: Context, precision: str) -> tuple[Path, float]:
    """(path, export seconds) of export.py's graph of a random encoder, exported once per precision.
    --no-check: export.py's own check runs PyTorch on the CPU up to 60-s clips, which a GPU loan cannot
    spare; gpu_check compares on the device instead."""
    known = ctx.onnx_paths.get(precision)
    if isinstance(known, Exception):  # a failed export is not tried again by the next check
        raise known
    if known is None:
        try:
            ctx.onnx_paths[precision] = export_graph(ctx, precision)
        except Skip as e:
            ctx.onnx_paths[precision] = e
            raise
        except Exception as e:
            ctx.onnx_paths[precision] = RuntimeError(f"the {precision} export failed earlier: {last_line(e)}")
            raise
    return ctx.onnx_paths[precision]


def export_graph(ctx: Context, precision: str) -> tuple[Path, float]:
    if precision == "fp16" and not ctx.cuda:
        raise Skip("fp16 graphs are for the CUDA provider (export.py --fp16); the CPU takes fp32 or int8")
    checkpoint = ctx.scratch / "encoder.safetensors"
    if not checkpoint.exists():
        torch.manual_seed(0)
        encoder = bat.load_encoder(f"random:{ctx.plan.model}")
        bat.save_encoder(checkpoint, encoder, encoder.frontend_config)
    out = ctx.scratch / f"{ctx.plan.model}_{precision}.onnx"
    cmd = [sys.executable, str(ROOT / "export.py"), "--checkpoint", str(checkpoint), "--out", str(out), "--no-check",
           *(["--fp16"] if precision == "fp16" else [])]
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        lines = (run.stderr or run.stdout).strip().splitlines() or ["no output"]
        if lines[-1].startswith("ModuleNotFoundError"):  # a bare machine without the requirements
            raise Skip(f"export.py: {lines[-1]} (pip install -r requirements.txt)")
        raise RuntimeError(f"export.py {precision} exited {run.returncode}: {lines[-1]}")
    return out, round(time.perf_counter() - t, 1)


def reference_cls(ctx: Context, waves: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 PyTorch on the CPU (export.py's reference): every layer's CLS, [clips, layers, dim], of the
    checkpoint the graphs were exported from, through the same front-end (encoded whole, chunked)."""
    encoder = bat.load_encoder(ctx.scratch / "encoder.safetensors")
    frontend = bat.Frontend.from_config({**encoder.frontend_config, "target_frames": None})
    with torch.inference_mode():
        return [encoder.forward_layers(frontend(w))[:, :, 0].transpose(0, 1).float() for w in waves]


def graph_session(ctx: Context, precision: str):
    """The session of export.py's graph in this precision, created once (parity and latency share it)."""
    ort_device(ctx)  # no CUDA provider on a GPU run: skip before spending half a minute on an export
    if precision not in ctx.sessions:
        ctx.sessions[precision] = ort_session(ctx, exported_graph(ctx, precision)[0])
    return ctx.sessions[precision]


def graph_parity(ctx: Context, precision: str, waves, refs) -> dict:
    """One graph on this run's provider against fp32 PyTorch; fails beyond the tolerance / agreement."""
    sess, export_seconds = graph_session(ctx, precision), exported_graph(ctx, precision)[1]
    got = [sess.run(["embedding", "layers"], {"waveform": w.numpy()}) for w in waves]
    emb, ref_emb = torch.cat([torch.from_numpy(g[0]) for g in got]), torch.cat([r[:, -1] for r in refs])
    diff = {"embedding": float((emb - ref_emb).abs().max()),
            "layers": max(float((torch.from_numpy(g[1]) - r).abs().max()) for g, r in zip(got, refs))}
    head = random_head(emb.shape[1], ctx.plan.classes)
    out = {"provider": sess.get_providers()[0], "export_seconds": export_seconds, "clips": len(emb),
           "max_abs_diff": diff, "cosine_min": float(F.cosine_similarity(emb, ref_emb, dim=-1).min()),
           "top1_agreement": top1_agreement(emb, ref_emb, head)}
    if precision == "fp32" and max(diff.values()) > FP32_TOLERANCE:
        out.update(status="failed",
                   reason=f"fp32 graph differs from PyTorch by {max(diff.values()):.3g} > {FP32_TOLERANCE}")
    if precision != "fp32" and not out["cosine_min"] >= MIN_COSINE:
        out.update(status="failed", reason=f"{precision} embedding cosine to PyTorch {out['cosine_min']:.5f} < {MIN_COSINE}")
    return out


def profiled_nodes(ctx: Context, path: Path, wave: torch.Tensor) -> list[dict]:
    """Every node ORT ran once, with its provider, op and output types, from ORT's own profile."""
    sess = ort_session(ctx, path, profile=str(ctx.scratch / f"profile_{path.stem}"))
    sess.run(None, {"waveform": wave.numpy()})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return [e["args"] for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def node_placement(ctx: Context, precision: str, wave: torch.Tensor) -> dict:
    """Where the graph's nodes ran. A node on the CPU provider that outputs a float tensor larger than
    shape arithmetic is a fallback (a copy to the host and back, and CPU compute): the check fails."""
    path, _ = exported_graph(ctx, precision)
    nodes = profiled_nodes(ctx, path, wave)
    by_provider, fallback = {}, {}
    for n in nodes:
        by_provider[n.get("provider", "?")] = by_provider.get(n.get("provider", "?"), 0) + 1
        floats = [math.prod(shape) for out in n.get("output_type_shape", []) for dtype, shape in out.items()
                  if "float" in dtype.lower()]
        if n.get("provider") == "CPUExecutionProvider" and floats and max(floats) >= SHAPE_OP_ELEMENTS:
            fallback[n.get("op_name", "?")] = fallback.get(n.get("op_name", "?"), 0) + 1
    copies = sum(n.get("op_name", "").startswith("Memcpy") for n in nodes)  # host <-> device transfers
    out = {"status": "ok", "nodes_by_provider": by_provider, "cpu_float_nodes": fallback, "memcpy_nodes": copies}
    if not ctx.cuda:
        return {**out, "status": "skipped", "reason": "CPU provider: every node runs on the CPU by design"}
    try:
        ort_session(ctx, path, strict=True)
        out["cuda_only_session"] = "created (session.disable_cpu_ep_fallback=1)"
    except Exception as e:  # noqa: BLE001 - ORT puts shape nodes on the CPU on purpose; recorded, not judged
        out["cuda_only_session"] = last_line(e)[:300]
    if fallback:
        out.update(status="failed", reason=f"float nodes fell back to the CPU provider: {fallback}")
    return out


def check_export_parity(ctx: Context) -> dict:
    ort_device(ctx)  # no CUDA provider on a GPU run: skip before spending a minute on exports
    waves = [synthetic_waves(n, s, seed=i) for i, (n, s) in enumerate(ctx.plan.parity_batches)]
    exported_graph(ctx, "fp32")
    refs = reference_cls(ctx, waves)
    parts = {p: part(graph_parity, ctx, p, waves, refs) for p in ("fp32", "fp16")}
    for precision in ("fp32", "fp16"):
        if parts[precision]["status"] == "ok":
            parts[f"placement_{precision}"] = part(node_placement, ctx, precision, waves[0])
    return {"model": ctx.plan.model, **parts}


# ------------------------------------------------------------------------------ tagger latency

def ort_latency(ctx: Context, precision: str, wave: torch.Tensor) -> dict:
    """onnxruntime with I/O binding: input and outputs stay on the device, as a serving loop keeps them."""
    sess, device = graph_session(ctx, precision), ort_device(ctx)
    ort = onnxruntime(cuda=device == "cuda")
    binding = sess.io_binding()
    binding.bind_ortvalue_input("waveform", ort.OrtValue.ortvalue_from_numpy(wave.numpy(), device, 0))
    for output in sess.get_outputs():
        binding.bind_output(output.name, device)

    def run():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
    seconds = median_seconds(run, torch.device("cpu"), ctx.plan)  # ORT synchronises itself
    return {"ms": round(1e3 * seconds, 3), "provider": sess.get_providers()[0]}


def torch_latency(ctx: Context, encoder, precision: str, wave: torch.Tensor) -> dict:
    """PyTorch eager on the same device: the graph's computation (front-end in fp32, encoder, every CLS)."""
    if precision == "fp16" and not ctx.cuda:
        raise Skip("fp16 is the CUDA precision; the CPU runs fp32")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    encoder = encoder.to(ctx.device, dtype)  # in place: every fp32 row runs before the fp16 rows
    frontend = bat.Frontend("bat").to(ctx.device)
    wave = wave.to(ctx.device)

    def run():
        with torch.inference_mode():
            encoder.forward_layers(frontend(wave).to(dtype))[:, :, 0].float()
    return {"ms": round(1e3 * median_seconds(run, ctx.device, ctx.plan), 3)}


def check_tagger_latency(ctx: Context) -> dict:
    plan = ctx.plan
    torch.manual_seed(0)
    encoder = bat.load_encoder(f"random:{plan.model}")
    rows = {}
    for precision in ("fp32", "fp16"):
        for batch in plan.tagger_batches:
            wave = synthetic_waves(batch, plan.clip_seconds, seed=batch)
            row = {"torch_eager": part(torch_latency, ctx, encoder, precision, wave),
                   "onnxruntime": part(ort_latency, ctx, precision, wave)}
            if all(r["status"] == "ok" for r in row.values()):
                row["speedup"] = round(row["torch_eager"]["ms"] / row["onnxruntime"]["ms"], 3)
            rows[f"{precision}/batch{batch}"] = row
    return {"model": plan.model, "clip_seconds": plan.clip_seconds, **rows}


