"""The exported ONNX tagger against PyTorch eager: latency per clip, clips/s, peak RSS. Prints JSON.

    python benchmarks/bench_export.py                          # tiny and base, CPU (+ CUDA provider if it loads)
    python benchmarks/bench_export.py --sizes tiny --repeats 5

Each size is a random-weight encoder with a CGP head (AudioSet-sized by default: 527 classes, 10 000
prototypes), written with export.py's own code and run on 10 s demo clips at batch 1 and 8: PyTorch
eager (frontend + encoder + head, float32, inference_mode) vs onnxruntime on the same input, both with
--threads threads (default: all cores). `ort_over_torch` is the latency ratio (below 1: onnxruntime is faster). The peak RSS is that of a
separate `python -m bat.tag` process tagging one 60 s file (what a service pays, without torch). Takes a
few minutes on 2 cores (base: fewer repeats, and most of the time is its export).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import export as export_script  # noqa: E402
from bat.demo import demo_clip  # noqa: E402
from bat.frontend import Frontend  # noqa: E402
from bat.model import Encoder, config_for, count_parameters  # noqa: E402
from bat.probes import CGP, Probe, save_probe  # noqa: E402
from bat.tag import Tagger  # noqa: E402

CLIP_SECONDS = 10.0


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, onnxruntime's arena
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def make_probe(size: str, classes: int, prototypes: int, path: Path) -> None:
    torch.manual_seed(0)
    enc = Encoder(config_for(size))
    enc.init_pretraining_weights()
    head = CGP(enc.cfg.dim, enc.cfg.depth, classes, num_prototypes=prototypes)
    save_probe(path, Probe(enc, head, Frontend("bat"), [f"class_{i}" for i in range(classes)], "multilabel"))


# Runs the tagger CLI in this process, then reports its own peak RSS (VmHWM). Measured inside the child:
# the parent's rusage would count the pages the child shared with this (large) process before exec.
RSS_PROBE = """
import runpy, sys
sys.argv = ["bat.tag"] + sys.argv[1:]
try:
    runpy.run_module("bat.tag", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) / 1024, file=sys.stderr)
"""


def peak_rss_mb(model: Path, audio: Path, device: str, threads: int) -> float:
    """Peak resident memory of a fresh `python -m bat.tag` process tagging `audio` (Linux)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model), str(audio), "--device", device,
                           "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bat.tag failed: {proc.stderr.strip()}")
    return float(proc.stderr.strip().splitlines()[-1])


def bench_size(size: str, args, tmp: Path, audio60: Path) -> dict:
    ckpt, onnx_path = tmp / f"{size}.safetensors", tmp / f"{size}.onnx"
    make_probe(size, args.classes, args.prototypes, ckpt)
    model, info = export_script.load_model(str(ckpt))
    t = time.perf_counter()
    export_script.export_onnx(model, str(onnx_path), 18, {"labels": info["labels"], "task": info["task"],
                                                           "sample_rate": "16000"})
    export_s = time.perf_counter() - t
    reference = export_script.Exported(model.encoder, {"kind": "bat"}, model.head, model.task, export=False).eval()
    repeats = args.repeats if size == "tiny" else max(1, args.repeats // 3)
    result = {"size": size, "params_M": round(count_parameters(model, trainable_only=False) / 1e6, 2),
              "onnx_MB": round(onnx_path.stat().st_size / 2**20, 1), "export_s": round(export_s, 1),
              "repeats": repeats, "runs": []}
    # The CUDA provider counts only where it really loads (onnxruntime-gpu lists it on CPU machines too).
    providers = ["cpu"] + (["cuda"] if Tagger(onnx_path, device="cuda").device == "cuda" else [])
    for device in providers:
        tagger = Tagger(onnx_path, device=device, threads=args.threads)
        for batch in args.batches:
            x = np.stack([demo_clip(i, seconds=CLIP_SECONDS)[0] for i in range(batch)])
            with torch.inference_mode():
                want = reference(torch.from_numpy(x))[0].numpy()
                torch_s = median_seconds(lambda: reference(torch.from_numpy(x)), repeats) if device == "cpu" else None
            got = tagger.scores(x)
            ort_s = median_seconds(lambda: tagger.scores(x), repeats)
            row = {"device": device, "batch": batch, "max_abs_diff": float(np.abs(got - want).max()),
                   "ort_ms_per_clip": round(1e3 * ort_s / batch, 2), "ort_clips_per_s": round(batch / ort_s, 2)}
            if torch_s is not None:
                row.update(torch_ms_per_clip=round(1e3 * torch_s / batch, 2), torch_clips_per_s=round(batch / torch_s, 2),
                           ort_over_torch=round(ort_s / torch_s, 3))
            result["runs"].append(row)
            print(json.dumps({"size": size, **row}), file=sys.stderr, flush=True)
        result[f"peak_rss_MB_tag_60s_{device}"] = round(peak_rss_mb(onnx_path, audio60, device, args.threads), 1)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=5, help="timed runs for tiny (base: a third, at least 1)")
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--prototypes", type=int, default=10000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for both PyTorch and onnxruntime (1 on a machine shared with other jobs: "
                        "PyTorch's OpenMP threads stall at every barrier when the cores are oversubscribed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    report = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__,
                          "onnxruntime": ort.__version__, "load_average_at_start": os.getloadavg()},
              "clip_seconds": CLIP_SECONDS, "head": f"cgp, {args.prototypes} prototypes, {args.classes} classes",
              "results": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        audio60 = tmp / "sixty.wav"
        sf.write(audio60, demo_clip(0, seconds=60.0)[0], 16000)
        for size in args.sizes:
            report["results"].append(bench_size(size, args, tmp, audio60))
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
