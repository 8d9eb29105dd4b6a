"""A tiny CNN trained on the bundled digits (8x8) in a few seconds, shared by the robustness tests."""

from __future__ import annotations

import functools
import io

import numpy as np
import onnx
import torch


class DigitsCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def export(model: torch.nn.Module, sample: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, sample, buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


@functools.lru_cache(maxsize=1)
def digits_cnn() -> tuple[DigitsCNN, onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    """(trained torch model, its ONNX export, x_test, y_test, x_train[:128] for calibration)."""
    from laqonnx.zoo.digits import load_digits

    xtr, ytr = load_digits(8, "train")
    xte, yte = load_digits(8, "test")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, above all on a loaded machine
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(5):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    torch.set_num_threads(threads)
    net.eval()
    return net, export(net, torch.zeros(1, 1, 8, 8)), xte, yte, xtr[:128].copy()


def quantize(model: onnx.ModelProto, calib: np.ndarray, *, per_channel: bool, activation: str = "QUInt8",
             opset: int | None = None) -> onnx.ModelProto:
    """A QDQ model by onnxruntime's ``quantize_static`` (int8 weights; given activation type), with
    7-bit weights (its ``reduce_range``) where this CPU's int8 kernels saturate full-range ones (x86
    without VNNI): there onnxruntime's fused output departs from the QDQ graph's meaning otherwise."""
    from laqonnx.latency import cpu_info

    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.it, None)

    if opset is not None:
        model = onnx.version_converter.convert_version(model, opset)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "f.onnx"), Path(d, "q.onnx")
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                        reduce_range=cpu_info().int8_saturates())
        return onnx.load(dst)
