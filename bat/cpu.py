"""The CPU's instruction set, as far as the int8 / bf16 kernels care, and how many CPUs this process may
really use. Torch-free and standard-library only (bat.tag and bat.tagger import it).

    from bat.cpu import cpu_isa, isa_string, usable_cpus
    cpu_isa()      # -> ISA(arch='x86_64', avx2=True, avx512=True, vnni=True, bf16=True, amx=False, ...)
    isa_string()   # -> "x86-64 AVX-512 VNNI BF16"
    usable_cpus()  # -> 2 in a container limited to 2 CPUs (docker --cpus 2) on a 64-core machine

On Linux the flags come from /proc/cpuinfo; elsewhere only the architecture is known (platform.machine())
and the x86 extensions read as absent (`source` says "unknown"). Why they matter here:
- VNNI (avx512_vnni, avx_vnni) or AMX (amx_int8): u8 x s8 products are summed in int32 in one instruction.
  Without it, x86 int8 kernels (AVX2 vpmaddubsw) add pairs of products in int16, which saturates with
  full-range 8-bit weights; onnxruntime's quantisation guide advises reduce_range (7-bit weights) there.
  ARM's int8 dot products have no such limit. bat.onnx_graph.int8_scheme picks from this.
- BF16 (avx512_bf16) or AMX (amx_bf16): native bf16 matmuls (oneDNN), so bf16 autocast is a speed-up on
  the CPU; elsewhere it is emulated and slower than float32 (bat.precision).

Usable CPUs: os.cpu_count() and os.sched_getaffinity (and Python 3.13's os.process_cpu_count) report the
machine's CPUs inside a container with a CPU quota (Kubernetes `limits.cpu: 2` or `docker --cpus 2` on a
64-core node: 64). A pool of 64 threads on 2 CPUs of quota is throttled by the kernel every scheduling
period, and latency grows many times. usable_cpus() also reads the cgroup's quota (v2 cpu.max, v1
cpu.cfs_quota_us / cpu.cfs_period_us), so default thread and worker counts follow it.
"""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
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


# ------------------------------------------------------------------------- CPUs this process may use

class CPUs(NamedTuple):
    machine: int  # os.cpu_count(): every CPU the kernel shows, whatever limits this process
    affinity: int  # CPUs this process may be scheduled on (taskset, a SLURM allocation, a cpuset)
    quota: float | None  # the cgroup's CPU time quota in CPUs (1.5: 150 ms per 100 ms); None: no limit found
    usable: int  # min(affinity, ceil(quota)), at least 1


def _read_ints(path: Path) -> list[int] | None:
    """A cgroup file's whitespace-separated integers; None where it is missing, unreadable or not all integers
    (cpu.max's "max")."""
    try:
        return [int(word) for word in path.read_text().split()]
    except (OSError, ValueError):  # missing, no permission, "max", garbage (UnicodeDecodeError is a ValueError)
        return None


def _ratio(quota: int, period: int) -> float | None:
    """quota / period in CPUs; None for no limit (a quota of -1) or a nonsensical pair."""
    return quota / period if quota > 0 and period > 0 else None


def _v2_quota(directory: Path) -> float | None:
    """cpu.max is "QUOTA PERIOD" in microseconds ("200000 100000": 2 CPUs), or "max PERIOD" for no limit."""
    words = _read_ints(directory / "cpu.max")
    return _ratio(*words) if words and len(words) == 2 else None


def _v1_quota(directory: Path) -> float | None:
    """cpu.cfs_quota_us / cpu.cfs_period_us, each one number in microseconds; a quota of -1 means no limit."""
    quota, period = _read_ints(directory / "cpu.cfs_quota_us"), _read_ints(directory / "cpu.cfs_period_us")
    return _ratio(quota[0], period[0]) if quota and period and len(quota) == len(period) == 1 else None


def _with_parents(base: Path, cgroup_path: str) -> list[Path]:
    """base/a/b/c, base/a/b, base/a, base: a limit set on an ancestor cgroup (a Kubernetes pod's, a systemd
    slice's) binds every cgroup below it. Inside a cgroup namespace /proc/self/cgroup says "/" and the
    container's own files sit at base; without one (docker on cgroup v1) the host's path is shown while
    base is already the container's cgroup: the deeper folders are missing and base is read."""
    parts = [p for p in cgroup_path.strip().split("/") if p]
    if any(p in (".", "..") for p in parts):  # a cgroup outside this namespace's view: only its top is ours
        parts = []
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_quota(root: str | os.PathLike = "/") -> float | None:
    """This process's CPU quota in CPUs (the tightest of its cgroup and their ancestors, v2 and v1), or None
    where none is set or none could be read. Never raises: an odd file means "no limit known". `root` is
    where /proc and /sys are found (tests build fake trees)."""
    root = Path(root)
    try:
        lines = (root / "proc/self/cgroup").read_text()
    except (OSError, ValueError):  # not Linux, or no /proc
        return None
    found = []
    for line in lines.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one tree, "0::/PATH"
            found += [_v2_quota(d) for d in _with_parents(root / "sys/fs/cgroup", path)]
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/PATH", the cpu controller's tree
            # Its usual mount points (systemd and docker); "cpu" is often a link to "cpu,cpuacct".
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                found += [_v1_quota(d) for d in _with_parents(root / "sys/fs/cgroup" / mount, path)]
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def cpu_limits(root: str | os.PathLike = "/") -> CPUs:
    """The machine's CPUs, this process's affinity and cgroup quota, and the CPUs it may really use."""
    try:
        affinity = len(os.sched_getaffinity(0))  # Linux; not macOS or Windows
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    machine = os.cpu_count() or affinity
    quota = cgroup_quota(root)
    usable = min(affinity, math.ceil(quota)) if quota is not None else affinity
    return CPUs(machine=machine, affinity=affinity, quota=quota, usable=max(1, usable))


def usable_cpus(root: str | os.PathLike = "/") -> int:
    """The CPUs this process may really use: its affinity, within the cgroup's CPU quota rounded up (1.5 -> 2),
    at least 1. For default thread and worker counts, where os.cpu_count() would count a whole node."""
    return cpu_limits(root).usable


def cpus_string(cpus: CPUs | None = None) -> str:
    """A line for `bat.tag --info`: "cpus: 64 usable", "cpus: 2 usable (cgroup CPU quota 1.5 of 64)",
    "cpus: 3 usable (affinity 3 of 64)"."""
    c = cpus or cpu_limits()
    line = f"cpus: {c.usable} usable"
    if c.usable < c.machine:  # say what limits it
        if c.quota is not None and math.ceil(c.quota) <= c.affinity:
            line += f" (cgroup CPU quota {c.quota:g} of {c.machine})"
        else:
            line += f" (affinity {c.affinity} of {c.machine})"
    return line


if __name__ == "__main__":
    print(isa_string())
    print(cpus_string())
