"""The report's figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state)
and written atomically as PNG: robust accuracy vs eps, per-layer Lipschitz constants, and accuracy
vs size and latency."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._util.io import atomic_write_bytes
from .tables import _eps, format_value

__all__: list[str] = []


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
