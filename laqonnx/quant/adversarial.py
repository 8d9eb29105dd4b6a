"""Adversarial calibration: how the calibration set gets its adversarial examples.

:class:`Generated` (the default when ``eps > 0``) crafts them with PGD on the float model's
differentiable mirror, against the float model's own predictions (no labels needed), inside the
threat model (``||delta|| <= eps`` in L-inf or L2, in input units) and the model's valid input
range; :class:`FromData` reads them from a data spec (paired by index with the clean calibration
examples); :class:`Off` calibrates on clean data only (the metric's adversarial term is then 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError

__all__ = ["Generated", "FromData", "Off", "AdversarialCalib", "pgd_examples"]


@dataclass(frozen=True)
class Generated:
    """PGD with ``steps`` signed-gradient (L-inf) or normalised-gradient (L2) steps of
    ``2.5 * eps / steps`` from a uniform random start, seeded."""

    steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise OptionError(f"adversarial calibration steps must be a positive int, got {self.steps!r}")

    def describe(self) -> str:
        return f"generated (PGD-{self.steps} on the float model)"


@dataclass(frozen=True)
class FromData:
    """Adversarial examples from ``spec`` (an .npz or arrays), paired with the clean ones by index."""

    spec: Any

    def describe(self) -> str:
        return f"from data ({self.spec if isinstance(self.spec, str) else 'arrays'})"


@dataclass(frozen=True)
class Off:
    """No adversarial examples."""

    def describe(self) -> str:
        return "off"


AdversarialCalib = Generated | FromData | Off


def _project(delta, x, eps: float, norm: str, lo: float, hi: float):
    import torch

    if norm == "inf":
        delta = delta.clamp(-eps, eps)
    else:
        flat = delta.reshape(len(delta), -1)
        scale = torch.clamp(eps / flat.norm(dim=1).clamp_min(1e-12), max=1.0)
        delta = (flat * scale[:, None]).reshape(delta.shape)
    return (x + delta).clamp(lo, hi) - x


def pgd_examples(mirror: Any, x: np.ndarray, eps: float, norm: str, input_range: tuple[float, float],
                 config: Generated = Generated(), batch_size: int = 64, step_batch: int = 16,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """PGD examples of ``x`` on ``mirror`` (the float model) against its own top-1 predictions
    (or against ``labels``, one class per example).

    The random starts are drawn per ``batch_size`` examples; the steps run on ``step_batch`` of them
    at a time (each example's steps depend on its own gradient only: the sign or norm of a batch-mean
    loss's gradient is the example's). Smaller step batches keep the backward pass in cache: on
    the ResNet-18 at 224x224, 16 examples per step run 2.2x faster than 64."""
    import torch

    lo, hi = float(input_range[0]), float(input_range[1])
    step = 2.5 * eps / config.steps
    gen = torch.Generator().manual_seed(config.seed)
    step_batch = max(1, step_batch)
    out = []
    for i in range(0, len(x), batch_size):
        xs = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
        if norm == "inf":
            starts = (torch.rand(xs.shape, generator=gen) * 2 - 1) * eps
        else:
            r = torch.randn(xs.shape, generator=gen)
            starts = r / r.reshape(len(xs), -1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (xs.dim() - 1)) * eps
        for j in range(0, len(xs), step_batch):
            xb = xs[j:j + step_batch]
            if labels is not None:
                y = torch.as_tensor(np.asarray(labels[i + j:i + j + len(xb)]), dtype=torch.long)
            else:
                with torch.no_grad():
                    y = mirror(xb).reshape(len(xb), -1).argmax(1)
            delta = _project(starts[j:j + len(xb)], xb, eps, norm, lo, hi)
            for _ in range(config.steps):
                delta.requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(mirror(xb + delta).reshape(len(xb), -1), y)
                (grad,) = torch.autograd.grad(loss, delta)
                if norm == "inf":
                    move = grad.sign()
                else:
                    move = grad / grad.reshape(len(xb), -1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (xb.dim() - 1))
                delta = _project(delta.detach() + step * move, xb, eps, norm, lo, hi)
            out.append((xb + delta).detach().numpy().astype(np.float32))
    result = np.concatenate(out) if out else np.zeros_like(x, dtype=np.float32)
    if not math.isfinite(float(np.abs(result).max(initial=0.0))):
        raise ValueError("PGD produced non-finite inputs")
    return result
