"""Per-layer latency costs, measured on this CPU by onnxruntime's own per-node profiler.

For each precision (``float``, ``int8``, ``int4``: every layer at that weight precision, lowered as
:func:`laqonnx.quant.lower.lower` writes it, int4 MatMul/Gemm as MatMulNBits; ``a16``: int8 weights behind
16-bit input activations, which onnxruntime's CPU provider runs unfused), the lowered model
runs a few times with ``SessionOptions.enable_profiling``; each kernel's time is attributed to a
layer: the layer's own (possibly fused: ``fused fc``) node, or the node named after it (``fc_bias``), else the
layer a Quantize/Dequantize/Clip node feeds (or, failing that, the layer it reads from); a node
onnxruntime renamed (NCHWc convolutions) by the layer whose weight or bias it reads. What no
layer claims is the rest of the graph, taken from the float model and held constant. Kernel times
carry the profiler's per-node overhead, so each precision's times are scaled to make the uniform
model's total equal its measured wall-clock latency (interleaved medians).

The table is cached per model, CPU and batch size (``$LAQONNX_CACHE`` or ``~/.cache/laqonnx``), and
is additive: a plan's latency is the rest plus each layer's cost at its precision. Interactions
(a QDQ pair shared by an int8 and a float layer, memory effects) are not modelled: the written
model's latency is measured after writing and reported next to the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import OptionError

__all__ = ["LatencyTable", "attribute", "cache_path", "int4_dominated", "measure_table", "precision_key", "profile_nodes"]

PRECISIONS = ("float", "int8", "int4", "a16")


def precision_key(weight, activation=None) -> str:
    """``float`` (a layer left in float), ``a16`` (a quantized layer whose input activation is 16-bit:
    unfused, whatever its weight bits), else ``int<weight bits>``."""
    if weight is None:
        return "float"
    if activation is not None and activation.bits == 16:
        return "a16"
    return f"int{weight.bits}"


@dataclass(frozen=True)
class LatencyTable:
    """``costs``: layer -> precision -> ms; ``rest_ms``: the graph outside the layers; ``float_ms``: the
    float model's whole latency (the base of a relative budget)."""

    costs: Mapping[str, Mapping[str, float]]
    rest_ms: float
    float_ms: float
    batch: int = 1
    source: str = field(default="measured", compare=False)

    def __post_init__(self) -> None:
        for name, per in self.costs.items():
            for key, ms in per.items():
                if not (np.isfinite(ms) and ms >= 0):
                    raise OptionError(f"latency cost of {name} at {key} must be a finite ms >= 0, got {ms!r}")
        if not (np.isfinite(self.float_ms) and self.float_ms > 0):
            raise OptionError(f"float_ms must be > 0, got {self.float_ms!r}")

    def cost_ms(self, layer: str, weight, activation=None) -> float:
        """The layer's cost with ``weight`` (None = float) behind ``activation`` (None = 8-bit)."""
        per = self.costs.get(layer)
        if per is None:
            raise OptionError(f"the latency table has no layer {layer!r}")
        key = precision_key(weight, activation)
        if key not in per:
            raise OptionError(f"the latency table has no {key} cost for layer {layer!r}")
        return float(per[key])

    def unfused_ms(self, layer: str) -> float:
        """What running int8 ``layer`` unfused adds to its int8 cost: onnxruntime fuses it only when the
        QuantizeLinear after it is 8-bit too, so a 16-bit activation there (or in front of it, its
        ``a16`` cost) runs it as DequantizeLinear -> float op. Taken as its a16 cost over its int8 cost
        (0 where the table has no a16 cost)."""
        per = self.costs.get(layer, {})
        if "a16" not in per or "int8" not in per:
            return 0.0
        return max(0.0, float(per["a16"]) - float(per["int8"]))

    def total_ms(self, weights: Mapping[str, object], activations: Mapping[str, object] | None = None,
                 unfused: Iterable[str] = ()) -> float:
        """The additive estimate of a plan (layer -> its weight setting, None = float; ``activations``:
        layer -> its input activation setting, 8-bit where absent; ``unfused``: int8 layers whose
        output is quantized to 16 bits, charged :meth:`unfused_ms`)."""
        acts = activations or {}
        extra = sum(self.unfused_ms(n) for n in dict.fromkeys(unfused))
        return self.rest_ms + extra + sum(self.cost_ms(n, w, acts.get(n)) for n, w in weights.items())

    def to_json(self) -> dict:
        return {"costs": {k: dict(v) for k, v in self.costs.items()}, "rest_ms": self.rest_ms,
                "float_ms": self.float_ms, "batch": self.batch}

    @classmethod
    def from_json(cls, d: Mapping) -> LatencyTable:
        return cls({k: {p: float(ms) for p, ms in v.items()} for k, v in d["costs"].items()}, float(d["rest_ms"]),
                   float(d["float_ms"]), int(d.get("batch", 1)), source="cache")


