"""Deployment stage: one ONNX file from encoded image bytes to classes, built with
onnxruntime-extensions' toolkit.

:func:`deploy` wraps a float or quantized (QDQ) classifier with pre- and post-processing from
``onnxruntime_extensions.tools.pre_post_processing`` so that the serving side needs only onnxruntime
and the extensions' custom-op library. The deployed model has one input, ``image_bytes`` (uint8,
1-D: the bytes of one PNG or JPEG file), and the outputs ``class_index`` (int64 scalar, top-1),
``topk_scores`` (float32 ``[k]``, softmax probabilities, highest first), ``topk_indices`` (int64 ``[k]``)
and, when labels are given, ``topk_labels`` (string ``[k]``).

The pipeline, in order (the reference any test or user should reproduce):

1. refuse bytes that are neither a PNG (signature) nor a well-formed JPEG (``FF D8 FF`` ... ``FF D9``,
   every marker segment checked by an in-graph walk, see :mod:`laqonnx.deployment._jpeg`), grayscale
   JPEGs (the extensions' decoder garbles them), and images declaring more than ``max_image_pixels``
   pixels (PNG IHDR, JPEG SOF width x height; default 40 MP: a decompression bomb is refused before
   the decoder allocates it). Peak memory of one run, measured: ~6.4 bytes per accepted pixel (two
   3-byte copies; ~0.24 GiB at 40 MP, gray models ~0.16 GiB) plus ~2 bytes per byte of a PNG file and
   ~9 per byte of a JPEG file (the segment walk): 0.46 GiB for a 120 MB 40 MP PNG, 0.92 GiB for a
   79 MB one as JPEG, so cap the upload size as well. libjpeg's error handler in
   onnxruntime-extensions 0.15 ends the process, so malformed markers, tables and frame headers must
   not reach it;
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

The input model must have one float input of shape ``(N, C, S, S)`` with ``C`` 1 or 3, ``N`` 1 or
symbolic and ``S`` fixed or symbolic (then ``image_size`` is required: the deployed copy is fixed to
it, and refused unless the network runs at that size), and one output ``(N, classes)``; anything else is refused with :class:`~laqonnx.errors.ModelError`.

- :mod:`.options`: :class:`DeployOptions`, :class:`DeployResult`, the model signature, labels;
- :mod:`.build`: :func:`build_deployed_model`, :func:`deploy`;
- ``._steps``, ``._jpeg``: the custom toolkit steps (they import onnxruntime-extensions).
"""

from __future__ import annotations

from .build import build_deployed_model, deploy
from .options import INPUT_NAME, DeployOptions, DeployResult, read_labels

__all__ = ["DeployOptions", "DeployResult", "deploy", "build_deployed_model", "read_labels", "INPUT_NAME"]
