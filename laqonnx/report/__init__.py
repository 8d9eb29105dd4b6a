"""Report stage: aligned text tables, Markdown tables, and a Markdown report with plots.

:func:`write_report` turns the JSON of ``laqonnx evaluate`` (and optionally the JSON of
``laqonnx analyze`` for some models) into ``report.md`` with PNG figures beside it. Figures are
drawn with matplotlib's Agg canvas (no display, no global pyplot state).

- :mod:`.tables`: :func:`format_value`, :func:`format_bytes` (the one size unit), :func:`format_table`,
  :func:`markdown_table`;
- :mod:`.plots`: the figures;
- :mod:`.markdown`: :func:`write_report`.
"""

from __future__ import annotations

from .markdown import write_report
from .tables import Column, format_bytes, format_table, format_value, markdown_table

__all__ = ["Column", "format_value", "format_bytes", "format_table", "markdown_table", "write_report"]
