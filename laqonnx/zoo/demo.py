"""The demo and the benchmark matrix: train digits models, quantize them every way, compare.

:func:`run_demo` (behind ``laqonnx demo``) trains (or takes from the zoo cache) plain and
adversarially trained digits models, quantizes each with every method of :data:`METHODS`,
evaluates clean and worst-case robust accuracy on onnxruntime (:func:`laqonnx.evaluate`),
measures batch-1 latency of all variants of a model side by side
(:func:`laqonnx.latency.compare_latency`, interleaved), prints one comparison table and writes
the Markdown report with its plots (:func:`laqonnx.report.write_report`).

Methods are handlers registered by name with :func:`method`; ``benchmarks/record.py`` runs the
same registry. The mixed-precision comparison is at equal average weight bits:

* the *uniform onnxruntime alternative* (``ort-mixed``) is onnxruntime's ``quantize_static``
  (MinMax, per-channel int8, uint8 activations) with int4 weights on the largest weighted layers
  (by parameter count, ties in graph order) until the parameter-weighted average weight bits is
  at most the nominal budget (default 6). The rule looks only at layer sizes: it is
  method-independent. Its achieved average ``B`` is the budget;
* ``laq-mixed`` is :func:`laqonnx.quantize` with ``avg_weight_bits=B`` (the same objective,
  candidates and calibration as ``laq-int8``, int4 allowed), and ``mse-mixed`` /
  ``lipschitz-mixed`` the same with the objective's quantization-only / Lipschitz-only terms;
* ``ort-int4`` puts every weight at int4 (per-channel MinMax), ``laq-int4`` is LAQ at 4 bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, OptionError
from ..vocab import AttackPreset

__all__ = [
    "METHODS", "DEMO_METHODS", "RECORD_METHODS", "SWEEP_METHODS", "MethodContext", "Quantized", "method", "int4_rule",
    "ort_mixed", "quantize_method", "DemoConfig", "DemoResult", "run_demo", "TABLE_COLUMNS", "QUICK",
]

DEMO_METHODS: tuple[str, ...] = ("float", "ort-minmax", "ort-minmax-pc", "ort-entropy", "ort-percentile",
                                 "laq-int8", "ort-mixed", "laq-mixed")
RECORD_METHODS: tuple[str, ...] = (*DEMO_METHODS, "mse-mixed", "lipschitz-mixed", "ort-int4", "laq-int4")
SWEEP_METHODS: tuple[str, ...] = ("float", "ort-minmax-pc", "laq-int8", "laq-mixed")  # curves of adversarial models


@dataclass(frozen=True)
class MethodContext:
    """What every method needs: the float model, where to write, calibration and budget."""

    float_path: Path
    out_dir: Path
    eps: float
    calib: str = "digits"
    calib_limit: int = 256
    budget_bits: float = 8.0  # the achieved average bits of the uniform int4 rule
    int4_weights: tuple[str, ...] = ()  # the weights the uniform rule puts at int4
    progress: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.eps <= 1) or self.calib_limit < 1 or not 4 <= self.budget_bits <= 8:
            raise OptionError("need 0 < eps <= 1, calib_limit >= 1 and 4 <= budget_bits <= 8")


@dataclass(frozen=True)
class Quantized:
    """One method's model: file, end-to-end quantize wall time (load to write), size and bits."""

    method: str
    path: Path
    seconds: float
    avg_weight_bits: float
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}


METHODS: dict[str, Callable[[MethodContext], Quantized]] = {}


def method(name: str) -> Callable[[Callable[[MethodContext], Quantized]], Callable[[MethodContext], Quantized]]:
    """Register a method handler under ``name``."""

    def register(fn: Callable[[MethodContext], Quantized]) -> Callable[[MethodContext], Quantized]:
        METHODS[name] = fn
        return fn

    return register


def quantize_method(name: str, ctx: MethodContext) -> Quantized:
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](ctx)


# ------------------------------------------------------------------------------ the methods


def _layer_sizes(path: Path) -> list[tuple[str, int]]:
    """(weight initializer, parameter count) of the weighted layers, in graph order."""
    from ..graph import load_model

    return [(layer.weight, int(np.prod(layer.weight_shape))) for layer in load_model(path).layers]


