"""Small torch classifiers in the styles users bring, trained on the digits and exported to ONNX.

Three architectures on scikit-learn's digits at 16x16 (1 channel, 10 classes), each trained for
a few seconds on one CPU thread (seeded) to >= 95 % test accuracy:

- ``mobilenetv3``: MobileNetV3-small style: hard-swish, depthwise convs, squeeze-excite gated by
  HardSigmoid (a Mul of two activations), BatchNorm (both exporters fold it into the convs);
- ``efficientnet``: MBConv blocks: SiLU (x * sigmoid(x)), depthwise convs, squeeze-excite with
  Sigmoid, BatchNorm, residual Adds;
- ``vit``: a tiny ViT: conv patch embedding, class token (Expand + Concat), position embedding,
  LayerNorm, two-head self-attention written out (MatMul of two activations, scaling, Softmax;
  not ``F.scaled_dot_product_attention``, which the legacy exporter refuses below opset 14), MLP
  with exact GELU, residual Adds, Linear head on the class token.

Exports (``EXPORTS``): ``torchscript`` (legacy exporter, ``dynamo=False``, opset 17), ``dynamo``
(``dynamo=True``, its default opset), ``opset11`` (legacy exporter at opset 11) and ``paddle`` (the
torchscript export with every initializer turned into a ``Constant`` node, as paddle2onnx writes).
:func:`foreign_export` returns the model or, if an exporter fails, the reason (tests skip with it).
``RECORDED_OPS`` is the table of which export produced which op types (checked by a test).
Everything is cached per process: the whole set (3 trainings, 12 exports) takes 15-25 s on a shared
2-core machine (each dynamo export ~2 s).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

__all__ = ["MODELS", "EXPORTS", "CASES", "RECORDED_OPS", "ForeignExport", "foreign_export", "foreign_model",
           "trained_model", "digits_16", "constants_for_initializers", "IMAGE_SHAPE"]

MODELS = ("mobilenetv3", "efficientnet", "vit")
EXPORTS = ("torchscript", "dynamo", "opset11", "paddle")
CASES = tuple((m, e) for m in MODELS for e in EXPORTS)
IMAGE_SHAPE = (1, 16, 16)

# ---------------------------------------------------------------- architectures


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, hard: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)
        self.act = nn.ReLU() if hard else nn.SiLU()
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class _InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> squeeze-excite -> project 1x1 (+ identity when shapes allow)."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int, act: type[nn.Module], hard_se: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expand != cin:
            layers += [nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), act()]
        layers += [nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False), nn.BatchNorm2d(expand), act(),
                   _SqueezeExcite(expand, max(4, expand // 4), hard_se),
                   nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
            _InvertedResidual(16, 16, 16, 1, nn.ReLU, True),
            _InvertedResidual(16, 48, 24, 2, nn.Hardswish, True),
            _InvertedResidual(24, 72, 24, 1, nn.Hardswish, True),
            nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(64, 64), nn.Hardswish(), nn.Dropout(0.1), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
            _InvertedResidual(16, 16, 16, 1, nn.SiLU, False),
            _InvertedResidual(16, 64, 24, 2, nn.SiLU, False),
            _InvertedResidual(24, 96, 24, 1, nn.SiLU, False),
            nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.scale = (dim // heads) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), _Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (16 // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(_Block(dim, heads), _Block(dim, heads))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


_ARCH = {"mobilenetv3": (MobileNetV3, 4, 3e-3), "efficientnet": (EfficientNet, 4, 3e-3), "vit": (ViT, 15, 3e-3)}

# ---------------------------------------------------------------- data, training


@functools.cache
def digits_16(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The digits at 16x16: float32 (N, 1, 16, 16) in [0, 1] and int64 labels."""
    from laqonnx.zoo.digits import load_digits

    x, y = load_digits(size=16, split=split)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, above all on a shared machine
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def trained_model(name: str) -> nn.Module:
    """The architecture ``name`` trained (seeded, Adam, batch 64) on the digits train split, in eval mode."""
    cls, epochs, lr = _ARCH[name]
    xtr, ytr = digits_16("train")
    x, y = torch.from_numpy(np.array(xtr)), torch.from_numpy(np.array(ytr))
    with _one_thread(), torch.enable_grad():  # callers may sit inside torch.no_grad()
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        net = cls()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                b = perm[i:i + 64]
                opt.zero_grad()
                F.cross_entropy(net(x[b]), y[b]).backward()
                opt.step()
    return net.eval()


# ---------------------------------------------------------------- exports


@dataclass(frozen=True)
class ForeignExport:
    """One export of one model: the ONNX model (or ``None`` and the exporter's failure)."""

    name: str
    exporter: str
    model: onnx.ModelProto | None
    reason: str = ""

    @property
    def opset(self) -> int:
        assert self.model is not None
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))

    @property
    def ops(self) -> frozenset[str]:
        assert self.model is not None
        return frozenset(n.op_type for n in self.model.graph.node)


