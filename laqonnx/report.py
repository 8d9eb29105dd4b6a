"""Human-readable results: aligned text tables, Markdown tables, and a Markdown report with plots.

:func:`write_report` turns the JSON of ``laqonnx evaluate`` (and optionally the JSON of
``laqonnx analyze`` for some models) into ``report.md`` with PNG figures beside it. Figures are
drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from ._util.io import atomic_write_bytes, atomic_write_text
from .errors import DataError, OutputError

__all__ = ["Column", "format_value", "format_table", "markdown_table", "write_report"]

# (key, header) or (key, header, formatter); a dotted key such as "latency_ms.p50" looks inside dicts
Column = Union[tuple[str, str], tuple[str, str, Callable[[Any], str]]]

MISSING = "—"
MIRROR_RELIABLE = 0.99  # below this agreement with onnxruntime, white-box attacks on the mirror are suspect


def format_value(value: Any) -> str:
    """A compact string: None/NaN as "—", booleans as yes/no, floats to about 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        a = abs(value)
        if a == 0 or math.isinf(a):
            return str(value).replace("inf", "∞")
        if a >= 1e9 or a < 1e-3:
            return f"{value:.3g}"
        return f"{value:,.0f}" if a >= 1000 else f"{value:.4g}"
    return str(value)


def _get(row: Mapping[str, Any], key: str) -> Any:
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _cells(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> tuple[list[list[str]], list[bool]]:
    cells, numeric = [], []
    for col in columns:
        fmt = col[2] if len(col) > 2 else format_value  # type: ignore[misc]
        raw = [_get(r, col[0]) for r in rows]
        present = [v for v in raw if v is not None]
        numeric.append(bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present))
        cells.append([MISSING if v is None else fmt(v) for v in raw])
    return [list(r) for r in zip(*cells)] if rows else [], numeric


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """An aligned plain-text table: header, a dashed rule, one line per row; numbers right-aligned."""
    body, numeric = _cells(rows, columns)
    headers = [c[1] for c in columns]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""
    body, numeric = _cells(rows, columns)

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    return "\n".join([line([c[1] for c in columns]), rule, *(line(r) for r in body)])


# ---------------------------------------------------------------------------------- formatting


def _pct(v: Any) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1 else format_value(v)


