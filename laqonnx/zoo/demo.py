"""The demo and the benchmark matrix: train digits models, quantize them every way, compare.

:func:`run_demo` (behind ``laqonnx demo``) trains (or takes from the zoo cache) plain and
adversarially trained digits models, quantizes each with every method of :data:`METHODS`,
evaluates clean and worst-case robust accuracy on onnxruntime (:func:`laqonnx.evaluate`),
measures batch-1 latency of all variants of a model side by side
(:func:`laqonnx.latency.compare_latency`, interleaved), prints one comparison table and writes
the Markdown report with its plots (:func:`laqonnx.report.write_report`).

Methods are the handlers of :mod:`laqonnx.zoo.methods` (``benchmarks/record.py`` runs the same
registry). The mixed-precision comparison is at equal average weight bits:

* the *uniform onnxruntime alternative* (``ort-mixed``) is onnxruntime's ``quantize_static``
  (MinMax, per-channel int8, uint8 activations) with int4 weights on the largest weighted layers
  (by parameter count, ties in graph order) until the parameter-weighted average weight bits is
  at most the nominal budget (default 6). The rule looks only at layer sizes: it is
  method-independent. Its achieved average ``B`` is the budget;
* ``laq-mixed-ada`` is :func:`laqonnx.quantize` with ``avg_weight_bits=B`` (the same objective,
  candidates and calibration as ``laq-int8``, int4 and adaptive rounding allowed);
* ``laq-latency``: LAQ under a latency budget (``max_latency``, default 0.85x the float model at
  batch 1, between int8's latency and float's): int8, 16-bit activations or float per layer, where
  the metric says the slack buys the most;
* the low-bit row: ``ort-int4`` puts every weight at int4 (per-channel MinMax), ``laq-int4-ada``
  is LAQ at 4 bits with adaptive rounding as a candidate. (More variants: :mod:`laqonnx.zoo.methods`.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError, OptionError
from ..report.tables import format_bytes
from ..vocab import AttackPreset
from .methods import DEMO_METHODS, METHODS, SWEEP_METHODS, MethodContext, Quantized, int4_rule, layer_sizes, quantize_method, warm_up

__all__ = ["DemoConfig", "DemoResult", "run_demo", "copy_float_model", "TABLE_COLUMNS", "QUICK"]

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
    image_size: int = 16  # the digits upscaled (the ResNet runs int8 ~0.75x float here; the 16-wide CNN is too small to gain)
    max_latency: str = "0.85x"  # the laq-latency row's budget: between int8 and float, so the metric spends the slack
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
        if not 8 <= self.image_size <= 64:
            raise OptionError(f"image_size must be between 8 and 64, got {self.image_size}")
        from ..quant.costs import parse_max_latency

        parse_max_latency(self.max_latency)  # OptionError naming the flag


QUICK = {"archs": ("resnet",), "n_eval": 100, "calib_limit": 128, "sweep": False, "latency_runs": 50}


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[dict[str, Any], ...]  # one per model x method, columns of TABLE_COLUMNS
    table: str
    report: Path
    results_json: Path
    seconds: float
    models: Path = Path("models")  # out_dir/models/<arch>-<training>/: float.onnx and one .onnx per method


def _fmt(spec: str) -> Callable[[Any], str]:
    return lambda v: "—" if v is None else format(v, spec)


TABLE_COLUMNS = [("model", "model"), ("method", "method"), ("bits", "w-bits", _fmt(".2f")),
                 ("size", "size", lambda v: "—" if v is None else format_bytes(v)), ("clean", "clean", _fmt(".3f")), ("robust", "robust", _fmt(".3f")),
                 ("d_robust", "Δrobust", _fmt("+.3f")), ("p50_ms", "p50 ms", _fmt(".3f")),
                 ("lat_ratio", "×float", _fmt(".2f")), ("quant_s", "quant s", _fmt(".1f"))]


def _model(cfg: DemoConfig, arch: str, adv: str, progress: bool) -> Path:
    from . import cache, train

    conf = train.default_config(arch, adv, quick=cfg.quick, seed=cfg.seed, image_size=cfg.image_size)
    over = {k: v for k, v in (("epochs", cfg.epochs), ("width", cfg.width)) if v is not None}
    conf = dataclasses.replace(conf, **over) if over else conf
    return cache.get_model(arch, adv, config=conf, cache_dir=cfg.cache_dir, progress=progress).path


def copy_float_model(cached: Path, folder: Path) -> Path:
    """``folder/float.onnx``: the demo's own copy of the float model from the zoo's hash-named cache
    (the quantized models and the report then name a file in the output folder)."""
    from .._util.io import atomic_write_bytes

    return atomic_write_bytes(folder / "float.onnx", Path(cached).read_bytes())


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
        folder = out / "models" / f"{arch}-{adv}"
        folder.mkdir(parents=True, exist_ok=True)
        float_path = copy_float_model(_model(cfg, arch, adv, progress), folder)
        bar.update()
        int4, budget = int4_rule(layer_sizes(float_path), cfg.mixed_bits)
        ctx = MethodContext(float_path, folder, cfg.eps, "digits", cfg.calib_limit, budget, int4, progress, cfg.max_latency)
        warm_up(ctx)
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
            rows.append({"model": label, "method": name, "bits": q.avg_weight_bits, "size": q.size_bytes,
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
                  "latency budget": f"laq-latency: {cfg.max_latency} the float model at batch 1",
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
    return DemoResult(tuple(rows), table, report_path, results, seconds, out / "models")

