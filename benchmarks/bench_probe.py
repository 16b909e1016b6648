"""Probe training throughput: steps/s and clips/s, with and without --cache-features. Prints JSON.

    python benchmarks/bench_probe.py                                # tiny and base, CPU (+ CUDA when present)
    python benchmarks/bench_probe.py --sizes tiny --devices cpu --steps 5
    python benchmarks/bench_probe.py --probe lp --seconds 10.23 --batch-size 48 --devices cuda
    python benchmarks/bench_probe.py --sizes tiny --devices cpu --seconds 3 --batch-size 32 --dense-min-max

One training step is what probe_cgp.py runs: without a cache, front-end + frozen encoder (no_grad,
bf16 autocast on CUDA, all layers at once) + head forward/backward + AdamW; with a cache, only the head
part on features already in memory (`cache_build_clips_per_s` is the one-off encoding pass). Inputs are
synthetic waveforms held in memory, so disk and decoding are not measured.

--dense-min-max also times the cached CGP step with autograd's own min/max backward (a dense (B, N, K)
gradient and two full matmuls, the formula as REF writes it) instead of bat.heads' sparse one, in the
same run, and reports the speed-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bat.heads  # noqa: E402
from bat.cpu import isa_string  # noqa: E402
from bat.data import Batch  # noqa: E402
from bat.features import encode  # noqa: E402
from bat.precision import autocast  # noqa: E402
from bat.frontend import Frontend  # noqa: E402
from bat.heads import build_head  # noqa: E402
from bat.losses import classification_loss  # noqa: E402
from bat.model import Encoder, config_for  # noqa: E402
from bat.optim import param_groups  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(size, device, args):
    torch.manual_seed(0)
    encoder = Encoder(config_for(size)).to(device).eval().requires_grad_(False)
    samples = int(args.seconds * 16000)
    frames = 16 * -(-(1 + samples // 160) // 16)
    frontend = Frontend("bat", target_frames=frames).to(device)
    head = build_head(args.probe, encoder.cfg.dim, encoder.cfg.depth, args.classes, args.prototypes).to(device)
    opt = torch.optim.AdamW(param_groups(head, 0.05), lr=1e-3)
    B = args.batch_size
    batch = Batch(torch.randn(B, samples) * 0.1, torch.full((B,), samples), torch.randint(0, args.classes, (B,)),
                  torch.arange(B), [])
    targets = batch.targets.to(device)

    def step(feats):
        with autocast(device, "cuda-bf16"):
            logits = head(feats)
        loss = classification_loss(logits, targets, "multiclass")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn):
        fn()  # warm-up (allocations, kernels)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        return (time.perf_counter() - t) / args.steps

    head.train()
    no_cache = timed(lambda: step(encode(encoder, frontend, head, batch, device)))
    cached = encode(encoder, frontend, head, batch, device)  # what a cache holds for B clips
    with_cache = timed(lambda: step(cached))
    build = timed(lambda: encode(encoder, frontend, head, batch, device))
    dense = None
    if args.dense_min_max and args.probe == "cgp":
        sparse_fn = bat.heads.min_max_similarity
        bat.heads.min_max_similarity = bat.heads.dense_min_max_similarity
        try:
            dense = timed(lambda: step(cached))
        finally:
            bat.heads.min_max_similarity = sparse_fn
    per_clip = sum(t.numel() * t.element_size() for t in cached[:2] if t is not None)
    out = {"size": size, "device": device.type, "probe": args.probe, "prototypes": args.prototypes,
           "batch_size": B, "seconds": args.seconds, "frames": frames,
           "no_cache": {"steps_per_s": 1 / no_cache, "clips_per_s": B / no_cache},
           "cache": {"steps_per_s": 1 / with_cache, "clips_per_s": B / with_cache},
           "cache_build_clips_per_s": B / build, "cache_bytes_per_clip": per_clip // B}
    if dense is not None:
        out["cache_dense_min_max"] = {"steps_per_s": 1 / dense, "speedup_of_sparse": dense / with_cache}
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    p.add_argument("--probe", default="cgp", choices=["cgp", "lcgp", "lp", "protobin"])
    p.add_argument("--prototypes", type=int, default=10000)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 48 on CUDA")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length (5 s = ESC-50, 512 frames)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--dense-min-max", action="store_true",
                   help="CGP: also time autograd's dense min/max backward on cached features, for the speed-up")
    args = p.parse_args()
    results = []
    for dev in args.devices:
        device = torch.device(dev)
        a = argparse.Namespace(**vars(args))
        a.batch_size = args.batch_size or (48 if device.type == "cuda" else 8)
        a.steps = args.steps or (20 if device.type == "cuda" else 3)
        for size in args.sizes:
            results.append(bench(size, device, a))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress while the rest runs
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "isa": isa_string(),
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(json.dumps({"env": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
