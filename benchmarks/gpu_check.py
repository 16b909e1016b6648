"""Every check that needs a GPU, in one command that fits a short GPU loan (at most 8 minutes).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu        # full size, on CUDA (else all skipped)
    python benchmarks/gpu_check.py --out /tmp/gc --smoke                # toy sizes on whatever device exists
    bash benchmarks/gpu_check.sh [DIR]                                  # the command to hand a lent GPU machine

Writes DIR/gpu_check.json, rewritten after every check (a run cut short keeps what it measured):
    {"device", "torch", "onnxruntime", "providers", "mode", "plan", "seconds",
     "checks": {NAME: {"status": "ok" | "skipped" | "failed", "reason", figures...}}}
and exits non-zero only when a check failed (skipped is fine: no CUDA, no CUDA execution provider, a
missing package). Each check runs in its own try/except and time box; `reason` is the last line of
the error.

The checks (full size: base encoder, pretrain.py's base preset, 10-s clips):
  pretrain_step     one pretraining step of pretrain.py (teacher targets, student on the kept patches of
                    every view, decoder, loss, backward, AdamW, EMA) at REF's per-GPU load, bf16 autocast:
                    steps/s, clips/s, peak memory, MFU = analytic model FLOPs per step / time / the GPU's
                    dense bf16 peak (see model_flops_pretrain; a profiler count is given beside it)
  pretrain_compile  the same step with torch.compile (student and teacher, as pretrain.py --compile), and
                    the compile time (the first step)
  sdpa_backend      which attention kernel F.scaled_dot_product_attention can use (each backend forced in
                    turn) and which one the encoder really runs (the profiler's aten op), for the encoder's
                    shapes: full clip, the student's kept patches, chunked input with a key mask
  probe_features    frozen feature extraction (encoder.forward_layers on spectrograms) in fp32 and bf16:
                    clips/s each, and how far bf16 is from fp32 (max abs diff, CLS cosine, top-1
                    agreement of a random linear head)
  finetune_step     one fine-tuning step (encoder with drop-path + LayerNorm/Linear head, BCE, AdamW, bf16):
                    steps/s, clips/s, peak memory, MFU
  export_parity     export.py's fp32 and fp16 ONNX graphs on the CUDA execution provider against fp32
                    PyTorch: max abs diff, top-1 agreement of a random linear head, and where ORT placed
                    the nodes (a float node on the CPU provider is a fallback and fails the check)
  tagger_latency    batch 1 and 32 of 10-s clips, fp32 and fp16: onnxruntime with I/O binding against
                    PyTorch eager on the same device (ms per batch, speed-up)

--smoke runs them all at toy size (tiny encoder, a few clips, one or two timed steps) on whatever device
exists: on 2 CPU cores in about a minute, a third of it export.py's own export. What only exists on CUDA
(the CUDA provider, fp16 graphs) is then "skipped" with the reason; torch.compile uses the "eager" backend
(the same graph capture; inductor would spend minutes compiling C++ on a CPU). tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bat  # noqa: E402  (top-level names only; internals are imported in the section below)


# ------------------------------------------------------------------------- the project's internals
# The only deep imports of this script, kept here so a reorganisation of bat/ is a one-place update.
# They are imported when a check needs them: a package missing on a bare GPU machine (tyro, soundfile)
# then skips the checks that need it instead of stopping the script.

def pretrain_api() -> SimpleNamespace:
    """pretrain.py's own preset, model and optimiser builders, and the pieces of its training step."""
    import pretrain
    from bat.masking import inverse_block_mask
    from bat.pretraining import ssl_losses, teacher_targets
    from bat.train import ema_update
    return SimpleNamespace(script=pretrain, inverse_block_mask=inverse_block_mask, ssl_losses=ssl_losses,
                           teacher_targets=teacher_targets, ema_update=ema_update)


def config_for(size: str):
    from bat.model import config_for as cfg_for
    return cfg_for(size)