def _input_feed(model: onnx.ModelProto, input_shape: Sequence[int], batch: int) -> dict[str, np.ndarray]:
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    return {name: rng.uniform(0, 1, (batch, *input_shape)).astype(np.float32)}


def profile_nodes(model: onnx.ModelProto, input_shape: Sequence[int], *, batch: int = 1, runs: int = 20,
                  warmup: int = 3) -> tuple[dict[str, float], onnx.ModelProto]:
    """Mean kernel time per run (ms) of each node of ``model`` as onnxruntime optimizes and runs it,
    and the optimized graph (to attribute the fused nodes)."""
    import onnxruntime as ort

    from ..latency import default_threads

    with tempfile.TemporaryDirectory(prefix="laqonnx-profile-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = default_threads()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what the profiled session runs (NCHWc too)
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = _input_feed(model, input_shape, batch)
        for _ in range(warmup):
            sess.run(None, feed)
        so2 = ort.SessionOptions()
        so2.intra_op_num_threads = so.intra_op_num_threads
        so2.log_severity_level = 3
        so2.enable_profiling = True
        so2.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(model.SerializeToString(), so2, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    per: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per.setdefault(e["name"][: -len("_kernel_time")], []).append(float(e["dur"]) / 1000.0)
    # the first warmup runs of the profiled session are dropped: medians of the remaining ones, per node
    return {k: float(np.median(v[warmup:] if len(v) > warmup else v)) for k, v in per.items()}, optimized


_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Clip", "Sum", "Add", "Relu", "Flatten", "Reshape", "Transpose",
             "ReorderInput", "ReorderOutput"}


def attribute(times: Mapping[str, float], graph: onnx.ModelProto, layers: Sequence[str],
              params: Mapping[str, Sequence[str]] | None = None) -> tuple[dict[str, float], float]:
    """Layer -> its kernel time (ms), and the unclaimed rest (see the module doc). ``params``: layer ->
    the initializers it reads (weight, bias): a node onnxruntime renamed (NCHWc: ``<output>_nchwc``) is
    claimed by the layer whose initializer it reads (``name`` or ``name_<suffix>``)."""
    names = sorted(layers, key=len, reverse=True)
    nodes = {n.name: n for n in graph.graph.node}
    owner = {init: lay for lay, inits in (params or {}).items() for init in inits}

    def by_param(node: onnx.NodeProto) -> str | None:
        for i in node.input:
            lay = owner.get(i) or next((owner[b] for b in owner if i.startswith(b + "_")), None)
            if lay is not None:
                return lay
        return None
    readers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in graph.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n

    def own(node_name: str) -> str | None:
        base = node_name.removeprefix("fused ")  # onnxruntime's name for a node fused with its activation
        hit = next((lay for lay in names if base == lay or base.startswith((lay + "_", lay + "/"))), None)
        if hit is None and node_name in nodes and nodes[node_name].op_type not in _PLUMBING:
            hit = by_param(nodes[node_name])
        return hit

    def walk(node: onnx.NodeProto | None, forward: bool, depth: int = 0) -> str | None:
        if node is None or depth > 4:
            return None
        mine = own(node.name)
        if mine is not None and depth:
            return mine
        nxt = [r for o in node.output for r in readers.get(o, [])] if forward else \
              [producer[i] for i in node.input if i in producer]
        for m in nxt:
            found = own(m.name) if own(m.name) else (walk(m, forward, depth + 1) if m.op_type in _PLUMBING else None)
            if found is not None:
                return found
        return None

    out = {lay: 0.0 for lay in layers}
    rest = 0.0
    for node_name, ms in times.items():
        lay = own(node_name)
        if lay is None and node_name in nodes and nodes[node_name].op_type in _PLUMBING:
            lay = walk(nodes[node_name], True) or walk(nodes[node_name], False)
        if lay is None:
            rest += ms
        else:
            out[lay] += ms
    return out, rest


def cache_path(model: onnx.ModelProto, batch: int, precisions: Sequence[str]) -> Path:
    """Where the table of ``model`` on this CPU at ``batch`` is cached."""
    import onnxruntime as ort

    from ..latency import cpu_info, default_threads

    h = hashlib.sha256(model.SerializeToString())
    h.update(json.dumps([cpu_info().model_name, default_threads(), batch, list(precisions), ort.__version__]).encode())
    root = Path(os.environ.get("LAQONNX_CACHE") or Path.home() / ".cache" / "laqonnx")
    return root / "latency" / f"{h.hexdigest()[:24]}.json"


def measure_table(float_model: onnx.ModelProto, lowerings: Mapping[str, Callable[[], onnx.ModelProto]],
                  layers: Sequence[str], input_shape: Sequence[int], *, batch: int = 1, runs: int = 20,
                  cache: bool = True, params: Mapping[str, Sequence[str]] | None = None,
                  wall: bool = True) -> LatencyTable:
    """The table over ``lowerings`` (precision -> a function writing the model with every layer at that
    precision; ``float`` is the float model itself), cached (see the module doc). ``params``: see
    :func:`attribute`. With ``wall``, each precision's kernel times are scaled so that the uniform
    model's total equals its wall-clock latency (interleaved medians): the profiler's per-node
    overhead, large on a sub-millisecond model with many QDQ nodes, then cancels out."""
    precisions = ["float", *[p for p in lowerings if p != "float"]]
    path = cache_path(float_model, batch, [*precisions, "wall" if wall else "kernel"]) if cache else None
    if path is not None and path.exists():
        try:
            table = LatencyTable.from_json(json.loads(path.read_text()))
            if set(table.costs) == set(layers):
                return table
        except (ValueError, KeyError, OptionError):
            pass
    costs: dict[str, dict[str, float]] = {lay: {} for lay in layers}
    built = {"float": float_model, **{k: lowerings[k]() for k in precisions[1:]}}
    rests: dict[str, float] = {}
    for key, model in built.items():
        t, g = profile_nodes(model, input_shape, batch=batch, runs=runs)
        per, rests[key] = attribute(t, g, layers, params)
        for lay, ms in per.items():
            costs[lay][key] = ms
    scale = {k: 1.0 for k in built}
    if wall:
        from ..latency import compare_latency

        res = compare_latency(built, rounds=5, runs=max(10, runs), warmup=3, batch_sizes=(batch,),
                              input_shape=tuple(input_shape))
        for k in built:
            total = rests[k] + sum(costs[lay][k] for lay in layers)
            scale[k] = res[k].at(batch).p50_ms / total if total > 0 else 1.0
    costs = {lay: {k: ms * scale[k] for k, ms in by_key.items()} for lay, by_key in costs.items()}
    float_ms = rests["float"] * scale["float"] + sum(costs[lay]["float"] for lay in layers)  # the float wall-clock latency
    table = LatencyTable(costs, rests["float"] * scale["float"], max(float_ms, 1e-6), batch)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table.to_json()))
        except OSError:
            pass
    return table


