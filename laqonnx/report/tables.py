"""Text and Markdown tables of result rows, and the formatting of their values (percentages, bytes,
eps as a fraction of 255, norms, milliseconds)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

__all__ = ["Column", "format_value", "format_bytes", "format_table", "markdown_table", "MISSING"]

# (key, header) or (key, header, formatter); a dotted key such as "latency_ms.p50" looks inside dicts
Column = Union[tuple[str, str], tuple[str, str, Callable[[Any], str]]]

MISSING = "—"


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


def _pct(v: Any) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1 else format_value(v)


def format_bytes(n: float) -> str:
    """A size in the one unit laqonnx shows everywhere (terminal tables, the report, plots): binary
    KiB / MiB / GiB with one decimal (192183 bytes -> ``187.7 KiB``), bytes below 1 KiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _bytes(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return format_value(v)
    return format_bytes(v)


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
