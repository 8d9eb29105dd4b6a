"""Scoring: every candidate of every layer, measured on the calibration data (the metric's terms).

:func:`score_layers` fake-quantizes each layer's weight with every candidate weight setting and
derives every candidate activation setting of each layer-input tensor from its calibration
histogram, then measures the terms of :mod:`laqonnx.quant.metric` on ``config.metric_examples``
clean calibration points and their paired adversarial examples: through the float model's torch
mirror (:func:`laqonnx.quant.sensitivity.mirror_sensitivities`), or, without torch, through
onnxruntime with every local gain taken as the identity (:mod:`laqonnx.quant.layer_error`: each
layer's own output error), which the plan's warnings then say. Settings that quantize a weight to
the same values share their terms.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .._util.threads import compute_threads
from ..graph import PreparedModel
from .metric import ActivationScore, CandidateSpace, LayerTerms, ObjectiveConfig, Scored, WeightScore
from .numerics import QParams, WeightQuant, activation_qparams, quantize_weight
from .ranges import activation_range

__all__ = ["CalibSet", "score_layers", "layer_inputs", "NO_TORCH_NOTE"]

NO_TORCH_NOTE = (
    "torch is not installed: the metric measured each layer's own output error (local gains to the logits taken as 1) "
    "instead of its effect on the logits, so its choices can differ; install laqonnx[robustness] for the full metric"
)


@dataclass(frozen=True, eq=False)
class CalibSet:
    """Calibration inputs in the model's units: ``clean``, and ``adversarial`` examples paired by
    index with the first ``len(adversarial)`` clean ones (None without adversarial calibration)."""

    clean: np.ndarray
    adversarial: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.adversarial is not None and len(self.adversarial) > len(self.clean):
            raise ValueError(f"{len(self.adversarial)} adversarial examples for {len(self.clean)} clean ones")

    def pairs(self, n: int) -> CalibSet:
        """The first ``n`` examples; with adversarial examples, only as many clean ones as are paired."""
        if self.adversarial is None:
            return CalibSet(self.clean[:n])
        k = min(n, len(self.adversarial))
        return CalibSet(self.clean[:k], self.adversarial[:k])


def _effective_qparams(qp: QParams, shape: Sequence[int], channel_axis: int) -> tuple:
    """Equal for two settings that quantize every output channel with the same scale, zero point
    and type (equal keys imply equal weights, so they share their terms)."""
    channels = int(shape[channel_axis % len(shape)]) if len(shape) else 1
    scale = np.broadcast_to(np.asarray(qp.scale, dtype=np.float32).reshape(-1), (channels,))
    zp = np.broadcast_to(np.asarray(qp.zero_point, dtype=np.int64).reshape(-1), (channels,))
    return qp.bits, qp.signed, scale.tobytes(), zp.tobytes()


def layer_inputs(pm: PreparedModel, x: np.ndarray, tensors) -> dict[str, np.ndarray]:
    """The float model's values of ``tensors`` on inputs ``x`` (onnxruntime, in chunks of a fixed batch)."""
    return model_values(pm.model, pm.input_name, x, tensors, getattr(pm, "fixed_batch", None))


def model_values(model, input_name: str, x: np.ndarray, tensors, fixed_batch: int | None = None) -> dict[str, np.ndarray]:
    """The values of ``tensors`` in ``model`` (float or QDQ) on inputs ``x``, through onnxruntime."""
    from ..graph import with_outputs
    from .guard import OrtRunner

    wanted = [t for t in dict.fromkeys(tensors) if t != input_name]
    out: dict[str, np.ndarray] = {input_name: x} if input_name in tensors else {}
    if wanted:
        runner = OrtRunner(with_outputs(model, wanted), input_name, fixed_batch)
        step = runner.step
        parts: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if runner.fixed and n < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            for t, v in zip(wanted, runner.session.run(wanted, {input_name: chunk})):
                parts[t].append(v[:n])
        out.update({t: np.concatenate(v) for t, v in parts.items()})
    return out