def table_for(pm, stats: Mapping, bits: Sequence[int], default_activation, *, batch: int = 1,
              runs: int = 20, cache: bool = True, activation_bits: Sequence[int] = (8,)) -> LatencyTable:
    """The table of a prepared model over the weight precisions in ``bits`` (8, 4; 32 = float, always
    measured) and, with 16 in ``activation_bits``, int8 weights behind 16-bit activations (``a16``):
    every layer at one precision, per-channel max-abs weights, activation ranges from the
    calibration ``stats`` with ``default_activation``."""
    import dataclasses

    from .lower import LoweringSpec, lower, quantized_tensors
    from .numerics import PerChannel, WeightQuant, weight_qparams
    from .ranges import activation_range

    tensors = [t for t in quantized_tensors(pm.model) if t in stats]
    ranges = {t: tuple(float(v) for v in activation_range(stats[t], default_activation)) for t in tensors}

    def lowering(b: int, act_bits: int = 8) -> Callable[[], onnx.ModelProto]:
        def build() -> onnx.ModelProto:
            weights = {lay.weight: weight_qparams(pm.weight(lay), WeightQuant(b, PerChannel(lay.channel_axis))) for lay in pm.layers}
            acts = {} if act_bits == 8 else {t: dataclasses.replace(default_activation, bits=act_bits) for t in tensors}
            return lower(pm.model, LoweringSpec(weights=weights, ranges=ranges, activations=acts))
        return build

    lowerings = {f"int{b}": lowering(b) for b in sorted(set(bits) - {32}, reverse=True)}
    if 16 in activation_bits:
        lowerings["a16"] = lowering(8, 16)
    fixed = getattr(pm, "fixed_batch", None)
    params = {lay.name: [n for n in (lay.weight, lay.bias) if n] for lay in pm.layers}
    return measure_table(pm.model, lowerings, [lay.name for lay in pm.layers], tuple(pm.input_shape[1:]),
                         batch=fixed or batch, runs=runs, cache=cache, params=params)


def int4_dominated(pm, table: LatencyTable) -> set[tuple[str, int]]:
    """(layer, 4) where a latency budget can never prefer int4: Conv (never offered: unfused on CPU)
    and layers the table measures no faster at int4 than at int8 (int8 is the finer grid). They are
    not scored, so no adaptive rounding is fitted for them."""
    out = set()
    for layer in pm.layers:
        per = table.costs.get(layer.name, {})
        if layer.op_type == "Conv" or ("int4" in per and "int8" in per and per["int4"] >= per["int8"]):
            out.add((layer.name, 4))
    return out
