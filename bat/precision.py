"""--precision auto|fp32|bf16 for frozen feature extraction (probe_cgp.py, Probe.predict).

auto: bf16 autocast on CUDA (what the scripts always did) and on CPUs with native bf16 dot products
(AVX512_BF16 or AMX, read by bat.cpu); float32 on other CPUs, where oneDNN emulates bf16 and it is slower
than float32. Measured by benchmarks/bench_precision.py.
"""
from __future__ import annotations

import torch

from bat.cpu import ISA, cpu_isa

PRECISIONS = ("auto", "cuda-bf16", "fp32", "bf16")  # cuda-bf16: bf16 on CUDA, float32 on every CPU
_process_default = "auto"  # set once by a script's --precision (set_default)


def native_bf16(isa: ISA | None = None) -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512_BF16, AMX-BF16, ARM BF16)."""
    return (isa or cpu_isa()).native_bf16


def resolve(device, precision: str | None = None, isa: ISA | None = None) -> str:
    """"fp32" or "bf16" for `precision` (None: the process default, see set_default) on `device`."""
    precision = _process_default if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "cuda-bf16":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and native_bf16(isa)):
        return "bf16"
    return "fp32"


def autocast(device, precision: str | None = None, isa: ISA | None = None):
    """The autocast context for extracting frozen features on `device` at `precision`."""
    device = torch.device(device)
    bf16 = resolve(device, precision, isa) == "bf16" and device.type in ("cpu", "cuda")
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", dtype=torch.bfloat16,
                          enabled=bf16)


def set_default(precision: str) -> str:
    """Set the process default (a script's --precision) after checking it; returns it."""
    global _process_default
    resolve("cpu", precision)  # validates
    _process_default = precision
    return precision