# ------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Sizes of every check. FULL is what a GPU run measures; SMOKE exercises the same code in seconds."""

    model: str = "base"  # encoder of probe_features, finetune_step, export_parity, tagger_latency
    pretrain_model: str = "base"  # pretrain.py --model: its preset sets views, crop length, decoder
    pretrain_batch: int | None = None  # clips per GPU; None: REF's per-GPU share of the preset's batch
    pretrain_views: int | None = None  # None: the preset's
    pretrain_frames: int | None = None  # None: the preset's
    compile_backend: str = "inductor"
    attention_batch: int = 16  # clips in sdpa_backend's shapes
    probe_batch: int = 64  # clips of 10 s per forward pass
    finetune_batch: int = 48  # finetune.py's --batch-size on one GPU (REF's AS-20k recipe)
    finetune_frames: int = 1024
    classes: int = 527  # AudioSet's, for every random head
    clip_seconds: float = 10.0
    # (clips, seconds) of export_parity's inputs: 16 clips of 10 s for the agreement, 25 s chunked and ragged
    parity_batches: tuple = ((8, 10.0), (8, 10.0), (2, 25.0))
    tagger_batches: tuple = (1, 32)
    warmup: int = 2  # untimed calls before timing (allocations, autotuning)
    timed_calls: int = 20  # at most; also stops after timed_seconds
    timed_seconds: float = 8.0
    # Time box of each check, seconds; together under the 8 minutes of a GPU loan (gpu_check.sh: 540 s).
    time_boxes: dict = field(default_factory=lambda: dict(
        sdpa_backend=20, pretrain_step=45, probe_features=40, finetune_step=35, export_parity=140,
        tagger_latency=45, pretrain_compile=120))


FULL = Plan()
SMOKE = Plan(model="tiny", pretrain_model="tiny", pretrain_batch=2, pretrain_views=2, compile_backend="eager",
             attention_batch=2, probe_batch=2, finetune_batch=2, finetune_frames=256, classes=10,
             parity_batches=((2, 10.0), (1, 12.0)), tagger_batches=(1, 2), warmup=1, timed_calls=2,
             timed_seconds=2.0, time_boxes=dict(sdpa_backend=20, pretrain_step=30, probe_features=30, finetune_step=30,
                                                export_parity=90, tagger_latency=30, pretrain_compile=60))
REF_GPUS = 4  # REF pretrains on 4 GPUs: its per-GPU batch is the global batch / 4 (48 -> 12)

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched in this order against the device name.
BF16_PEAK = [("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12),
             ("RTX 4090", 165e12)]  # (V100: no bf16 tensor cores)


class Skip(Exception):
    """Raised by a check (or a part of one) that cannot run here; the message is the reason."""


class TimeBox(Exception):
    pass


@dataclass
class Context:
    plan: Plan
    device: torch.device
    scratch: Path  # ONNX files, checkpoints, profiles: never in --out (a GPU run returns only small files)
    onnx_paths: dict = field(default_factory=dict)  # precision -> (path, seconds), exported once, shared by two checks
    sessions: dict = field(default_factory=dict)  # precision -> onnxruntime session of that graph
    results: dict = field(default_factory=dict)  # name -> result of the checks run so far

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def time_box(seconds: float):
    """Raise TimeBox in the main thread after `seconds` (SIGALRM: it lands between Python bytecodes, so
    a long CUDA call ends first). Measuring loops also stop on their own well before it."""
    def expire(signum, frame):
        raise TimeBox(f"time box of {seconds:.0f} s exceeded")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, plan: Plan) -> float:
    """Median time of one call after plan.warmup untimed ones; at most timed_calls or timed_seconds."""
    for _ in range(plan.warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < plan.timed_calls and (not times or time.perf_counter() - start < plan.timed_seconds):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the process's peak RSS (VmHWM) on Linux


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA allocation since the reset; on the CPU the process's peak RSS (the interpreter included)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def bf16_peak(device: torch.device) -> tuple[float | None, str | None]:
    """(dense bf16 FLOP/s of this GPU, why it is unknown)."""
    if device.type != "cuda":
        return None, "no GPU: MFU is defined against a GPU's bf16 peak"
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in BF16_PEAK if key in name), None)
    return peak, None if peak else f"{name!r} is not in the table of bf16 peaks (BF16_PEAK)"


