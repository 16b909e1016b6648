"""Front-end and encoder throughput: seconds of audio per second, clips/s, peak memory. Prints JSON.

    python benchmarks/bench_encoder.py                   # CPU (and CUDA with bf16 autocast when present)
    python benchmarks/bench_encoder.py --sizes tiny --repeats 5

Each encoder is also run with the explicit softmax attention REF uses, so the gain of
F.scaled_dot_product_attention is printed as a ratio (sdpa_speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bat.cpu import isa_string  # noqa: E402
from bat.frontend import spectrogram  # noqa: E402
from bat.model import Encoder, config_for, count_parameters  # noqa: E402

SAMPLES = 163_680  # 10.23 s -> exactly 1024 frames (10.24 s of spectrogram)


def reset_peak_memory(device: str):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) on Linux
            f.write("5")


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


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def bench_frontend(device: str, batch: int, repeats: int) -> dict:
    wave = torch.randn(batch, SAMPLES, device=device) * 0.1
    sec = timed(lambda: spectrogram(wave), device, repeats)
    return {"batch": batch, "seconds_per_batch": sec, "audio_seconds_per_second": batch * SAMPLES / 16000 / sec}


@torch.no_grad()
def bench_encoder(size: str, device: str, batch: int, repeats: int) -> dict:
    enc = Encoder(config_for(size)).to(device).eval()
    spec = torch.rand(batch, 1, 1024, 128, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def run():
        with autocast:
            enc.forward_layers(spec)

    result = {"size": size, "params_M": round(count_parameters(enc) / 1e6, 2), "batch": batch,
              "precision": "bf16-autocast" if device == "cuda" else "fp32"}
    for style in ("sdpa", "explicit_softmax"):
        for blk in enc.blocks:
            blk.attn.explicit_softmax = style == "explicit_softmax"
        reset_peak_memory(device)
        sec = timed(run, device, repeats)
        result[style] = {"seconds_per_batch": round(sec, 4), "clips_per_s": round(batch / sec, 2),
                         "peak_memory_MB": round(peak_memory_mb(device) or float("nan"), 1)}
    result["sdpa_speedup"] = round(result["explicit_softmax"]["seconds_per_batch"] / result["sdpa"]["seconds_per_batch"], 3)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = p.parse_args()
    report = {"machine": {"platform": platform.platform(), "isa": isa_string(), "cpu_threads": torch.get_num_threads(),
                          "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "clip_seconds": 10.24, "results": []}
    for device in args.devices:
        entry = {"device": device, "frontend": bench_frontend(device, args.batch, args.repeats), "encoders": []}
        for size in args.sizes:
            entry["encoders"].append(bench_encoder(size, device, args.batch, args.repeats))
            print(json.dumps(entry["encoders"][-1]), file=sys.stderr, flush=True)
        report["results"].append(entry)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
