"""The Markdown report: :func:`write_report` turns the JSON of ``laqonnx evaluate`` (and optionally
the JSON of ``laqonnx analyze`` for some models) into ``report.md`` with PNG figures beside it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._util.io import atomic_write_text
from ..errors import DataError, OutputError
from .plots import _plot_eps, _plot_lipschitz, _plot_tradeoff
from .tables import MISSING, Column, _bytes, _eps, _get, _ms, _norm, _pct, format_value, markdown_table

__all__ = ["write_report", "MIRROR_RELIABLE"]

MIRROR_RELIABLE = 0.99  # below this agreement with onnxruntime, white-box attacks on the mirror are suspect


def _masking(v: Any) -> tuple[bool | None, list[str]]:
    """(flagged, reasons) from a bool, a string, a list of reasons, or a dict."""
    if v is None or isinstance(v, bool):
        return v, []
    if isinstance(v, str):
        return True, [v]
    if isinstance(v, (list, tuple)):
        return bool(v), [str(x) for x in v]
    if isinstance(v, Mapping):
        flag = next((bool(v[k]) for k in ("flagged", "flag", "detected", "suspected", "masking") if k in v), None)
        reasons = v.get("reasons", v.get("reason", []))
        return flag, [reasons] if isinstance(reasons, str) else [str(x) for x in reasons]
    return bool(v), []


def _labels(models: Sequence[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for i, m in enumerate(models):
        base = str(m.get("label") or m.get("name") or (Path(str(m["path"])).name if m.get("path") else f"model {i + 1}"))
        label, n = base, 2
        while label in out:
            label, n = f"{base} ({n})", n + 1
        out.append(label)
    return out


def _row(label: str, m: Mapping[str, Any], attacks: Sequence[str]) -> dict[str, Any]:
    robust = m.get("robust_accuracy") or {}
    notes = [str(n) for n in (m.get("notes") or [])] if not isinstance(m.get("notes"), str) else [m["notes"]]
    agreement = m.get("mirror_agreement")
    flag, reasons = _masking(m.get("gradient_masking"))
    detail = m.get("gradient_masking_detail")
    if flag and not reasons and isinstance(detail, Mapping) and detail.get("reason"):
        reasons = [str(detail["reason"])]
    if flag:
        notes.append("gradient masking suspected" + (f" ({'; '.join(reasons)})" if reasons else ""))
    if m.get("error"):
        notes.append(f"failed: {m['error']}")
    if m.get("mirror_error"):
        notes.append(f"no white-box mirror: {m['mirror_error']}")
    skipped = m.get("skipped_attacks")
    if isinstance(skipped, Mapping):
        notes += [f"{a} skipped: {why}" for a, why in skipped.items()]
    if robust.get("worst_case") is None and not m.get("error"):
        notes.append("no robust accuracy measured")
    row: dict[str, Any] = {
        "model": label,
        "size": m.get("size_bytes"),
        "p50": _get(m, "latency_ms.p50"),
        "clean": m.get("clean_accuracy"),
        "worst": robust.get("worst_case"),
        "mirror": agreement,
        "masking": flag,
        "notes": "; ".join(notes) or None,
    }
    row.update({f"attack:{a}": robust.get(a) for a in attacks})
    return row


def _mirror(v: Any) -> str:
    text = _pct(v)
    return f"{text} ⚠ white-box unreliable" if isinstance(v, (int, float)) and v < MIRROR_RELIABLE else text


def _match(key: str, labels: Sequence[str], models: Sequence[Mapping[str, Any]]) -> str:
    for label, m in zip(labels, models):
        path = str(m.get("path") or "")
        if key in (label, path) or (path and key in (Path(path).name, Path(path).stem)):
            return label
    return key


def write_report(
    evaluation: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    analyses: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "laqonnx report",
) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures from an evaluation (and analyses); return its path."""
    from ..errors import require

    require("matplotlib", "robustness")
    models = evaluation.get("models")
    if not isinstance(models, Sequence) or not all(isinstance(m, Mapping) for m in models):
        raise DataError("the evaluation has no 'models' list of objects: is it the JSON written by laqonnx evaluate?")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the report folder {out}: {exc.strerror or exc}") from exc
    labels = _labels(models)
    attacks = list(dict.fromkeys(a for m in models for a in (m.get("robust_accuracy") or {}) if a != "worst_case"))
    rows = [_row(label, m, attacks) for label, m in zip(labels, models)]

    lat = next((m["latency_ms"] for m in models if isinstance(m.get("latency_ms"), Mapping)), {})
    from ..latency import cpu_info

    here = cpu_info()
    cpu = evaluation.get("cpu") or lat.get("cpu_model") or f"{here.model_name} (this machine)"
    isa = lat.get("int8_isa", here.int8_isa())
    warning = lat.get("int8_warning") if "int8_isa" in lat else here.int8_warning()
    lines = [f"# {title}", "", "## Setup", "",
             f"- ε: {_eps(evaluation.get('eps'))}, norm: {_norm(evaluation.get('norm'))}",
             f"- CPU: {cpu if isinstance(cpu, str) else format_value(cpu)}"
             + (f", {lat['threads']} threads" if "threads" in lat else ""),
             f"- int8 instructions: {', '.join(isa) if isa else 'none (no VNNI/AMX)'}"]
    if warning:
        lines.append(f"- ⚠ {warning}")
    known = {"eps", "norm", "models", "cpu"}
    counts = sorted({m["n_examples"] for m in models if isinstance(m.get("n_examples"), int)})
    if counts:
        lines.append(f"- examples evaluated: {', '.join(map(str, counts))}")
    for k, v in evaluation.items():
        if k in known or v is None:
            continue
        if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
            lines.append(f"- {k}: {', '.join(map(format_value, v)) or MISSING}")
        elif isinstance(v, (str, int, float, bool)):
            lines.append(f"- {k}: {format_value(v)}")
    columns: list[Column] = [("model", "Model"), ("size", "Size", _bytes), ("p50", "p50 (ms)", _ms),
                             ("clean", "Clean acc", _pct)]
    columns += [(f"attack:{a}", a, _pct) for a in attacks]
    columns += [("worst", "Worst case", _pct), ("mirror", "Mirror agreement", _mirror), ("masking", "Masking", lambda v: "yes ⚠" if v else "no"),
                ("notes", "Notes")]
    lines += ["", "## Results", "", markdown_table(rows, columns), "",
              "Robust accuracy is measured on the model as onnxruntime runs it; *worst case* is the per-example "
              "worst over all attacks. Mirror agreement is how often the PyTorch mirror used for white-box attacks "
              f"predicts the same class as onnxruntime (below {MIRROR_RELIABLE:.0%} its attacks are unreliable).", ""]
    lat_rows = [{"model": label, **(m.get("latency_ms") or {})} for label, m in zip(labels, models) if m.get("latency_ms")]
    if lat_rows:
        lines += ["## Latency (ms)", "", markdown_table(lat_rows, [("model", "Model"), ("p50", "p50", _ms),
                  ("p90", "p90", _ms), ("p99", "p99", _ms), ("batch_size", "batch"), ("threads", "threads")]), ""]

    figures: list[tuple[str, str]] = []
    curves = {}
    for label, m in zip(labels, models):
        pts = [(float(p["eps"]), float(p["robust_accuracy"])) for p in (m.get("robust_vs_eps") or [])
               if isinstance(p, Mapping) and p.get("eps") is not None and p.get("robust_accuracy") is not None]
        if pts and m.get("clean_accuracy") is not None and all(e > 0 for e, _ in pts):
            pts.append((0.0, float(m["clean_accuracy"])))
        if pts:
            curves[label] = pts
    if curves:
        _plot_eps(curves, evaluation.get("eps"), out / "robust_vs_eps.png")
        figures.append(("Robust accuracy vs ε", "robust_vs_eps.png"))
    points = [{"label": r["model"], "clean": r["clean"], "worst": r["worst"],
               **{k: r[k] if isinstance(r[k], (int, float)) and not isinstance(r[k], bool) else None for k in ("p50", "size")}}
              for r in rows]
    if _plot_tradeoff(points, out / "accuracy_tradeoff.png"):
        figures.append(("Accuracy vs size and latency", "accuracy_tradeoff.png"))
    named = {_match(str(k), labels, models): a for k, a in (analyses or {}).items() if isinstance(a, Mapping)}
    if any(a.get("layers") for a in named.values()):
        _plot_lipschitz({k: a for k, a in named.items() if a.get("layers")}, out / "lipschitz.png")
        figures.append(("Per-layer Lipschitz constants", "lipschitz.png"))
    if figures:
        lines += ["## Figures", ""] + [f"![{cap}]({name})\n" for cap, name in figures]
    for label, a in named.items():
        unknown = a.get("unknown_ops") or []
        lines += [f"## Lipschitz analysis: {label}", "",
                  f"Network bound: {format_value(a.get('network_bound'))}"
                  + (f" (unknown downstream of: {', '.join(map(str, unknown))})" if unknown else ""), "",
                  markdown_table(a.get("layers") or [], [("name", "Layer"), ("op_type", "Op"), ("weight_shape", "Weight shape"),
                                 ("input_shape", "Input shape"), ("lipschitz", "Lipschitz"), ("lipschitz_method", "Method")]), ""]
    return atomic_write_text(out / "report.md", "\n".join(lines).rstrip() + "\n")
