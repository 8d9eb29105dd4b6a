"""``laqonnx.evaluate``: clean and robust accuracy of ONNX models, scored on onnxruntime.

For each model: clean accuracy on onnxruntime; the mirror's top-1 agreement with onnxruntime on
clean and on adversarial inputs (white-box results are flagged unreliable below 99 %); every
attack of the preset (see :mod:`.attacks`) with each candidate scored on onnxruntime; the
per-example worst case; the gradient-masking verdict; optionally latency, model size and a cheap
robust-accuracy-versus-eps sweep (PGD on the mirror + transfer) for the report's plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..errors import DataError, LaqonnxWarning, ModelError, OptionError
from ..vocab import AttackPreset
from .attacks import ATTACKS, PRESETS, AttackContext, AttackResult, Masking, NotApplicable, Preset, Threat
from .attacks import gradient_masking, run_attack, worst_case

__all__ = ["evaluate", "EvaluationReport", "ModelEvaluation", "RELIABLE_AGREEMENT", "SWEEP_MULTIPLES", "format_table"]

RELIABLE_AGREEMENT = 0.99
SWEEP_MULTIPLES: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5)
ModelLike = "str | os.PathLike[str] | onnx.ModelProto"


@dataclass(frozen=True)
class ModelEvaluation:
    """Everything measured on one model. ``robust_accuracy`` maps attack -> accuracy + ``worst_case``."""

    path: str
    n_examples: int
    clean_accuracy: float
    robust_accuracy: Mapping[str, float]
    skipped: Mapping[str, str]
    attack_seconds: Mapping[str, float]
    mirror_agreement_clean: float | None
    mirror_agreement_adversarial: float | None
    masking: Masking
    size_bytes: int
    latency_ms: Mapping[str, Any] | None = None
    robust_vs_eps: tuple[Mapping[str, float], ...] | None = None
    softmax_stripped: bool = False
    mirror_error: str | None = None

    @property
    def mirror_agreement(self) -> float | None:
        vals = [v for v in (self.mirror_agreement_clean, self.mirror_agreement_adversarial) if v is not None]
        return min(vals) if vals else None

    @property
    def white_box_reliable(self) -> bool:
        return self.mirror_agreement is not None and self.mirror_agreement >= RELIABLE_AGREEMENT

    def to_json(self) -> dict[str, Any]:
        m = self.masking
        out: dict[str, Any] = {
            "path": self.path,
            "n_examples": self.n_examples,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": dict(self.robust_accuracy),
            "mirror_agreement": self.mirror_agreement,
            "mirror_agreement_detail": {"clean": self.mirror_agreement_clean,
                                        "adversarial": self.mirror_agreement_adversarial},
            "white_box_reliable": self.white_box_reliable,
            "gradient_masking": m.flagged,
            "gradient_masking_detail": {"white_box_robust": m.white_box_robust, "black_box_robust": m.black_box_robust,
                                        "gap": m.gap, "black_box_only_examples": m.black_box_only, "reason": m.reason},
            "latency_ms": dict(self.latency_ms) if self.latency_ms is not None else None,
            "size_bytes": self.size_bytes,
            "skipped_attacks": dict(self.skipped),
            "attack_seconds": dict(self.attack_seconds),
            "softmax_stripped": self.softmax_stripped,
        }
        if self.mirror_error:
            out["mirror_error"] = self.mirror_error
        if self.robust_vs_eps is not None:
            out["robust_vs_eps"] = [dict(p) for p in self.robust_vs_eps]
        return out


@dataclass(frozen=True)
class EvaluationReport:
    """The result of :func:`evaluate`; ``to_json()`` is what ``laqonnx evaluate --json`` writes."""

    eps: float
    norm: str
    preset: str
    attacks: tuple[str, ...]
    models: tuple[ModelEvaluation, ...]
    reference: str | None = None
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "preset": self.preset, "attacks": list(self.attacks),
                "reference": self.reference, "seed": self.seed, "models": [m.to_json() for m in self.models]}


def _name(model: Any, i: int) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or f"model{i}"
    return os.fspath(model)


def _load_data(data: Any, shape: tuple[int | None, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, tuple) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    elif isinstance(data, (str, os.PathLike)):
        from ..data import open_data

        full = (None, *shape)  # open_data drops a batch axis only from 2-d / 4-d shapes
        source = open_data(os.fspath(data), input_shape=full if len(full) in (2, 4) else None, split="test",
                           limit=limit)
        pairs = list(source.batches(256))
        if not pairs:
            raise DataError(f"data {os.fspath(data)!r} has no examples")
        if any(p[1] is None for p in pairs):
            raise DataError(f"data {os.fspath(data)!r} has no labels: robust accuracy needs labelled data")
        x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    else:
        raise DataError("data must be a data spec string or an (x, y) tuple of arrays")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.ndim < 2 or len(x) != len(y) or y.ndim != 1 or len(x) == 0:
        raise DataError(f"data must be x (N, ...) and y (N,) with N > 0; got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers, not {y.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise DataError(f"inputs must be finite and in [0, 1]; got range [{x.min():.3g}, {x.max():.3g}]")
    return np.clip(x, 0.0, 1.0), y.astype(np.int64)


class _Bar:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="batch")

    def tick(self, n: int) -> None:
        self.bar.update(n)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mirror_art(model: onnx.ModelProto, shape: tuple[int, ...], classes: int) -> Any:
    from .mirror import build_mirror, mirror_classifier

    return mirror_classifier(build_mirror(model), shape, classes)


def _sweep(ctx: AttackContext, x: np.ndarray, y: np.ndarray, correct: np.ndarray,
           with_transfer: bool) -> tuple[dict[str, float], ...]:
    p = dataclasses.replace(ctx.preset, pgd_steps=min(ctx.preset.pgd_steps, 20), pgd_restarts=1)
    points = []
    for mult in SWEEP_MULTIPLES:
        sub = dataclasses.replace(ctx, threat=Threat(ctx.threat.eps * mult, ctx.threat.norm), preset=p)
        results = [r for name in ("pgd", "transfer") if name != "transfer" or with_transfer
                   for r in [run_attack(name, sub, x, y, correct)] if isinstance(r, AttackResult)]
        points.append({"eps": sub.threat.eps, "robust_accuracy": float(worst_case(correct, results).mean())})
    return tuple(points)


def _evaluate_one(model: Any, name: str, x: np.ndarray, y: np.ndarray, attacks: Sequence[str], threat: Threat,
                  preset: Preset, reference_art: Any, ref_reason: str | None, opts: dict[str, Any]) -> ModelEvaluation:
    from .ort_estimator import OrtModel, load_model, ort_classifier

    proto = load_model(model)
    ort = OrtModel(proto, threads=opts["threads"] or 1)
    shape = ort.sample_shape(tuple(x.shape[1:]))
    logits = ort.predict(x, opts["batch_size"])
    classes = logits.shape[1]
    if y.max() >= classes or y.min() < 0:
        raise DataError(f"labels range over [{y.min()}, {y.max()}] but {name} has {classes} outputs")
    pred = logits.argmax(axis=1)
    correct = pred == y
    mirror_art = mirror_error = agree_clean = None
    try:
        mirror_art = _mirror_art(ort.model, shape, classes)
        mpred = mirror_art.predict(x, batch_size=opts["batch_size"]).argmax(axis=1)
        agree_clean = float((mpred == pred).mean())
    except ModelError as exc:
        mirror_error = str(exc)
    except RuntimeError as exc:  # torch could not evaluate the graph (shapes it does not support)
        mirror_error = f"the mirror failed on this model: {str(exc).splitlines()[0]}"
        mirror_art = None
    ctx = AttackContext(threat=threat, preset=preset, ort=ort, ort_art=ort_classifier(ort, shape, classes),
                        mirror_art=mirror_art, reference_art=reference_art, nb_classes=classes,
                        input_shape=shape, batch_size=opts["batch_size"], seed=opts["seed"])
    chunks = -(-int(correct.sum()) // opts["batch_size"])
    bar = _Bar(sum(ATTACKS[a].rounds(preset) for a in attacks) * chunks, name, opts["progress"])
    ctx.tick = bar.tick
    results: list[AttackResult] = []
    skipped: dict[str, str] = {}
    for attack in attacks:
        bar.bar.set_description(f"{Path(name).name}: {attack}")
        if attack == "transfer" and ref_reason:
            skipped[attack] = ref_reason
            continue
        if ATTACKS[attack].kind == "white-box" and mirror_error:
            skipped[attack] = f"no mirror: {mirror_error}"
            continue
        out = run_attack(attack, ctx, x, y, correct)
        if isinstance(out, NotApplicable):
            skipped[attack] = out.reason
        else:
            results.append(out)
    bar.bar.close()
    total = sum(r.mirror_total for r in results)
    agree_adv = sum(r.mirror_agree for r in results) / total if total else None
    robust = {r.name: r.robust_accuracy for r in results}
    robust["worst_case"] = float(worst_case(correct, results).mean())
    sweep = None
    with_transfer = reference_art is not None and not ref_reason and "transfer" in attacks
    if opts["sweep"] and (mirror_art is not None or with_transfer):  # else no attack to sweep with
        sweep = _sweep(ctx, x, y, correct, with_transfer=with_transfer)
    latency = None
    if opts["latency"]:
        from ..latency import measure_latency

        latency = measure_latency(proto, batch_sizes=(1,), input_shape=shape, threads=opts["threads"]).to_json()
    size = os.path.getsize(model) if not isinstance(model, onnx.ModelProto) else proto.ByteSize()
    return ModelEvaluation(
        path=name, n_examples=len(x), clean_accuracy=float(correct.mean()), robust_accuracy=robust, skipped=skipped,
        attack_seconds={r.name: r.seconds for r in results}, mirror_agreement_clean=agree_clean,
        mirror_agreement_adversarial=agree_adv, masking=gradient_masking(results), size_bytes=int(size),
        latency_ms=latency, robust_vs_eps=sweep, softmax_stripped=ort.softmax_stripped, mirror_error=mirror_error,
    )


def evaluate(
    models: Any,
    data: Any,
    eps: float,
    *,
    norm: str = "inf",
    preset: str = "quick",
    attacks: Sequence[str] | None = None,
    reference: Any = None,
    limit: int | None = None,
    batch_size: int = 128,
    latency: bool = True,
    sweep: bool | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    analyses: Mapping[str, dict] | None = None,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationReport:
    """Attack each model (path or ``onnx.ModelProto``, or a list of them) and score it on onnxruntime.

    ``data`` is a data spec (see :func:`laqonnx.data.open_data`, test split) or an ``(x, y)`` tuple
    with ``x`` in [0, 1]. ``attacks`` restricts the preset's attacks (names in
    :data:`~laqonnx.robustness.attacks.ATTACK_NAMES`, run with the preset's budgets). ``reference``
    is the float model used for transfer attacks. ``sweep`` (default: on iff ``report_dir``)
    adds robust accuracy at 0, 0.25, 0.5, 1 and 1.5 x eps. ``report_dir`` writes the Markdown +
    PNG report through :func:`laqonnx.report.write_report`, with ``analyses`` (default: computed
    by :func:`laqonnx.lipschitz.analyze.analyze` for each model). Seeds numpy's and torch's global RNGs.

    ``threads`` is the number of onnxruntime and torch threads used by the attacks (default 1:
    attacks run small batches where per-op overhead dominates, and multi-threaded torch was
    measured 10-50x slower on a loaded 2-core machine); the latency measurement uses ``threads``
    if given, else :func:`laqonnx.latency.measure_latency`'s default (physical cores).
    """
    preset = AttackPreset.check(preset, "preset")
    threat = Threat(float(eps), str(norm))
    chosen = PRESETS[preset]
    names = tuple(attacks) if attacks is not None else chosen.attacks
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise OptionError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise OptionError("batch_size and limit must be >= 1")
    model_list = list(models) if isinstance(models, (list, tuple)) else [models]
    if not model_list:
        raise OptionError("give at least one model")
    from .ort_estimator import OrtModel, load_model

    if threads is not None and threads < 1:
        raise OptionError(f"threads must be >= 1, not {threads}")
    first = OrtModel(load_model(model_list[0]), threads=threads or 1)
    x, y = _load_data(data, first.declared_shape, limit)
    opts = {"threads": threads, "batch_size": batch_size, "seed": seed, "progress": progress, "latency": latency,
            "sweep": bool(report_dir) if sweep is None else sweep}
    reference_art, ref_name = None, None
    evaluations = []
    with _torch_threads(threads or 1):
        if reference is not None and "transfer" in names:
            ref = OrtModel(load_model(reference), threads=threads or 1)
            ref_name = _name(reference, 0)
            reference_art = _mirror_art(ref.model, ref.sample_shape(tuple(x.shape[1:])), ref.predict(x[:1]).shape[1])
        for i, model in enumerate(model_list):
            name = _name(model, i)
            same = (reference is not None and not isinstance(model, onnx.ModelProto)
                    and not isinstance(reference, onnx.ModelProto) and Path(model).resolve() == Path(reference).resolve())
            ref_reason = "the model is the float reference itself" if same else None
            evaluations.append(_evaluate_one(model, name, x, y, names, threat, chosen, reference_art, ref_reason, opts))
    report = EvaluationReport(eps=threat.eps, norm=threat.norm, preset=preset, attacks=names,
                              models=tuple(evaluations), reference=ref_name, seed=seed)
    if report_dir is not None:
        from ..report import write_report

        if analyses is None:
            analyses = _analyses(model_list, [m.path for m in evaluations], tuple(x.shape[1:]))
        write_report(report.to_json(), report_dir, analyses=analyses)
    return report


def _analyses(models: list[Any], names: list[str], shape: tuple[int, ...]) -> dict[str, dict]:
    """Per-layer Lipschitz analyses for the report's plot; a model the analysis rejects is left out."""
    import warnings

    from ..lipschitz.analyze import analyze
    from ..errors import LaqonnxError

    out: dict[str, dict] = {}
    for model, name in zip(models, names):
        try:
            out[name] = analyze(model, (1, *shape), progress=False).to_json()
        except LaqonnxError as exc:
            warnings.warn(f"no Lipschitz analysis of {name} in the report: {exc}", LaqonnxWarning, stacklevel=3)
    return out


