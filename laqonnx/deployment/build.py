"""Building the deployed model: the network wrapped with the toolkit's pre/post-processing steps
(:func:`build_deployed_model`), and :func:`deploy`, which reads the model and writes the result."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import onnx

from .._util.io import check_output_path, save_model
from ..errors import ModelError, require
from .options import DEFAULT_MAX_IMAGE_PIXELS, INPUT_NAME, Channels, DeployOptions, DeployResult, _resolve, _signature, read_labels

__all__ = ["build_deployed_model", "deploy"]


def _value_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer)}
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _fix_spatial_size(net: onnx.ModelProto, size: int) -> None:
    """Fix a symbolic H/W of the network's input to ``size`` and check that it runs at that size."""
    dims = net.graph.input[0].type.tensor_type.shape.dim
    for d in dims[2:]:
        d.dim_value = size  # clears dim_param (a oneof)
    del net.graph.value_info[:]  # shapes inferred for the symbolic size no longer hold
    import numpy as np
    import onnxruntime as ort

    x = np.zeros([1, dims[1].dim_value, size, size], np.float32)
    try:
        sess = ort.InferenceSession(net.SerializeToString(), providers=["CPUExecutionProvider"])
        sess.run(None, {net.graph.input[0].name: x})
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the model does not run at image_size {size} x {size}: {first}") from exc


def build_deployed_model(model: onnx.ModelProto, options: DeployOptions) -> tuple[onnx.ModelProto, DeployOptions]:
    """Return the deployed model (in memory) and the options resolved against ``model``."""
    require("onnxruntime_extensions", "deploy")
    from onnxruntime_extensions.tools import pre_post_processing as ppp

    from . import _jpeg, _steps as steps

    sig = _signature(model)
    opts = _resolve(options, sig)
    net = onnx.ModelProto()
    net.CopyFrom(model)
    inits = {t.name for t in net.graph.initializer}
    keep = [i for i in net.graph.input if i.name not in inits]  # the toolkit joins to graph.input[0]
    del net.graph.input[:]
    net.graph.input.extend(keep)
    if sig.dynamic_size:
        _fix_spatial_size(net, opts.image_size)
    reserved = {INPUT_NAME, "class_index", "topk_scores", "topk_indices", "topk_labels"}
    if _value_names(net) & reserved:
        net = onnx.compose.add_prefix(net, "net_")
    opset = max([18, *(o.version for o in net.opset_import if o.domain in ("", "ai.onnx"))])

    pre: list = [_jpeg.RequireEncodedImage(opts.max_image_pixels), ppp.ConvertImageToBGR(), steps.RequireThreeChannels()]
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
    max_image_pixels: int | None = None,
) -> DeployResult:
    """Write ``output``: ``model`` with image decoding, preprocessing and top-k embedded (see module doc).

    ``image_size`` defaults to the model's input size; ``resize`` (shorter side before the center crop)
    to ``image_size``; ``channels`` to ``gray`` for 1-channel models and ``rgb`` for 3-channel ones;
    ``top_k`` to ``min(5, classes)``. ``max_image_pixels``: images declaring more pixels (PNG
    IHDR, JPEG SOF width x height; default 40 MP) are refused before decoding (a session error). ``labels`` is a sequence of strings or the path of a text file
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
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels,
    )
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    check_output_path(output, source)  # before any work: an unwritable output is a one-line error
    if source is None:
        proto = model
    else:
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
