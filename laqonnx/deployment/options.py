"""Deployment options: :class:`DeployOptions` (validated), the model signature a deployment needs
(one float ``(N, C, S, S)`` image input, C 1 or 3, one ``(N, classes)`` output), the options
resolved against it, and :func:`read_labels`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from ..errors import DataError, ModelError, OptionError
from ..vocab import ChannelOrder

__all__ = ["DeployOptions", "DeployResult", "read_labels", "INPUT_NAME", "Channels"]

INPUT_NAME = "image_bytes"
Channels = Literal["rgb", "bgr", "gray"]
_DEFAULT_TOP_K = 5
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # 40 MP, a 7300 x 5500 photo: decoding one costs ~0.24 GiB (2 copies x 3 B/pixel)


@dataclass(frozen=True)
class DeployOptions:
    """Pre/post-processing settings. ``None`` fields are resolved from the model by :func:`deploy`."""

    image_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: Channels | None = None
    labels: tuple[str, ...] | None = None
    top_k: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if self.image_size is not None and self.image_size < 1:
            raise OptionError(f"image_size must be a positive integer, got {self.image_size}")
        if self.resize is not None:
            if self.resize < 1:
                raise OptionError(f"resize must be a positive integer, got {self.resize}")
            if self.image_size is not None and self.resize < self.image_size:
                raise OptionError(f"resize ({self.resize}) must be at least image_size ({self.image_size})")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, 3):
                raise OptionError(f"{name} needs 1 or 3 values, got {len(values)}")
        if any(not s > 0 for s in self.std):
            raise OptionError(f"std values must be positive, got {self.std}")
        if self.channels is not None:
            object.__setattr__(self, "channels", ChannelOrder.check(self.channels, "channels"))
        if self.top_k is not None and self.top_k < 1:
            raise OptionError(f"top_k must be a positive integer, got {self.top_k}")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or not (
                1 <= self.max_image_pixels <= 1 << 40):
            raise OptionError(f"max_image_pixels must be an integer in 1..2**40, got {self.max_image_pixels!r}")
        if self.labels is not None and (not self.labels or any(not s for s in self.labels)):
            raise OptionError("labels must be non-empty strings, one per class")


@dataclass(frozen=True)
class DeployResult:
    """What :func:`deploy` wrote: the file, the resolved options and the deployed model's I/O names."""

    path: Path
    options: DeployOptions
    num_classes: int
    input_name: str
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class _Signature:
    channels: int
    size: int
    classes: int | None
    ends_in_softmax: bool
    dynamic_size: bool = False  # a symbolic H or W: deploy fixes it to image_size in its working copy


def read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """One label per line (UTF-8); trailing empty lines are ignored, empty lines elsewhere refused."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    labels = tuple(line.strip() for line in lines)
    if not labels:
        raise DataError(f"labels file {path} is empty")
    if "" in labels:
        raise DataError(f"labels file {path} has an empty line {labels.index('') + 1}")
    return labels


def _signature(model: onnx.ModelProto) -> _Signature:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs; deploy needs exactly one image input")
    if len(model.graph.output) != 1:
        raise ModelError(f"the model has {len(model.graph.output)} outputs; deploy needs exactly one (logits)")
    t = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    where = f"input {inputs[0].name!r} of shape {dims}"
    if not inputs[0].type.HasField("tensor_type") or t.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"input {inputs[0].name!r} is not a float32 tensor; deploy needs an (N, C, S, S) image input")
    if len(dims) != 4:
        raise ModelError(f"{where} is not an image tensor: deploy needs rank 4 (N, C, S, S)")
    if dims[0] not in (None, 1):
        raise ModelError(f"{where} has a fixed batch of {dims[0]}; deploy needs batch 1 or a symbolic batch axis")
    if dims[1] not in (1, 3):
        raise ModelError(f"{where} is not an image tensor: channels (axis 1) must be 1 or 3")
    fixed = {d for d in dims[2:] if d is not None}
    if len(fixed) > 1:
        raise ModelError(f"{where}: deploy needs a square spatial size (S, S)")
    o = model.graph.output[0].type.tensor_type
    odims = [d.dim_value if d.HasField("dim_value") else None for d in o.shape.dim]
    if o.elem_type != onnx.TensorProto.FLOAT or len(odims) != 2:
        raise ModelError(f"output {model.graph.output[0].name!r} must be float32 (N, classes), got shape {odims}")
    out_name = model.graph.output[0].name
    softmax = any(n.op_type == "Softmax" and out_name in n.output for n in model.graph.node)
    return _Signature(channels=dims[1], size=next(iter(fixed), None), classes=odims[1], ends_in_softmax=softmax,
                      dynamic_size=None in dims[2:])


def _resolve(options: DeployOptions, sig: _Signature) -> DeployOptions:
    size = options.image_size if options.image_size is not None else sig.size
    if size is None:
        raise ModelError("the model's input has a dynamic spatial size: give image_size (--image-size S), the size "
                         "it is fixed to in the deployed model")
    if sig.size is not None and size != sig.size:
        raise ModelError(f"image_size {size} does not match the model's input size {sig.size}")
    if options.resize is not None and options.resize < size:
        raise OptionError(f"resize ({options.resize}) must be at least image_size ({size})")
    channels = options.channels or ("gray" if sig.channels == 1 else "rgb")
    if (channels == "gray") != (sig.channels == 1):
        raise ModelError(f"channels {channels!r} do not fit the model's {sig.channels}-channel input")
    for name, values in (("mean", options.mean), ("std", options.std)):
        if len(values) not in (1, sig.channels):
            raise ModelError(f"{name} has {len(values)} values for a {sig.channels}-channel model")
    classes = sig.classes
    if options.labels is not None:
        if classes is not None and len(options.labels) != classes:
            raise DataError(f"{len(options.labels)} labels for a model with {classes} classes")
        classes = len(options.labels)
    if classes is None:
        raise ModelError("the model's output has a symbolic class axis; give labels so deploy knows the class count")
    top_k = options.top_k if options.top_k is not None else min(_DEFAULT_TOP_K, classes)
    if top_k > classes:
        raise ModelError(f"top_k {top_k} exceeds the model's {classes} classes")
    n = sig.channels
    return DeployOptions(
        image_size=size,
        resize=options.resize if options.resize is not None else size,
        mean=options.mean * n if len(options.mean) == 1 else options.mean,
        std=options.std * n if len(options.std) == 1 else options.std,
        channels=channels,
        labels=options.labels,
        top_k=top_k,
        max_image_pixels=options.max_image_pixels,
    )