def _settings(space: CandidateSpace, layer, weight_bits, drop: Collection[tuple[str, int]]):
    """The layer's weight settings, without the bit widths ``drop`` rules out for it."""
    return tuple(ws for ws in space.weight_settings(layer.channel_axis, weight_bits)
                 if ws is None or (layer.name, ws.bits) not in drop)


def _adaptive(pm: PreparedModel, space: CandidateSpace, weight_bits, data: CalibSet, progress: bool, drop=frozenset()):
    """(layer, setting) -> Rounded for every adaptive setting, fitted on clean and adversarial inputs."""
    from tqdm.auto import tqdm

    from .numerics import weight_qparams
    from .rounding import adaptive_round

    todo = [(layer, ws) for layer in pm.layers for ws in _settings(space, layer, weight_bits, drop)
            if ws is not None and ws.rounding == "adaptive"]
    if not todo:
        return {}
    x = data.clean if data.adversarial is None else np.concatenate([data.clean, data.adversarial])
    acts = layer_inputs(pm, x, [layer.input for layer, _ in todo])
    out = {}
    bar = tqdm(total=len(todo), desc="adaptive rounding", unit="layer", disable=not progress, leave=False)
    with compute_threads():
        for layer, ws in todo:
            bar.set_postfix_str(layer.name[-24:])
            w = pm.weight(layer)
            qp = weight_qparams(w, ws.nearest)
            out[(layer.name, ws)] = (adaptive_round(layer, w, qp, acts[layer.input], space.adaround), qp)
            bar.update(1)
    bar.close()
    return out


def _weight_candidates(pm: PreparedModel, space: CandidateSpace, weight_bits, adaptive, drop=frozenset()):
    """Per layer: its settings, setting -> row of its unique deltas, the deltas, the qparams, the roundings."""
    from .numerics import dequantize

    out = {}
    for layer in pm.layers:
        w = pm.weight(layer)
        settings = _settings(space, layer, weight_bits, drop)
        rows: dict[WeightQuant | None, int] = {}
        keys: dict[tuple, int] = {}
        deltas: list[np.ndarray] = []
        qparams: dict[WeightQuant, QParams] = {}
        rounded = {}
        for ws in settings:
            if ws is None:
                continue
            if ws.rounding == "adaptive":
                r, qparams[ws] = adaptive[(layer.name, ws)]
                rounded[ws] = r
                rows[ws] = len(deltas)
                deltas.append((dequantize(r.q, qparams[ws]) - w).astype(np.float32))
                continue
            wq, qparams[ws] = quantize_weight(w, ws)
            key = _effective_qparams(qparams[ws], w.shape, layer.channel_axis)
            if key not in keys:
                keys[key] = len(deltas)
                deltas.append((wq - w).astype(np.float32))
            rows[ws] = keys[key]
        stacked = np.stack(deltas) if deltas else np.zeros((0, *w.shape), np.float32)
        out[layer.name] = (settings, rows, stacked, qparams, rounded)
    return out


def _activation_candidates(pm: PreparedModel, stats: Mapping[str, object], space: CandidateSpace, sources: Mapping[str, str]):
    """Per activation source tensor: its activation settings and their (scale, zero point, qmin, qmax)."""
    out = {}
    for tensor in dict.fromkeys(sources.get(layer.input, layer.input) for layer in pm.layers):
        settings = space.activation_settings()
        rows = []
        for a in settings:
            lo, hi = activation_range(stats[tensor], a)
            qp = activation_qparams(lo, hi, a)
            rows.append((float(qp.scale), float(qp.zero_point), float(qp.qmin), float(qp.qmax)))
        out[tensor] = (settings, np.array(rows, dtype=np.float64))
    return out


