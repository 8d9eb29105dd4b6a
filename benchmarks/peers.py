"""Peers' advanced PTQ in the record: quantizers of other projects, each run in its own environment.

A peer is never a laqonnx dependency (they pin other onnx/numpy versions): ``benchmarks/record.py``
runs its script with the peer's own Python (``--aimet-python``), on the same calibration digits as
every laqonnx and onnxruntime method, then checks what it wrote like any other method's model: it
must load and run in onnxruntime, and its weights must be in the regime's bits (every weighted
layer's integer weights within int4's [-8, 7] for an int4 regime). Scoring is the record's own
evaluator, as for every method.

``aimet-int4-ada``: Qualcomm AIMET 2.42 (``aimet-onnx``) AdaRound at int4 per-channel weights,
8-bit activations (``benchmarks/aimet_int4.py``, its settings there). AMD Quark 0.13 is not a
peer here: its ONNX data types and its AdaRound have no int4 (``quark.onnx`` 0.13's AdaRound
quantizer ranges cover (u)int8/16/32 only).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

__all__ = ["PEERS", "Peer", "PeerUnavailable", "quantize_peer", "int_weight_bits"]


class PeerUnavailable(RuntimeError):
    """The peer's environment is missing: its cells are skipped, not failed."""


@dataclass(frozen=True)
class Peer:
    """A peer method: the script its Python runs (``script model out calib.npz [args...]``),
    extra arguments, the weight bits its model must have, and what it is, in one line."""

    script: str
    args: tuple[str, ...]
    weight_bits: int
    what: str


PEERS: dict[str, Peer] = {
    # 15000 iterations per layer: AIMET's own recommendation for weights below 8 bits (apply_adaround's docstring)
    "aimet-int4-ada": Peer("aimet_int4.py", ("--iterations", "15000"), 4,
                           "AIMET 2.42 AdaRound (15000 iterations per layer, its recommendation below 8 bits), "
                           "int4 per-channel weights, 8-bit activations"),
}


def int_weight_bits(model: Any) -> dict[str, int]:
    """For every Conv/ConvTranspose/Gemm/MatMul weight stored as integers behind a
    DequantizeLinear: the bits its values need (signed: 4 for values in [-8, 7])."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        dq = produced.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64) if len(dq.input) > 2 and dq.input[2] in inits else 0
        if np.any(zp != 0):
            raise ValueError(f"{n.name}: asymmetric integer weights (zero point != 0)")
        lo, hi = int(q.min()), int(q.max())
        out[n.name or n.output[0]] = next(b for b in range(2, 33) if -(1 << (b - 1)) <= lo and hi < (1 << (b - 1)))
    return out


def quantize_peer(name: str, float_path: Path, out_dir: Path, calib: str, calib_limit: int,
                  python: str) -> dict[str, Any]:
    """Run peer ``name`` on ``float_path`` with the record's calibration digits; returns the
    record's ``quantize`` entry (like ``Quantized.to_json()``). Raises :class:`PeerUnavailable`
    when ``python`` does not exist, RuntimeError when the peer fails or writes a model that does
    not load, run, or keep the regime's bits."""
    import onnx

    from laqonnx.data import open_data
    from laqonnx.graph import load_model
    from laqonnx.graph.session import open_session

    peer = PEERS[name]
    if not Path(python).exists():
        raise PeerUnavailable(f"{name}: no peer environment at {python}")
    pm = load_model(float_path)
    src = open_data(calib, input_shape=pm.input_shape, split="train", limit=calib_limit)
    x = np.concatenate([b for b, _ in src.batches(32)]).astype(np.float32).reshape((-1, *pm.input_shape[1:]))
    out_dir.mkdir(parents=True, exist_ok=True)
    npz, out = out_dir / f"{name}.calib.npz", out_dir / f"{name}.onnx"
    np.savez(npz, x=x)
    p = subprocess.run([python, str(HERE / peer.script), str(float_path), str(out), str(npz), *peer.args],
                       capture_output=True, text=True, cwd=out_dir)
    seconds = re.search(r"^SECONDS ([0-9.]+)", p.stdout, re.M)
    if p.returncode != 0 or seconds is None or not out.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{name} failed (exit {p.returncode}): {' | '.join(tail)}")
    model = onnx.load(str(out))
    bits = int_weight_bits(model)
    n_layers = len(pm.layers)
    if len(bits) != n_layers or max(bits.values()) > peer.weight_bits:
        raise RuntimeError(f"{name} wrote {len(bits)} integer weights of {n_layers} layers, at most "
                           f"{max(bits.values(), default=0)} bits (want {peer.weight_bits})")
    sess = open_session(str(out), threads=1)
    i = sess.get_inputs()[0]
    batch = x[:1] if isinstance(i.shape[0], int) else x[:8]
    logits = sess.run(None, {i.name: batch})[0]
    if not np.all(np.isfinite(logits)):
        raise RuntimeError(f"{name} wrote a model whose outputs are not finite")
    return {"method": name, "path": str(out), "seconds": float(seconds.group(1)), "avg_weight_bits": float(peer.weight_bits),
            "size_bytes": out.stat().st_size, "guard_kept": None, "peer": peer.what,
            "peer_python": python, "peer_stdout_tail": p.stdout.strip().splitlines()[-1:]}


if __name__ == "__main__":  # python benchmarks/peers.py MODEL: the integer weight bits of a QDQ model
    import onnx

    print(int_weight_bits(onnx.load(sys.argv[1])))
