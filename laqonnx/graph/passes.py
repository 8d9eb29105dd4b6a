"""Pass infrastructure: a pass changes a model and says whether it did; one sequencer runs them.

After onnx-ir's pass infrastructure (``onnx_ir.passes``): every pass is called on a model and
returns a :class:`PassResult` (the model and whether it changed). Passes come in two forms:

* :class:`ProtoPass` edits an ``onnx.ModelProto`` in place (our own passes, onnx's checker and
  version converter);
* :class:`IRPass` wraps an onnx-ir / onnxscript pass, which works on an ``onnx_ir.Model``.

:func:`run_passes` runs a sequence in order and converts between the two forms only when the form
changes (consecutive onnx-ir passes share one conversion). It returns the final ``ModelProto`` and
the names of the passes that changed it. A pass reports a user problem as a
:class:`laqonnx.errors.LaqonnxError`; any other exception a library pass raises becomes a one-line
:class:`ModelError` naming the pass.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import onnx
import onnx_ir as ir

from ..errors import LaqonnxError, ModelError

__all__ = ["PassResult", "Pass", "ProtoPass", "IRPass", "PassLog", "run_passes", "one_line"]

Form = Literal["proto", "ir"]
AnyModel = Union[onnx.ModelProto, ir.Model]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The message of ``exc`` on one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(str(exc).split())
    return text[:limit] if text else type(exc).__name__


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the model (the same object for in-place passes) and whether it changed."""

    model: AnyModel
    changed: bool


class Pass(abc.ABC):
    """A named step of the intake. ``form`` says which representation :meth:`__call__` takes."""

    name: str = "pass"
    form: Form = "proto"

    @abc.abstractmethod
    def __call__(self, model: AnyModel) -> PassResult:
        """Run the pass on ``model``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ProtoPass(Pass):
    """A pass editing an ``onnx.ModelProto`` in place; subclasses implement :meth:`run`."""

    form: Form = "proto"

    @abc.abstractmethod
    def run(self, model: onnx.ModelProto) -> bool:
        """Edit ``model`` in place; return True if it changed."""

    def __call__(self, model: AnyModel) -> PassResult:
        if not isinstance(model, onnx.ModelProto):
            raise TypeError(f"{self.name} takes an onnx.ModelProto, got {type(model).__name__}")
        return PassResult(model, bool(self.run(model)))


class IRPass(Pass):
    """An onnx-ir pass (``onnx_ir.passes.PassBase``: onnx-ir's own or onnxscript's) under a name."""

    form: Form = "ir"

    def __init__(self, name: str, inner: ir.passes.PassBase) -> None:
        self.name = name
        self.inner = inner

    def __call__(self, model: AnyModel) -> PassResult:
        if not isinstance(model, ir.Model):
            raise TypeError(f"{self.name} takes an onnx_ir.Model, got {type(model).__name__}")
        result = self.inner(model)
        return PassResult(result.model, bool(result.modified))


@dataclass(frozen=True)
class PassLog:
    """The result of :func:`run_passes`: the final model and the passes that changed it, in order."""

    model: onnx.ModelProto
    changed_by: tuple[str, ...]


def _convert(model: AnyModel, form: Form, where: str) -> AnyModel:
    try:
        if form == "ir":
            return ir.serde.deserialize_model(model)  # type: ignore[arg-type]
        return ir.serde.serialize_model(model)  # type: ignore[arg-type]
    except Exception as exc:
        raise ModelError(f"cannot convert {where} for the graph passes: {one_line(exc)}") from exc


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass], where: str = "the model") -> PassLog:
    """Run ``passes`` in order on ``model`` (which may be edited or replaced) and log the changes.

    ``where`` names the model in error messages (its path, usually).
    """
    current: AnyModel = model
    form: Form = "proto"
    changed: list[str] = []
    for p in passes:
        if p.form != form:
            current, form = _convert(current, p.form, where), p.form
        try:
            result = p(current)
        except LaqonnxError:
            raise
        except Exception as exc:  # a library pass failing on a model it does not handle
            raise ModelError(f"graph pass {p.name!r} failed on {where}: {one_line(exc)}") from exc
        current = result.model
        if result.changed:
            changed.append(p.name)
    if form != "proto":
        current = _convert(current, "proto", where)
    assert isinstance(current, onnx.ModelProto)
    return PassLog(current, tuple(changed))
