"""Argument parsers shared by sub-commands (``type=`` callables for argparse)."""

from __future__ import annotations

import argparse
import math
from fractions import Fraction

__all__ = ["parse_fraction", "parse_shape"]


def parse_fraction(text: str) -> float:
    """A non-negative finite number written as a decimal or a fraction: ``0.03``, ``8/255``, ``1e-2``."""
    raw = str(text).strip()
    try:
        if raw.count("/") > 1:
            raise ValueError(raw)
        if "/" in raw:
            num, _, den = raw.partition("/")
            value = float(Fraction(num.strip())) / float(Fraction(den.strip()))
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"invalid number {text!r}: write a decimal or a fraction such as 0.03 or 8/255"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be finite and >= 0")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape of positive integers separated by commas or 'x': ``1,28,28``, ``3x32x32``."""
    raw = str(text).strip().strip("()[]").replace("x", ",").replace("X", ",")
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: write positive integers separated by commas, e.g. 1,28,28 or 3x32x32"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: needs one or more positive integers")
    return dims
