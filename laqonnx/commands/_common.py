"""The one kit of argparse ``type=`` parsers every sub-command uses.

Each parser turns the text of one option into a value or raises
:class:`argparse.ArgumentTypeError` with a message naming the problem (argparse then prints
``laqonnx CMD: error: argument --opt: <message>`` and exits 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from fractions import Fraction

__all__ = ["parse_fraction", "parse_positive_fraction", "parse_positive_int", "parse_shape", "parse_floats", "parse_range",
           "parse_subset", "parse_max_latency"]


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


def parse_positive_fraction(text: str) -> float:
    """Like :func:`parse_fraction`, but strictly positive."""
    value = parse_fraction(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be > 0")
    return value


def parse_positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def parse_max_latency(text: str) -> str:
    """A latency budget: ``0.7x`` (relative to the float model) or ``3.5ms``; returned as written
    (its batch size comes from ``--latency-batch``)."""
    from ..errors import OptionError
    from ..quant.costs import parse_max_latency as parse

    try:
        parse(text)
    except OptionError:
        raise argparse.ArgumentTypeError(f"invalid latency {text!r}: write 0.7x (relative to the float model) or 3.5ms") from None
    return str(text).strip()


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape of positive integers separated by commas or 'x': ``1,28,28``, ``3x32x32``, ``(3, 8, 8)``."""
    raw = str(text).strip().strip("()[]").replace("x", ",").replace("X", ",")
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a shape: {text!r} (write positive integers separated by commas or 'x', e.g. 1,3,32,32 or 3x32x32)"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (needs one or more positive sizes, e.g. 1,3,32,32)")
    return dims


def parse_floats(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers: ``0.485,0.456,0.406``."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"invalid numbers {text!r}: expected comma-separated numbers such as 0.5,0.5,0.5")
    return values


def parse_range(text: str) -> tuple[float, float]:
    """``LO,HI``: the model's valid input range, finite with LO < HI (fractions allowed: ``0,255``,
    ``-1,1``; on the command line write ``--input-range=-1,1`` when LO is negative)."""
    parts = [p.strip() for p in str(text).strip().strip("[]()").split(",")]
    try:
        if len(parts) != 2:
            raise ValueError(text)
        lo, hi = (_signed_fraction(p) for p in parts)
    except (ValueError, ZeroDivisionError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"invalid range {text!r}: write LO,HI such as 0,1 or -1,1 or 0,255") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"invalid range {text!r}: LO and HI must be finite with LO < HI")
    return lo, hi


def _signed_fraction(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * parse_fraction(text[1:] if sign < 0 else text)


def parse_subset(allowed: Iterable[str], what: str = "method") -> Callable[[str], tuple[str, ...]]:
    """A parser of a comma-separated, non-empty subset of ``allowed`` (order kept, repeats dropped)."""
    names_allowed = tuple(str(a) for a in allowed)

    def parse(text: str) -> tuple[str, ...]:
        names = [t.strip() for t in str(text).split(",") if t.strip()]
        unknown = [n for n in names if n not in names_allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"invalid {what} list {text!r}: expected a comma-separated subset of {','.join(names_allowed)}"
            )
        return tuple(dict.fromkeys(names))

    return parse
