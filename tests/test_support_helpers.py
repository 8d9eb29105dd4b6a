"""The test-support modules do what the tests relying on them assume.

``tests/jpeg_fuzz.py`` (the corrupted-JPEG fuzzer behind the deploy tests) and
``tests/_digits_model.py`` (the trained digits CNN behind the attack tests) hold no assertions of
their own; a fuzzer that silently returned valid JPEGs, or a model that never learned, would let
the tests that use them pass for the wrong reason. ``tests/models.py`` is checked in
``test_models_fixture.py``.
"""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests import jpeg_fuzz

# ---------------------------------------------------------------- jpeg_fuzz


def test_sources_are_valid_jpegs_of_the_advertised_modes():
    srcs = jpeg_fuzz.sources()
    assert len(srcs) == 6
    for name, data in srcs.items():
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes fully
        assert img.format == "JPEG"
        assert img.mode == ("RGB" if name.startswith("rgb") else "L")
        assert ("progressive" in img.info) == ("_prog_" in name)


def test_segments_walk_the_marker_chain_to_sos():
    for data in jpeg_fuzz.sources().values():
        segs = jpeg_fuzz.segments(data)
        assert data[:2] == b"\xff\xd8" and segs[0][0] == 2
        for (off, marker, length), nxt in zip(segs, segs[1:]):
            assert data[off] == 0xFF and data[off + 1] == marker
            assert nxt[0] == off + 2 + length  # each segment ends where the next begins
        markers = {m for _, m, _ in segs}
        assert segs[-1][1] == 0xDA and {0xC4, 0xDB} <= markers and markers & {0xC0, 0xC2}


def test_variants_are_labelled_deterministic_and_actually_corrupted():
    n = 3
    a = jpeg_fuzz.variants(seed=0, n_per_kind=n)
    assert [k for k, _ in a] == [k for k in jpeg_fuzz.KINDS for _ in range(n)]
    assert a == jpeg_fuzz.variants(seed=0, n_per_kind=n)
    assert a != jpeg_fuzz.variants(seed=1, n_per_kind=n)
    valid = set(jpeg_fuzz.sources().values())
    unchanged = [k for k, d in a if d in valid]
    assert len(unchanged) <= 2, unchanged  # a random byte may rarely equal the one it replaces
    with pytest.raises(ValueError):
        jpeg_fuzz._mutate("no-such-kind", next(iter(valid)), np.random.default_rng(0))


# ---------------------------------------------------------------- _digits_model


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("torch")
    from tests._digits_model import digits_cnn

    return digits_cnn()


def test_digits_cnn_learned_and_its_export_matches_torch(digits):
    import torch

    net, model, xte, yte, calib = digits
    assert calib.shape == (128, 1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": xte})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(xte)).numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == yte).mean() >= 0.9


@pytest.mark.parametrize("per_channel", [False, True])
def test_digits_quantize_helper_writes_a_qdq_model_that_agrees(digits, per_channel):
    from onnx import numpy_helper

    from tests._digits_model import quantize

    _, model, xte, _, calib = digits
    q = quantize(model, calib, per_channel=per_channel)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 5
    scales = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_scale")]
    assert any(s.ndim == 1 and s.size > 1 for s in scales) == per_channel  # per-channel weight scales
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": xte})[0]  # noqa: E731
    assert (run(q).argmax(1) == run(model).argmax(1)).mean() >= 0.95
