"""The vocabularies of laqonnx's options, one ``str`` Enum each.

Every argparse ``choices=`` and every validation of these options derives from the enums here, so
a name is spelled in one place. Members are ``str`` and compare equal to their values
(``WeightMethod.MSE == "mse"``); they print and format as the bare value, so JSON, plans and
messages are unchanged. Options keep accepting the plain strings.
"""

from __future__ import annotations

from enum import Enum

from .errors import OptionError

__all__ = [
    "Vocabulary",
    "ThreatNorm",
    "WeightMethod",
    "Rounding",
    "RoundingMode",
    "ActivationMethod",
    "Objective",
    "Baseline",
    "AttackPreset",
    "AttackName",
    "ChannelOrder",
    "BoundKind",
]


class Vocabulary(str, Enum):
    """Base of the vocabularies: a ``str`` Enum whose ``str()`` and ``format()`` are its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The values in definition order, as plain strings (for ``choices=`` and messages)."""
        return tuple(str(m.value) for m in cls)

    @classmethod
    def check(cls, value: object, what: str) -> str:
        """``value`` as a plain string if it is one of the values, else :class:`OptionError` naming ``what``."""
        if isinstance(value, str) and value in cls.values():
            return str(cls(value).value)
        raise OptionError(f"{what} must be one of {cls.values()}, got {value!r}")


class ThreatNorm(Vocabulary):
    """The threat model's norm: ``||delta||_inf <= eps`` or ``||delta||_2 <= eps``."""

    INF = "inf"
    L2 = "2"


class WeightMethod(Vocabulary):
    """How a weight's clip range is chosen."""

    MAXABS = "maxabs"
    MSE = "mse"
    PERCENTILE = "percentile"


class Rounding(Vocabulary):
    """How a weight's values are rounded to its integer grid: to the nearest level, or learned per
    weight (adaptive rounding, up or down, to minimise the layer's output error)."""

    NEAREST = "nearest"
    ADAPTIVE = "adaptive"


class RoundingMode(Vocabulary):
    """Which roundings the metric scores: ``auto`` adds adaptive rounding as a candidate where it
    is most likely to pay (int4, per-channel, MSE range); ``nearest`` never; ``adaptive`` forces it
    on every weight setting."""

    AUTO = "auto"
    NEAREST = "nearest"
    ADAPTIVE = "adaptive"


class ActivationMethod(Vocabulary):
    """How an activation's range is chosen from its calibration histogram."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class Objective(Vocabulary):
    """What the per-layer metric minimises: both terms, the quantization term, the adversarial term."""

    LAQ = "laq"
    MSE = "mse"
    LIPSCHITZ = "lipschitz"


class Baseline(Vocabulary):
    """onnxruntime's plain ``quantize_static`` with one calibration method."""

    ORT_MINMAX = "ort-minmax"
    ORT_PERCENTILE = "ort-percentile"
    ORT_ENTROPY = "ort-entropy"


class AttackPreset(Vocabulary):
    """Attack budgets of ``laqonnx evaluate`` (:data:`laqonnx.robustness.attacks.PRESETS`)."""

    QUICK = "quick"
    STANDARD = "standard"
    THOROUGH = "thorough"


class AttackName(Vocabulary):
    """The attacks :mod:`laqonnx.robustness.attacks` registers, in the order presets run them."""

    FGSM = "fgsm"
    PGD = "pgd"
    APGD_CE = "apgd-ce"
    APGD_DLR = "apgd-dlr"
    TRANSFER = "transfer"
    SQUARE = "square"
    HSJ = "hsj"


class ChannelOrder(Vocabulary):
    """The channel order a deployed model's network expects."""

    RGB = "rgb"
    BGR = "bgr"
    GRAY = "gray"


class BoundKind(Vocabulary):
    """What a Lipschitz bound covers: every input (global), or the calibration data (data-dependent:
    some rule bounded a product, Exp, ... from the calibrated value ranges)."""

    GLOBAL = "global"
    DATA_DEPENDENT = "data-dependent"
