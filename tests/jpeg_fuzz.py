"""Corrupted-JPEG fuzzing of a deployed model, each input run in a child process.

``variants(seed, n)`` makes ``(kind, bytes)`` pairs from PIL-encoded JPEGs (gray and colour, baseline
and progressive, several sizes/qualities/subsamplings); ``run(model_path, datas)`` runs them through an
onnxruntime session with the extensions registered in a child process (restarted after a death) and
returns one outcome per input: ``"ok"`` (decoded), ``"error"`` (the session raised) or ``"died"``
(the process ended: libjpeg's default error handler calls ``exit``).

``python -m tests.jpeg_fuzz [N] [SEED]`` deploys a tiny CNN and prints a table per corruption kind.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np
from PIL import Image

__all__ = ["KINDS", "sources", "segments", "variants", "run"]

KINDS = (
    "header_flip", "entropy_flip", "segment_length", "truncate_keep_eoi", "delete_segment", "duplicate_segment",
    "sof_dims", "sof_precision", "sof_components", "sof_sampling", "dht", "dqt", "sos",
)

_WORKER = r"""
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import onnxruntime as ort, onnxruntime_extensions as ortx
so = ort.SessionOptions()
so.register_custom_ops_library(ortx.get_library_path())
so.intra_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
datas = np.load(sys.argv[2], allow_pickle=True)["datas"]
for i in range(int(sys.argv[3]), len(datas)):
    try:
        sess.run(None, {"image_bytes": np.frombuffer(datas[i], np.uint8)})
        out = "ok"
    except Exception:
        out = "error"
    sys.stdout.write(f"{i} {out}\n")
    sys.stdout.flush()
"""


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [rng.uniform(20, 60) + rng.uniform(-1, 1) * 150 * xx + rng.uniform(-1, 1) * 150 * yy for _ in range(3)]
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(np.stack(chans, -1) + 60 + noise, 0, 255).astype(np.uint8)


def sources() -> dict[str, bytes]:
    """Valid JPEGs: colour/gray x baseline/progressive, several sizes, qualities and subsamplings."""
    out: dict[str, bytes] = {}
    for name, (h, w, mode, kw) in {
        "rgb_base_q95_444": (16, 24, "RGB", {"quality": 95, "subsampling": 0}),
        "rgb_base_q50_420": (33, 20, "RGB", {"quality": 50, "subsampling": 2}),
        "rgb_prog_q85_422": (24, 40, "RGB", {"quality": 85, "subsampling": 1, "progressive": True}),
        "rgb_prog_q30_420": (48, 32, "RGB", {"quality": 30, "subsampling": 2, "progressive": True}),
        "gray_base_q90": (20, 20, "L", {"quality": 90}),
        "gray_prog_q70": (17, 29, "L", {"quality": 70, "progressive": True}),
    }.items():
        img = Image.fromarray(_smooth(h, w, seed=h * w)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", **kw)
        out[name] = buf.getvalue()
    return out


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """Header marker segments up to and including the first SOS: ``(offset, marker, length)``."""
    segs, p = [], 2
    while p + 4 <= len(data) and data[p] == 0xFF:
        marker, length = data[p + 1], struct.unpack(">H", data[p + 2 : p + 4])[0]
        segs.append((p, marker, length))
        if marker == 0xDA:
            break
        p += 2 + length
    return segs


def _find(segs: list[tuple[int, int, int]], markers: tuple[int, ...]) -> tuple[int, int, int]:
    return next(s for s in segs if s[1] in markers)


def _mutate(kind: str, src: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(src)
    segs = segments(src)
    sos = _find(segs, (0xDA,))
    data_start = sos[0] + 2 + sos[2]
    sof = _find(segs, (0xC0, 0xC1, 0xC2))
    if kind == "header_flip":
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(2, data_start))] = int(rng.integers(0, 256))
    elif kind == "entropy_flip":
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(data_start, len(b) - 2))] = int(rng.integers(0, 256))
    elif kind == "segment_length":
        off = segs[int(rng.integers(len(segs)))][0]
        new = int(rng.choice([0, 1, 2, 3, int(rng.integers(0, 65536)), len(b)]))
        b[off + 2 : off + 4] = struct.pack(">H", new)
    elif kind == "truncate_keep_eoi":
        cut = int(rng.integers(4, len(b) - 2))
        return bytes(b[:cut]) + b"\xff\xd9"
    elif kind in ("delete_segment", "duplicate_segment"):
        off, _, length = segs[int(rng.integers(len(segs)))]
        seg = bytes(b[off : off + 2 + length])
        return bytes(b[:off]) + (seg * 2 if kind == "duplicate_segment" else b"") + bytes(b[off + 2 + length :])
    elif kind == "sof_dims":
        which = int(rng.integers(3))
        h = 0 if which in (0, 2) else int(rng.integers(1, 300))
        w = 0 if which in (1, 2) else int(rng.integers(1, 300))
        b[sof[0] + 5 : sof[0] + 9] = struct.pack(">HH", h, w)
    elif kind == "sof_precision":
        b[sof[0] + 4] = int(rng.choice([0, 1, 7, 9, 12, 16, 255]))
    elif kind == "sof_components":
        b[sof[0] + 9] = int(rng.choice([0, 2, 4, 5, 255, 1, 3]))
    elif kind == "sof_sampling":
        nc = b[sof[0] + 9]
        k = int(rng.integers(nc))
        field = int(rng.integers(3))
        pos = sof[0] + 10 + 3 * k + field
        b[pos] = int(rng.integers(0, 256)) if field != 0 else int(rng.choice([b[pos], 7, 99]))
    elif kind in ("dht", "dqt"):
        seg = [s for s in segs if s[1] == (0xC4 if kind == "dht" else 0xDB)]
        off, _, length = seg[int(rng.integers(len(seg)))]
        for _ in range(int(rng.integers(1, 3))):
            pos = off + 4 + int(rng.integers(0, 17 if kind == "dht" else 1))
            b[pos] = int(rng.integers(0, 256))
    elif kind == "sos":
        off, _, length = sos
        b[off + 4 + int(rng.integers(0, length - 2))] = int(rng.integers(0, 256))
    else:
        raise ValueError(kind)
    return bytes(b)


def variants(seed: int, n_per_kind: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, bytes]]:
    """``n_per_kind`` corrupted variants per kind, cycling over :func:`sources`; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    srcs = list(sources().values())
    return [(k, _mutate(k, srcs[i % len(srcs)], rng)) for k in kinds for i in range(n_per_kind)]