def throughput(seconds: float, clips: int, flops: float | None, device: torch.device) -> dict:
    """Rates, peak memory and MFU for a step of `clips` clips that took `seconds`."""
    peak, why = bf16_peak(device)
    out = {"seconds_per_step": round(seconds, 5), "steps_per_s": round(1 / seconds, 3),
           "clips_per_s": round(clips / seconds, 2), "peak_memory_mb": peak_memory_mb(device)}
    if flops is not None:
        out.update(model_tflops_per_step=round(flops / 1e12, 4), achieved_tflops=round(flops / seconds / 1e12, 2),
                   bf16_peak_tflops=peak and peak / 1e12, mfu=peak and round(flops / seconds / peak, 4))
        if why:
            out["mfu_reason"] = why
    return out


def synthetic_waves(clips: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """float32 [clips, samples] at 16 kHz: a few tones with random pitch and loudness over a noise floor,
    so the front-end's dB floor and normalisation see something like audio, not white noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    freq = 100 * 2 ** (6 * torch.rand(clips, 3, 1, generator=g))  # 100 Hz .. 6.4 kHz
    amp = 0.3 * torch.rand(clips, 3, 1, generator=g)
    tones = (amp * torch.sin(2 * math.pi * freq * t)).sum(1)
    return tones + 0.01 * torch.randn(clips, t.numel(), generator=g)


def random_head(dim: int, classes: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(dim, classes, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dim)


def top1_agreement(a: torch.Tensor, b: torch.Tensor, head: torch.Tensor) -> float:
    """Share of rows whose argmax under the same linear head agrees (a, b: [clips, dim] features)."""
    return float(((a.float() @ head).argmax(-1) == (b.float() @ head).argmax(-1)).float().mean())


def last_line(e: BaseException) -> str:
    lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def part(fn, *args) -> dict:
    """A part of a check with its own status, so a skipped fp16 half leaves the fp32 half standing."""
    try:
        return {"status": "ok", **fn(*args)}
    except Skip as e:
        return {"status": "skipped", "reason": str(e)}
    except (TimeBox, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a failed part is recorded, the check goes on
        return {"status": "failed", "reason": last_line(e)}


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- model FLOPs

def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0, gated: bool = True) -> float:
    """Forward FLOPs (2 per multiply-add) of one transformer block on one sequence: the qkv, gate,
    output and MLP matmuls, and attention's two (QK^T and AV). Norms, softmax, GELU are left out."""
    linear = 2 * tokens * dim * dim * (3 + int(gated) + 1 + 2 * mlp_ratio)
    return linear + 2 * 2 * tokens * tokens * dim


def encoder_forward_flops(cfg, sequences: int, tokens: int, embedded: int | None = None) -> float:
    """`sequences` sequences of `tokens` patches + CLS through cfg's blocks, plus the 16x16 patch
    embedding of `embedded` patches (default sequences * tokens)."""
    embedded = sequences * tokens if embedded is None else embedded
    blocks = sequences * cfg.depth * block_flops(tokens + 1, cfg.dim, cfg.mlp_ratio, cfg.gated)
    return blocks + 2 * embedded * 256 * cfg.dim


def model_flops_pretrain(cfg, enc_cfg, clips: int, views: int, patches: int, kept: int) -> dict:
    """Model FLOPs of one pretraining step, counted from the configuration (no recomputation counted):
    backward ~ 2x forward, so trained parts cost 3x their forward; the EMA teacher only runs forward.
      student encoder: clips x views sequences of the kept patches + CLS (patch embedding once per clip)
      decoder:         clips x views sequences of all patches (no CLS), gated blocks, in/out projections
      teacher:         clips sequences of all patches + CLS"""
    student = encoder_forward_flops(enc_cfg, clips * views, kept, embedded=clips * patches)
    dec_dim = cfg.decoder_dim
    proj = 2 * patches * dec_dim * enc_cfg.dim * (2 if dec_dim != enc_cfg.dim else 1)  # in_proj only if widths differ
    decoder = clips * views * (cfg.decoder_depth * block_flops(patches, dec_dim, 4.0, True) + proj)
    teacher = encoder_forward_flops(enc_cfg, clips, patches)
    return {"student_encoder": student, "decoder": decoder, "teacher": teacher,
            "total": 3 * (student + decoder) + teacher}


# ------------------------------------------------------------------------------- pretraining

def pretrain_setup(ctx: Context, compile_: bool) -> tuple:
    """pretrain.py's models, optimiser and step on one fixed synthetic batch -> (step, description).
    The step is the body of pretrain.py's training loop for one micro-batch (no accumulation)."""
    api, plan, device = pretrain_api(), ctx.plan, ctx.device
    cfg = api.script.parse_config(["--model", plan.pretrain_model])  # the CLI's preset, as a run gets it
    cfg = dataclasses.replace(cfg, **{k: v for k, v in dict(views=plan.pretrain_views,
                                                            target_frames=plan.pretrain_frames).items() if v})
    clips = plan.pretrain_batch or cfg.batch_size // REF_GPUS
    torch.manual_seed(0)
    student, teacher = api.script.build_models(cfg, device)
    optimizer = api.script.build_optimizer(cfg, student, device)
    frontend = bat.Frontend("bat", target_frames=cfg.target_frames).to(device)
    wave = synthetic_waves(clips, api.script.crop_samples(cfg) / 16000).to(device)
    tp = cfg.target_frames // 16
    masks = api.inverse_block_mask(clips * cfg.views, tp, 8, cfg.mask_ratio, generator=torch.Generator().manual_seed(0))
    ids_keep, mask = masks.ids_keep.to(device), masks.mask.to(device)
    bf16 = ctx.cuda  # pretrain.py --precision auto: bf16 autocast on CUDA, fp32 on the CPU
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    model = student
    if compile_:  # as pretrain.py --compile does
        model = torch.compile(student, backend=plan.compile_backend)
        teacher.forward_layers = torch.compile(teacher.forward_layers, backend=plan.compile_backend)
    losses = []

    def step():
        spec = frontend(wave)
        with autocast:
            targets = api.teacher_targets(teacher, spec, cfg.center_targets)
            cls, pred = model(spec, ids_keep)
        loss = api.ssl_losses(cls, pred, targets, mask).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        api.ema_update(teacher, student.encoder, cfg.ema_start)
        losses.append(loss.detach())

    flops = model_flops_pretrain(cfg, student.encoder.cfg, clips, cfg.views, tp * 8, ids_keep.shape[1])
    info = {"model": cfg.model, "clips": clips, "views": cfg.views, "target_frames": cfg.target_frames,
            "kept_patches": ids_keep.shape[1], "precision": "bf16-autocast" if bf16 else "fp32",
            "flops": flops, "losses": losses}
    return step, info


def report_pretrain(ctx: Context, step, info: dict, extra: dict) -> dict:
    """Time the step; rates, memory, MFU and the FLOP breakdown; fails on a non-finite loss."""
    reset_peak_memory(ctx.device)
    seconds = median_seconds(step, ctx.device, ctx.plan)
    last = float(info["losses"][-1])
    if not math.isfinite(last):
        raise FloatingPointError(f"loss is {last} after {len(info['losses'])} steps")
    flops = info["flops"]
    out = {k: info[k] for k in ("model", "clips", "views", "target_frames", "kept_patches", "precision")}
    out.update(extra, **throughput(seconds, info["clips"], flops["total"], ctx.device), loss=round(last, 5),
               forward_tflops={k: round(v / 1e12, 4) for k, v in flops.items() if k != "total"})
    return out


def check_pretrain_step(ctx: Context) -> dict:
    step, info = pretrain_setup(ctx, compile_=False)
    step()  # warm-up before the FLOP count: the profiler count is a cross-check of the analytic one
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    # On the CPU the fused attention kernel is invisible to the counter: the count omits attention.
    return report_pretrain(ctx, step, info, {"counted_tflops_per_step": round(counter.get_total_flops() / 1e12, 4)})


def check_pretrain_compile(ctx: Context) -> dict:
    step, info = pretrain_setup(ctx, compile_=True)
    t = time.perf_counter()
    step()  # compiles the forward and backward graphs of student and teacher
    sync(ctx.device)
    compile_seconds = time.perf_counter() - t
    try:
        out = report_pretrain(ctx, step, info, {"backend": ctx.plan.compile_backend,
                                                "compile_seconds": round(compile_seconds, 1)})
    finally:
        torch.compiler.reset()
    eager = ctx.results.get("pretrain_step", {})
    if eager.get("status") == "ok":
        out["speedup_vs_eager"] = round(eager["seconds_per_step"] / out["seconds_per_step"], 3)
    return out


# ---------------------------------------------------------------------------- attention kernels

SDPA_OPS = {  # the aten op each backend dispatches to: what the profiler shows
    "_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable", "_scaled_dot_product_attention_math": "math",
}


def attention_shapes(ctx: Context) -> dict:
    """(q shape, with key mask) of the encoder's attention calls: a full 10-s clip (512 patches + CLS,
    the teacher and feature extraction), the student's kept patches (102 + CLS), a chunked input whose
    ragged last chunk is masked (what long inputs and the export path run)."""
    cfg = config_for(ctx.plan.model)
    heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
    batch = ctx.plan.attention_batch
    return {"full_clip": ((batch, heads, 513, head_dim), False),
            "student_kept": ((8 * batch, heads, 103, head_dim), False),
            "masked_chunks": ((batch, heads, 513, head_dim), True)}


def try_backends(shape, masked: bool, dtype, device) -> dict:
    """Force each SDPA backend in turn: True where it runs these shapes, else the reason it refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(shape[0], 1, 1, shape[2], dtype=torch.bool, device=device) if masked else None
    if masked:
        mask[..., -40:] = False  # padding tokens of a ragged chunk
    works = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        # A refused backend warns why, then raises a generic "No viable backend": the warning is the reason.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                sync(device)
                works[backend.name.lower()] = True
            except RuntimeError as e:
                why = [str(w.message) for w in caught] or [
                    "not built for this device" if "No viable backend" in str(e) else last_line(e)]
                works[backend.name.lower()] = " / ".join(why)[:300]
    return works


def encoder_attention_ops(encoder, spec: torch.Tensor, autocast) -> dict:
    """The SDPA backends an encoder forward really dispatched to, read off the profiler's aten ops."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.is_cuda else [])
    with torch.inference_mode(), autocast:
        encoder.forward_layers(spec)  # warm-up outside the profile
        with profile(activities=activities) as prof:
            encoder.forward_layers(spec)
            sync(spec.device)
    names = {e.key.split("::")[-1] for e in prof.key_averages()}
    found = sorted(SDPA_OPS[n] for n in names if n in SDPA_OPS)
    return {"ops": found or ["math (unfused: no SDPA kernel op seen)"]}


def check_sdpa_backend(ctx: Context) -> dict:
    device = ctx.device
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if ctx.cuda else {"fp32": torch.float32}
    forced = {f"{name}/{dt}": try_backends(shape, masked, dtype, device)
              for name, (shape, masked) in attention_shapes(ctx).items() for dt, dtype in dtypes.items()}
    encoder = bat.load_encoder(f"random:{ctx.plan.model}").to(device)
    batch = ctx.plan.attention_batch
    specs = {"full_clip": bat.spectrogram(synthetic_waves(batch, 10.0).to(device), target_frames=1024),
             "masked_chunks": bat.spectrogram(synthetic_waves(batch, 11.2).to(device), target_frames=1120)}
    used = {}
    for dt in dtypes:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dt == "bf16")
        for name, spec in specs.items():
            used[f"{name}/{dt}"] = part(encoder_attention_ops, encoder, spec, autocast)
    fused = all(not u["ops"][0].startswith("math") for key, u in used.items()
                if key.startswith("full_clip") and u["status"] == "ok")
    return {"forced": forced, "encoder_uses": used, "fused_on_full_clip": fused,
            "note": "masked_chunks: 1120 frames = 70 time patches, two chunks of 64, the second padded and masked"}


