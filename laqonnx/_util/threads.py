"""Thread pools for the numeric stages (operator norms, scoring).

Those stages alternate torch convolutions with many tiny numpy problems (Lanczos tridiagonal
eigen-solves, small SVDs). Left alone, OpenBLAS keeps its worker threads spinning after each tiny
call and they steal the cores torch's intra-op threads need: measured on the 2-core machine
(`benchmarks/analyze_resnet18.py`), the ResNet-18 norms took 12.7 s with 2 torch threads and
default BLAS threads, 2.5 s with 2 torch threads and one BLAS thread, 3.7 s with one of each.
So BLAS is pinned to one thread and torch keeps its own thread count, except on a machine that
is already busy (1-minute load >= CPU count), where extra intra-op threads only oversubscribe.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["compute_threads", "machine_busy"]

_state = threading.local()  # .depth: how many compute_threads this thread is within


def machine_busy() -> bool:
    """True when the 1-minute load average is at least the CPU count (False where unknown)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (OSError, AttributeError):  # no load average on this platform
        return False


@contextlib.contextmanager
def compute_threads(torch_threads: int | None = None) -> Iterator[None]:
    """Run with BLAS (numpy/scipy, through threadpoolctl) on one thread and torch on
    ``torch_threads`` threads (None: torch's current count, or 1 if :func:`machine_busy`).
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
            want = (1 if machine_busy() else before) if outermost else before
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
