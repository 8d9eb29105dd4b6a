"""laqonnx.deploy: deployed model (bytes -> classes) against the manual PIL + numpy + onnxruntime path.

Tolerances, all stated against the manual path (PIL decode, PIL bilinear resize, x / 255, the original
model in onnxruntime, numpy softmax); measured maxima over 20-40 seeds/sizes in brackets:
- image already at the input size, PNG, float and QDQ models: pixels are bit-identical (PNG decode and
  PIL "L" are exact); only x * float32(1/255) vs x / 255 differs (<= 1 ulp): top-k indices equal
  exactly, scores within 1e-6 [1.5e-7 float, 3e-8 QDQ];
- resize path on smooth PNGs: ONNX antialiased linear Resize differs from PIL by <= 1 grey level:
  top-k equal up to near-ties, scores within 1e-3 [4.8e-4];
- JPEG: the extensions' decoder differs from PIL's by <= 2 grey levels on smooth images (chroma
  upsampling): top-k equal up to near-ties, scores within 1e-2 [4.6e-3; in 2 of 80 random-weight
  cases the top-1 differed, where the reference top-2 margin (4e-5, 4e-4) was below that deviation].
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")
ortx = pytest.importorskip("onnxruntime_extensions")
from PIL import Image  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException  # noqa: E402

import laqonnx  # noqa: E402
from laqonnx.cli import main  # noqa: E402
from laqonnx.deployment import DeployOptions, build_deployed_model, deploy, read_labels  # noqa: E402
from laqonnx.errors import DataError, ModelError, OutputError  # noqa: E402
from tests import jpeg_fuzz  # noqa: E402
from tests.models import cnn, random_input  # noqa: E402

ORT_ERRORS = (Fail, RuntimeException)
S = 8
LABELS = tuple(f"class_{i}" for i in range(10))


# ---------------------------------------------------------------- helpers
def session(model: onnx.ModelProto | str | Path, extensions: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if extensions:
        so.register_custom_ops_library(ortx.get_library_path())
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def encode(pixels: np.ndarray, fmt: str) -> np.ndarray:
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return np.frombuffer(buf.getvalue(), np.uint8)


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (random linear gradients per channel) in uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [rng.uniform(20, 60) + rng.uniform(-1, 1) * 150 * xx + rng.uniform(-1, 1) * 150 * yy for _ in range(3)]
    return np.clip(np.stack(chans, -1) + 60, 0, 255).astype(np.uint8)


def manual_input(data: np.ndarray, opts: DeployOptions) -> np.ndarray:
    """The documented pipeline with PIL + numpy: decode, convert, resize (shorter side), crop, scale, normalize."""
    img = Image.open(io.BytesIO(data.tobytes()))
    img = img.convert("L" if opts.channels == "gray" else "RGB")
    w, h = img.size
    hw = np.array([h, w], np.float32)
    new = np.round(hw * (np.float32(opts.resize) / hw).max()).astype(int)
    if (new[0], new[1]) != (h, w):
        img = img.resize((int(new[1]), int(new[0])), Image.BILINEAR)
    arr = np.asarray(img)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if opts.channels == "bgr":
        arr = arr[:, :, ::-1]
    top, left = (arr.shape[0] - opts.image_size) // 2, (arr.shape[1] - opts.image_size) // 2
    arr = arr[top : top + opts.image_size, left : left + opts.image_size]
    x = arr.transpose(2, 0, 1).astype(np.float32) / 255.0
    x = (x - np.float32(opts.mean).reshape(-1, 1, 1)) / np.float32(opts.std).reshape(-1, 1, 1)
    return x[None].astype(np.float32)


def manual_scores(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    logits = session(model, extensions=False).run(None, {"input": x})[0][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def run_deployed(sess: ort.InferenceSession, data: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"image_bytes": data})))


def qdq(model: onnx.ModelProto, tmp_path: Path, contrib: bool = False) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": random_input(model, n=1, seed=s)} for s in range(8)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"UseQDQContribOps": contrib})
    out = onnx.load(dst)
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    return out


def check(model, data, opts, top_k, score_atol, labels=None, strict=True):
    """Deployed outputs vs the manual path.

    ``strict``: top-k indices equal the reference order exactly. Otherwise (resize / JPEG paths, whose
    pixels differ slightly from PIL's) the deployed top-k must be the reference top-k up to near-ties:
    every deployed index's reference score is within ``score_atol`` of the reference's score at that rank.
    """
    deployed, resolved = build_deployed_model(model, DeployOptions(**opts, top_k=top_k, labels=labels))
    got = run_deployed(session(deployed), data)
    ref = manual_scores(model, manual_input(data, resolved))
    order = np.argsort(-ref, kind="stable")[:top_k]
    idx = got["topk_indices"]
    assert int(got["class_index"]) == int(idx[0])
    assert len(set(idx.tolist())) == top_k
    if strict:
        np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(ref[idx], ref[order], rtol=0, atol=score_atol)
    np.testing.assert_allclose(got["topk_scores"], ref[idx], rtol=0, atol=score_atol)
    assert np.all(np.diff(got["topk_scores"]) <= 0)
    if labels:
        assert list(got["topk_labels"]) == [labels[i] for i in idx]
    return got, ref


# ---------------------------------------------------------------- equality with the manual path
@pytest.mark.parametrize("channels, in_ch", [("rgb", 3), ("bgr", 3), ("gray", 1)])
@pytest.mark.parametrize("network", ["float", "qdq", "qdq_contrib_ops"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_at_input_size_png_matches_manual_path(channels, in_ch, network, seed, tmp_path):
    model = cnn(seed=seed, in_ch=in_ch, hw=S)
    if network != "float":
        model = qdq(model, tmp_path, contrib=network == "qdq_contrib_ops")
    pixels = np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)  # noise: no resize happens
    opts = {"channels": channels, "mean": (0.45, 0.5, 0.55)[:in_ch], "std": (0.2, 0.25, 0.3)[:in_ch]}
    check(model, encode(pixels, "PNG"), opts, top_k=4, score_atol=1e-6, labels=LABELS)


@pytest.mark.parametrize("h, w, resize", [(30, 40, 12), (40, 23, 8), (8, 13, 8), (6, 5, 9)])
@pytest.mark.parametrize("in_ch", [1, 3])
def test_resize_and_center_crop_match_pil_on_smooth_images(h, w, resize, in_ch):
    model = cnn(seed=3, in_ch=in_ch, hw=S)
    data = encode(smooth(h, w, seed=h * w), "PNG")
    check(model, data, {"resize": resize}, top_k=3, score_atol=1e-3, strict=False)


@pytest.mark.parametrize("h, w, resize", [(S, S, S), (24, 32, 10)])
@pytest.mark.parametrize("in_ch", [1, 3])
def test_jpeg_matches_pil_decode_within_tolerance(h, w, resize, in_ch):
    model = cnn(seed=4, in_ch=in_ch, hw=S)
    check(model, encode(smooth(h, w, seed=7), "JPEG"), {"resize": resize}, top_k=3, score_atol=1e-2, strict=False)


@pytest.mark.parametrize("opset", [13, 21])
def test_models_at_other_opsets_deploy(opset):
    model = cnn(seed=8, in_ch=3, hw=S)
    if opset < 17:  # Conv, Relu, Flatten, Gemm are unchanged since opset 13 (no down-converter exists)
        model.opset_import[0].version = opset
    else:
        model = onnx.version_converter.convert_version(model, opset)
    deployed, _ = build_deployed_model(model, DeployOptions())
    assert max(o.version for o in deployed.opset_import if o.domain == "") == max(opset, 18)
    pixels = np.random.default_rng(8).integers(0, 256, (S, S, 3), dtype=np.uint8)
    check(model, encode(pixels, "PNG"), {}, top_k=5, score_atol=1e-6)


def test_gray_step_is_pil_convert_L_bit_for_bit():
    """A 1-channel 'network' whose logits are its pixels: softmax order recovers PIL's L values' order exactly."""
    n = S * S
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"], axis=1)], "probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, S, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pixels = np.random.default_rng(5).integers(0, 256, (S, S, 3), dtype=np.uint8)
    deployed, _ = build_deployed_model(probe, DeployOptions(top_k=n))
    got = run_deployed(session(deployed), encode(pixels, "PNG"))
    # scores are softmax(L / 255): log-ratios to the top score give the L differences exactly
    lum = np.asarray(Image.fromarray(pixels).convert("L")).reshape(-1).astype(np.float64)
    recovered = np.empty(n)
    recovered[got["topk_indices"]] = np.log(got["topk_scores"].astype(np.float64) / got["topk_scores"][0]) * 255
    np.testing.assert_allclose(recovered, lum - lum.max(), atol=0.05)  # float32 softmax noise << 1 grey level
    assert np.array_equal(np.round(recovered), lum - lum.max())


def test_network_ending_in_softmax_is_not_softmaxed_twice():
    model = cnn(seed=6, in_ch=3, hw=S)
    model.graph.node[-1].output[0] = "pre_softmax"
    model.graph.node.append(helper.make_node("Softmax", ["pre_softmax"], ["logits"], axis=1))
    data = encode(np.random.default_rng(6).integers(0, 256, (S, S, 3), dtype=np.uint8), "PNG")
    deployed, opts = build_deployed_model(model, DeployOptions(top_k=10))
    got = run_deployed(session(deployed), data)
    probs = session(model, extensions=False).run(None, {"input": manual_input(data, opts)})[0][0]
    np.testing.assert_allclose(got["topk_scores"], np.sort(probs)[::-1], atol=1e-6)
    assert abs(float(got["topk_scores"].sum()) - 1.0) < 1e-5


def test_input_named_like_deployed_io_is_prefixed_not_clashing():
    model = cnn(seed=7, in_ch=3, hw=S)
    for node in model.graph.node:
        node.input[:] = ["image_bytes" if i == "input" else i for i in node.input]
    model.graph.input[0].name = "image_bytes"
    deployed, _ = build_deployed_model(model, DeployOptions(top_k=2))
    got = run_deployed(session(deployed), encode(smooth(S, S), "PNG"))
    assert got["topk_indices"].shape == (2,)


# ---------------------------------------------------------------- bad input
def _bad_inputs() -> dict[str, bytes]:
    png = encode(smooth(20, 20), "PNG").tobytes()
    jpg = encode(smooth(20, 20), "JPEG").tobytes()
    buf = io.BytesIO()
    Image.fromarray(smooth(20, 20)).convert("L").save(buf, format="JPEG")
    return {
        "empty": b"",
        "text": b"definitely not an image" * 4,
        "gif": b"GIF89a" + bytes(100),
        "truncated_jpeg": jpg[: len(jpg) // 2],
        "jpeg_header_only": jpg[:3],
        "truncated_png": png[: len(png) // 2],
        "corrupt_png": png[:60] + bytes(40) + png[100:],
        "grayscale_jpeg": buf.getvalue(),
    }


@pytest.fixture(scope="module")
def rgb_session() -> ort.InferenceSession:
    deployed, _ = build_deployed_model(cnn(seed=0, in_ch=3, hw=S), DeployOptions(top_k=3))
    return session(deployed)


@pytest.mark.parametrize("kind", sorted(_bad_inputs()))
def test_corrupt_bytes_raise_from_session_and_session_survives(rgb_session, kind):
    with pytest.raises(ORT_ERRORS):
        rgb_session.run(None, {"image_bytes": np.frombuffer(_bad_inputs()[kind], np.uint8)})
    good = run_deployed(rgb_session, encode(smooth(S, S), "PNG"))
    assert good["topk_scores"].shape == (3,)


# ---------------------------------------------------------------- decompression bombs (declared size over the limit)
def _png_declaring(w: int, h: int, first: bytes = b"IHDR") -> bytes:
    """A PNG header declaring w x h, then a tiny IDAT that is wrong for that size: only a check made
    before decoding can refuse it without the decoder allocating w x h x 3 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(first, struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def _jpeg_declaring(h: int, w: int) -> bytes:
    """A real 16 x 16 colour JPEG whose SOF0 says h x w."""
    data = bytearray(encode(smooth(16, 16), "JPEG").tobytes())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("name, data", [
    ("png 20000x20000", _png_declaring(20000, 20000)),
    ("png 2**31 x 1", _png_declaring(2**31, 1)),
    ("png 1 x 2**32-1", _png_declaring(1, 2**32 - 1)),
    ("png 7000x7000", _png_declaring(7000, 7000)),
    ("jpeg 65500x65500", _jpeg_declaring(65500, 65500)),
    ("jpeg 6400x6400", _jpeg_declaring(6400, 6400)),
])
def test_images_declaring_more_than_max_image_pixels_are_refused_before_decoding(rgb_session, name, data):
    with pytest.raises(ORT_ERRORS, match="max_image_pixels=40000000"):
        rgb_session.run(None, {"image_bytes": np.frombuffer(data, np.uint8)})
    for fmt in ("PNG", "JPEG"):  # the session survives and normal images still work
        assert run_deployed(rgb_session, encode(smooth(S, S), fmt))["topk_scores"].shape == (3,)


def test_max_image_pixels_is_set_at_deploy_time_and_exact(tmp_path):
    deployed, opts = build_deployed_model(cnn(seed=0, in_ch=3, hw=S), DeployOptions(max_image_pixels=20 * 20))
    assert opts.max_image_pixels == 400
    sess = session(deployed)
    for fmt in ("PNG", "JPEG"):
        assert run_deployed(sess, encode(smooth(20, 20), fmt))["topk_scores"].shape == (5,)
        with pytest.raises(ORT_ERRORS, match="max_image_pixels=400_"):
            sess.run(None, {"image_bytes": encode(smooth(20, 21), fmt)})
    with pytest.raises(ORT_ERRORS, match="max_image_pixels"):  # a PNG must start with IHDR: nothing to read otherwise
        sess.run(None, {"image_bytes": np.frombuffer(_png_declaring(4, 4, first=b"tEXt"), np.uint8)})
    with pytest.raises(ORT_ERRORS, match="max_image_pixels"):
        sess.run(None, {"image_bytes": np.frombuffer(_png_declaring(0, 4), np.uint8)})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(laqonnx.errors.OptionError, match="max_image_pixels"):
            DeployOptions(max_image_pixels=bad)
    src = tmp_path / "m.onnx"
    onnx.save(cnn(in_ch=3, hw=S), src)
    assert "1_000 pixels refused" in _cli_out(["deploy", str(src), "-o", str(tmp_path / "o.onnx"), "--max-image-pixels", "1000"])
    meta = {p.key: p.value for p in onnx.load(tmp_path / "o.onnx").metadata_props}
    assert '"max_image_pixels": 1000' in meta["laqonnx.deploy"]


def _cli_out(argv) -> str:
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


_PEAK = """
import sys
import numpy as np, onnxruntime as ort, onnxruntime_extensions as ortx

def status(key):  # kB
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))

so = ort.SessionOptions()
so.register_custom_ops_library(ortx.get_library_path())
so.intra_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
sess.run(None, {"image_bytes": np.fromfile(sys.argv[3], np.uint8)})  # warm-up on a small image
data = np.fromfile(sys.argv[2], np.uint8)
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
before = status("VmRSS")
try:
    sess.run(None, {"image_bytes": data})
    outcome = "accepted"
except Exception as exc:
    outcome = "refused" if "max_image_pixels" in str(exc) else "error"
print(outcome, status("VmHWM") - before)
"""


def test_a_real_large_png_is_refused_without_decoding_peak_memory_measured(tmp_path):
    """A real 4000 x 4000 PNG (16 MP, 48 MB decoded, ~50 KB on disk) in a fresh process: refused at a
    10 MP limit with (almost) no memory growth, decoded at a 20 MP limit (tens of MB)."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak memory of one run")
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(np.full((4000, 4000, 3), 90, np.uint8)).save(big)
    Image.fromarray(smooth(S, S)).save(small)
    grown = {}
    for limit in (10_000_000, 20_000_000):
        deployed, _ = build_deployed_model(cnn(seed=0, in_ch=3, hw=S), DeployOptions(max_image_pixels=limit))
        onnx.save(deployed, tmp_path / "d.onnx")
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "d.onnx"), str(big), str(small)],
                             capture_output=True, text=True, timeout=300, check=True).stdout.split()
        grown[out[0]] = int(out[1]) * 1024  # the peak RSS growth during the run (/proc/self/status, kB)
    assert set(grown) == {"refused", "accepted"}
    assert grown["accepted"] > 40e6 and grown["refused"] < 8e6, grown


# ---------------------------------------------------------------- malformed JPEGs (libjpeg would exit the process)
def test_fuzzed_jpegs_give_session_errors_never_process_deaths(tmp_path):
    """A fixed seeded set (4 per corruption kind, 52, colour sources): with only the signature/end check, 35
    of them killed the process and 17 decoded; with the segment walk 36 are refused and 16 decode."""
    deployed, _ = build_deployed_model(cnn(seed=0, in_ch=3, hw=S), DeployOptions(top_k=3))
    path = tmp_path / "m.onnx"
    onnx.save(deployed, path)
    variants = jpeg_fuzz.variants(seed=0, n_per_kind=4)
    outcomes = jpeg_fuzz.run(str(path), [d for _, d in variants])
    died = [kind for (kind, _), out in zip(variants, outcomes) if out == "died"]
    assert died == []
    assert outcomes.count("error") >= 30  # the ones that used to kill it are refused ...
    # ... while the valid sources still decode (colour) or are refused (grayscale, on purpose)
    assert jpeg_fuzz.run(str(path), list(jpeg_fuzz.sources().values())) == ["ok"] * 4 + ["error"] * 2


def _unguarded(monkeypatch) -> onnx.ModelProto:
    """The deployed model with the JPEG segment walk replaced by 'accept, 3 components' (the previous guard)."""
    from laqonnx.deployment import _jpeg as _deploy_steps

    def accept(xi: str, out: str, components: str, height: str, width: str) -> list:
        const = lambda name, kind, v: helper.make_node(  # noqa: E731
            "Constant", [], [name], value=helper.make_tensor(name + "_v", kind, [], [v]))
        return [const(out, TensorProto.BOOL, True), const(components, TensorProto.INT64, 3),
                const(height, TensorProto.INT64, 1), const(width, TensorProto.INT64, 1)]

    monkeypatch.setattr(_deploy_steps, "_jpeg_structure_nodes", accept)
    deployed, _ = build_deployed_model(cnn(seed=1, in_ch=3, hw=S), DeployOptions(top_k=4))
    return deployed


@pytest.mark.parametrize("name", [n for n in jpeg_fuzz.sources() if n.startswith("rgb")])
def test_valid_colour_jpegs_pass_the_walk_unchanged(name, monkeypatch):
    data = np.frombuffer(jpeg_fuzz.sources()[name], np.uint8)
    guarded, _ = build_deployed_model(cnn(seed=1, in_ch=3, hw=S), DeployOptions(top_k=4))
    got = run_deployed(session(guarded), data)
    ref = run_deployed(session(_unguarded(monkeypatch)), data)
    assert got.keys() == ref.keys()
    for key in got:
        np.testing.assert_array_equal(got[key], ref[key])


@pytest.mark.parametrize("name", [n for n in jpeg_fuzz.sources() if n.startswith("gray")])
def test_grayscale_jpegs_are_refused_before_decoding(rgb_session, name):
    with pytest.raises(ORT_ERRORS, match="grayscale_JPEG"):
        rgb_session.run(None, {"image_bytes": np.frombuffer(jpeg_fuzz.sources()[name], np.uint8)})


def _with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` with one marker segment inserted right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _dht(counts: list[int], symbols: list[int], table: int = 0x00) -> bytes:
    return bytes([table, *counts, *symbols])


@pytest.mark.parametrize(
    "segment, accepted",
    [
        ((0xFE, b"a comment"), True),
        ((0xE5, b""), True),
        ((0xC4, _dht([1, 1] + [0] * 14, [3, 4], 0x02)), True),  # DC table 2: codes 0, 10 (Kraft 3/4)
        # refused even though libjpeg checks these only in tables a scan uses (where they ended the process)
        ((0xC4, _dht([2] + [0] * 15, [3, 4], 0x02)), False),  # two 1-bit codes: Kraft sum 1
        ((0xC4, _dht([1, 1] + [0] * 14, [3, 16], 0x02)), False),  # DC symbol 16 > 15
        ((0xC4, _dht([1, 1] + [0] * 14, [3, 16], 0x12)), True),  # ... fine in an AC table
        ((0xC4, _dht([1, 1] + [0] * 14, [3, 4], 0x04)), False),  # table id 4
        ((0xC4, _dht([1, 1] + [0] * 14, [3, 4], 0x02) + b"\x00"), False),  # trailing byte
        ((0xDB, bytes([0x02]) + bytes(range(1, 65))), True),
        ((0xDB, bytes([0x04]) + bytes(range(1, 65))), False),  # quantization table id 4
        ((0xDB, bytes([0x12]) + bytes(range(1, 65))), False),  # 16-bit table, 64 bytes short (libjpeg: read on)
        ((0xDD, b"\x00\x10"), True),
        ((0xDD, b"\x00\x10\x00"), False),
        ((0xC3, bytes(9)), False),  # lossless SOF
        ((0xD8, b""), False),  # second SOI
    ],
)
def test_segment_walk_on_crafted_segments(rgb_session, segment, accepted):
    data = np.frombuffer(_with_segment(jpeg_fuzz.sources()["rgb_base_q95_444"], *segment), np.uint8)
    if accepted:
        assert run_deployed(rgb_session, data)["topk_scores"].shape == (3,)
    else:
        with pytest.raises(ORT_ERRORS, match="well-formed_JPEG"):
            rgb_session.run(None, {"image_bytes": data})


def _gemm_model(in_dims: list, name: str = "input") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Flatten", [name], ["f"], axis=1), helper.make_node("ReduceSum", ["f"], ["logits"], keepdims=1)],
        "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, in_dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "dims, message",
    [
        (["N", 64], "rank 4"),
        (["N", 2, S, S], "channels"),
        (["N", 4, S, S], "channels"),
        (["N", 3, S, S + 1], "square"),
        (["N", 3, "H", "W"], "dynamic spatial size: give image_size"),
        ([4, 3, S, S], "batch"),
    ],
)
def test_non_image_models_are_refused(dims, message):
    with pytest.raises(ModelError, match=message):
        build_deployed_model(_gemm_model(dims), DeployOptions())


@pytest.mark.parametrize(
    "opts, error, message",
    [
        ({"image_size": 16}, ModelError, "does not match"),
        ({"channels": "gray"}, ModelError, "3-channel"),
        ({"mean": (0.1, 0.2)}, ValueError, "1 or 3"),
        ({"top_k": 11}, ModelError, "exceeds"),
        ({"labels": ("a", "b")}, DataError, "2 labels"),
        ({"resize": 4}, ValueError, "at least"),
        ({"std": (0.0,)}, ValueError, "positive"),
    ],
)
def test_bad_options_are_refused(opts, error, message):
    with pytest.raises(error, match=message):
        build_deployed_model(cnn(in_ch=3, hw=S), DeployOptions(**opts))


def _dynamic_spatial(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for d, name in zip(out.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = name
    return out


def test_dynamic_spatial_size_is_fixed_to_image_size(tmp_path, capsys):
    from tests.models import residual

    net = residual(seed=3)  # global average pooling: runs at any size
    dyn = _dynamic_spatial(net)
    fixed = _dynamic_spatial(net)
    for d in fixed.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = S
    data = encode(smooth(12, 16), "PNG")
    opts = DeployOptions(image_size=S, top_k=5)
    got = run_deployed(session(build_deployed_model(dyn, opts)[0]), data)
    ref = run_deployed(session(build_deployed_model(fixed, opts)[0]), data)
    for key in got:
        np.testing.assert_array_equal(got[key], ref[key])
    onnx.save(dyn, tmp_path / "dyn.onnx")
    assert main(["deploy", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dynamic spatial size" in err[0] and "--image-size" in err[0]
    assert not (tmp_path / "o.onnx").exists()
    assert main(["deploy", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "o.onnx"), "--image-size", "10"]) == 0
    assert "crop 10" in capsys.readouterr().out
    # a network that runs at one size only (Flatten -> Gemm) is refused at any other, in one line
    onnx.save(_dynamic_spatial(cnn(in_ch=3, hw=S)), tmp_path / "flat.onnx")
    assert main(["deploy", str(tmp_path / "flat.onnx"), "-o", str(tmp_path / "f.onnx"), "--image-size", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not run at image_size 12 x 12" in err[0] and not (tmp_path / "f.onnx").exists()
    assert main(["deploy", str(tmp_path / "flat.onnx"), "-o", str(tmp_path / "f.onnx"), "--image-size", str(S)]) == 0


def test_gray_model_refuses_three_means():
    with pytest.raises(ModelError, match="1-channel"):
        build_deployed_model(cnn(in_ch=1, hw=S), DeployOptions(mean=(0.1, 0.2, 0.3)))


# ---------------------------------------------------------------- files, API, CLI
def test_deploy_writes_file_atomically_and_never_overwrites_input(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(cnn(in_ch=1, hw=S), src)
    before = src.read_bytes()
    with pytest.raises(OutputError):
        deploy(src, src)
    assert src.read_bytes() == before
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n\n")
    result = laqonnx.deploy(src, tmp_path / "e2e.onnx", labels=tmp_path / "labels.txt", top_k=2)
    assert laqonnx.deploy is deploy
    assert result.options.channels == "gray" and result.options.image_size == S and result.num_classes == 10
    assert set(result.output_names) == {"class_index", "topk_scores", "topk_indices", "topk_labels"}
    got = run_deployed(session(result.path), encode(smooth(S, S), "PNG"))
    assert got["topk_labels"][0] == LABELS[int(got["class_index"])]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_read_labels_refuses_gaps(tmp_path):
    (tmp_path / "l.txt").write_text("a\n\nb\n")
    with pytest.raises(DataError, match="empty line 2"):
        read_labels(tmp_path / "l.txt")
    with pytest.raises(DataError, match="cannot read"):
        read_labels(tmp_path / "missing.txt")


def test_cli_deploy_writes_working_file(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(seed=2, in_ch=3, hw=S), src)
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    code = main(["deploy", str(src), "-o", str(out), "--image-size", str(S), "--resize", "10",
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--channels", "rgb",
                 "--labels", str(tmp_path / "labels.txt"), "--top-k", "3"])
    assert code == 0 and out.is_file()
    assert "image_bytes" in capsys.readouterr().out
    data = encode(smooth(12, 16), "PNG")
    got = run_deployed(session(out), data)
    opts = DeployOptions(image_size=S, resize=10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels="rgb")
    ref = manual_scores(cnn(seed=2, in_ch=3, hw=S), manual_input(data, opts))
    assert int(got["class_index"]) == int(np.argmax(ref))
    assert list(got["topk_labels"]) == [LABELS[i] for i in got["topk_indices"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mean", "a,b,c"], "--mean"),
        (["--std", "0.1,0.2"], "std needs 1 or 3"),
        (["--channels", "cmyk"], "--channels"),
        (["--top-k", "0"], "--top-k"),
        (["--image-size", "16"], "does not match"),
        (["--resize", "4"], "at least"),
        (["--labels", "missing.txt"], "cannot read labels"),
    ],
)
def test_cli_bad_arguments_give_one_line_errors(tmp_path, capsys, extra, message):
    src = tmp_path / "m.onnx"
    onnx.save(cnn(in_ch=3, hw=S), src)
    try:
        code = main(["deploy", str(src), "-o", str(tmp_path / "o.onnx"), *extra])
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    if extra[0] not in ("--mean", "--channels", "--top-k"):  # refused by deploy, not argparse: no usage text
        assert len(err) == 1 and err[0].startswith("laqonnx deploy: error: ")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("where", ["under-a-file", "proc", "missing-folder"])
def test_cli_unwritable_output_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, where):
    import os

    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    src = tmp_path / "m.onnx"
    onnx.save(cnn(in_ch=3, hw=S), src)
    (tmp_path / "file.txt").write_text("x")
    out = {"under-a-file": tmp_path / "file.txt" / "o.onnx", "proc": "/proc/o.onnx",
           "missing-folder": tmp_path / "nope" / "o.onnx"}[where]

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("laqonnx.deployment.build.build_deployed_model", no_work)
    assert main(["deploy", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("laqonnx deploy: error: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "m.onnx"]


def test_cli_missing_model_is_one_line(tmp_path, capsys):
    assert main(["deploy", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
