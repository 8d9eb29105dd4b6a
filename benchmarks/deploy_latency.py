"""Benchmark: per-image latency of a `laqonnx deploy` file vs the bare model with PIL preprocessing.

    python benchmarks/deploy_latency.py [--quick] [--threads 2] [--rounds 10] [--runs 10]

For each case (model + encoded test image) three ways of classifying one image are timed, interleaved
round by round in one process so that machine noise hits them alike:

- ``deployed``: the deployed file in onnxruntime with the extensions' custom ops, fed the encoded
  bytes (decode, resize, crop, normalize, network, softmax, top-k all in the graph);
- ``pil_plus_bare``: the same work in Python: PIL decode/convert/resize, numpy crop/scale/normalize,
  the bare model in onnxruntime, numpy softmax and top-k;
- ``bare``: the bare model alone on an already preprocessed tensor (the floor).

Cases: a ResNet-18 (3x224x224, 1000 classes; float and onnxruntime int8 QDQ per-channel) on a 500x375
JPEG with the ImageNet recipe (shorter side 256, crop 224, ImageNet mean/std), and a small digits-style
CNN (1x16x16) on a 64x64 PNG (shorter side 16, gray). Weights are random (latency does not depend on
them). Each call is timed with ``time.perf_counter``; the summary is each variant's median per-image
latency over all calls, and the median over rounds of the per-round ratios. Writes
``benchmarks/results/deploy_latency.json``.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laqonnx._util.io import atomic_write_json  # noqa: E402
from laqonnx.deployment import deploy  # noqa: E402
from laqonnx.latency import cpu_info  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_image(h: int, w: int, fmt: str, gray: bool) -> bytes:
    """A photo-like image: smooth gradients plus mild noise, encoded as ``fmt``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [80 + 120 * np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(3)]
    pixels = np.clip(np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels).convert("L") if gray else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def export(arch: str, path: Path, in_ch: int, size: int, classes: int) -> None:
    import torch

    from laqonnx.zoo.export import export_onnx
    from laqonnx.zoo.models import build_model

    torch.manual_seed(0)
    export_onnx(build_model(arch, in_channels=in_ch, num_classes=classes, image_size=size), path, (in_ch, size, size))


