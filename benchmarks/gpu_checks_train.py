"""The training-side checks of benchmarks/gpu_check.py: pretrain_step, pretrain_compile (pretrain.py's
step, eager and torch.compile'd), sdpa_backend (which attention kernel runs), probe_features (frozen
features in fp32 and bf16), probe_step (a CGP training step, sparse vs dense min/max backward) and
finetune_step (one fine-tuning step). Each check takes the run's Context
and returns its figures; gpu_check.py runs them in their time boxes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import bat
from bat.precision import autocast, resolve
from gpu_checks_common import (Context, Skip, encoder_forward_flops, last_line, median_seconds, model_flops_pretrain, part,
                               peak_memory_mb, random_head, reset_peak_memory, sync, synthetic_waves, throughput,
                               top1_agreement)

REF_GPUS = 4  # REF pretrains on 4 GPUs: its per-GPU batch is the global batch / 4 (48 -> 12)

# ------------------------------------------------------------------------- the project's internals
# The only deep imports of these checks, kept here so a reorganisation of bat/ is a one-place update.
# They are imported when a check needs them: a package missing on a bare GPU machine (tyro, soundfile)
# then skips the checks that need it instead of stopping the script.

def pretrain_api() -> SimpleNamespace:
    """pretrain.py's preset, and bat.pretraining's model and optimiser builders and the pieces of its step.

    The preset (REF's base recipe, and the tiny one) is written in one place only, pretrain.py's command
    line: its parser `parse_config(["--model", ...])` is the script's public interface and gives the
    Config a run gets. Everything else comes from bat."""
    from pretrain import parse_config
    from bat.masking import inverse_block_mask
    from bat.pretraining import PretrainBatch, build_models, build_optimizer, crop_samples, ssl_step
    from bat.optim import ema_update
    return SimpleNamespace(parse_config=parse_config, build_models=build_models, build_optimizer=build_optimizer,
                           crop_samples=crop_samples, inverse_block_mask=inverse_block_mask, ssl_step=ssl_step,
                           PretrainBatch=PretrainBatch, ema_update=ema_update)


def probe_api() -> SimpleNamespace:
    """probe_cgp.py's head builder, its frozen pass, and the min/max pooling CGP trains through."""
    import bat.heads
    return SimpleNamespace(build_head=bat.heads.build_head, frozen_features=bat.heads.frozen_features, heads=bat.heads)


def config_for(size: str):
    from bat.model import config_for as cfg_for
    return cfg_for(size)


# ------------------------------------------------------------------------------- pretraining

def pretrain_setup(ctx: Context, compile_: bool) -> tuple:
    """pretrain.py's models, optimiser and step on one fixed synthetic batch -> (step, description).
    The step is the body of pretrain.py's training loop for one micro-batch (no accumulation)."""
    api, plan, device = pretrain_api(), ctx.plan, ctx.device
    cfg = api.parse_config(["--model", plan.pretrain_model])  # the CLI's preset, as a run gets it
    cfg = dataclasses.replace(cfg, **{k: v for k, v in dict(views=plan.pretrain_views,
                                                            target_frames=plan.pretrain_frames).items() if v})
    clips = plan.pretrain_batch or cfg.batch_size // REF_GPUS
    torch.manual_seed(0)
    student, teacher = api.build_models(cfg, device)
    optimizer = api.build_optimizer(cfg, student, device)
    frontend = bat.Frontend("bat", target_frames=cfg.target_frames).to(device)
    wave = synthetic_waves(clips, api.crop_samples(cfg.target_frames) / 16000).to(device)
    tp = cfg.target_frames // 16
    masks = api.inverse_block_mask(clips * cfg.views, tp, 8, cfg.mask_ratio, generator=torch.Generator().manual_seed(0))
    ids_keep, mask = masks.ids_keep.to(device), masks.mask.to(device)
    batch = api.PretrainBatch(wave, torch.full((clips,), wave.shape[1]), mask, ids_keep, torch.arange(clips), [])
    bf16 = resolve(device, "cuda-bf16") == "bf16"  # pretrain.py --precision auto: bf16 on CUDA, fp32 on the CPU
    amp = autocast(device, "cuda-bf16")
    model = student
    if compile_:  # as pretrain.py --compile does
        model = torch.compile(student, backend=plan.compile_backend)
        teacher.forward_layers = torch.compile(teacher.forward_layers, backend=plan.compile_backend)
    losses = []

    def step():
        loss = api.ssl_step(model, teacher, frontend, batch, device, amp, cfg.center_targets).losses.total
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
    if ctx.plan.compile_backend == "inductor" and not any(shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc",
                                                                                     "clang") if c):
        raise Skip("torch.compile's inductor backend builds Triton's launchers with a C compiler; none on PATH ($CC, cc, "
                   "gcc, clang)")
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


