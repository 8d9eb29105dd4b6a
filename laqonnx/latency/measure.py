"""CPU latency of ONNX models in onnxruntime.

Latency is measured the way a deployment runs a classifier: onnxruntime's CPU execution
provider, all graph optimizations, a fixed number of intra-op threads, sequential execution, on
random inputs in [0, 1] (zeros for an integer input: token ids or indices). Each run is timed on its own with ``time.perf_counter_ns`` after a
warm-up, and percentiles are reported. :func:`compare_latency` measures several models
*interleaved* (round-robin, several rounds), so a ratio such as float / int8 is taken side by
side under the same machine noise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from ..errors import ModelError, OptionError
from .cpu import CpuInfo, cpu_info, default_threads

__all__ = ["LatencyStats", "LatencyResult", "measure_latency", "compare_latency"]

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]


@dataclass(frozen=True)
class LatencyStats:
    """Per-run latency at one batch size, in milliseconds; throughput in examples per second."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float
    runs: int

    @classmethod
    def from_times(cls, batch_size: int, times_ms: Sequence[float]) -> LatencyStats:
        t = np.asarray(times_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
        mean = float(t.mean())
        return cls(batch_size, p50, p90, p99, mean, batch_size * 1000.0 / mean if mean > 0 else float("inf"), t.size)

    def to_json(self) -> dict[str, float | int]:
        return {"p50": self.p50_ms, "p90": self.p90_ms, "p99": self.p99_ms, "mean": self.mean_ms,
                "throughput": self.throughput, "runs": self.runs}


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one model at each measured batch size."""

    model: str
    stats: tuple[LatencyStats, ...]
    threads: int
    cpu: CpuInfo
    providers: tuple[str, ...]

    def at(self, batch_size: int) -> LatencyStats:
        for s in self.stats:
            if s.batch_size == batch_size:
                return s
        raise KeyError(f"batch size {batch_size} was not measured (measured: {[s.batch_size for s in self.stats]})")

    def to_json(self) -> dict[str, Any]:
        """``p50/p90/p99`` (ms) at batch 1 (else the smallest batch measured), plus every batch."""
        head = min(self.stats, key=lambda s: s.batch_size)
        return {
            "p50": head.p50_ms,
            "p90": head.p90_ms,
            "p99": head.p99_ms,
            "batch_size": head.batch_size,
            "by_batch": {str(s.batch_size): s.to_json() for s in self.stats},
            "threads": self.threads,
            "providers": list(self.providers),
            "cpu_model": self.cpu.model_name,
            "int8_isa": self.cpu.int8_isa(),
            "int8_warning": self.cpu.int8_warning(),
        }


@dataclass(frozen=True)
class _Options:
    batch_sizes: tuple[int, ...]
    threads: int
    warmup: int
    runs: int
    min_time_s: float
    rounds: int
    input_shape: tuple[int, ...] | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) != b or b < 1 for b in self.batch_sizes):
            raise OptionError(f"batch_sizes must be positive integers, got {self.batch_sizes!r}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise OptionError(f"batch_sizes has duplicates: {self.batch_sizes!r}")
        if self.threads < 1:
            raise OptionError(f"threads must be >= 1, got {self.threads}")
        if self.warmup < 0 or self.runs < 1 or self.rounds < 1:
            raise OptionError("need warmup >= 0, runs >= 1 and rounds >= 1")
        if self.min_time_s < 0:
            raise OptionError(f"min_time_s must be >= 0, got {self.min_time_s}")
        if self.input_shape is not None and any(int(d) != d or d < 1 for d in self.input_shape):
            raise OptionError(f"input_shape must be positive integers, got {self.input_shape!r}")


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass
class _Session:
    """One onnxruntime session and its single input; ``run`` executes one inference."""

    name: str
    session: Any
    input_name: str
    input_dims: list[Any]
    dtype: Any
    input_shape: tuple[int, ...] | None
    _feeds: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def accepts(self, batch: int) -> bool:
        first = self.input_dims[0] if self.input_dims else None
        return not isinstance(first, int) or first <= 0 or first == batch

    def prepare(self, batch: int) -> None:
        if batch in self._feeds:
            return
        dims = self.input_dims[1:]
        if self.input_shape is not None:
            if len(self.input_shape) != len(dims):
                raise ModelError(f"{self.name}: input_shape {list(self.input_shape)} has {len(self.input_shape)} "
                                 f"dimensions, the model's input {self.input_name!r} has {len(dims)} besides the batch")
            dims = list(self.input_shape)
        elif any(not isinstance(d, int) or d <= 0 for d in dims):
            raise ModelError(f"{self.name}: input {self.input_name!r} has dynamic dimensions {self.input_dims}; "
                             "pass input_shape (without the batch dimension)")
        rng = np.random.default_rng(batch)
        if self.dtype == np.uint8:
            x = rng.integers(0, 256, (batch, *dims), dtype=np.uint8)
        elif np.issubdtype(self.dtype, np.integer):  # token ids / indices: 0 is valid for any vocabulary
            x = np.zeros((batch, *dims), dtype=self.dtype)
        else:
            x = rng.uniform(0, 1, (batch, *dims)).astype(self.dtype)
        self._feeds[batch] = {self.input_name: x}

    def run(self, batch: int) -> None:
        try:
            self.session.run(None, self._feeds[batch])
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelError(f"{self.name}: onnxruntime failed at batch {batch}: {str(exc).splitlines()[0]}") from exc


def _open(name: str, model: ModelLike, opts: _Options) -> _Session:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        source: Any = model.SerializeToString()
        domains = {o.domain for o in model.opset_import}
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        source = str(path)
        try:
            domains = {o.domain for o in onnx.load(str(path), load_external_data=False).opset_import}
        except Exception as exc:
            raise ModelError(f"cannot read {path} as an ONNX model: {exc}") from exc
    if "ai.onnx.contrib" in domains:  # pre/post-processing from onnxruntime-extensions
        from .errors import require

        so.register_custom_ops_library(require("onnxruntime_extensions", "deploy").get_library_path())
    try:
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{name}: onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{name}: expected one input, the model has {len(inputs)}: {[i.name for i in inputs]}")
    dtype = _NUMPY_TYPES.get(inputs[0].type)
    if dtype is None:
        raise ModelError(f"{name}: unsupported input type {inputs[0].type} (float, uint8, int32 or int64 expected)")
    return _Session(name, sess, inputs[0].name, list(inputs[0].shape), dtype, opts.input_shape)


def _model_name(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return str(model)


def _measure(models: Mapping[str, ModelLike], opts: _Options) -> dict[str, LatencyResult]:
    """Open every model, then measure each batch size round-robin over the models."""
    from tqdm.auto import tqdm

    sessions = {key: _open(key, m, opts) for key, m in models.items()}
    for s in sessions.values():
        if not any(s.accepts(b) for b in opts.batch_sizes):
            raise ModelError(f"{s.name}: fixed batch dimension {s.input_dims[0]} is none of batch_sizes "
                             f"{list(opts.batch_sizes)}")
    times: dict[str, dict[int, list[float]]] = {k: {} for k in sessions}
    per_round = -(-opts.runs // opts.rounds)  # ceil
    bar = tqdm(total=opts.runs * len(opts.batch_sizes) * len(sessions), desc="latency", unit="run",
               disable=not opts.progress, leave=False)
    try:
        for batch in opts.batch_sizes:
            keys = [k for k, s in sessions.items() if s.accepts(batch)]
            for k in keys:
                sessions[k].prepare(batch)
                for _ in range(opts.warmup):
                    sessions[k].run(batch)
                times[k][batch] = []
            r = 0
            while True:
                pending = [k for k in keys if len(times[k][batch]) < opts.runs
                           or sum(times[k][batch]) < opts.min_time_s * 1000.0]
                if not pending:
                    break
                order = pending[r % len(pending):] + pending[: r % len(pending)]  # rotate the start
                for k in order:
                    sess, out = sessions[k], times[k][batch]
                    before = min(len(out), opts.runs)
                    for _ in range(per_round):
                        t0 = time.perf_counter_ns()
                        sess.run(batch)
                        out.append((time.perf_counter_ns() - t0) / 1e6)
                    bar.update(min(len(out), opts.runs) - before)
                r += 1
    finally:
        bar.close()
    info = cpu_info()
    return {
        k: LatencyResult(
            model=_model_name(models[k]),
            stats=tuple(LatencyStats.from_times(b, t) for b, t in times[k].items()),
            threads=opts.threads,
            cpu=info,
            providers=tuple(s.session.get_providers()),
        )
        for k, s in sessions.items()
    }


def _options(batch_sizes: Sequence[int], threads: int | None, warmup: int, runs: int, min_time_s: float,
             rounds: int, input_shape: Sequence[int] | None, progress: bool) -> _Options:
    return _Options(tuple(batch_sizes), default_threads() if threads is None else threads, warmup, runs,
                    min_time_s, min(rounds, runs), None if input_shape is None else tuple(input_shape), progress)


def measure_latency(
    model: ModelLike,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    min_time_s: float = 0.0,
    input_shape: Sequence[int] | None = None,
    progress: bool = False,
) -> LatencyResult:
    """Latency percentiles of ``model`` on the onnxruntime CPU provider at each batch size.

    ``threads`` defaults to the physical cores; ``input_shape`` (without the batch dimension) is
    required when a non-batch input dimension is dynamic. At least ``runs`` timed runs are made,
    more until ``min_time_s`` of timed runs is reached. A model with a fixed batch dimension is
    measured only at that batch size.
    """
    opts = _options(batch_sizes, threads, warmup, runs, min_time_s, 1, input_shape, progress)
    return _measure({_model_name(model): model}, opts)[_model_name(model)]


def compare_latency(models: Mapping[str, ModelLike], *, rounds: int = 10, **kw: Any) -> dict[str, LatencyResult]:
    """Measure several models interleaved: ``rounds`` round-robin passes, each running every model
    for ``runs / rounds`` timed runs, so ratios between models share the same machine noise.
    Other keywords are those of :func:`measure_latency`."""
    if not models:
        raise OptionError("compare_latency needs at least one model")
    allowed = {"batch_sizes", "threads", "warmup", "runs", "min_time_s", "input_shape", "progress"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"compare_latency got unexpected keywords {sorted(unknown)}")
    args = {"batch_sizes": (1, 32), "threads": None, "warmup": 10, "runs": 50, "min_time_s": 0.0,
            "input_shape": None, "progress": False, **kw}
    opts = _options(args["batch_sizes"], args["threads"], args["warmup"], args["runs"], args["min_time_s"],
                    rounds, args["input_shape"], args["progress"])
    return _measure(dict(models), opts)
