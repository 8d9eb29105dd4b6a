"""Adaptive rounding: each weight rounded up or down to minimise the layer's output error.

Round-to-nearest minimises each weight's own error, not the layer's. For a layer ``T_W`` with a
fixed scale ``s`` (the setting's), AdaRound (Nagel et al., 2020) learns per weight whether
``floor(W / s)`` goes up by one: ``W_hat = s * clip(floor(W / s) + h(V), qmin, qmax)`` with the
rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, minimising

    E ||T_{W_hat}(a) - T_W(a)||^2  +  lambda * sum (1 - |2 h(V) - 1|^beta)

over the layer's input activations ``a`` on the calibration examples, **clean and adversarial**
(the adversarial examples the metric uses, so the rounding is also fitted where the attack takes
the activations). ``beta`` anneals from 20 to 2 after a warm-up without the regulariser, which
drives every ``h`` to 0 or 1. ``V`` starts at round-to-nearest (``h`` = 1 exactly where nearest
rounds up), Adam optimises it on minibatches, and training stops early when the hard-rounded error
has not improved for ``patience`` checks. The result is the best hard rounding seen, and never
worse than nearest on the same activations (nearest is the first one seen). The integer weights
differ from nearest by at most one step; the scale, zero point and everything onnxruntime fuses
are unchanged. Deterministic for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from ..graph import Layer
from .numerics import QParams

__all__ = ["AdaRoundConfig", "Rounded", "adaptive_round"]

_ZETA, _GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """``iterations`` (at most), minibatch of ``batch`` examples, Adam ``lr``, regulariser weight
    ``reg`` (relative to the nearest-rounding error), ``warmup`` fraction without it, ``beta``
    annealed from ``beta_start`` to ``beta_end``; the hard error is checked every ``check_every``
    steps and training stops after ``patience`` checks without improvement (once past warm-up).
    ``sequential``: once a plan is chosen, re-fit its adaptive layers in order on the inputs the
    partly quantized model gives them (:mod:`laqonnx.quant.refit`), kept where the measured
    calibration loss does not rise. ``gram``: fit a 2-D Conv through its input Gram matrix (exact
    full-data steps, :mod:`laqonnx.quant.rounding_gram`): True, False, or None (where its cost rule
    says it is cheaper and the minibatch fit is expensive)."""

    iterations: int = 400
    batch: int = 32
    lr: float = 5e-2
    reg: float = 100.0
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    check_every: int = 25
    patience: int = 4
    seed: int = 0
    sequential: bool = True
    gram: bool | None = None

    def __post_init__(self) -> None:
        for name in ("iterations", "batch", "check_every", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"adaptive rounding {name} must be a positive int, got {v!r}")
        if not (self.lr > 0 and self.reg >= 0 and 0 <= self.warmup < 1 and self.beta_start >= self.beta_end > 0):
            raise OptionError("adaptive rounding needs lr > 0, reg >= 0, 0 <= warmup < 1 and beta_start >= beta_end > 0")
        if self.gram not in (None, True, False):
            raise OptionError(f"adaptive rounding gram must be None, True or False, got {self.gram!r}")


@dataclass(frozen=True, eq=False)
class Rounded:
    """The integer weights (as the setting's storage dtype) and the layer's output errors."""

    q: np.ndarray
    error_nearest: float  # E ||T_{W_nearest}(a) - T_W(a)||^2 on the activations
    error_adaptive: float  # the same with the returned rounding (<= error_nearest)
    steps: int
    gram: bool = False  # fitted through the input Gram matrix (laqonnx.quant.rounding_gram)


def _broadcast(qp: QParams, ndim: int):
    import torch

    scale = np.asarray(qp.scale, dtype=np.float32)
    if qp.axis is None:
        return torch.tensor(float(scale))
    shape = [1] * ndim
    shape[qp.axis % ndim] = -1
    return torch.from_numpy(scale.reshape(shape))


def adaptive_round(layer: Layer, w: np.ndarray, qp: QParams, activations: np.ndarray, config: AdaRoundConfig = AdaRoundConfig(),
                   *, target_inputs: np.ndarray | None = None, progress=None) -> Rounded:
    """Learn the rounding of ``w`` (layer ``layer``, qparams ``qp``, zero point 0) on the layer's
    input ``activations`` (``(N, ...)``, clean and adversarial together). The target is the float
    layer's output on ``target_inputs`` (default: the same activations); given the float model's
    inputs while ``activations`` are the quantized model's, the rounding also makes up for the
    error upstream layers pass on."""
    import torch

    from .rounding_gram import build_gram, use_gram
    from .sensitivity import _linear_part

    if np.any(np.asarray(qp.zero_point) != 0):
        raise ValueError("adaptive rounding expects symmetric weights (zero point 0)")
    fn = _linear_part(torch, layer)
    gen = torch.Generator().manual_seed(config.seed)
    wt = torch.from_numpy(np.array(w, dtype=np.float32))
    scale = _broadcast(qp, wt.dim())
    base = torch.floor(wt / scale)
    frac = wt / scale - base
    lo, hi = float(qp.qmin), float(qp.qmax)
    nearest_up = (torch.round(wt / scale) - base).clamp(0, 1)  # round half to even, as QuantizeLinear
    a = torch.from_numpy(np.array(activations, dtype=np.float32))
    if target_inputs is not None and np.shape(target_inputs) != np.shape(activations):
        raise ValueError(f"target inputs of shape {np.shape(target_inputs)} for activations of shape {np.shape(activations)}")
    inputs = None if target_inputs is None else torch.from_numpy(np.array(target_inputs, dtype=np.float32))
    gram = None
    if use_gram(config.gram, layer, tuple(a.shape), config.iterations, config.batch):
        gram = build_gram(torch, layer, a, wt, inputs)
        h32 = gram.h.float()
    else:
        with torch.no_grad():
            target = fn(a if inputs is None else inputs, wt)

    def hard(up: torch.Tensor) -> torch.Tensor:
        return torch.clamp(base + up, lo, hi) * scale

    def error(wq: torch.Tensor) -> float:
        if gram is not None:
            return gram.error(wq, wt)
        with torch.no_grad():
            return float(((fn(a, wq) - target) ** 2).sum() / len(a))

    # V such that h(V) is 1 where nearest rounds up and 0 where it rounds down, a little inside (0, 1)
    start = torch.where(nearest_up > 0, torch.full_like(frac, 0.9), torch.full_like(frac, 0.1))
    v = torch.log((start - _GAMMA) / (_ZETA - start)).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=config.lr)
    best_up = nearest_up.clone()
    err_nearest = error(hard(nearest_up))
    best_err = err_nearest
    scale_reg = config.reg * max(err_nearest, 1e-12) / max(wt.numel(), 1)
    warm = int(config.warmup * config.iterations)
    stale, steps = 0, 0
    for it in range(config.iterations):
        h = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
        soft = torch.clamp(base + h, lo, hi) * scale
        if gram is not None:  # every row, exactly
            loss = gram.surrogate(soft, wt, h32)
        else:
            idx = torch.randint(0, len(a), (min(config.batch, len(a)),), generator=gen)
            loss = ((fn(a[idx], soft) - target[idx]) ** 2).sum() / len(idx)
        if it >= warm:
            t = (it - warm) / max(1, config.iterations - warm)
            beta = config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(math.pi * t))
            loss = loss + scale_reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps = it + 1
        if progress is not None:
            progress(1)
        if steps % config.check_every == 0 or steps == config.iterations:
            with torch.no_grad():
                up = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA >= 0.5).to(base.dtype)
            e = error(hard(up))
            if e < best_err * (1 - 1e-6):
                best_err, best_up, stale = e, up, 0
            elif it >= warm:
                stale += 1
                if stale >= config.patience:
                    break
    q = torch.clamp(base + best_up, lo, hi).numpy().astype(qp.storage_dtype)
    return Rounded(q, err_nearest, best_err, steps, gram is not None)