def score_layers(
    pm: PreparedModel,
    stats: Mapping[str, object],
    config: ObjectiveConfig,
    space: CandidateSpace,
    calib: CalibSet,
    *,
    weight_bits: Sequence[int] | None = None,
    mirror: object = None,
    sources: Mapping[str, str] | None = None,
    progress: bool = True,
    drop: Collection[tuple[str, int]] = frozenset(),
) -> Scored:
    """Score every candidate of every layer. ``stats``: calibration stats of every layer input
    (:func:`laqonnx.quant.collect.collect`); ``calib``: the calibration inputs; ``weight_bits``
    restricts the weight candidates (e.g. ``(8,)`` without a budget; 32 means float when allowed);
    ``mirror``: the float model's logits mirror, if already built; ``sources``: layer input -> the
    tensor whose range it gets (:func:`laqonnx.quant.structure.activation_sources`; default: itself);
    ``drop``: (layer, bits) pairs not scored at all (a budget can never choose them, e.g. int4 where a
    latency budget measures it no faster than int8): no adaptive rounding is fitted for them."""
    data = calib.pairs(config.metric_examples)
    warnings: list[str] = []
    try:
        import torch  # noqa: F401
    except ImportError:
        torch_ok = False
    else:
        torch_ok = True
    if not torch_ok and space.rounding != "nearest":
        import dataclasses

        from ..errors import require

        if space.rounding == "adaptive":
            require("torch", "robustness")  # adaptive rounding is learned with torch
        space = dataclasses.replace(space, rounding="nearest")
    drop = frozenset(drop)
    weights = _weight_candidates(pm, space, weight_bits, _adaptive(pm, space, weight_bits, data, progress, drop), drop)
    sources = dict(sources or {})
    acts = _activation_candidates(pm, stats, space, sources)
    deltas = {name: w[2] for name, w in weights.items()}
    params = {t: a[1] for t, a in acts.items()}
    if torch_ok:
        from .sensitivity import SensitivityConfig, logits_mirror, mirror_sensitivities

        sizes = {t: int(np.prod(s[1:])) for t, s in pm.shapes.items() if len(s)}
        sizes[pm.input_name] = int(np.prod(pm.input_shape[1:]))
        with compute_threads():
            sens = mirror_sensitivities(mirror if mirror is not None else logits_mirror(pm), pm.layers, deltas, params, data.clean, data.adversarial,
                                        SensitivityConfig(projections=config.projections, seed=config.seed),
                                        sizes=sizes, progress=progress)
        engine = "mirror"
    else:
        from .layer_error import layer_errors

        sens = layer_errors(pm, deltas, params, data.clean, data.adversarial, sources)
        engine = "layer-output"
        warnings.append(NO_TORCH_NOTE)
    adversarial = data.adversarial is not None
    layers = []
    for layer in pm.layers:
        settings, rows, _, qparams, rounded = weights[layer.name]
        params_n = int(np.prod(layer.weight_shape))
        clean_t = sens.weight_clean.get(layer.name, np.zeros(0))
        adv_t = sens.weight_adversarial.get(layer.name) if sens.weight_adversarial is not None else None
        scores = []
        for ws in settings:
            if ws is None:
                c, a = 0.0, (0.0 if adversarial else None)
                bits = 32
            else:
                r = rows[ws]
                c, a = float(clean_t[r]), (float(adv_t[r]) if adv_t is not None else None)
                bits = ws.bits
            scores.append(WeightScore(ws, c, a, config.value(c, a), bits * params_n))
        layers.append(LayerTerms(layer, tuple(scores), qparams, rounded))
    tensors = {}
    for t, (settings, _) in acts.items():
        clean_t = sens.activation_clean[t]
        adv_t = sens.activation_adversarial.get(t) if sens.activation_adversarial is not None else None
        tensors[t] = tuple(
            ActivationScore(a, float(clean_t[i]), None if adv_t is None else float(adv_t[i]),
                            config.value(float(clean_t[i]), None if adv_t is None else float(adv_t[i])))
            for i, a in enumerate(settings)
        )
    return Scored(tuple(layers), tensors, tuple(warnings), engine, sens.projections, sens.exact, sens.examples, adversarial,
                  sources)
