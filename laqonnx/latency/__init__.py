"""Latency stage: CPU latency of ONNX models in onnxruntime, and what the CPU offers for int8.

- :mod:`.cpu`: :class:`CpuInfo`, :func:`cpu_info`, :func:`default_threads`;
- :mod:`.measure`: :func:`measure_latency`, :func:`compare_latency` (interleaved, side by side).
"""

from __future__ import annotations

from .cpu import CpuInfo, cpu_info, default_threads, parse_cpuinfo
from .measure import LatencyResult, LatencyStats, compare_latency, measure_latency

__all__ = [
    "CpuInfo",
    "parse_cpuinfo",
    "cpu_info",
    "default_threads",
    "LatencyStats",
    "LatencyResult",
    "measure_latency",
    "compare_latency",
]