def _bytes(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return format_value(v)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{v / size:.3g} {unit}"
    return f"{int(v)} B"


def _eps(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return format_value(v)
    k = v * 255
    return f"{format_value(float(v))} (= {round(k)}/255)" if v > 0 and abs(k - round(k)) < 1e-6 else format_value(float(v))


def _norm(v: Any) -> str:
    text = str(v).lower().replace("_", "")
    if text in ("linf", "inf", "l∞", "infinity") or (isinstance(v, float) and math.isinf(v)):
        return "L∞"
    return {"l2": "L2", "2": "L2", "2.0": "L2", "l1": "L1", "1": "L1"}.get(text, format_value(v))


def _ms(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return format_value(v)
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


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
    if m.get("mirror_error"):
        notes.append(f"no white-box mirror: {m['mirror_error']}")
    skipped = m.get("skipped_attacks")
    if isinstance(skipped, Mapping):
        notes += [f"{a} skipped: {why}" for a, why in skipped.items()]
    if not robust:
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


# ---------------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plot_eps(curves: Mapping[str, list[tuple[float, float]]], eps: Any, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    all_eps = sorted({e for pts in curves.values() for e, _ in pts})
    for label, pts in curves.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=label)
    if all(abs(e * 255 - round(e * 255)) < 1e-6 for e in all_eps):
        ax.set_xticks(all_eps)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{round(x * 255)}/255" if x else "0"))
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
        ax.axvline(eps, color="0.5", ls=":", lw=1, label=f"evaluated ε = {_eps(eps).split(' (= ')[-1].rstrip(')')}")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.set(xlabel="ε (input units; ε = 0 is clean accuracy)", ylabel="robust accuracy",
           title="Robust accuracy vs attack budget ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def _plot_lipschitz(analyses: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    n = len(analyses)
    width = max(7.0, 0.32 * max(len(a.get("layers") or []) for a in analyses.values()) + 3)
    fig = Figure(figsize=(width, 3.2 * n))
    colors: dict[str, str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray"]
    for i, (label, a) in enumerate(analyses.items()):
        ax = fig.add_subplot(n, 1, i + 1)
        layers = a.get("layers") or []
        names = [str(layer.get("name", f"#{j}")) for j, layer in enumerate(layers)]
        values = [layer.get("lipschitz") for layer in layers]
        ok = [isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values]
        xs = [j for j, good in enumerate(ok) if good]
        methods = [str(layers[j].get("lipschitz_method") or "unknown") for j in xs]
        for method in methods:
            colors.setdefault(method, palette[len(colors) % len(palette)])
        ax.set_yscale("log")
        if xs:
            lo, hi = min(values[j] for j in xs), max(values[j] for j in xs)
            ax.bar(xs, [values[j] for j in xs], color=[colors[m] for m in methods])
            ax.set_ylim(lo / 3, hi * 2)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        for j, good in enumerate(ok):
            if not good:
                ax.annotate("n/a", (j, 0.02), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=60 if len(names) > 6 else 0,
                      ha="right" if len(names) > 6 else "center", fontsize=8)
        ax.set_xlim(-0.6, max(len(names), 1) - 0.4)
        bound = a.get("network_bound")
        unknown = a.get("unknown_ops") or []
        bound_text = format_value(bound) if isinstance(bound, (int, float)) else "unknown"
        if unknown:
            bound_text += f": no rule for {', '.join(map(str, unknown))}"
        ax.set_title(f"{label}: per-layer Lipschitz constants (network bound {bound_text})", fontsize=10)
        ax.set_ylabel("Lipschitz constant (log)")
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(handles=[Patch(color=c, label=m) for m, c in colors.items()], title="method",
                       fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)


def _plot_tradeoff(points: Sequence[dict[str, Any]], path: Path) -> bool:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    sizes = [p["size"] for p in points if p["size"] is not None]
    unit, scale = ("MB", 1e6) if sizes and max(sizes) >= 1e6 else ("kB", 1e3)
    panels = [(k, t) for k, t in (("size", f"model size ({unit})"), ("p50", "latency p50, batch 1 (ms)"))
              if any(p[k] is not None for p in points)]
    if not panels:
        return False
    fig = Figure(figsize=(5.2 * len(panels) + 2.2, 4.2))
    colors = {p["label"]: f"C{i % 10}" for i, p in enumerate(points)}
    for i, (key, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for p in points:
            if p[key] is None:
                continue
            x = p[key] / scale if key == "size" else p[key]
            ys = [p[k] for k in ("clean", "worst") if p[k] is not None]
            if len(ys) == 2:
                ax.plot([x, x], ys, color=colors[p["label"]], lw=1, alpha=0.5, zorder=1)
            for acc, marker in (("clean", "o"), ("worst", "v")):
                if p[acc] is not None:
                    ax.scatter([x], [p[acc]], marker=marker, s=50, color=colors[p["label"]], zorder=2)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, 1.05)
        ax.set_xlim(left=0)  # sizes and latencies compare as ratios: keep the origin
        ax.set(xlabel=xlabel, ylabel="accuracy", title=f"Accuracy vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="s", ls="", label=lab) for lab, c in colors.items()]
    handles += [Line2D([], [], color="k", marker="o", ls="", label="clean accuracy"),
                Line2D([], [], color="k", marker="v", ls="", label="robust accuracy (worst case)")]
    fig.axes[-1].legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------- report


def write_report(
    evaluation: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    analyses: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "laqonnx report",
) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures from an evaluation (and analyses); return its path."""
    from .errors import require

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
    from .latency import cpu_info

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