def encoder_attention_ops(encoder, spec: torch.Tensor, amp) -> dict:
    """The SDPA backends an encoder forward really dispatched to, read off the profiler's aten ops."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.is_cuda else [])
    with torch.inference_mode(), amp:
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
        for name, spec in specs.items():
            used[f"{name}/{dt}"] = part(encoder_attention_ops, encoder, spec, autocast(device, dt))
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
            amp = autocast(device, precision)

            def encode():
                with torch.inference_mode(), amp:
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


def step_without_dropout(head, step):
    head.eval()  # the same inputs to both backwards (dropout draws differ between calls)
    try:
        return step()
    finally:
        head.train()


def check_probe_step(ctx: Context) -> dict:
    """probe_cgp.py's CGP training step on cached features (every layer's tokens, 10,000 prototypes, bf16
    autocast on CUDA), with bat.heads' sparse min/max backward and with autograd's dense one: steps/s and
    peak memory of each, and how far their prototype gradients are apart."""
    plan, device, api = ctx.plan, ctx.device, probe_api()
    torch.manual_seed(0)
    encoder = bat.load_encoder(f"random:{plan.model}").to(device).requires_grad_(False)
    spec = bat.spectrogram(synthetic_waves(plan.probe_step_batch, plan.clip_seconds).to(device), target_frames=1024)
    head = api.build_head("cgp", encoder.dim, encoder.cfg.depth, plan.classes, plan.prototypes).to(device).train()
    feats = api.frozen_features(encoder, head, spec)  # what --cache-features holds for these clips
    targets = torch.randint(0, plan.classes, (plan.probe_step_batch,), device=device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)

    def step():
        with autocast(device, "cuda-bf16"):
            logits = head(feats)
        F.cross_entropy(logits.float(), targets).backward()
        grad = head.prototypes.grad.float().clone()
        optimizer.zero_grad(set_to_none=True)  # no optimizer.step(): both paths see the same weights
        return grad

    out, grads, sparse = {}, {}, api.heads.min_max_similarity
    for name, pool in (("sparse", sparse), ("dense", api.heads.dense_min_max_similarity)):
        api.heads.min_max_similarity = pool
        try:
            reset_peak_memory(device)
            sec = median_seconds(step, device, plan)
            out[name] = {"steps_per_s": round(1 / sec, 3), "peak_memory_mb": peak_memory_mb(device)}
            grads[name] = step_without_dropout(head, step)
        finally:
            api.heads.min_max_similarity = sparse
    diff = (grads["sparse"] - grads["dense"]).norm() / grads["dense"].norm().clamp_min(1e-30)
    return {"model": plan.model, "clips": plan.probe_step_batch, "prototypes": plan.prototypes,
            "tokens": int(feats.tokens.shape[2]), "precision": "bf16-autocast" if ctx.cuda else "fp32", **out,
            "sparse_speedup": round(out["sparse"]["steps_per_s"] / out["dense"]["steps_per_s"], 3),
            "prototype_grad_rel_diff": float(diff)}


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
    amp = autocast(device, "cuda-bf16")
    losses = []

    def step():
        with amp:
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