# ------------------------------------------------------------------------- features and fine-tuning

def check_probe_features(ctx: Context) -> dict:
    """probe_cgp.py's frozen pass: every layer's output of spectrograms already on the device."""
    plan, device = ctx.plan, ctx.device
    torch.manual_seed(0)
    encoder = bat.load_encoder(f"random:{plan.model}").to(device).requires_grad_(False)
    spec = bat.spectrogram(synthetic_waves(plan.probe_batch, plan.clip_seconds).to(device), target_frames=1024)
    # fp32 means fp32: TF32 matmuls would make it a third precision (cuDNN's flag covers the patch conv)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out, rates = {}, {}
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

            def encode():
                with torch.inference_mode(), autocast:
                    out[precision] = encoder.forward_layers(spec)
            rates[precision] = round(plan.probe_batch / median_seconds(encode, device, plan), 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    ref, low = out["fp32"].float(), out["bf16"].float()  # (L, B, 1 + N, D)
    cos = F.cosine_similarity(ref[:, :, 0], low[:, :, 0], dim=-1)  # CLS of every layer and clip
    head = random_head(encoder.dim, plan.classes).to(device)
    return {"model": plan.model, "clips_per_batch": plan.probe_batch, "frames": spec.shape[2],
            "clips_per_s": rates, "bf16_speedup": round(rates["bf16"] / rates["fp32"], 3),
            "max_abs_diff": float((ref - low).abs().max()), "mean_abs_diff": float((ref - low).abs().mean()),
            "cls_cosine_min": float(cos.min()), "cls_cosine_mean": float(cos.mean()),
            "top1_agreement_last_cls": top1_agreement(ref[-1, :, 0], low[-1, :, 0], head)}


def check_finetune_step(ctx: Context) -> dict:
    """finetune.py's model (encoder with drop-path, last CLS -> LayerNorm -> dropout -> Linear) and one
    optimiser step on a fixed batch of spectrograms; bf16 autocast on CUDA, fp32 on the CPU."""
    plan, device = ctx.plan, ctx.device
    torch.manual_seed(0)
    base = bat.load_encoder(f"random:{plan.model}")
    encoder = bat.Encoder(base.cfg, drop_path=0.1)
    encoder.load_state_dict(base.state_dict())
    head = nn.Sequential(nn.LayerNorm(encoder.dim), nn.Dropout(0.1), nn.Linear(encoder.dim, plan.classes))
    model = nn.ModuleDict({"encoder": encoder, "head": head}).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.05, fused=ctx.cuda)
    seconds = plan.finetune_frames * 160 / 16000
    spec = bat.spectrogram(synthetic_waves(plan.finetune_batch, seconds).to(device), target_frames=plan.finetune_frames)
    targets = (torch.rand(plan.finetune_batch, plan.classes, device=device) < 0.02).float()  # sparse multi-hot
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.cuda)
    losses = []

    def step():
        with autocast:
            logits = head(encoder(spec)[:, 0])
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    reset_peak_memory(device)
    sec = median_seconds(step, device, plan)
    if not math.isfinite(float(losses[-1])):
        raise FloatingPointError(f"loss is {float(losses[-1])}")
    patches = plan.finetune_frames // 16 * 8
    flops = 3 * (encoder_forward_flops(encoder.cfg, plan.finetune_batch, patches)
                 + 2 * plan.finetune_batch * encoder.dim * plan.classes)
    return {"model": plan.model, "clips": plan.finetune_batch, "frames": plan.finetune_frames,
            "precision": "bf16-autocast" if ctx.cuda else "fp32", **throughput(sec, plan.finetune_batch, flops, device),
            "loss": round(float(losses[-1]), 5)}