def int4_rule(sizes: Sequence[tuple[str, int]], target_bits: float) -> tuple[tuple[str, ...], float]:
    """The uniform alternative's rule: int4 on the largest layers (ties: graph order) until the
    parameter-weighted average weight bits is <= ``target_bits``. Returns (weights, achieved bits)."""
    total = sum(n for _, n in sizes)
    if total == 0:
        return (), 8.0
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], i))
    chosen: list[str] = []
    bits = 8.0
    for i in order:
        if bits <= target_bits + 1e-12:
            break
        chosen.append(sizes[i][0])
        bits -= 4.0 * sizes[i][1] / total
    return tuple(chosen), bits


def _calib_batches(path: Path, calib: str, limit: int) -> tuple[Any, list[np.ndarray]]:
    from ..data import open_data
    from ..graph import load_model

    pm = load_model(path)
    source = open_data(calib, input_shape=pm.input_shape, split="train", limit=limit)
    batches = [np.ascontiguousarray(x, dtype=np.float32).reshape((-1, *pm.input_shape[1:]))
               for x, _ in source.batches(32)]
    return pm, batches


def _warm_up(ctx: MethodContext) -> None:
    """Load the calibration data once and import onnxruntime's quantizer before any method's clock
    starts: the first-time imports (scikit-learn's dataset loader, the quantizer; ~0.7 s) are not
    quantization time and would otherwise be charged to whichever method runs first."""
    import onnxruntime.quantization  # noqa: F401

    _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)


def _done(name: str, path: Path, t0: float, bits: float) -> Quantized:
    return Quantized(name, path, time.perf_counter() - t0, float(bits), path.stat().st_size)


@method("float")
def _float(ctx: MethodContext) -> Quantized:
    return Quantized("float", ctx.float_path, 0.0, 32.0, ctx.float_path.stat().st_size)


def _ort(name: str, baseline: str, per_channel: bool) -> None:
    @method(name)
    def run(ctx: MethodContext) -> Quantized:
        from .._util.io import save_model
        from ..quant.lower import ort_baseline

        t0 = time.perf_counter()
        pm, batches = _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's entropy/percentile calibrators print
            model = ort_baseline(pm.model, pm.input_name, batches, method=baseline, per_channel=per_channel)
        out = save_model(model, ctx.out_dir / f"{name}.onnx", ctx.float_path)
        return _done(name, out, t0, 8.0)


_ort("ort-minmax", "ort-minmax", False)
_ort("ort-minmax-pc", "ort-minmax", True)
_ort("ort-entropy", "ort-entropy", False)
_ort("ort-percentile", "ort-percentile", False)


def ort_mixed(pm: Any, batches: Sequence[np.ndarray], int4_weights: Sequence[str]) -> Any:
    """onnxruntime ``quantize_static`` (QDQ, MinMax, per-channel, uint8 activations, int8 weights)
    with int4 weights on ``int4_weights``. Returns the ModelProto."""
    from ..quant.lower import ort_baseline

    return ort_baseline(pm.model, pm.input_name, batches, method="ort-minmax", per_channel=True,
                        int4_weights=int4_weights)


def _ort_int4(name: str, everything: bool) -> None:
    @method(name)
    def run(ctx: MethodContext) -> Quantized:
        from .._util.io import save_model

        t0 = time.perf_counter()
        pm, batches = _calib_batches(ctx.float_path, ctx.calib, ctx.calib_limit)
        weights = tuple(layer.weight for layer in pm.layers) if everything else ctx.int4_weights
        out = save_model(ort_mixed(pm, batches, weights), ctx.out_dir / f"{name}.onnx", ctx.float_path)
        sizes = {layer.weight: int(np.prod(layer.weight_shape)) for layer in pm.layers}
        total = sum(sizes.values())
        return _done(name, out, t0, 8.0 - 4.0 * sum(sizes[w] for w in weights) / total)


_ort_int4("ort-mixed", False)
_ort_int4("ort-int4", True)