def format_table(report: EvaluationReport) -> str:
    """A plain-text table: one row per model, one column per attack plus the worst case."""
    cols = [a for a in report.attacks if any(a in m.robust_accuracy for m in report.models)] + ["worst_case"]
    head = ["model", "clean", *cols, "mirror", "masking", "p50 ms", "size KB"]
    rows = [head]
    for m in report.models:
        agree = "n/a" if m.mirror_agreement is None else f"{m.mirror_agreement:.1%}" + ("" if m.white_box_reliable else "!")
        p50 = "-" if not m.latency_ms else f"{m.latency_ms['p50']:.3f}"
        rows.append([Path(m.path).name, f"{m.clean_accuracy:.3f}",
                     *[f"{m.robust_accuracy[c]:.3f}" if c in m.robust_accuracy else "-" for c in cols],
                     agree, "FLAG" if m.masking.flagged else "ok", p50, f"{m.size_bytes / 1024:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"eps={report.eps:g} (L{report.norm}), preset={report.preset}; robust accuracy scored on onnxruntime"]
    for m in report.models:
        if not m.white_box_reliable:
            notes.append(f"{Path(m.path).name}: mirror agreement below {RELIABLE_AGREEMENT:.0%} or no mirror: "
                         "white-box results are unreliable")
        if m.masking.flagged:
            notes.append(f"{Path(m.path).name}: gradient masking suspected: {m.masking.reason}")
        for a, why in m.skipped.items():
            notes.append(f"{Path(m.path).name}: {a} skipped: {why}")
    return "\n".join(lines + [""] + notes)

