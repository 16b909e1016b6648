"""Peak memory of bat.hear on long audio: 20 minutes in windows, never all at once. Prints JSON.

    python benchmarks/hear_memory.py --encoder random:base --minutes 20
    python benchmarks/hear_memory.py --encoder runs/bat/encoder.safetensors --minutes 20 --batch-windows 4

Reports the process's peak resident memory (ru_maxrss) after loading the model and creating the input
(`before_mb`) and after the embeddings (`peak_mb`); `growth_mb` = peak - before is what embedding the
audio cost, to compare with the output itself (`output_mb`) and the input (`input_mb`).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bat.hear as hear  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="random:tiny")
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--batch-windows", type=int, default=8)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    model = hear.load_model(a.encoder, a.batch_windows, num_heads=a.num_heads).to(a.device)
    audio = (torch.rand(1, int(a.minutes * 60 * 16000), generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.1
    audio = audio.to(a.device)
    hear.get_timestamp_embeddings(audio[:, :16000 * 3], model)  # warm-up: allocator pools, lazy init
    before = peak_rss_mb()
    t0 = time.perf_counter()
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    out = {"encoder": a.encoder, "minutes": a.minutes, "batch_windows": a.batch_windows, "dim": model.timestamp_embedding_size,
           "window_s": model.window_patches * 0.16, "frames": emb.shape[1], "input_mb": audio.numel() * 4 / 2**20,
           "output_mb": emb.numel() * 4 / 2**20, "before_mb": round(before, 1), "peak_mb": round(peak, 1),
           "growth_mb": round(peak - before, 1), "seconds": round(seconds, 2),
           "last_timestamp_ms": float(ts[0, -1]), "audio_ms": a.minutes * 60_000}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
