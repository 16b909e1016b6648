"""Frozen feature extraction on the CPU, float32 against bf16 autocast, in one run. Prints JSON.

    python benchmarks/bench_precision.py --threads 2                  # tiny and base
    python benchmarks/bench_precision.py --sizes tiny --clips 32

What probe_cgp.py's feature pass does (front-end, then every layer of a frozen random-weight encoder,
bat.precision.autocast), on demo clips of --seconds. Per size: clips/s for fp32 and bf16, their ratio,
and how far bf16 moves the result: the largest absolute difference of the pooled CLS (mean over layers of
the L2-normalised CLS, CGP's embedding with a uniform gate) and the top-1 agreement of a fixed random
linear head (--classes) on it. The ISA line (bat.cpu) says whether the CPU has native bf16 (AVX512_BF16 /
AMX); without it oneDNN emulates bf16 and fp32 is expected to win (auto picks fp32 there).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bat.cpu import cpu_isa, isa_string, usable_cpus  # noqa: E402
from bat.demo import demo_clip  # noqa: E402
from bat.frontend import Frontend  # noqa: E402
from bat.model import Encoder, config_for  # noqa: E402
from bat.precision import autocast, resolve  # noqa: E402


@torch.inference_mode()
def features(encoder, frontend, waves, precision, batch):
    out = []
    for i in range(0, len(waves), batch):
        spec = frontend(waves[i:i + batch])  # float32 (the front-end opts out of autocast)
        with autocast("cpu", precision):
            cls = encoder.forward_layers(spec)[:, :, 0].float()  # (L, B, D)
        out.append(F.normalize(cls, dim=-1).mean(0))
    return torch.cat(out)


def bench_size(size, args, waves):
    torch.manual_seed(0)
    encoder = Encoder(config_for(size))
    encoder.init_pretraining_weights()
    encoder.eval().requires_grad_(False)
    frontend = Frontend("bat", target_frames=16 * -(-(1 + waves.shape[1] // 160) // 16))
    head = torch.nn.Linear(encoder.cfg.dim, args.classes)
    clips = waves if size == "tiny" else waves[: max(args.batch, len(waves) // 2)]
    row = {"size": size, "clips": len(clips), "batch": args.batch}
    pooled = {}
    features(encoder, frontend, clips[: args.batch], "fp32", args.batch)  # warm-up: allocations, kernels
    features(encoder, frontend, clips[: args.batch], "bf16", args.batch)
    for precision in ("fp32", "bf16"):
        t = time.perf_counter()
        pooled[precision] = features(encoder, frontend, clips, precision, args.batch)
        row[f"{precision}_clips_per_s"] = round(len(clips) / (time.perf_counter() - t), 2)
    row["bf16_speedup"] = round(row["bf16_clips_per_s"] / row["fp32_clips_per_s"], 2)
    with torch.no_grad():
        a, b = head(pooled["fp32"]).argmax(-1), head(pooled["bf16"]).argmax(-1)
    row["top1_agreement"] = round(float((a == b).float().mean()), 4)
    row["max_abs_diff_pooled_cls"] = float(f"{(pooled['fp32'] - pooled['bf16']).abs().max():.3e}")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    p.add_argument("--clips", type=int, default=64, help="demo clips (base: half as many)")
    p.add_argument("--seconds", type=float, default=10.23, help="clip length (10.23 s: 1024 frames)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=527, help="random linear head for the agreement")
    p.add_argument("--threads", type=int, default=usable_cpus(),
                   help="PyTorch threads (default: the CPUs this process may use, a container's CPU quota counted)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    waves = torch.from_numpy(__import__("numpy").stack(
        [demo_clip(i, seed=3, seconds=args.seconds)[0] for i in range(args.clips)]))
    report = {"machine": {"platform": platform.platform(), "isa": isa_string(), "threads": args.threads,
                          "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "mkldnn": torch.backends.mkldnn.is_available(), "auto_resolves_to": resolve("cpu", "auto"),
                          "native_bf16": cpu_isa().native_bf16, "load_average_at_start": os.getloadavg()},
              "clip_seconds": args.seconds, "results": []}
    for size in args.sizes:
        report["results"].append(bench_size(size, args, waves))
        print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