def quantize(src: Path, dst: Path, in_ch: int, size: int, n_calib: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.it = iter([{"input": rng.uniform(0, 1, (1, in_ch, size, size)).astype(np.float32)} for _ in range(n_calib)])

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def pil_pipeline(data: bytes, size: int, resize: int, gray: bool, mean, std) -> np.ndarray:
    """The Python preprocessing a user would otherwise keep in sync (same semantics as the deployed graph)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("L" if gray else "RGB")
    w, h = img.size
    hw = np.array([h, w], np.float32)
    nh, nw = (int(v) for v in np.round(hw * (np.float32(resize) / hw).max()))
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
    arr = np.asarray(img)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    top, left = (nh - size) // 2, (nw - size) // 2
    x = arr[top : top + size, left : left + size].transpose(2, 0, 1).astype(np.float32) / 255.0
    x = (x - np.float32(mean).reshape(-1, 1, 1)) / np.float32(std).reshape(-1, 1, 1)
    return x[None]


def run_case(name: str, model: Path, deployed: Path, data: bytes, size: int, resize: int, gray: bool, mean, std,
             top_k: int, threads: int, rounds: int, runs: int) -> dict:
    import onnxruntime as ort
    import onnxruntime_extensions as ortx

    def options(ext: bool) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if ext:
            so.register_custom_ops_library(ortx.get_library_path())
        return so

    dep = ort.InferenceSession(str(deployed), options(True), providers=["CPUExecutionProvider"])
    bare = ort.InferenceSession(str(model), options(False), providers=["CPUExecutionProvider"])
    raw = np.frombuffer(data, np.uint8)
    tensor = pil_pipeline(data, size, resize, gray, mean, std)

    def deployed_call() -> int:
        return int(dep.run(["class_index", "topk_scores"], {"image_bytes": raw})[0])

    def pil_plus_bare_call() -> int:
        logits = bare.run(None, {"input": pil_pipeline(data, size, resize, gray, mean, std)})[0][0]
        e = np.exp(logits - logits.max())
        p = e / e.sum()
        top = np.argsort(-p, kind="stable")[:top_k]
        return int(top[0])

    def bare_call() -> int:
        return int(np.argmax(bare.run(None, {"input": tensor})[0][0]))

    calls: dict[str, Callable[[], int]] = {"deployed": deployed_call, "pil_plus_bare": pil_plus_bare_call, "bare": bare_call}
    agree = deployed_call() == pil_plus_bare_call()
    for fn in calls.values():  # warm-up
        for _ in range(5):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    per_round = []
    order = list(calls)
    for r in range(rounds):
        medians = {}
        for key in order[r % 3:] + order[: r % 3]:  # rotate who goes first
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                calls[key]()
                ts.append((time.perf_counter() - t0) * 1e3)
            samples[key] += ts
            medians[key] = statistics.median(ts)
        per_round.append(medians)
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in samples.items()}
    ratios = {
        "deployed_over_pil_plus_bare": statistics.median(m["deployed"] / m["pil_plus_bare"] for m in per_round),
        "deployed_over_bare": statistics.median(m["deployed"] / m["bare"] for m in per_round),
        "pil_plus_bare_over_bare": statistics.median(m["pil_plus_bare"] / m["bare"] for m in per_round),
    }
    line = ", ".join(f"{k} {v:.2f} ms" for k, v in p50.items())
    print(f"{name}: {line}; deployed/pil+bare {ratios['deployed_over_pil_plus_bare']:.2f}, "
          f"deployed/bare {ratios['deployed_over_bare']:.2f}", file=sys.stderr)
    return {"p50_ms": p50, "p90_ms": p90, "ratios_median_over_rounds": ratios,
            "deployed_class_equals_pil_path_class": agree, "per_round_p50_ms": per_round,
            "image_bytes": len(data), "calls_per_variant": rounds * runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few runs (a smoke test, not a figure)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds; ratios are medians over these")
    ap.add_argument("--runs", type=int, default=10, help="timed calls per variant per round")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy_latency.json")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice on the root logger
    rounds, runs, n_calib = (2, 3, 2) if args.quick else (args.rounds, args.runs, 8)

    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        export("resnet18", t / "r18.onnx", 3, 224, 1000)
        quantize(t / "r18.onnx", t / "r18.int8.onnx", 3, 224, n_calib)
        export("cnn", t / "cnn.onnx", 1, 16, 10)
        jpeg = test_image(375, 500, "JPEG", gray=False)
        png = test_image(64, 64, "PNG", gray=True)
        specs = {
            "resnet18_float_jpeg500x375": (t / "r18.onnx", jpeg, 224, 256, False, IMAGENET_MEAN, IMAGENET_STD),
            "resnet18_int8_jpeg500x375": (t / "r18.int8.onnx", jpeg, 224, 256, False, IMAGENET_MEAN, IMAGENET_STD),
            "small_cnn_gray16_png64x64": (t / "cnn.onnx", png, 16, 16, True, (0.5,), (0.25,)),
        }
        for name, (model, data, size, resize, gray, mean, std) in specs.items():
            out = t / f"{name}.e2e.onnx"
            deploy(model, out, image_size=size, resize=resize, mean=mean, std=std, top_k=5)
            cases[name] = run_case(name, model, out, data, size, resize, gray, mean, std, 5, args.threads, rounds, runs)
            cases[name]["overhead_ms_deployed_minus_bare"] = cases[name]["p50_ms"]["deployed"] - cases[name]["p50_ms"]["bare"]
            cases[name]["setup"] = {"image_size": size, "resize": resize, "channels": "gray" if gray else "rgb",
                                    "mean": list(mean), "std": list(std), "top_k": 5}

    import onnxruntime
    import onnxruntime_extensions
    import PIL

    info = cpu_info()
    result = {
        "benchmark": "per-image latency: deployed bytes->classes file vs PIL preprocessing + bare model vs bare model",
        "command": "python benchmarks/deploy_latency.py" + (" --quick" if args.quick else "")
        + f" --threads {args.threads} --rounds {rounds} --runs {runs}",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "shared 2-core machine, other jobs running: figures are noisy; ratios come from interleaved rounds",
        "cases": cases,
        "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_extensions": onnxruntime_extensions.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
        "cpu": {"model": getattr(info, "model_name", None), "logical_cores": info.logical_cores},
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
