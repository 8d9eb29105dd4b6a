"""The shared tiny models are valid and run in onnxruntime with a dynamic batch."""

import numpy as np
import onnxruntime as ort
import pytest

from tests import models


@pytest.mark.parametrize("build,classes", [(models.cnn, 10), (models.residual, 5), (models.concat, 4)])
@pytest.mark.parametrize("batch", [1, 3])
def test_builders_run_in_onnxruntime(build, classes, batch):
    model = build()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": models.random_input(model, n=batch)})[0]
    assert out.shape == (batch, classes)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dims", [(16, 12, 8, 5), (3, 2)])
def test_mlp_is_the_chain_of_gemms_it_says(dims):
    """models.mlp computes relu(x W0^T + b0) ... W_last^T + b_last, checked against numpy."""
    from onnx import numpy_helper

    model = models.mlp(seed=2, dims=dims)
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = np.random.default_rng(1).normal(0, 1, (4, dims[0])).astype(np.float32)
    h = x.astype(np.float64)
    for i in range(len(dims) - 1):
        h = h @ w[f"w{i}"].T + w[f"b{i}"]
        if i < len(dims) - 2:
            h = np.maximum(h, 0)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-5)


def test_random_input_shape_range_and_seed():
    model = models.cnn()
    x = models.random_input(model, n=5, seed=3)
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.2
    np.testing.assert_array_equal(x, models.random_input((1, 8, 8), n=5, seed=3))  # model or shape: same draw
    assert not np.array_equal(x, models.random_input(model, n=5, seed=4))
