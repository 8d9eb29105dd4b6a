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