def run(model_path: str, datas: list[bytes], timeout: float = 120.0) -> list[str]:
    """One outcome per input (``ok``/``error``/``died``), each input run in a child process."""
    outcomes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        arrays = os.path.join(tmp, "datas.npz")
        holder = np.empty(len(datas), object)
        holder[:] = datas
        np.savez(arrays, datas=holder)
        while len(outcomes) < len(datas):
            proc = subprocess.run(
                [sys.executable, "-c", _WORKER, model_path, arrays, str(len(outcomes))],
                capture_output=True, text=True, timeout=timeout,
            )
            outcomes += [line.split()[1] for line in proc.stdout.splitlines()]
            if len(outcomes) < len(datas):
                if proc.returncode == 0:
                    raise RuntimeError(f"worker stopped early without dying: {proc.stderr[-500:]}")
                outcomes.append("died")
    return outcomes


def _main() -> None:
    import onnx

    from laqonnx.deployment import DeployOptions, build_deployed_model
    from tests.models import cnn

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    deployed, _ = build_deployed_model(cnn(seed=0, in_ch=3, hw=8), DeployOptions(top_k=3))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        onnx.save(deployed, path)
        valid = run(path, list(sources().values()))
        print("valid sources:", dict(zip(sources(), valid)))
        vs = variants(seed, n)
        outs = run(path, [d for _, d in vs])
    table: dict[str, Counter] = {}
    for (kind, _), out in zip(vs, outs):
        table.setdefault(kind, Counter())[out] += 1
    total: Counter = Counter()
    for kind, c in table.items():
        total.update(c)
        print(f"{kind:20s} died {c['died']:3d}  error {c['error']:3d}  ok {c['ok']:3d}")
    print(f"{'TOTAL':20s} died {total['died']:3d}  error {total['error']:3d}  ok {total['ok']:3d}  of {len(vs)}")


if __name__ == "__main__":
    _main()
