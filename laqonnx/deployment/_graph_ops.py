"""A small builder for the guard graphs of :mod:`._jpeg`: :class:`_Ops` appends nodes with generated
value names, and boolean helpers over its scalars."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._steps import _const

__all__ = ["_Ops", "_all", "_any", "_in", "_pick", "_vec_all", "_B", "_I"]


class _Ops:
    """Appends nodes with generated value names: ``ops.Add(a, b)`` returns the output's name."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._n = 0

    def _name(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"

    def const(self, value: object, dtype: type = np.int64) -> str:
        name = self._name()
        self.nodes.append(_const(name, np.array(value, dtype)))
        return name

    def __getattr__(self, op: str):
        def make(*inputs: str, outputs: Sequence[str] | None = None, **attrs: object) -> str:
            outs = list(outputs) if outputs else [self._name()]
            self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
            return outs[0]
        return make


def _all(o: _Ops, *flags: str) -> str:
    out = flags[0]
    for f in flags[1:]:
        out = o.And(out, f)
    return out


def _any(o: _Ops, *flags: str) -> str:
    out = flags[0]
    for f in flags[1:]:
        out = o.Or(out, f)
    return out


def _in(o: _Ops, value: str, allowed: Sequence[int]) -> str:
    """Bool scalar: ``value`` (int64 scalar) is one of ``allowed``."""
    hit = o.Cast(o.Equal(value, o.const(list(allowed))), to=TensorProto.INT64)
    return o.Cast(o.ReduceMax(hit, keepdims=0), to=TensorProto.BOOL)


def _pick(o: _Ops, cond: str, a: str, b: str) -> str:
    """``Where`` for bool tensors (onnxruntime's CPU ``Where`` has no bool kernel)."""
    return o.Or(o.And(cond, a), o.And(o.Not(cond), b))


def _vec_all(o: _Ops, flags: str) -> str:
    return o.Cast(o.ReduceMin(o.Cast(flags, to=TensorProto.INT64), keepdims=0), to=TensorProto.BOOL)


_B = TensorProto.BOOL
_I = TensorProto.INT64