# ------------------------------------------------------------------------------ ONNX graphs

FP32_TOLERANCE = 1e-3  # CUDA sums in other orders than the CPU: 10x export.py's own CPU tolerance of ~1e-4
MIN_AGREEMENT = 0.98  # export.py's --min-agreement for reduced-precision graphs
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
    spare; this script compares on the device instead."""
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
    if precision != "fp32" and out["top1_agreement"] < MIN_AGREEMENT:
        out.update(status="failed", reason=f"{precision} top-1 agreement {out['top1_agreement']:.3f} < {MIN_AGREEMENT}")
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


# ---------------------------------------------------------------------------------- running

# Run in this order: the cheap checks first, the compile last (the slowest to start), so a run cut short
# by gpu_check.sh's timeout still has the rest.
CHECKS = {"sdpa_backend": check_sdpa_backend, "pretrain_step": check_pretrain_step,
          "probe_features": check_probe_features, "finetune_step": check_finetune_step,
          "export_parity": check_export_parity, "tagger_latency": check_tagger_latency,
          "pretrain_compile": check_pretrain_compile}


def rollup(figures: dict) -> tuple[str, str | None]:
    """A check's status from its parts (sub-dicts with a status): failed if one failed, ok if one ran."""
    parts = [v for v in figures.values() if isinstance(v, dict) and "status" in v]
    for v in figures.values():
        if isinstance(v, dict) and "status" not in v:  # one level down (tagger rows)
            parts += [w for w in v.values() if isinstance(w, dict) and "status" in w]
    if not parts:
        return "ok", None
    failed = [p["reason"] for p in parts if p["status"] == "failed"]
    if failed:
        return "failed", failed[0]
    if any(p["status"] == "ok" for p in parts):
        return "ok", None
    return "skipped", parts[0].get("reason")