def _legacy(net: nn.Module, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, *IMAGE_SHAPE),), buf, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def _dynamo(net: nn.Module) -> onnx.ModelProto:
    batch = torch.export.Dim("N")
    program = torch.onnx.export(net, (torch.zeros(2, *IMAGE_SHAPE),), dynamo=True, verbose=False,
                                input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},))
    return program.model_proto


def constants_for_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers are all ``Constant`` nodes (placed first), paddle2onnx style."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = list(out.graph.initializer)
    names = {t.name for t in inits}
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{k}", value=t) for k, t in enumerate(inits)]
    kept_inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.initializer[:]
    del out.graph.input[:]
    out.graph.input.extend(kept_inputs)
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@functools.cache
def foreign_export(name: str, exporter: str) -> ForeignExport:
    """Export the trained ``name`` with ``exporter`` (one of ``EXPORTS``); a failure is recorded, not raised."""
    if name not in MODELS or exporter not in EXPORTS:
        raise ValueError(f"unknown foreign model {name!r} / exporter {exporter!r}")
    if exporter == "paddle":
        base = foreign_export(name, "torchscript")
        if base.model is None:
            return ForeignExport(name, exporter, None, f"no torchscript export to convert: {base.reason}")
        return ForeignExport(name, exporter, constants_for_initializers(base.model))
    net = trained_model(name)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _one_thread():
            warnings.simplefilter("ignore")
            model = _dynamo(net) if exporter == "dynamo" else _legacy(net, 11 if exporter == "opset11" else 17)
    except Exception as exc:  # noqa: BLE001  (any exporter failure is a recorded, skipped case)
        return ForeignExport(name, exporter, None, f"{exporter} export of {name} failed: {type(exc).__name__}: {exc}")
    onnx.checker.check_model(model)
    return ForeignExport(name, exporter, model)


def foreign_model(name: str, exporter: str) -> onnx.ModelProto:
    """The ONNX model of ``name`` exported by ``exporter``; skips the calling test if that export failed."""
    exp = foreign_export(name, exporter)
    if exp.model is None:
        pytest.skip(exp.reason)
    return exp.model


# ---------------------------------------------------------------- what each export contains
# (torch 2.13.0, onnxscript 0.7.2; test_foreign_models checks this table against the exports)

_MBV3 = {"Add", "Conv", "Gemm", "HardSigmoid", "Mul", "Relu"}
_EFF = {"Add", "Conv", "Gemm", "Mul", "Sigmoid"}
RECORDED_OPS: dict[tuple[str, str], tuple[int, frozenset[str]]] = {
    ("mobilenetv3", "torchscript"): (17, frozenset(_MBV3 | {"HardSwish", "GlobalAveragePool", "Flatten"})),
    ("mobilenetv3", "dynamo"): (20, frozenset(_MBV3 | {"HardSwish", "ReduceMean", "Reshape"})),
    ("mobilenetv3", "opset11"): (11, frozenset(_MBV3 | {"GlobalAveragePool", "Flatten"})),  # HardSwish: opset 14
    ("mobilenetv3", "paddle"): (17, frozenset(_MBV3 | {"HardSwish", "GlobalAveragePool", "Flatten", "Constant"})),
    ("efficientnet", "torchscript"): (17, frozenset(_EFF | {"GlobalAveragePool", "Flatten"})),
    ("efficientnet", "dynamo"): (20, frozenset(_EFF | {"ReduceMean", "Reshape"})),
    ("efficientnet", "opset11"): (11, frozenset(_EFF | {"GlobalAveragePool", "Flatten"})),
    ("efficientnet", "paddle"): (17, frozenset(_EFF | {"GlobalAveragePool", "Flatten", "Constant"})),
}
_VIT = {"Add", "Concat", "Conv", "Expand", "Gather", "Gemm", "MatMul", "Mul", "Reshape", "Shape", "Slice", "Softmax",
        "Squeeze", "Transpose"}
_VIT_TS = _VIT | {"Cast", "Constant", "ConstantOfShape", "Div", "Equal", "Erf", "Split", "Unsqueeze", "Where"}
RECORDED_OPS.update({
    ("vit", "torchscript"): (17, frozenset(_VIT_TS | {"LayerNormalization"})),
    ("vit", "dynamo"): (20, frozenset(_VIT | {"Gelu", "LayerNormalization"})),
    ("vit", "opset11"): (11, frozenset(_VIT_TS | {"Pow", "ReduceMean", "Sqrt", "Sub"})),  # LayerNorm decomposed
    ("vit", "paddle"): (17, frozenset(_VIT_TS | {"LayerNormalization"})),
})
