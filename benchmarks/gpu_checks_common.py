"""What every check of benchmarks/gpu_check.py shares: the run's Context, Skip and TimeBox, timing, memory,
throughput and MFU, synthetic inputs, parts with their own status, and the analytic model FLOPs.

benchmarks/ is not a package: gpu_check.py puts this folder on sys.path, and the check modules
(gpu_checks_train.py, gpu_checks_onnx.py) import this one by its plain name.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: export.py, bat/

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched in this order against the device name (the
# first key contained in it wins: longer names first, "L40" before "L4").
BF16_PEAK = [("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12),
             ("L4", 121e12), ("RTX 4090", 165e12)]  # (GH200 matches H200; V100: no bf16 tensor cores)


class Skip(Exception):
    """Raised by a check (or a part of one) that cannot run here; the message is the reason."""


class TimeBox(Exception):
    pass


@dataclass
class Context:
    plan: object  # gpu_check.Plan (not imported: the entry imports this module)
    device: torch.device
    scratch: Path  # ONNX files, checkpoints, profiles: never in --out (a GPU run returns only small files)
    onnx_paths: dict = field(default_factory=dict)  # precision -> (path, seconds), exported once, shared by two checks
    sessions: dict = field(default_factory=dict)  # precision -> onnxruntime session of that graph
    results: dict = field(default_factory=dict)  # name -> result of the checks run so far

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------------------------- helpers

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, plan) -> float:
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
    if "MIG" in name:  # a slice of the GPU: its share of the peak is not in the name
        return None, f"{name!r} is a MIG slice; its bf16 peak is a fraction of the whole GPU's"
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
    # out_proj over every position; in_proj (only when the widths differ) over the kept patches, before the
    # mask tokens are filled in
    proj = 2 * dec_dim * enc_cfg.dim * (patches + (kept if dec_dim != enc_cfg.dim else 0))
    decoder = clips * views * (cfg.decoder_depth * block_flops(patches, dec_dim, 4.0, True) + proj)
    teacher = encoder_forward_flops(enc_cfg, clips, patches)
    return {"student_encoder": student, "decoder": decoder, "teacher": teacher,
            "total": 3 * (student + decoder) + teacher}


