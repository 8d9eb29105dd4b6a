"""Thread pools for the numeric stages (operator norms, scoring).

Those stages alternate torch convolutions with many tiny numpy problems (Lanczos tridiagonal
eigen-solves, small SVDs). Left alone, OpenBLAS keeps its worker threads spinning after each tiny
call and they steal the cores torch's intra-op threads need: measured on the 2-core machine
(`benchmarks/analyze_resnet18.py`), the ResNet-18 norms took 12.7 s with 2 torch threads and
default BLAS threads, 2.5 s with 2 torch threads and one BLAS thread, 3.7 s with one of each.
So BLAS is pinned to one thread and torch keeps its own thread count, except on a machine that
other processes already keep busy, where extra intra-op threads only oversubscribe: torch then
gets the cores the others leave free (at least one). "Busy" is measured, not guessed from the load
average: the CPU time the whole machine spent over a short window minus this process's own
(``/proc``; the 1-minute load average where there is no ``/proc``). The load average counted this
process's own previous stage (an onnxruntime run on every core a second earlier made the next torch
stage single-threaded, twice as slow on two cores).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

__all__ = ["compute_threads", "machine_busy", "others_cores", "free_cores"]

_state = threading.local()  # .depth: how many compute_threads this thread is within


_WINDOW_S = 0.1  # sampling window of others_cores
_REUSE_S = 10.0  # a measurement this recent is reused (stages follow each other within seconds)
_last: list[tuple[float, float | None]] = []


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # all but idle and iowait


def _own_jiffies() -> int:
    with open("/proc/self/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, every thread of this process


def others_cores() -> float | None:
    """Cores the other processes of the machine use right now (a 0.1 s sample of ``/proc``, reused
    for 10 s); None where ``/proc`` cannot be read."""
    now = time.monotonic()
    if _last and now - _last[0][0] < _REUSE_S:
        return _last[0][1]
    try:
        hz = os.sysconf("SC_CLK_TCK")
        b0, s0, t0 = _busy_jiffies(), _own_jiffies(), time.monotonic()
        time.sleep(_WINDOW_S)
        b1, s1, t1 = _busy_jiffies(), _own_jiffies(), time.monotonic()
        value: float | None = max(0.0, ((b1 - b0) - (s1 - s0)) / hz / max(t1 - t0, 1e-3))
    except (OSError, ValueError, IndexError, AttributeError):
        value = None
    _last[:] = [(time.monotonic(), value)]
    return value


def free_cores() -> int:
    """The cores other processes leave free, at least 1: measured (:func:`others_cores`), else the
    CPU count minus the 1-minute load average (the CPU count where neither is known)."""
    cpus = os.cpu_count() or 1
    others = others_cores()
    if others is None:
        try:
            others = os.getloadavg()[0]
        except (OSError, AttributeError):  # no load average on this platform
            others = 0.0
    return int(max(1, min(cpus, round(cpus - others))))


def machine_busy() -> bool:
    """True when other processes leave at most one core free on a multi-core machine."""
    cpus = os.cpu_count() or 1
    return cpus > 1 and free_cores() <= 1


@contextlib.contextmanager
def compute_threads(torch_threads: int | None = None) -> Iterator[None]:
    """Run with BLAS (numpy/scipy, through threadpoolctl) on one thread and torch on
    ``torch_threads`` threads (None: torch's current count, at most :func:`free_cores`).
    Restores both on exit. Works without torch or threadpoolctl (then it changes less).

    Re-entrant: BLAS is limited by the outermost call on a thread only; a nested call (an operator
    norm inside scoring) just sets torch's count if it asks for one, so the BLAS libraries are
    looked up once per stage rather than once per norm (threadpoolctl re-scans the loaded
    libraries on every limit: 0.2 s of scoring ResNet-18). The nesting is counted per thread; the
    limits themselves are process-wide, as before."""
    try:
        import torch
    except ImportError:
        torch = None
    outermost = getattr(_state, "depth", 0) == 0
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        if torch_threads is not None:
            want = torch_threads
        else:
            want = min(before, free_cores()) if outermost else before
        if want != before:
            torch.set_num_threads(max(1, int(want)))
    _state.depth = getattr(_state, "depth", 0) + 1  # a count, not a flag: right even if contexts close out of order
    try:
        with _one_blas_thread() if outermost else contextlib.nullcontext():
            yield
    finally:
        _state.depth -= 1
        if torch is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a core dependency
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")
