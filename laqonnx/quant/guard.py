"""The guard: never worse than its parts, measured.

Before a plan is written, :func:`guard` lowers the chosen plan and its alternatives -- the plans the
two ablations (``mse``, ``lipschitz``) choose from the same terms, and the uniform rule at the same
budget (every layer int8 per-channel max-abs with min-max activations; under a budget, int4 on the
largest layers until it fits) -- runs each through onnxruntime on the calibration examples, and
keeps the one with the lowest measured loss

    L = E_x ||P (f_hat(x) - f(x))||^2 + E ||P ([f_hat - f](x') - [f_hat - f](x))||^2

(centred logits; the second term over the (clean, adversarial) pairs, weighted as the objective
weights its adversarial term) -- the same two quantities the metric predicts as a sum of
per-layer terms. The comparison is recorded in the plan.

With a :class:`RobustGuard` the guard also measures what the product is for, robustness: every
alternative is attacked white-box (PGD on its own differentiable mirror, rounding passed straight
through) on the clean calibration inputs, the adversarial points are scored on onnxruntime, and
its **robust agreement** is the fraction whose prediction stays the float model's clean
prediction. The most robust alternative is kept; alternatives within ``tolerance`` of it are
decided by the measured loss above (:func:`keep`). The loss alone measures fidelity to the float
model at the float model's adversarial points, which on PGD-trained CNNs at int4 kept plans 1-5
points less robust than an ablation's (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import ModelError, OptionError
from .metric import ObjectiveConfig, Scored
from .scoring import CalibSet

__all__ = ["logits_view", "OrtRunner", "calibration_loss", "uniform_choice", "guard", "GuardEntry", "RobustGuard",
           "robust_agreements", "keep", "guard_plans"]


def logits_view(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """A copy of ``model`` whose only output is ``output``, or the input of a (Log)Softmax that
    produces it (logits: what the metric and attacks see)."""
    view = onnx.ModelProto()
    view.CopyFrom(model)
    graph = view.graph
    name = output
    producer = next((n for n in graph.node if output in n.output), None)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax") and producer.domain in ("", "ai.onnx"):
        name = producer.input[0]
        graph.node.remove(producer)
    del graph.output[:]
    graph.output.append(onnx.ValueInfoProto(name=name))
    return view


class OrtRunner:
    """An onnxruntime session over one model's logits, run in chunks of its fixed batch (if any)."""

    def __init__(self, model: onnx.ModelProto, input_name: str, fixed_batch: int | None = None, chunk: int = 256) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types
            raise ModelError(f"onnxruntime cannot load the model: {' '.join(str(exc).split())[:300]}") from exc
        self.input_name = input_name
        self.output = self.session.get_outputs()[0].name
        self.step = int(fixed_batch) if fixed_batch else chunk
        self.fixed = bool(fixed_batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(0, len(x), self.step):
            part = x[i:i + self.step]
            n = len(part)
            if self.fixed and n < self.step:
                part = np.concatenate([part, np.repeat(part[-1:], self.step - n, axis=0)])
            outs.append(self.session.run([self.output], {self.input_name: part})[0][:n])
        out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        return out.reshape(len(x), -1).astype(np.float64)


def _centre(z: np.ndarray) -> np.ndarray:
    return z - z.mean(axis=1, keepdims=True)


def calibration_loss(ref: tuple[np.ndarray, np.ndarray | None], got: tuple[np.ndarray, np.ndarray | None],
                     adversarial_weight: float = 1.0) -> tuple[float, float | None]:
    """(clean, adversarial) measured losses of logits ``got`` against the float model's ``ref``."""
    ec = _centre(got[0]) - _centre(ref[0])
    clean = float((ec ** 2).sum(axis=1).mean())
    if ref[1] is None or got[1] is None:
        return clean, None
    ea = _centre(got[1]) - _centre(ref[1])
    return clean, float(((ea - ec) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class RobustGuard:
    """The guard's robustness criterion: PGD with ``steps`` steps (``2.5 eps / steps`` each, from a
    random start drawn with ``seed``) on each alternative's mirror, on the first ``examples`` clean
    calibration inputs; alternatives whose robust agreement is within ``tolerance`` of the best are
    tied and decided by the measured loss."""

    examples: int = 256
    steps: int = 10
    tolerance: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("examples", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"robust guard {name} must be a positive int, got {v!r}")
        if not 0 <= self.tolerance < 1:
            raise OptionError(f"robust guard tolerance must be in [0, 1), got {self.tolerance!r}")


@dataclass(frozen=True)
class GuardEntry:
    name: str
    clean: float
    adversarial: float | None
    loss: float


def uniform_choice(scored: Scored, budget_fits: Callable[[dict[str, int]], bool]):
    """The uniform rule as indices into the scores: int8 per-channel max-abs everywhere (the first
    int8 setting if that is not a candidate) and min-max activations; then int4 on the largest layers
    first while ``budget_fits`` says the choice is still over budget. None if it cannot fit."""

    def pick(lt, bits: int) -> int | None:
        ranked = [(k, s) for k, s in enumerate(lt.scores) if s.setting is not None and s.setting.bits == bits]
        if not ranked:
            return None
        best = [k for k, s in ranked if s.setting.method == "maxabs" and type(s.setting.granularity).__name__ == "PerChannel"]
        return best[0] if best else ranked[0][0]

    weights = {}
    for lt in scored.layers:
        k = pick(lt, 8)
        if k is None:
            k = next((j for j, s in enumerate(lt.scores) if s.setting is not None), 0)
        weights[lt.layer.name] = k
    activations = {}
    for t, scores in scored.tensors.items():
        mm = [i for i, s in enumerate(scores) if s.setting.method == "minmax" and s.setting.bits == 8]
        activations[t] = mm[0] if mm else 0
    order = sorted(scored.layers, key=lambda lt: -int(np.prod(lt.layer.weight_shape)))
    for lt in order:
        if budget_fits(weights):
            break
        k = pick(lt, 4)
        if k is not None:
            weights[lt.layer.name] = k
    return (weights, activations) if budget_fits(weights) else None


def guard(
    candidates: Mapping[str, onnx.ModelProto],
    reference: onnx.ModelProto,
    input_name: str,
    output: str,
    calib: CalibSet,
    config: ObjectiveConfig,
    fixed_batch: int | None = None,
) -> list[GuardEntry]:
    """The measured loss of every candidate model (name -> lowered QDQ model), lowest first."""
    ref_run = OrtRunner(logits_view(reference, output), input_name, fixed_batch)
    ref = (ref_run(calib.clean), None if calib.adversarial is None else ref_run(calib.adversarial))
    entries = []
    for name, model in candidates.items():
        run = OrtRunner(logits_view(model, output), input_name, fixed_batch)
        got = (run(calib.clean), None if calib.adversarial is None else run(calib.adversarial))
        clean, adv = calibration_loss(ref, got)
        entries.append(GuardEntry(name, clean, adv, config.value(clean, adv)))
    return sorted(entries, key=lambda e: e.loss)


def robust_agreements(
    candidates: Mapping[str, onnx.ModelProto],
    reference: onnx.ModelProto,
    input_name: str,
    output: str,
    x: np.ndarray,
    eps: float,
    norm: str,
    input_range: tuple[float, float],
    config: RobustGuard = RobustGuard(),
    fixed_batch: int | None = None,
) -> dict[str, float]:
    """Robust agreement of every candidate (name -> lowered QDQ model) on the first
    ``config.examples`` of ``x``: PGD on the candidate's own mirror against the float model's clean
    top-1 (the label every candidate should keep), every adversarial point scored on onnxruntime.
    The same random starts for every candidate."""
    from ..robustness.mirror import build_mirror
    from .adversarial import Generated, pgd_examples

    x = np.ascontiguousarray(x[:config.examples], dtype=np.float32)
    labels = OrtRunner(logits_view(reference, output), input_name, fixed_batch)(x).argmax(axis=1)
    attack = Generated(steps=config.steps, seed=config.seed)
    out = {}
    for name, model in candidates.items():
        view = logits_view(model, output)
        adv = pgd_examples(build_mirror(view), x, float(eps), str(norm), input_range, attack, labels=labels)
        pred = OrtRunner(view, input_name, fixed_batch)(adv).argmax(axis=1)
        out[name] = float(np.mean(pred == labels))
    return out


def keep(entries: list[GuardEntry], robust: Mapping[str, float] | None, tolerance: float = 0.01) -> str:
    """The alternative to keep: without ``robust``, the lowest measured loss; with it, the lowest
    loss among those whose robust agreement is within ``tolerance`` of the best one's."""
    if not robust:
        return min(entries, key=lambda e: e.loss).name
    best = max(robust[e.name] for e in entries)
    tied = [e for e in entries if robust[e.name] >= best - tolerance - 1e-12]
    return min(tied, key=lambda e: e.loss).name


def guard_plans(lowered: Mapping[str, onnx.ModelProto], alias: Mapping[str, str], pm, calibration, config: ObjectiveConfig,
                metric_examples: int, robust: RobustGuard | None = None):
    """The guard over the lowered alternatives of :func:`laqonnx.quant.planning.plan_model` (``alias``:
    alternatives identical to a measured one, which share its figures): a
    :class:`~laqonnx.quant.plan.GuardResult`."""
    from .plan import GuardResult

    fixed = getattr(pm, "fixed_batch", None)
    pairs = calibration.data.pairs(metric_examples)
    entries = guard(lowered, pm.model, pm.input_name, pm.output_name, pairs, config, fixed)
    agreement = None if robust is None else robust_agreements(
        lowered, pm.model, pm.input_name, pm.output_name, calibration.data.clean, config.eps, config.norm,
        calibration.input_range, robust, fixed)
    kept = keep(entries, agreement, robust.tolerance if robust else 0.0)
    losses = {e.name: e.loss for e in entries}
    for name, first in alias.items():
        losses[name] = losses[first]
        if agreement is not None:
            agreement[name] = agreement[first]
    return GuardResult(kept, losses, int(len(pairs.clean)), agreement,
                       0 if robust is None else min(robust.examples, len(calibration.data.clean)))
