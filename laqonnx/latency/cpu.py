"""What the CPU offers for int8: :class:`CpuInfo` (model, core counts, int8 dot-product flags) from
Linux ``/proc/cpuinfo``, and the default thread count of latency measurements.

Int8 is only fast on CPUs with int8 dot-product instructions (x86 VNNI or AMX, Arm dot product);
:meth:`CpuInfo.int8_warning` warns when none is present.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuInfo", "parse_cpuinfo", "cpu_info", "default_threads"]

# CPU flag -> shown name, in the order reported; all give onnxruntime fast int8 kernels.
_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model, its core counts and instruction-set flags relevant to int8 speed."""

    model_name: str
    logical_cores: int
    flags: frozenset[str]
    vnni: bool
    amx: bool
    avx512: bool
    physical_cores: int | None = None
    note: str | None = None  # set when the flags could not be read

    def int8_isa(self) -> list[str]:
        """The int8 dot-product extensions present, e.g. ``["avx512_vnni", "avx_vnni", "amx_int8"]``."""
        return [f for f in _INT8_FLAGS if f in self.flags]

    def int8_saturates(self) -> bool:
        """True on an x86 CPU with AVX2 but no VNNI or AMX: onnxruntime's uint8 x int8 kernels there
        add pairs of products in 16 bits (``vpmaddubsw``), which saturates with full-range int8
        weights; 7-bit weights (``reduce_range``) cannot overflow."""
        return "avx2" in self.flags and not (self.vnni or self.amx)

    def int8_warning(self) -> str | None:
        """A one-line warning when int8 is unlikely to be faster than float here, else None."""
        if self.note is not None:
            return f"int8 speed unknown: {self.note}"
        if self.int8_isa():
            return None
        return (
            f"{self.model_name or 'this CPU'} has no VNNI or AMX (nor Arm dot product): int8 will be "
            "slow here and may be slower than float"
        )


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse the text of Linux ``/proc/cpuinfo`` (x86 or Arm). A pure function, for testing."""
    model_name = ""
    flags: set[str] = set()
    processors = 0
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = None
    for line in text.splitlines() + [""]:
        if not line.strip():  # end of one processor's block
            if physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            processors += 1
        elif key in ("model name", "cpu model") and not model_name:
            model_name = value
        elif key in ("flags", "features") and not flags:
            flags = set(value.lower().split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
    if not model_name:
        model_name = platform.processor() or platform.machine() or "unknown CPU"
    return CpuInfo(
        model_name=model_name,
        logical_cores=processors or (os.cpu_count() or 1),
        flags=frozenset(flags),
        vnni=bool(flags & {"avx512_vnni", "avx_vnni"}),
        amx="amx_int8" in flags,
        avx512="avx512f" in flags,
        physical_cores=len(cores) or None,
        note=None if flags else "no CPU flags found in /proc/cpuinfo",
    )


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (cached). Flags are read on Linux only."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return CpuInfo(
            model_name=platform.processor() or platform.machine() or "unknown CPU",
            logical_cores=os.cpu_count() or 1,
            flags=frozenset(),
            vnni=False,
            amx=False,
            avx512=False,
            note=f"CPU instruction sets are not read on {platform.system() or 'this platform'}",
        )


def default_threads() -> int:
    """Physical cores (logical if unknown), capped by the cores this process may use."""
    info = cpu_info()
    n = info.physical_cores or info.logical_cores
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, n)
