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


def _short(name: str, width: int = 36) -> str:
    """A layer name that fits a label: its tail, which tells layers apart (``…/layer3/conv2``)."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _plot_lipschitz(analyses: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Horizontal bars, one row per layer with its name (in graph order, top to bottom), log scale:
    readable for any number of layers, since the figure grows with them."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    counts = [max(len(a.get("layers") or []), 1) for a in analyses.values()]
    fig = Figure(figsize=(8.4, sum(0.24 * c + 1.1 for c in counts)))
    grid = fig.add_gridspec(len(counts), 1, height_ratios=[0.24 * c + 1.1 for c in counts])
    colors: dict[str, str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray"]
    for i, (label, a) in enumerate(analyses.items()):
        ax = fig.add_subplot(grid[i])
        layers = a.get("layers") or []
        names = [_short(str(layer.get("name", f"#{j}"))) for j, layer in enumerate(layers)]
        values = [layer.get("lipschitz") for layer in layers]
        ok = [isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values]
        ys = [j for j, good in enumerate(ok) if good]
        methods = [str(layers[j].get("lipschitz_method") or "unknown") for j in ys]
        for method in methods:
            colors.setdefault(method, palette[len(colors) % len(palette)])
        ax.set_xscale("log")
        if ys:
            lo, hi = min(values[j] for j in ys), max(values[j] for j in ys)
            ax.barh(ys, [values[j] for j in ys], color=[colors[m] for m in methods], height=0.7)
            ax.set_xlim(lo / 3, hi * 3)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        for j, good in enumerate(ok):
            if not good:
                ax.annotate("n/a (no bound)", (0.01, j), xycoords=("axes fraction", "data"), va="center", fontsize=8,
                            color="0.35")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(len(names) - 0.4 if names else 0.6, -0.6)  # graph order, first layer on top
        bound = a.get("network_bound")
        unknown = a.get("unknown_ops") or []
        bound_text = format_value(bound) if isinstance(bound, (int, float)) else "unknown"
        if unknown:
            bound_text += f": no rule for {', '.join(map(str, unknown))}"
        ax.set_title(f"{label}: per-layer Lipschitz constants (network bound {bound_text})", fontsize=10, loc="left")
        ax.set_xlabel("Lipschitz constant (log scale)")
        ax.grid(axis="x", alpha=0.3)
    fig.axes[0].legend(handles=[Patch(color=c, label=m) for m, c in colors.items()], title="method",
                       fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")


def _styles(labels: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """A distinct (colour, marker) per model: 18 saturated colours (tab10 then Dark2) and 12 markers,
    cycling at different periods, so that up to 36 models never share both and neighbours differ."""
    from matplotlib import colormaps

    colours = [colormaps["tab10"](i) for i in range(10)] + [colormaps["Dark2"](i) for i in range(8)]
    return {lab: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)]) for i, lab in enumerate(labels)}


def _spread(xs: Sequence[float], width: float) -> list[float]:
    """Offsets (in data units) spreading points whose x lie within 2% of the axis width of each other
    symmetrically around their x, so that none hides another: 0.8% of the width apart, a group
    spanning at most 8% (an x read off is then within 4% of the axis width of the true one)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    offsets = [0.0] * len(xs)
    group: list[int] = []
    for i in [*order, None]:
        if i is not None and group and xs[i] - xs[group[0]] <= 0.02 * width:
            group.append(i)
            continue
        step = min(0.008, 0.08 / max(len(group) - 1, 1)) * width
        for k, j in enumerate(group):
            offsets[j] = (k - (len(group) - 1) / 2) * step
        group = [] if i is None else [i]
    return offsets


def _plot_tradeoff(points: Sequence[dict[str, Any]], path: Path) -> bool:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    sizes = [p["size"] for p in points if p["size"] is not None]
    unit, scale = ("MiB", 1 << 20) if sizes and max(sizes) >= 1 << 20 else ("KiB", 1 << 10)
    panels = [(k, t) for k, t in (("size", f"model size ({unit})"), ("p50", "latency p50, batch 1 (ms)"))
              if any(p[k] is not None for p in points)]
    if not panels:
        return False
    styles = _styles([p["label"] for p in points])
    fig = Figure(figsize=(5.6 * len(panels) + 3.2, max(4.4, 0.2 * len(points) + 1.6)))
    for i, (key, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        shown = [p for p in points if p[key] is not None]
        xs = [p[key] / scale if key == "size" else p[key] for p in shown]
        offsets = _spread(xs, max(xs) or 1.0)
        for p, x, dx in zip(shown, xs, offsets):
            color, marker = styles[p["label"]]
            ys = [p[k] for k in ("clean", "worst") if p[k] is not None]
            if len(ys) == 2:
                ax.plot([x + dx] * 2, ys, color=color, lw=1, alpha=0.45, zorder=1)
            if p["clean"] is not None:
                ax.scatter([x + dx], [p["clean"]], marker=marker, s=55, color=color, edgecolors="k", linewidths=0.5,
                           zorder=3)
            if p["worst"] is not None:
                ax.scatter([x + dx], [p["worst"]], marker=marker, s=55, facecolors="white", edgecolors=[color],
                           linewidths=1.6, zorder=2)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, 1.05)
        ax.set_xlim(left=0, right=max(xs) * 1.08 if xs and max(xs) > 0 else None)  # sizes compare as ratios: the origin
        ax.set(xlabel=xlabel, ylabel="accuracy", title=f"Accuracy vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker=m, markeredgecolor="k", markeredgewidth=0.5, ls="", markersize=7,
                      label=lab) for lab, (c, m) in styles.items()]
    handles += [Line2D([], [], ls="", label=""),
                Line2D([], [], color="0.3", marker="o", ls="", label="filled: clean accuracy"),
                Line2D([], [], color="0.3", marker="o", markerfacecolor="white", markeredgewidth=1.6, ls="",
                       label="hollow: robust accuracy (worst case)")]
    fig.axes[-1].legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                        title="model (points close in x are spread apart)", title_fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return True
