"""What :func:`laqonnx.evaluate` returns: per-model results, models that failed, the report, its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..report.tables import format_bytes
from .attacks import Masking

__all__ = ["ModelEvaluation", "FailedModel", "EvaluationReport", "RELIABLE_AGREEMENT", "format_table"]

RELIABLE_AGREEMENT = 0.99


@dataclass(frozen=True)
class ModelEvaluation:
    """Everything measured on one model. ``robust_accuracy`` maps attack -> accuracy + ``worst_case``
    (``worst_case`` is None when no attack could run: an integer-input model under an Lp threat)."""

    path: str
    n_examples: int
    clean_accuracy: float
    robust_accuracy: Mapping[str, float | None]
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
    output_name: str | None = None
    input_shape: tuple[int, ...] | None = None  # per example, as fed to the model
    input_dtype: str = "float32"

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
            "output": self.output_name,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "input_dtype": self.input_dtype,
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
class FailedModel:
    """A model that could not be evaluated (onnxruntime cannot load or run it, data that does not fit it)."""

    path: str
    error: str  # one line

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "error": self.error}


@dataclass(frozen=True)
class EvaluationReport:
    """The result of :func:`evaluate`; ``to_json()`` is what ``laqonnx evaluate --json`` writes.

    ``models`` are the models evaluated, ``failed`` those skipped with their error (listed after the
    evaluated ones in the JSON ``models`` list, each with an ``error``). ``eps`` is in the units of
    ``input_range``."""

    eps: float
    norm: str
    preset: str
    attacks: tuple[str, ...]
    models: tuple[ModelEvaluation, ...]
    reference: str | None = None
    seed: int = 0
    input_range: tuple[float, float] = (0.0, 1.0)
    failed: tuple[FailedModel, ...] = ()
    engine: Mapping[str, Any] = field(default_factory=lambda: {"name": "local", "workers": 1})

    def to_json(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "input_range": list(self.input_range), "preset": self.preset,
                "attacks": list(self.attacks), "reference": self.reference, "seed": self.seed,
                "engine": dict(self.engine),
                "models": [m.to_json() for m in self.models] + [f.to_json() for f in self.failed]}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(report: EvaluationReport) -> str:
    """A plain-text table: one row per model, one column per attack plus the worst case; a model that
    failed is a row ``failed: <reason>``."""
    cols = [a for a in report.attacks if any(a in m.robust_accuracy for m in report.models)] + ["worst_case"]
    head = ["model", "clean", *cols, "mirror", "masking", "p50 ms", "size"]
    rows = [head]
    for m in report.models:
        agree = "n/a" if m.mirror_agreement is None else f"{m.mirror_agreement:.1%}" + ("" if m.white_box_reliable else "!")
        p50 = "-" if not m.latency_ms else f"{m.latency_ms['p50']:.3f}"
        rows.append([Path(m.path).name, f"{m.clean_accuracy:.3f}", *[_pct(m.robust_accuracy.get(c)) for c in cols],
                     agree, "FLAG" if m.masking.flagged else "ok", p50, format_bytes(m.size_bytes)])
    width0 = max([len(r[0]) for r in rows] + [len(Path(f.path).name) for f in report.failed])
    widths = [width0] + [max(len(r[i]) for r in rows) for i in range(1, len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{Path(f.path).name.ljust(width0)}  failed: {f.error}" for f in report.failed]
    lo, hi = report.input_range
    notes = [f"eps={report.eps:g} (L{report.norm}) in the units of the input range [{lo:g}, {hi:g}], "
             f"preset={report.preset}; robust accuracy scored on onnxruntime"]
    for m in report.models:
        name = Path(m.path).name
        if not m.white_box_reliable:
            notes.append(f"{name}: mirror agreement below {RELIABLE_AGREEMENT:.0%} or no mirror: "
                         "white-box results are unreliable")
        if m.masking.flagged:
            notes.append(f"{name}: gradient masking suspected: {m.masking.reason}")
        for a, why in m.skipped.items():
            notes.append(f"{name}: {a} skipped: {why}")
        if m.robust_accuracy.get("worst_case") is None:
            notes.append(f"{name}: no attack ran: robust accuracy not measured")
    return "\n".join(lines + [""] + notes)
