"""The plan's JSON codecs for weight and activation settings, and its rounding file (the integer
weights of adaptive-rounding layers, a compressed ``.npz`` read with ``allow_pickle=False``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import PlanError
from .numerics import ActivationQuant, PerChannel, PerTensor, WeightQuant

__all__ = ["load_rounding", "rounding_bytes", "weight_to_json", "weight_from_json", "activation_to_json",
           "activation_from_json", "candidate_to_json", "candidate_from_json", "opt_float"]


def load_rounding(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The integer weights of adaptive layers (weight name -> array) from a plan's rounding file,
    read with ``allow_pickle=False``."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as exc:
        raise PlanError(f"the plan's rounding file {path} is missing (it holds the adaptive layers' integer weights)") from exc
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read the rounding file {path}: {exc}") from exc


def rounding_bytes(rounded: Mapping[str, Any]) -> bytes:
    """The rounding file's content: a compressed .npz of the integer weights."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in rounded.items()})
    return buf.getvalue()


def weight_to_json(w: WeightQuant | None) -> dict[str, Any] | None:
    if w is None:
        return None
    per_channel = isinstance(w.granularity, PerChannel)
    out: dict[str, Any] = {
        "bits": w.bits,
        "granularity": "per_channel" if per_channel else "per_tensor",
        "method": w.method,
        "percentile": w.percentile,
    }
    if w.rounding != "nearest":
        out["rounding"] = w.rounding
    if w.reduce_range:
        out["reduce_range"] = True
    if per_channel:
        out["axis"] = w.granularity.axis
    return out


def weight_from_json(d: Mapping[str, Any] | None, channel_axis: int = 0) -> WeightQuant | None:
    if d is None:
        return None
    gran = d.get("granularity", "per_tensor")
    if gran == "per_channel":
        granularity: PerTensor | PerChannel = PerChannel(int(d.get("axis", channel_axis)))
    elif gran == "per_tensor":
        granularity = PerTensor()
    else:
        raise PlanError(f"unknown granularity {gran!r} (per_tensor or per_channel)")
    try:
        return WeightQuant(
            bits=d["bits"], granularity=granularity, method=d.get("method", "maxabs"), percentile=d.get("percentile", 99.99),
            rounding=d.get("rounding", "nearest"), reduce_range=d.get("reduce_range", False),
        )
    except ValueError as exc:
        raise PlanError(f"bad weight setting {dict(d)}: {exc}") from exc


def activation_to_json(a: ActivationQuant) -> dict[str, Any]:
    return {"bits": a.bits, "method": a.method, "percentile": a.percentile, "symmetric": a.symmetric}


def activation_from_json(d: Mapping[str, Any]) -> ActivationQuant:
    try:
        return ActivationQuant(
            bits=d["bits"], method=d.get("method", "minmax"), percentile=d.get("percentile", 99.99),
            symmetric=d.get("symmetric", False),
        )
    except ValueError as exc:
        raise PlanError(f"bad activation setting {dict(d)}: {exc}") from exc


def candidate_to_json(c) -> dict[str, Any]:
    """A layer's chosen setting (a :class:`~laqonnx.quant.metric.Candidate`)."""
    return {"weight": weight_to_json(c.weight), "activation": activation_to_json(c.activation)}


def candidate_from_json(d: Mapping[str, Any], axis: int):
    if "weight" not in d or "activation" not in d:
        raise PlanError("a candidate needs 'weight' (null for float) and 'activation'")
    from .metric import Candidate

    return Candidate(weight_from_json(d["weight"], axis), activation_from_json(d["activation"]))


def opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
