"""Passes on the graph's structure: order, validity, opset, names, dead code.

Most are onnx-ir passes under a name (:class:`IRPass`); the checker and the opset upgrade use onnx
itself. :func:`remove_unused` is the hygiene helper for models laqonnx writes.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter
from onnx_ir.passes import common as ir_common
from onnx_ir.passes.common.naming import NameGenerator

from ..errors import ModelError
from .passes import IRPass, ProtoPass, one_line, run_passes

__all__ = [
    "CheckModel", "UpgradeOpset", "NameNodes", "name_nodes", "default_opset", "topological_sort", "eliminate_identities",
    "remove_unused_nodes", "initializers_off_inputs", "remove_unused", "OPSET_FLOOR",
]

OPSET_FLOOR = 13  # onnxruntime's QDQ quantizer writes DequantizeLinear(axis=...), which needs opset 13


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ONNX domain the model imports (None if it imports none)."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions) if versions else None


def topological_sort() -> IRPass:
    """Sort the nodes so every node comes after the producers of its inputs (keras2onnx is unsorted)."""
    return IRPass("topological-sort", ir_common.TopologicalSortPass())


def eliminate_identities() -> IRPass:
    """Remove Identity nodes (torch puts them on parameters), keeping the graph's output names."""
    return IRPass("eliminate-identity", ir_common.IdentityEliminationPass())


def remove_unused_nodes() -> IRPass:
    """Remove nodes and initializers nothing reaches the outputs through (the signature stays)."""
    return IRPass("remove-unused", ir_common.RemoveUnusedNodesPass())


def initializers_off_inputs() -> IRPass:
    """Drop initializers listed as graph inputs (IR < 4 exports): they become plain constants."""
    return IRPass("initializers-off-inputs", ir_common.RemoveInitializersFromInputsPass())


class CheckModel(ProtoPass):
    """onnx.checker on the model (never changes it); a one-line ModelError when it is invalid.

    A model over 2 GB cannot be checked in memory: it is checked from ``source`` (its path).
    """

    name = "check"

    def __init__(self, source: str | None = None) -> None:
        self.source = source

    def run(self, model: onnx.ModelProto) -> bool:
        where = self.source or "the model"
        try:
            onnx.checker.check_model(model)
        except ValueError:  # > 2 GB in memory: check from the file instead
            if self.source is None:
                raise ModelError(f"{where} is too large to check in memory: pass its path") from None
            try:
                onnx.checker.check_model(self.source)
            except Exception as exc:
                raise ModelError(f"{where} is not a valid ONNX model: {one_line(exc)}") from exc
        except Exception as exc:
            raise ModelError(f"{where} is not a valid ONNX model: {one_line(exc)}") from exc
        return False


class UpgradeOpset(ProtoPass):
    """Convert a model of default-domain opset below ``target`` to ``target`` (onnx's version converter).

    The IR version is raised to the one ``target`` needs; the result is checked. A model already at
    ``target`` or above, or importing no default domain, is left as it is.
    """

    name = "upgrade-opset"

    def __init__(self, target: int = OPSET_FLOOR, source: str | None = None) -> None:
        if target < 1:
            raise ValueError(f"target opset must be positive, got {target}")
        self.target = target
        self.source = source

    def run(self, model: onnx.ModelProto) -> bool:
        opset = default_opset(model)
        if opset is None or opset >= self.target:
            return False
        where = self.source or "the model"
        try:
            converted = version_converter.convert_version(model, self.target)
            needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", self.target)], True)
            converted.ir_version = max(converted.ir_version, needed)
            onnx.checker.check_model(converted)
        except Exception as exc:
            raise ModelError(f"cannot convert {where} from opset {opset} to {self.target}: {one_line(exc)}") from exc
        model.CopyFrom(converted)
        return True


class _IndexNames(NameGenerator):
    """Unnamed nodes are called ``<op_type>_<index in the graph>``; values keep onnx-ir's default."""

    def __init__(self, graph: ir.Graph) -> None:
        self._index = {node: i for i, node in enumerate(graph)}

    def generate_node_name(self, node: ir.Node) -> str:
        i = self._index.get(node)
        return f"{node.op_type}_{i}" if i is not None else node.op_type

    def generate_value_name(self, value: ir.Value) -> str:
        return value.name or "v"


class NameNodes(ir.passes.InPlacePass):
    """onnx-ir's NameFixPass with ``<op_type>_<index>`` names: every node (and value) gets a unique name."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir_common.NameFixPass(name_generator=_IndexNames(model.graph))(model)


def name_nodes() -> IRPass:
    """Give every unnamed node the name ``<op_type>_<index>`` and make duplicate names unique."""
    return IRPass("name-nodes", NameNodes())


def remove_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without nodes or initializers that no output depends on (``model`` unchanged).

    For models laqonnx writes: onnxruntime warns "Removing initializer ... not used" on each load otherwise.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return run_passes(copy, [remove_unused_nodes()]).model
