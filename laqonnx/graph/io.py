"""The one model reader: a path or ``ModelProto`` in, a complete in-memory ``ModelProto`` out.

:func:`read_model` loads a file with its external data (tensors stored beside the model, as the
torch dynamo exporter writes them) or copies a ``ModelProto``, and refuses with a one-line
:class:`ModelError` what cannot be a model: a missing file, a folder, a file that does not parse
or parses to no graph (a truncated or foreign file), a missing or short external data file, and a
``ModelProto`` whose external data was never loaded. The caller's model is never modified.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import NamedTuple

import onnx
from onnx import external_data_helper

from ..errors import ModelError
from .passes import one_line

__all__ = ["ReadModel", "read_model", "external_locations"]


class ReadModel(NamedTuple):
    """A model as read: a private copy of the proto, and the path it came from (None in memory)."""

    model: onnx.ModelProto
    source: str | None


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external-data files (``location`` entries) the tensors of ``model`` refer to."""
    found: dict[str, None] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
            found[loc] = None
    return list(found)


def _require_graph(model: onnx.ModelProto, where: str) -> None:
    if not model.HasField("graph") or len(model.graph.node) == 0 or model.ir_version == 0:
        raise ModelError(f"{where} is not an ONNX model (no graph, or the file is truncated)")


def _load_file(path: Path) -> onnx.ModelProto:
    where = str(path)
    if path.stat().st_size == 0:
        raise ModelError(f"{where} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and the like
        raise ModelError(f"{where} is not a readable ONNX model ({one_line(exc)})") from exc
    _require_graph(model, where)
    locations = external_locations(model)
    if not locations:
        return model
    base = path.parent
    for loc in locations:
        if not loc:
            raise ModelError(f"{where} has a tensor in external data without a location")
        data = base / loc
        if not data.is_file():
            raise ModelError(f"external data file {loc!r} of {where} is missing (expected at {data})")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:  # short data file, a location outside the folder, ...
        raise ModelError(f"cannot read the external data of {where} ({one_line(exc)})") from exc
    return model


def read_model(model: str | os.PathLike[str] | onnx.ModelProto) -> ReadModel:
    """Read ``model`` (a path, or a ``ModelProto`` that is copied) with all its tensor data in memory."""
    if isinstance(model, onnx.ModelProto):
        proto = copy.deepcopy(model)
        _require_graph(proto, "the model")
        locations = external_locations(proto)
        if locations:
            raise ModelError(
                f"the model's tensors are in external data ({', '.join(map(repr, locations))}) that was not loaded: "
                "pass the model's path, or load it with onnx.load(path) first"
            )
        return ReadModel(proto, None)
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a folder, not an ONNX file: {path}")
    return ReadModel(_load_file(path), str(path))