def _laq(name: str, objective: str, budget: Callable[[MethodContext], float | None]) -> None:
    @method(name)
    def run(ctx: MethodContext) -> Quantized:
        from ..quant.workflow import quantize

        t0 = time.perf_counter()
        bits = budget(ctx)
        r = quantize(ctx.float_path, ctx.out_dir / f"{name}.onnx", ctx.calib, eps=ctx.eps, objective=objective,
                     avg_weight_bits=None if bits is None else bits + 1e-9, calib_limit=ctx.calib_limit,
                     progress=ctx.progress)
        return _done(name, r.output, t0, r.avg_weight_bits)


_laq("laq-int8", "laq", lambda ctx: None)
_laq("laq-mixed", "laq", lambda ctx: ctx.budget_bits)
_laq("mse-mixed", "mse", lambda ctx: ctx.budget_bits)
_laq("lipschitz-mixed", "lipschitz", lambda ctx: ctx.budget_bits)
_laq("laq-int4", "laq", lambda ctx: 4.0)


# ------------------------------------------------------------------------------ the demo


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains, quantizes and evaluates. ``quick``: the zoo's shorter training, the
    CNN only and fewer examples (see :data:`QUICK`). ``epochs``/``width``: overrides for tests."""

    out_dir: Path = Path("laqonnx-demo")
    archs: tuple[str, ...] = ("cnn", "resnet")
    adversarial: tuple[str, ...] = ("none", "pgd")
    methods: tuple[str, ...] = DEMO_METHODS
    quick: bool = False
    image_size: int = 16
    eps: float = 0.1
    n_eval: int = 200
    calib_limit: int = 256
    preset: str = "quick"
    attacks: tuple[str, ...] | None = None
    mixed_bits: float = 6.0
    sweep: bool = True
    latency_runs: int = 100
    seed: int = 0
    epochs: int | None = None
    width: int | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.archs or not self.adversarial or "float" not in self.methods:
            raise OptionError("need at least one arch, one training mode, and 'float' among the methods")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise OptionError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        object.__setattr__(self, "preset", AttackPreset.check(self.preset, "preset"))
        if not 4 <= self.mixed_bits <= 8 or self.n_eval < 1 or self.calib_limit < 1 or self.latency_runs < 1:
            raise OptionError("need 4 <= mixed_bits <= 8 and n_eval, calib_limit, latency_runs >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise OptionError(f"epochs must be >= 1, got {self.epochs}")


QUICK = {"archs": ("cnn",), "n_eval": 100, "calib_limit": 128, "sweep": False, "latency_runs": 50}


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[dict[str, Any], ...]  # one per model x method, columns of TABLE_COLUMNS
    table: str
    report: Path
    results_json: Path
    seconds: float


def _fmt(spec: str) -> Callable[[Any], str]:
    return lambda v: "—" if v is None else format(v, spec)


TABLE_COLUMNS = [("model", "model"), ("method", "method"), ("bits", "w-bits", _fmt(".2f")),
                 ("kb", "KB", _fmt(".1f")), ("clean", "clean", _fmt(".3f")), ("robust", "robust", _fmt(".3f")),
                 ("d_robust", "Δrobust", _fmt("+.3f")), ("p50_ms", "p50 ms", _fmt(".3f")),
                 ("lat_ratio", "×float", _fmt(".2f")), ("quant_s", "quant s", _fmt(".1f"))]


def _model(cfg: DemoConfig, arch: str, adv: str, progress: bool) -> Path:
    from . import cache, train

    conf = train.default_config(arch, adv, quick=cfg.quick, seed=cfg.seed, image_size=cfg.image_size)
    over = {k: v for k, v in (("epochs", cfg.epochs), ("width", cfg.width)) if v is not None}
    conf = dataclasses.replace(conf, **over) if over else conf
    return cache.get_model(arch, adv, config=conf, cache_dir=cfg.cache_dir, progress=progress).path


def run_demo(config: DemoConfig | None = None, *, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo (see the module doc); return its rows and where the report is."""
    from tqdm.auto import tqdm

    from .._util.io import atomic_write_json, atomic_write_text
    from ..lipschitz.analyze import analyze
    from ..latency import compare_latency
    from ..report import format_table, write_report
    from ..robustness.evaluate import evaluate

    cfg = config or DemoConfig()
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    pairs = [(a, t) for a in cfg.archs for t in cfg.adversarial]
    bar = tqdm(total=len(pairs) * (len(cfg.methods) + 3), desc="demo", unit="step", disable=not progress)
    rows: list[dict[str, Any]] = []
    models_json: list[dict[str, Any]] = []
    analyses: dict[str, dict] = {}
    for arch, adv in pairs:
        label = f"{arch}/{'plain' if adv == 'none' else adv}"
        bar.set_description(f"demo: train {label}")
        float_path = _model(cfg, arch, adv, progress)
        bar.update()
        folder = out / "models" / f"{arch}-{adv}"
        folder.mkdir(parents=True, exist_ok=True)
        int4, budget = int4_rule(_layer_sizes(float_path), cfg.mixed_bits)
        ctx = MethodContext(float_path, folder, cfg.eps, "digits", cfg.calib_limit, budget, int4, progress)
        _warm_up(ctx)
        made: dict[str, Quantized] = {}
        for name in cfg.methods:
            bar.set_description(f"demo: {label} {name}")
            made[name] = quantize_method(name, ctx)
            bar.update()
        bar.set_description(f"demo: evaluate {label}")
        curves = [n for n in made if cfg.sweep and n in (SWEEP_METHODS if adv != "none" else ("float",))]
        evals = {}
        for names, sweep in ((curves, True), ([n for n in made if n not in curves], False)):
            if names:  # the robust-vs-eps sweep only where the report plots it (a readable figure)
                rep = evaluate([str(made[n].path) for n in names], "digits", cfg.eps, preset=cfg.preset,
                               attacks=cfg.attacks, reference=str(float_path), limit=cfg.n_eval, latency=False,
                               sweep=sweep, seed=cfg.seed, progress=progress)
                if rep.failed:  # evaluate skips a model it cannot run: never pair the others with the wrong names
                    raise ModelError(f"demo: cannot evaluate {rep.failed[0].path}: {rep.failed[0].error}")
                evals.update(zip(names, rep.models))
        bar.update()
        bar.set_description(f"demo: latency {label}")
        lat = compare_latency({n: q.path for n, q in made.items()}, batch_sizes=(1,), runs=cfg.latency_runs,
                              warmup=5, rounds=10)
        bar.update()
        base = evals["float"]
        for name, q in made.items():
            ev = evals[name]
            p50 = lat[name].at(1).p50_ms
            rows.append({"model": label, "method": name, "bits": q.avg_weight_bits, "kb": q.size_bytes / 1024,
                         "clean": ev.clean_accuracy, "robust": ev.robust_accuracy["worst_case"],
                         "d_robust": ev.robust_accuracy["worst_case"] - base.robust_accuracy["worst_case"],
                         "p50_ms": p50, "lat_ratio": p50 / lat["float"].at(1).p50_ms,
                         "quant_s": q.seconds if name != "float" else None})
            models_json.append({**ev.to_json(), "label": f"{label} {name}", "latency_ms": lat[name].to_json(),
                                "quantize": q.to_json(), "budget_bits": budget, "int4_rule": list(int4)})
        analyses[f"{label} float"] = analyze(float_path, progress=False).to_json()
    bar.close()
    table = format_table(rows, TABLE_COLUMNS)
    evaluation = {"eps": cfg.eps, "norm": "inf", "preset": cfg.preset,
                  "mixed budget": f"uniform onnxruntime int4 on the largest layers until <= {cfg.mixed_bits:g} "
                                  "average weight bits; LAQ at the same achieved average",
                  "models": models_json}
    report_path = write_report(evaluation, out / "report", analyses=analyses, title="laqonnx demo")
    seconds = time.perf_counter() - t_start
    results = atomic_write_json(out / "results.json", {"config": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in dataclasses.asdict(cfg).items()},
                                                       "rows": rows, "evaluation": evaluation, "seconds": seconds})
    atomic_write_text(out / "table.txt", table + "\n")
    if echo is not None:
        echo(table)
    return DemoResult(tuple(rows), table, report_path, results, seconds)

