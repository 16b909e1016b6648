"""One BAT pretraining step (front-end, teacher targets, student + decoder forward/backward, AdamW, EMA):
clips/s, seconds per step, peak memory and, on CUDA, model FLOPs utilisation. Prints JSON.

    python benchmarks/bench_pretrain.py                        # tiny and base; CPU, and CUDA (bf16) when present
    python benchmarks/bench_pretrain.py --sizes base --devices cuda --batch 12 --views 16   # REF's per-GPU load
    python benchmarks/bench_pretrain.py --sizes tiny --cpu-bf16   # CPU float32 and bf16 autocast, in one run

FLOPs are counted by torch.utils.flop_counter on one step (matmuls, convolutions and fused attention,
forward and backward); MFU = counted FLOPs / step time / the GPU's dense bf16 peak (a table of known
GPUs, or --peak-tflops). On the CPU attention runs in a kernel the counter does not see, so the CPU
FLOP count omits attention; MFU is only reported for CUDA.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bat.cpu import isa_string  # noqa: E402
from bat.frontend import Frontend  # noqa: E402
from bat.masking import inverse_block_mask  # noqa: E402
from bat.model import Decoder, Encoder, config_for, count_parameters  # noqa: E402
from bat.pretraining import PretrainBatch, Student, ssl_step  # noqa: E402
from bat.optim import EmaSchedule, ema_update, param_groups  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 SXM", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0),
                    ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0)]
DECODER = {"tiny": (192, 2, 3), "small": (384, 6, 6), "base": (768, 6, 12)}  # pretrain.py's presets


def reset_peak_memory(device: str):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) on Linux
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device: str) -> float | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bf16_peak(name: str) -> float | None:
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS if key in name), None)


def make_step(size, device, batch, views, frames, compile_, bf16):
    """A closure running one full training step on a fixed synthetic batch."""
    tp = frames // 16
    enc = Encoder(config_for(size, chunk_patches=tp))
    enc.init_pretraining_weights()
    dim, depth, heads = DECODER[size]
    student = Student(enc, Decoder(enc.dim, dim, depth, heads, num_patches=tp * 8, time_patches=tp)).to(device)
    teacher = copy.deepcopy(student.encoder).requires_grad_(False).eval()
    opt = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda")
    frontend = Frontend("bat", target_frames=frames).to(device)
    ema = EmaSchedule()
    wave = torch.randn(batch, (frames - 1) * 160, device=device) * 0.1
    m = inverse_block_mask(batch * views, tp, 8, 0.8, generator=torch.Generator().manual_seed(0))
    batch_ = PretrainBatch(wave, torch.full((batch,), wave.shape[1]), m.mask.to(device), m.ids_keep.to(device),
                           torch.arange(batch), [])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    model = torch.compile(student) if compile_ else student

    def step():  # pretrain.py's micro-batch (bat.pretraining.ssl_step) and optimiser step
        ssl_step(model, teacher, frontend, batch_, torch.device(device), autocast).losses.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(teacher, student.encoder, ema(0))

    params = {"encoder_M": round(count_parameters(student.encoder) / 1e6, 2),
              "decoder_M": round(count_parameters(student.decoder) / 1e6, 2)}
    return step, params


def bench(size, device, batch, views, frames, repeats, compile_, peak_override, bf16):
    step, params = make_step(size, device, batch, views, frames, compile_, bf16)
    step()  # warm-up (allocations, kernels, compilation)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sec = sorted(times)[len(times) // 2]
    out = {"size": size, "device": device, **params, "clips_per_step": batch, "views": views, "frames": frames,
           "precision": "bf16-autocast" if bf16 else "fp32", "compile": compile_,
           "seconds_per_step": round(sec, 4), "clips_per_s": round(batch / sec, 2),
           "peak_memory_MB": round(peak_memory_mb(device) or float("nan"), 1),
           "counted_tflops_per_step": round(flops / 1e12, 4)}
    if device == "cuda":
        peak = peak_override * 1e12 if peak_override else bf16_peak(torch.cuda.get_device_name())
        out["achieved_tflops"] = round(flops / sec / 1e12, 2)
        out["mfu"] = round(flops / sec / peak, 4) if peak else None
        out["bf16_peak_tflops"] = peak / 1e12 if peak else None
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(DECODER))
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: CPU 2, CUDA 12 = REF's 48 on 4 GPUs)")
    p.add_argument("--views", type=int, default=None, help="views per clip (default: CPU 4, CUDA 16 as REF)")
    p.add_argument("--frames", type=int, default=1024, help="spectrogram frames per clip (REF: 1024)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on the CPU also time bf16 autocast (pretrain.py --precision bf16) beside float32")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    args = p.parse_args()
    report = {"machine": {"platform": platform.platform(), "isa": isa_string(), "cpu_threads": torch.get_num_threads(),
                          "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "results": []}
    for device in args.devices:
        batch = args.batch or (12 if device == "cuda" else 2)
        views = args.views or (16 if device == "cuda" else 4)
        precisions = [device == "cuda"] + ([True] if device == "cpu" and args.cpu_bf16 else [])  # True: bf16
        for size in args.sizes:
            for bf16 in precisions:
                r = bench(size, device, batch, views, args.frames, args.repeats, args.compile, args.peak_tflops, bf16)
                print(json.dumps(r), file=sys.stderr, flush=True)
                report["results"].append(r)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
