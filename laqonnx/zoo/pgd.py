"""L-infinity attacks in PyTorch for adversarial training and quick robustness checks.

``pgd`` is Madry et al.'s projected gradient descent (uniform random start, signed-gradient
steps, projection onto the eps-ball and [0, 1]); ``fgsm_rs`` is the single step with random
start of Wong et al., "Fast is better than free" (step 1.25 eps). Both maximise the
cross-entropy of the logits. These are the zoo's own training-time attacks; laqonnx's
evaluation of quantized models uses the full attack suite in ``laqonnx.robustness``.
"""

from __future__ import annotations

from ..errors import require

torch = require("torch", "robustness")
F = torch.nn.functional

__all__ = ["pgd", "fgsm_rs", "accuracy", "robust_accuracy", "default_alpha"]


def default_alpha(eps: float, steps: int) -> float:
    """Madry-style step size ``2.5 * eps / steps`` (reaches the ball's surface from any start)."""
    return 2.5 * eps / max(steps, 1)


def _random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * (2 * eps) - eps
    return (x + noise).clamp(0.0, 1.0) - x


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(delta.clamp(-eps, eps), -x), 1.0 - x)


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    *,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``x + delta`` with ``||delta||_inf <= eps`` and values in [0, 1], maximising the loss.

    The model's mode (train/eval) is left as the caller set it; parameters get no gradients.
    """
    if eps <= 0 or steps < 1:
        return x.detach().clone()
    step = default_alpha(eps, steps) if alpha is None else float(alpha)
    x = x.detach()
    delta = _random_start(x, eps, generator) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = _project(delta.detach() + step * grad.sign(), x, eps)
    return (x + delta).detach()


def fgsm_rs(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FGSM with a uniform random start and step ``alpha`` (default ``1.25 * eps``), projected."""
    step = 1.25 * eps if alpha is None else float(alpha)
    x = x.detach()
    delta = _random_start(x, eps, generator).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = _project(delta.detach() + step * grad.sign(), x, eps)
    return (x + delta).detach()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in its current mode) on ``(x, y)``."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def robust_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    alpha: float | None = None,
    *,
    seed: int = 0,
    batch_size: int = 512,
) -> float:
    """Accuracy under :func:`pgd` (one random start from a generator seeded with ``seed``),
    counting an example robust only if it is also classified correctly when clean."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        adv = pgd(model, xb, yb, eps, steps, alpha, generator=generator)
        with torch.no_grad():
            ok = (model(adv).argmax(1) == yb) & (model(xb).argmax(1) == yb)
        correct += int(ok.sum())
    return correct / max(len(x), 1)
