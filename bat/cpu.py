"""The CPU's instruction set, as far as the int8 / bf16 kernels care. Torch-free (bat.tag imports it).

    from bat.cpu import cpu_isa, isa_string
    cpu_isa()      # -> ISA(arch='x86_64', avx2=True, avx512=True, vnni=True, bf16=True, amx=False, ...)
    isa_string()   # -> "x86-64 AVX-512 VNNI BF16"

On Linux the flags come from /proc/cpuinfo; elsewhere only the architecture is known (platform.machine())
and the x86 extensions read as absent (`source` says "unknown"). Why they matter here:
- VNNI (avx512_vnni, avx_vnni) or AMX (amx_int8): u8 x s8 products are summed in int32 in one instruction.
  Without it, x86 int8 kernels (AVX2 vpmaddubsw) add pairs of products in int16, which saturates with
  full-range 8-bit weights; onnxruntime's quantisation guide advises reduce_range (7-bit weights) there.
  ARM's int8 dot products have no such limit. bat.onnx_graph.int8_scheme picks from this.
- BF16 (avx512_bf16) or AMX (amx_bf16): native bf16 matmuls (oneDNN), so bf16 autocast is a speed-up on
  the CPU; elsewhere it is emulated and slower than float32 (bat.precision).
"""
from __future__ import annotations

import platform
from typing import NamedTuple


class ISA(NamedTuple):
    arch: str  # "x86_64", "aarch64", ... (platform.machine(), normalised)
    avx2: bool
    avx512: bool  # AVX-512 F
    vnni: bool  # avx512_vnni or avx_vnni (int8 dot products summed in int32)
    bf16: bool  # avx512_bf16 (native bf16 dot products; ARM64: bf16)
    amx: bool  # amx_tile with amx_int8 / amx_bf16
    amx_int8: bool
    amx_bf16: bool
    source: str  # "/proc/cpuinfo", or "unknown" where the flags could not be read

    @property
    def x86(self) -> bool:
        return self.arch == "x86_64"

    @property
    def native_bf16(self) -> bool:
        return self.bf16 or self.amx_bf16

    @property
    def int8_dot_int32(self) -> bool:
        """int8 products summed in int32 without int16 saturation: VNNI or AMX on x86, any ARM64."""
        return self.vnni or self.amx_int8 or self.arch == "aarch64"


ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


def parse_flags(flags, arch: str = "x86_64", source: str = "/proc/cpuinfo") -> ISA:
    """A flags string ("fpu sse avx2 avx512f ...", as /proc/cpuinfo's `flags` line) or iterable -> ISA."""
    f = set(flags.split() if isinstance(flags, str) else flags)
    arch = ARCH_ALIASES.get(arch.lower(), arch.lower())
    amx_tile = "amx_tile" in f
    return ISA(arch=arch, avx2="avx2" in f, avx512="avx512f" in f,
               vnni=bool(f & {"avx512_vnni", "avx_vnni"}),
               bf16="avx512_bf16" in f or (arch == "aarch64" and "bf16" in f),
               amx=amx_tile and bool(f & {"amx_int8", "amx_bf16"}),
               amx_int8=amx_tile and "amx_int8" in f, amx_bf16=amx_tile and "amx_bf16" in f, source=source)


def parse_cpuinfo(text: str, arch: str | None = None) -> ISA:
    """The text of /proc/cpuinfo -> ISA (the first `flags` line; ARM kernels call it `Features`)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return parse_flags(value, arch or platform.machine() or "unknown")
    return parse_flags("", arch or platform.machine() or "unknown", source="unknown")


_cached: ISA | None = None


def cpu_isa() -> ISA:
    """This machine's ISA (read once)."""
    global _cached
    if _cached is None:
        try:
            with open("/proc/cpuinfo") as fh:
                _cached = parse_cpuinfo(fh.read())
        except OSError:  # not Linux: the architecture only
            _cached = parse_flags("", platform.machine() or "unknown", source="unknown")
    return _cached


def isa_string(isa: ISA | None = None) -> str:
    """A short line: "x86-64 AVX-512 VNNI BF16", "x86-64 AVX2", "x86-64 AVX-512 VNNI BF16 AMX", "aarch64"."""
    isa = isa or cpu_isa()
    parts = ["x86-64" if isa.x86 else isa.arch or "unknown"]
    if isa.avx512:
        parts.append("AVX-512")
    elif isa.avx2:
        parts.append("AVX2")
    if isa.vnni:
        parts.append("VNNI")
    if isa.bf16:
        parts.append("BF16")
    if isa.amx:
        parts.append("AMX")
    if isa.source == "unknown" and isa.x86:
        parts.append("(extensions unknown)")
    return " ".join(parts)


if __name__ == "__main__":
    print(isa_string())
