"""Calibration: the data in the model's units, its adversarial examples, and activation statistics.

:func:`calibrate` opens the user's data for the model (its shape, layout, dtype and valid input
range), crafts or reads the adversarial examples (:mod:`laqonnx.quant.adversarial`) for the first
``adversarial_examples`` clean ones, and runs the model in onnxruntime over all of them to build the
streaming statistics every range method needs (clean and adversarial merged into one histogram per
tensor, so a range chosen on it covers what an attack reaches).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError, require
from ..graph import PreparedModel
from .adversarial import AdversarialCalib, FromData, Generated, Off, pgd_examples
from .collect import collect
from .scoring import CalibSet
from .stats import TensorStats

__all__ = ["Calibration", "calibrate", "DEFAULT_CALIB_LIMIT"]

DEFAULT_CALIB_LIMIT = 1024  # calibration examples read when no limit is given
_BATCH = 32


@dataclass(frozen=True, eq=False)
class Calibration:
    data: CalibSet
    stats: dict[str, TensorStats]
    input_range: tuple[float, float] | None  # the valid input range used (None: integer inputs)
    adversarial: str  # how the adversarial examples were made ("off" without)
    notes: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "clean" if self.data.adversarial is None else "clean+adversarial (merged histograms)"


def _integer(pm: PreparedModel) -> bool:
    return np.issubdtype(np.dtype(getattr(pm, "input_dtype", np.float32)), np.integer)


def _read(source, pm: PreparedModel) -> np.ndarray:
    parts = [x for x, _ in source.batches(256)]
    if not parts:
        raise DataError("the calibration data is empty")
    x = np.concatenate(parts)
    return x.reshape((-1, *pm.input_shape[1:]))


def calibrate(
    pm: PreparedModel,
    calib: Any,
    tensors: Sequence[str],
    *,
    adversarial: AdversarialCalib = Generated(),
    eps: float = 8 / 255,
    norm: str = "inf",
    input_range: tuple[float, float] | None = None,
    limit: int | None = None,
    adversarial_examples: int = 64,
    minmax_only: Collection[str] = (),
    mirror: Any = None,
    progress: bool = True,
) -> Calibration:
    """Read the calibration data, make its adversarial examples, collect statistics of ``tensors``.

    ``input_range`` None: ``[0, 1]`` when the data lie in it, else the data's own range (a note says
    so). ``limit`` None reads at most :data:`DEFAULT_CALIB_LIMIT` examples (a note says when more
    were there). ``mirror``: the float model's logits mirror, if already built.
    """
    from ..data import open_data

    t0 = time.perf_counter()
    notes: list[str] = []
    integer = _integer(pm)
    source = open_data(calib, input_shape=pm.input_shape, split="train", input_range=None if integer else input_range,
                       integer_input=integer)
    n_all = len(source)
    cap = limit if limit is not None else DEFAULT_CALIB_LIMIT
    if n_all > cap:
        if limit is None:
            notes.append(f"calibrating on the first {cap} of {n_all} examples (--calib-limit to change)")
        source = open_data(source, limit=cap, input_range=None)
    x = _read(source, pm)
    if integer:
        used_range = None
    elif input_range is not None:
        used_range = (float(input_range[0]), float(input_range[1]))
    elif float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
        used_range = (0.0, 1.0)
    else:
        used_range = (float(x.min()), float(x.max()))
        notes.append(f"the calibration data lie in [{used_range[0]:.4g}, {used_range[1]:.4g}], not [0, 1]: that is taken as "
                     "the model's valid input range (set it with --input-range LO,HI)")
    seconds = {"load": time.perf_counter() - t0}

    adv = None
    how = "off"
    if isinstance(adversarial, Generated) and eps > 0 and integer:
        notes.append("the model takes integer inputs: no adversarial calibration (its inputs have no gradient)")
    elif isinstance(adversarial, Generated) and eps > 0:
        t = time.perf_counter()
        require("torch", "robustness")
        from .sensitivity import logits_mirror

        k = min(len(x), adversarial_examples)
        adv = pgd_examples(mirror if mirror is not None else logits_mirror(pm), x[:k], float(eps), str(norm), used_range, adversarial)
        seconds["adversarial"] = time.perf_counter() - t
        how = adversarial.describe()
        notes.append(f"adversarial calibration: {k} PGD-{adversarial.steps} examples at eps {eps:g} (L{norm}) in "
                     f"{seconds['adversarial']:.1f} s (--no-adversarial-calib to skip)")
    elif isinstance(adversarial, FromData):
        other = open_data(adversarial.spec, input_shape=pm.input_shape, split="train", input_range=used_range)
        adv = _read(other, pm)[: len(x)]
        how = adversarial.describe()
        if len(adv) < len(x):
            notes.append(f"{len(adv)} adversarial examples for {len(x)} clean ones: paired with the first {len(adv)}")
    elif not isinstance(adversarial, (Generated, Off, FromData)):
        raise TypeError(f"adversarial must be Generated, FromData or Off, got {adversarial!r}")

    t = time.perf_counter()

    def batches():
        for i in range(0, len(x), _BATCH):
            yield x[i:i + _BATCH]
        if adv is not None:
            for i in range(0, len(adv), _BATCH):
                yield adv[i:i + _BATCH]

    total = len(x) + (0 if adv is None else len(adv))
    stats = collect(pm.model, tensors, batches(), progress=progress, total=total, minmax_only=minmax_only)
    seconds["statistics"] = time.perf_counter() - t
    return Calibration(CalibSet(x, adv), stats, used_range, how, tuple(notes), seconds)
