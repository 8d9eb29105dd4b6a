"""The one check of an attack radius against the input range, shared by ``quantize`` and ``evaluate``."""

from __future__ import annotations

__all__ = ["large_eps_note"]


def large_eps_note(eps: float, norm: str, input_range: tuple[float, float]) -> str | None:
    """A one-line note when an L-inf ``eps`` is at least half the width of ``input_range`` (such a
    ball reaches a constant image from any input, so eps was most likely meant as eps/255, or in
    [0, 1] units), else None. Not for L2, whose radii grow with the input size."""
    lo, hi = (float(v) for v in input_range)
    if str(norm) != "inf" or not eps >= (hi - lo) / 2:
        return None
    guess = f"{eps:g}/255 = {eps / 255:.4g}"
    note = (f"eps {eps:g} is at least half the width of the input range [{lo:g}, {hi:g}]: an L-inf ball this large "
            f"can erase any input; eps is in the units of the input range: did you mean eps/255, {guess}?")
    if hi - lo != 1:
        note += f" (an eps meant in [0, 1] units is eps x {hi - lo:g} in these)"
    return note