def run_check(name: str, ctx: Context) -> dict:
    """One check in its time box; any error becomes status "failed" with the error's last line."""
    t = time.perf_counter()
    try:
        with time_box(ctx.plan.time_boxes[name]):
            figures = CHECKS[name](ctx)
        status, reason = rollup(figures)
        result = {"status": status, "reason": reason, **figures}
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except ModuleNotFoundError as e:  # a bare GPU machine without the project's requirements
        result = {"status": "skipped", "reason": f"{last_line(e)} (pip install -r requirements.txt)"}
    except Exception as e:  # noqa: BLE001 - one failure must not stop the others
        result = {"status": "failed", "reason": last_line(e)}
    result["seconds"] = round(time.perf_counter() - t, 1)
    free_memory(ctx.device)
    return result


def environment(device: torch.device) -> dict:
    try:
        ort = onnxruntime(cuda=device.type == "cuda")
        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError as e:
        ort_version, providers = None, [last_line(e)]
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"device": name, "torch": torch.__version__, "onnxruntime": ort_version, "providers": providers,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu", help="folder of gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="toy sizes on whatever device exists (the CPU here)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**environment(device), "mode": "smoke" if args.smoke else "full", "plan": dataclasses.asdict(plan),
              "checks": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        ctx = Context(plan, device, Path(scratch))
        for name in args.only or CHECKS:
            if device.type != "cuda" and not args.smoke:
                result = {"status": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is False); "
                                                         "--smoke runs the same code at toy size on the CPU"}
            else:
                print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
                result = run_check(name, ctx)
            report["checks"][name] = ctx.results[name] = result
            report["seconds"] = round(time.perf_counter() - start, 1)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")  # after every check
            print(f"[gpu_check] {name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else "")
                  + f" in {result.get('seconds', 0)} s", file=sys.stderr, flush=True)
    failed = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    print(f"wrote {out / 'gpu_check.json'} in {report['seconds']} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no check failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
