"""Calibrated value ranges for the data-dependent bound rules.

:func:`calibrated_ranges` finds the tensors the rules will read (a dry run of the propagation that
records every range a rule asks for), runs the model in onnxruntime over the calibration data with
those tensors as extra outputs (:func:`laqonnx.quant.calibration.calibrate`, min/max only) and
returns ``tensor name -> (min, max)``. A LayerNormalization's unnamed InvStdDev output is named for
the run, so its 1/sqrt(var + eps) is calibrated too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import onnx

from ..graph import PreparedModel
from .rules_data import inv_std_name

__all__ = ["CalibratedRanges", "calibrated_ranges", "needed_ranges"]


class _Recorder(Mapping):
    """A ranges mapping that answers every name with a harmless positive range and remembers the names."""

    def __init__(self) -> None:
        self.asked: dict[str, None] = {}

    def get(self, name, default=None):
        self.asked[name] = None
        return (1.0, 2.0)

    __getitem__ = get

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def needed_ranges(pm: PreparedModel, layer_norms: Mapping[str, float]) -> tuple[str, ...]:
    """The tensors whose calibrated range some rule on a perturbed path reads."""
    from .network import network_bounds

    recorder = _Recorder()
    network_bounds(pm, layer_norms, recorder)
    return tuple(recorder.asked)


@dataclass(frozen=True)
class CalibratedRanges:
    ranges: Mapping[str, tuple[float, float]]
    examples: int
    notes: tuple[str, ...] = ()


def _probe_model(pm: PreparedModel, wanted: set[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose LayerNormalization nodes output the InvStdDev the rules asked for, and the
    wanted tensors it produces."""
    model = onnx.ModelProto()
    model.CopyFrom(pm.model)
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and inv_std_name(node) in wanted and not (len(node.output) > 2 and node.output[2]):
            while len(node.output) < 3:
                node.output.append("")
            node.output[2] = inv_std_name(node)
    produced = {o for n in model.graph.node for o in n.output if o} | {pm.input_name}
    return model, [t for t in wanted if t in produced]


def calibrated_ranges(pm: PreparedModel, layer_norms: Mapping[str, float], calib: Any, *, limit: int | None = None,
                      input_range: tuple[float, float] | None = None, progress: bool = True) -> CalibratedRanges:
    """(min, max) over ``calib`` (a data spec as :func:`laqonnx.data.open_data` accepts) of every
    tensor a data-dependent rule of ``pm`` reads. Raises :class:`laqonnx.errors.DataError` on bad data."""
    from ..quant.adversarial import Off
    from ..quant.calibration import calibrate

    wanted = set(needed_ranges(pm, layer_norms))
    model, tensors = _probe_model(pm, wanted)
    probe = dataclasses.replace(pm, model=model)
    result = calibrate(probe, calib, tensors, adversarial=Off(), input_range=input_range, limit=limit,
                       minmax_only=tensors, progress=progress)
    ranges = {name: (float(s.min), float(s.max)) for name, s in result.stats.items()}
    return CalibratedRanges(MappingProxyType(ranges), len(result.data.clean), tuple(result.notes))
