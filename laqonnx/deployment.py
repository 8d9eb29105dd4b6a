"""One ONNX file from encoded image bytes to classes, built with onnxruntime-extensions' toolkit.

:func:`deploy` wraps a float or quantized (QDQ) classifier with pre- and post-processing from
``onnxruntime_extensions.tools.pre_post_processing`` so that the serving side needs only onnxruntime
and the extensions' custom-op library. The deployed model has one input, ``image_bytes`` (uint8,
1-D: the bytes of one PNG or JPEG file), and the outputs ``class_index`` (int64 scalar, top-1),
``topk_scores`` (float32 ``[k]``, softmax probabilities, highest first), ``topk_indices`` (int64 ``[k]``)
and, when labels are given, ``topk_labels`` (string ``[k]``).

The pipeline, in order (the reference any test or user should reproduce):

1. refuse bytes that are neither a PNG (signature) nor a well-formed JPEG (``FF D8 FF`` ... ``FF D9``,
   every marker segment checked by an in-graph walk, see :mod:`laqonnx._deploy_steps`), and grayscale
   JPEGs (the extensions' decoder garbles them): libjpeg's error handler in onnxruntime-extensions 0.15
   ends the process, so malformed markers, tables and frame headers must not reach it;
2. decode to BGR uint8 (``DecodeImage``; PNG alpha is dropped, palette/gray PNGs expand to 3 channels).
   PNG decoding equals PIL's; JPEG decoding differs from PIL's by up to 2 grey levels on smooth colour
   images (chroma upsampling), more on high-frequency chroma. Corrupt entropy-coded data is decoded
   with libjpeg's warnings (garbage pixels, a class, no error);
3. channels: ``rgb`` reverses to RGB (PIL ``convert("RGB")``), ``bgr`` keeps BGR, ``gray`` is PIL's
   ``convert("L")`` bit for bit (integer ITU-R 601-2 weights, rounded);
4. resize so the shorter side is ``resize`` (default ``image_size``), the longer side
   ``round(long * resize / short)`` (float32 arithmetic, round half to even; torchvision floors
   instead), bilinear with antialiasing (ONNX ``Resize``, opset 18, on uint8). This approximates
   PIL's ``Image.resize(..., BILINEAR)``: equal on an image already at that size, within 1 grey level
   on smooth images, up to ~16 levels on pixel noise when downscaling;
5. center-crop ``image_size`` x ``image_size``, offsets ``(h - S) // 2`` and ``(w - S) // 2``;
6. HWC to CHW, multiply by float32 ``1/255``, ``(x - mean) / std`` per channel, add the batch axis;
7. the network; then softmax over the logits (skipped if the network already ends in Softmax), top-k.

The input model must have one float input of shape ``(N, C, S, S)`` with ``C`` 1 or 3 and ``N`` 1 or
symbolic, and one output ``(N, classes)``; anything else is refused with :class:`ModelError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import onnx

from ._util.io import check_output_path, save_model
from .errors import DataError, ModelError, require

__all__ = ["DeployOptions", "DeployResult", "deploy", "build_deployed_model", "read_labels", "INPUT_NAME"]

INPUT_NAME = "image_bytes"
Channels = Literal["rgb", "bgr", "gray"]
_DEFAULT_TOP_K = 5


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size}")
        if self.resize is not None:
            if self.resize < 1:
                raise ValueError(f"resize must be a positive integer, got {self.resize}")
            if self.image_size is not None and self.resize < self.image_size:
                raise ValueError(f"resize ({self.resize}) must be at least image_size ({self.image_size})")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, 3):
                raise ValueError(f"{name} needs 1 or 3 values, got {len(values)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.channels is not None and self.channels not in ("rgb", "bgr", "gray"):
            raise ValueError(f"channels must be 'rgb', 'bgr' or 'gray', got {self.channels!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.labels is not None and (not self.labels or any(not s for s in self.labels)):
            raise ValueError("labels must be non-empty strings, one per class")


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
    if dims[2] is None or dims[3] is None or dims[2] != dims[3]:
        raise ModelError(f"{where}: deploy needs a fixed square spatial size (S, S)")
    o = model.graph.output[0].type.tensor_type
    odims = [d.dim_value if d.HasField("dim_value") else None for d in o.shape.dim]
    if o.elem_type != onnx.TensorProto.FLOAT or len(odims) != 2:
        raise ModelError(f"output {model.graph.output[0].name!r} must be float32 (N, classes), got shape {odims}")
    out_name = model.graph.output[0].name
    softmax = any(n.op_type == "Softmax" and out_name in n.output for n in model.graph.node)
    return _Signature(channels=dims[1], size=dims[2], classes=odims[1], ends_in_softmax=softmax)


def _resolve(options: DeployOptions, sig: _Signature) -> DeployOptions:
    size = options.image_size if options.image_size is not None else sig.size
    if size != sig.size:
        raise ModelError(f"image_size {size} does not match the model's input size {sig.size}")
    if options.resize is not None and options.resize < size:
        raise ValueError(f"resize ({options.resize}) must be at least image_size ({size})")
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
    )


def _value_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer)}
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
    return names


def build_deployed_model(model: onnx.ModelProto, options: DeployOptions) -> tuple[onnx.ModelProto, DeployOptions]:
    """Return the deployed model (in memory) and the options resolved against ``model``."""
    require("onnxruntime_extensions", "deploy")
    from onnxruntime_extensions.tools import pre_post_processing as ppp

    from . import _deploy_steps as steps

    sig = _signature(model)
    opts = _resolve(options, sig)
    net = onnx.ModelProto()
    net.CopyFrom(model)
    inits = {t.name for t in net.graph.initializer}
    keep = [i for i in net.graph.input if i.name not in inits]  # the toolkit joins to graph.input[0]
    del net.graph.input[:]
    net.graph.input.extend(keep)
    reserved = {INPUT_NAME, "class_index", "topk_scores", "topk_indices", "topk_labels"}
    if _value_names(net) & reserved:
        net = onnx.compose.add_prefix(net, "net_")
    opset = max([18, *(o.version for o in net.opset_import if o.domain in ("", "ai.onnx"))])

    pre: list = [steps.RequireEncodedImage(), ppp.ConvertImageToBGR(), steps.RequireThreeChannels()]
    if opts.channels == "rgb":
        pre.append(ppp.ReverseAxis(axis=-1, dim_value=3, name="BGRToRGB"))
    elif opts.channels == "gray":
        pre.append(steps.BGRToGray())
    pre += [
        ppp.Resize(opts.resize, layout="HWC", policy="not_smaller"),
        ppp.CenterCrop(opts.image_size, opts.image_size),
        ppp.ChannelsLastToChannelsFirst(),
        ppp.ImageBytesToFloat(),
    ]
    if opts.mean != (0.0,) * sig.channels or opts.std != (1.0,) * sig.channels:
        if sig.channels == 3:
            pre.append(ppp.Normalize(list(zip(opts.mean, opts.std)), layout="CHW"))
        else:
            pre.append(steps.NormalizeChannels(opts.mean, opts.std))
    pre.append(ppp.Unsqueeze([0]))
    post: list = [ppp.Squeeze([0])]
    if not sig.ends_in_softmax:
        post.append(ppp.Softmax())
    post.append(steps.TopKClasses(opts.top_k, opts.labels))

    processor = ppp.PrePostProcessor(
        [ppp.create_named_value(INPUT_NAME, onnx.TensorProto.UINT8, ["num_bytes"])], onnx_opset=opset
    )
    processor.add_pre_processing(pre)
    processor.add_post_processing(post)
    # The toolkit's checker context (and the opset imports of the model it writes) know only the ONNX
    # and extensions domains; a network with contrib ops (com.microsoft QDQ, fused kernels) needs its own.
    context = getattr(processor, "_custom_op_checker_context", None)
    if context is not None:
        imports = dict(context.opset_imports)
        imports.update({o.domain: o.version for o in net.opset_import if o.domain not in ("", "ai.onnx", *imports)})
        context.opset_imports = imports
    try:
        deployed = processor.run(net)
    except (ValueError, onnx.checker.ValidationError, RuntimeError) as exc:
        raise ModelError(f"cannot add pre/post-processing to this model: {exc}") from exc
    deployed.functions.extend(net.functions)
    known = {o.domain for o in deployed.opset_import}
    deployed.opset_import.extend(o for o in net.opset_import if o.domain not in known)
    deployed.producer_name = "laqonnx.deploy"
    meta = {k: v for k, v in asdict(opts).items() if k != "labels"}
    deployed.metadata_props.add(key="laqonnx.deploy", value=json.dumps(meta))
    return deployed, opts


def deploy(
    model: str | os.PathLike[str] | onnx.ModelProto,
    output: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    channels: Channels | None = None,
    labels: Sequence[str] | str | os.PathLike[str] | None = None,
    top_k: int | None = None,
) -> DeployResult:
    """Write ``output``: ``model`` with image decoding, preprocessing and top-k embedded (see module doc).

    ``image_size`` defaults to the model's input size; ``resize`` (shorter side before the center crop)
    to ``image_size``; ``channels`` to ``gray`` for 1-channel models and ``rgb`` for 3-channel ones;
    ``top_k`` to ``min(5, classes)``. ``labels`` is a sequence of strings or the path of a text file
    with one label per line. Run the result with the extensions' custom ops registered::

        so = onnxruntime.SessionOptions()
        so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
        sess = onnxruntime.InferenceSession(path, so)
        sess.run(None, {"image_bytes": np.frombuffer(open("cat.jpg", "rb").read(), np.uint8)})
    """
    if isinstance(labels, (str, os.PathLike)):
        labels = read_labels(labels)
    options = DeployOptions(
        image_size=image_size, resize=resize, mean=tuple(mean), std=tuple(std), channels=channels,
        labels=tuple(labels) if labels is not None else None, top_k=top_k,
    )
    source = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        source = Path(model)
        check_output_path(output, source)
        if not source.is_file():
            raise ModelError(f"model file {source} does not exist")
        try:
            proto = onnx.load(str(source))
        except Exception as exc:  # protobuf's DecodeError, OSError, external data errors
            raise ModelError(f"cannot read {source} as an ONNX model: {exc}") from exc
    deployed, resolved = build_deployed_model(proto, options)
    path = save_model(deployed, output, source)
    sig = _signature(proto)
    return DeployResult(
        path=path,
        options=resolved,
        num_classes=sig.classes if sig.classes is not None else len(resolved.labels or ()),
        input_name=INPUT_NAME,
        output_names=tuple(o.name for o in deployed.graph.output),
    )
