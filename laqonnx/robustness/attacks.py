"""The attack suite: presets, a registry of attacks, onnxruntime scoring, worst case, masking flag.

Every attack returns candidate adversarial examples; every candidate is scored on onnxruntime
(the model as deployed), never on the mirror. An example counts *fooled* by an attack if any of
its candidates (restarts) is within the threat ball and onnxruntime misclassifies it. Reported
robust accuracy is the per-example worst case: robust only if clean-correct and no attack fooled
it. Attack kinds:

- ``white-box`` on the differentiable mirror (ART ``PyTorchClassifier``): fgsm, pgd, apgd-ce,
  apgd-dlr (logits);
- ``transfer``: PGD crafted on the float reference's mirror, scored on the model;
- ``black-box`` on onnxruntime (ART ``BlackBoxClassifierNeuralNetwork``): square, hsj
  (HopSkipJump is unbounded; a candidate counts only where ``||delta|| <= eps``).

An attack that does not apply (no reference, too few classes, non-image input) returns
:class:`NotApplicable` with the reason.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from ..errors import OptionError
from ..vocab import AttackName, ThreatNorm
from .shards import BatchOutcome, plan_batches, shard_seed

__all__ = [
    "Threat", "Preset", "PRESETS", "ATTACKS", "AttackContext", "AttackResult", "NotApplicable",
    "Masking", "register_attack", "run_attack", "attack_batch", "gather", "worst_case", "gradient_masking", "perturbation_norm",
]

Kind = Literal["white-box", "transfer", "black-box"]


@dataclass(frozen=True)
class Threat:
    """``||delta||_norm <= eps`` around inputs in ``input_range`` (the model's valid input range, in
    whose units ``eps`` is; every candidate is clipped to it, and ART's ``clip_values`` are it)."""

    eps: float
    norm: Literal["inf", "2"] = "inf"
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not np.isfinite(self.eps) or self.eps < 0:
            raise OptionError(f"eps must be a finite number >= 0, not {self.eps}")
        object.__setattr__(self, "norm", ThreatNorm.check(self.norm, "norm"))
        try:
            lo, hi = (float(v) for v in self.input_range)
        except (TypeError, ValueError):
            raise OptionError(f"input_range must be (lo, hi), not {self.input_range!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise OptionError(f"input range [{lo:g}, {hi:g}] must be finite with lo < hi (Lp attacks need a finite range)")
        object.__setattr__(self, "input_range", (lo, hi))

    @property
    def art_norm(self) -> float | int:
        return np.inf if self.norm == "inf" else 2


@dataclass(frozen=True)
class Preset:
    """How hard to attack: which attacks, and their iteration / query / restart budgets."""

    name: str
    attacks: tuple[str, ...]
    pgd_steps: int
    pgd_restarts: int
    apgd_steps: int
    apgd_restarts: int
    square_queries: int
    square_restarts: int
    hsj_iters: int
    hsj_max_eval: int
    hsj_init_eval: int

    def __post_init__(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(ATTACK_NAMES)}")
        for key in ("pgd_steps", "pgd_restarts", "apgd_steps", "apgd_restarts", "square_queries",
                    "square_restarts", "hsj_iters", "hsj_max_eval", "hsj_init_eval"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, not {getattr(self, key)}")


ATTACK_NAMES: tuple[str, ...] = AttackName.values()

PRESETS: dict[str, Preset] = {
    # Sized on a digits CNN with 200 examples, 1 thread (benchmarks/evaluate_throughput.py):
    # quick ~seconds, standard well under a few minutes, thorough meant to run for long.
    "quick": Preset("quick", ("fgsm", "pgd", "apgd-ce", "transfer", "square"), pgd_steps=20, pgd_restarts=1,
                    apgd_steps=50, apgd_restarts=1, square_queries=1000, square_restarts=1,
                    hsj_iters=5, hsj_max_eval=200, hsj_init_eval=20),
    "standard": Preset("standard", ATTACK_NAMES, pgd_steps=50, pgd_restarts=5, apgd_steps=100, apgd_restarts=2,
                       square_queries=5000, square_restarts=1, hsj_iters=20, hsj_max_eval=1000, hsj_init_eval=100),
    "thorough": Preset("thorough", ATTACK_NAMES, pgd_steps=100, pgd_restarts=20, apgd_steps=200,
                       apgd_restarts=5, square_queries=10000, square_restarts=3, hsj_iters=50,
                       hsj_max_eval=5000, hsj_init_eval=100),
}


@dataclass(frozen=True)
class NotApplicable:
    """An attack that cannot run on this model / setting, and why."""

    reason: str


@dataclass
class AttackContext:
    """Everything an attack may use. ``tick(n)`` advances the caller's progress bar. ``model_index``
    and ``shard`` (attack name, batch index; set by :func:`run_attack`) key the shard's seeds."""

    threat: Threat
    preset: Preset
    ort: Any  # OrtModel of the evaluated model
    ort_art: Any  # ART BlackBoxClassifierNeuralNetwork over ``ort``
    mirror_art: Any | None  # ART PyTorchClassifier over the model's mirror (None: no mirror)
    reference_art: Any | None  # ART PyTorchClassifier over the float reference's mirror
    nb_classes: int
    input_shape: tuple[int, ...]
    batch_size: int = 128
    channels_first: bool = True  # False for an (H, W, C) model input
    seed: int = 0
    tick: Callable[[int], None] = lambda n: None
    model_index: int = 0
    shard: tuple[str, int] = ("", 0)


@dataclass(frozen=True)
class AttackResult:
    """One attack's outcome on all evaluated examples (length-N masks)."""

    name: str
    kind: Kind
    fooled: np.ndarray  # bool, onnxruntime misclassifies a valid candidate
    robust: np.ndarray  # bool, clean-correct and not fooled
    seconds: float
    mirror_agree: int = 0  # adversarial candidates where mirror and onnxruntime agree (top-1)
    mirror_total: int = 0

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.mean()) if self.robust.size else 0.0


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: Kind
    run: Callable[[AttackContext, np.ndarray, np.ndarray], "list[np.ndarray] | NotApplicable"]
    rounds: Callable[[Preset], int]


ATTACKS: dict[str, _Spec] = {}


def register_attack(name: str, kind: Kind, rounds: Callable[[Preset], int] = lambda p: 1):
    """Register ``fn(ctx, x, y_onehot) -> list of candidate arrays | NotApplicable`` as ``name``."""

    def deco(fn):
        ATTACKS[name] = _Spec(name, kind, fn, rounds)
        return fn

    return deco


def perturbation_norm(delta: np.ndarray, norm: str) -> np.ndarray:
    flat = delta.reshape(len(delta), -1)
    return np.abs(flat).max(axis=1) if norm == "inf" else np.linalg.norm(flat, axis=1)


def _seed(ctx: AttackContext, offset: int) -> None:
    """Seed numpy's and torch's global RNGs (ART draws from them) for restart ``offset`` of ctx's shard."""
    import torch

    s = shard_seed(ctx.seed, ctx.model_index, ctx.shard[0], ctx.shard[1], offset)
    np.random.seed(s)
    torch.manual_seed(s)


def _chunked(ctx: AttackContext, attack: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(x), ctx.batch_size):
        out.append(attack.generate(x=x[i:i + ctx.batch_size], y=y[i:i + ctx.batch_size]))
        ctx.tick(1)
    return np.concatenate(out).astype(np.float32, copy=False)


def _pgd_rounds(estimator: Any, ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    from art.attacks.evasion import ProjectedGradientDescent

    p, t = ctx.preset, ctx.threat
    candidates = []
    for r in range(p.pgd_restarts):
        _seed(ctx, r)
        attack = ProjectedGradientDescent(estimator, norm=t.art_norm, eps=t.eps, eps_step=2.5 * t.eps / p.pgd_steps,
                                          max_iter=p.pgd_steps, num_random_init=1, batch_size=ctx.batch_size,
                                          verbose=False)
        candidates.append(_chunked(ctx, attack, x, y))
    return candidates


@register_attack("fgsm", "white-box")
def _fgsm(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    from art.attacks.evasion import FastGradientMethod

    attack = FastGradientMethod(ctx.mirror_art, norm=ctx.threat.art_norm, eps=ctx.threat.eps,
                                eps_step=ctx.threat.eps, batch_size=ctx.batch_size)
    return [_chunked(ctx, attack, x, y)]


@register_attack("pgd", "white-box", rounds=lambda p: p.pgd_restarts)
def _pgd(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    return _pgd_rounds(ctx.mirror_art, ctx, x, y)


def _apgd(ctx: AttackContext, x: np.ndarray, y: np.ndarray, loss: str) -> list[np.ndarray] | NotApplicable:
    from art.attacks.evasion import AutoProjectedGradientDescent

    p, t = ctx.preset, ctx.threat
    if loss == "difference_logits_ratio" and ctx.nb_classes < 3:
        return NotApplicable("APGD-DLR needs at least 3 classes")
    _seed(ctx, 0)
    attack = AutoProjectedGradientDescent(ctx.mirror_art, norm=t.art_norm, eps=t.eps, eps_step=2 * t.eps,
                                          max_iter=p.apgd_steps, nb_random_init=p.apgd_restarts,
                                          batch_size=ctx.batch_size, loss_type=loss, verbose=False)
    return [_chunked(ctx, attack, x, y)]


@register_attack("apgd-ce", "white-box")
def _apgd_ce(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    return _apgd(ctx, x, y, "cross_entropy")


@register_attack("apgd-dlr", "white-box")
def _apgd_dlr(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    return _apgd(ctx, x, y, "difference_logits_ratio")


@register_attack("transfer", "transfer", rounds=lambda p: p.pgd_restarts)
def _transfer(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    if ctx.reference_art is None:
        return NotApplicable("no float reference model given (--reference)")
    return _pgd_rounds(ctx.reference_art, ctx, x, y)


@register_attack("square", "black-box", rounds=lambda p: p.square_restarts)
def _square(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    from art.attacks.evasion import SquareAttack

    if len(ctx.input_shape) != 3:
        return NotApplicable(f"SquareAttack needs image inputs (C, H, W) or (H, W, C), not {ctx.input_shape}")
    p, t = ctx.preset, ctx.threat
    candidates = []
    for r in range(p.square_restarts):
        _seed(ctx, r)
        attack = SquareAttack(ctx.ort_art, norm=t.art_norm, eps=t.eps, max_iter=p.square_queries,
                              p_init=0.8 if t.norm == "inf" else 0.3, nb_restarts=1,
                              batch_size=ctx.batch_size, verbose=False)
        candidates.append(_chunked(ctx, attack, x, y))
    return candidates


@register_attack("hsj", "black-box")
def _hsj(ctx: AttackContext, x: np.ndarray, y: np.ndarray) -> list[np.ndarray] | NotApplicable:
    from art.attacks.evasion import HopSkipJump

    p, t = ctx.preset, ctx.threat
    _seed(ctx, 0)
    attack = HopSkipJump(ctx.ort_art, batch_size=ctx.batch_size, targeted=False, norm=t.art_norm,
                         max_iter=p.hsj_iters, max_eval=p.hsj_max_eval, init_eval=p.hsj_init_eval,
                         init_size=100, verbose=False)
    return [_chunked(ctx, attack, x, y)]


def attack_batch(name: str, ctx: AttackContext, xs: np.ndarray, ys: np.ndarray) -> BatchOutcome | NotApplicable:
    """Run attack ``name`` on one shard (clean-correct examples ``xs``, labels ``ys``; ``ctx.shard``
    set) and score every candidate on onnxruntime."""
    spec = ATTACKS[name]
    if spec.kind == "white-box" and ctx.mirror_art is None:
        return NotApplicable("no differentiable mirror of the model")
    start = time.perf_counter()
    fooled = np.zeros(len(xs), dtype=bool)
    agree = total = 0
    out = spec.run(ctx, xs, np.eye(ctx.nb_classes, dtype=np.float32)[ys])
    if isinstance(out, NotApplicable):
        return out
    for cand in out:
        cand = np.clip(cand, *ctx.threat.input_range)
        valid = perturbation_norm(cand - xs, ctx.threat.norm) <= ctx.threat.eps * (1 + 1e-5) + 1e-7
        pred = ctx.ort.labels(cand, ctx.batch_size)
        fooled |= valid & (pred != ys)
        if spec.kind == "white-box" and ctx.mirror_art is not None:
            mpred = ctx.mirror_art.predict(cand, batch_size=ctx.batch_size).argmax(axis=1)
            agree += int((mpred == pred).sum())
            total += len(cand)
    return BatchOutcome(fooled, time.perf_counter() - start, agree, total)


def gather(name: str, clean_correct: np.ndarray, batches: list[np.ndarray],
           outcomes: list[BatchOutcome | NotApplicable], seconds: float | None = None) -> AttackResult | NotApplicable:
    """One attack's result from its shards' outcomes (``batches[i]`` the example indices of ``outcomes[i]``);
    ``seconds`` defaults to the shards' sum."""
    fooled = np.zeros(len(clean_correct), dtype=bool)
    agree = total = 0
    for sel, out in zip(batches, outcomes):
        if isinstance(out, NotApplicable):
            return out
        fooled[sel] |= out.fooled
        agree += out.mirror_agree
        total += out.mirror_total
    if seconds is None:
        seconds = sum(o.seconds for o in outcomes)  # type: ignore[union-attr]
    return AttackResult(name, ATTACKS[name].kind, fooled, clean_correct & ~fooled, seconds, agree, total)


def shard_batches(ctx: AttackContext, clean_correct: np.ndarray) -> list[np.ndarray]:
    """The shards (example indices) an attack runs on: none when no example is clean-correct or eps is 0."""
    idx = np.flatnonzero(clean_correct)
    return plan_batches(idx, ctx.batch_size) if len(idx) and ctx.threat.eps > 0 else []


def run_attack(name: str, ctx: AttackContext, x: np.ndarray, y: np.ndarray,
               clean_correct: np.ndarray) -> AttackResult | NotApplicable:
    """Run attack ``name`` on the clean-correct examples, shard by shard (see :mod:`.shards`), and
    score every candidate on onnxruntime."""
    if ATTACKS[name].kind == "white-box" and ctx.mirror_art is None:
        return NotApplicable("no differentiable mirror of the model")
    start = time.perf_counter()
    batches = shard_batches(ctx, clean_correct)
    outcomes: list[BatchOutcome | NotApplicable] = []
    for b, sel in enumerate(batches):
        outcomes.append(attack_batch(name, dataclasses.replace(ctx, shard=(name, b)), x[sel], y[sel]))
        if isinstance(outcomes[-1], NotApplicable):
            break
    return gather(name, clean_correct, batches, outcomes, time.perf_counter() - start)


def worst_case(clean_correct: np.ndarray, results: list[AttackResult]) -> np.ndarray:
    """Per-example worst case: robust iff clean-correct and no attack fooled it."""
    robust = clean_correct.copy()
    for r in results:
        robust &= ~r.fooled
    return robust


@dataclass(frozen=True)
class Masking:
    """The gradient-masking verdict (see :func:`gradient_masking`)."""

    flagged: bool
    white_box_robust: float | None  # lowest robust accuracy of the white-box attacks
    black_box_robust: float | None  # lowest robust accuracy of the black-box attacks
    gap: float  # white_box_robust - black_box_robust (0 when either is missing)
    black_box_only: int  # examples fooled by a black-box attack but by no white-box attack
    reason: str


def gradient_masking(results: list[AttackResult], *, margin: float = 0.02, min_examples: int = 2) -> Masking:
    """Flag gradient masking: a black-box attack beats every white-box attack.

    Precisely: with ``W`` the lowest robust accuracy among the white-box (mirror) attacks and
    ``B`` the lowest among the black-box (onnxruntime) attacks, flagged iff ``W - B > margin``
    (2 points by default) AND that gap is more than ``min_examples`` examples (so one or two
    examples on a tiny set never flag).
    """
    wb = [r for r in results if r.kind == "white-box"]
    bb = [r for r in results if r.kind == "black-box"]
    if not wb or not bb:
        return Masking(False, None, None, 0.0, 0, "needs both a white-box and a black-box attack")
    w = min(r.robust_accuracy for r in wb)
    b = min(r.robust_accuracy for r in bb)
    n = len(wb[0].robust)
    wb_fooled = np.logical_or.reduce([r.fooled for r in wb])
    bb_only = int((np.logical_or.reduce([r.fooled for r in bb]) & ~wb_fooled).sum())
    gap = w - b
    flagged = bool(gap > margin and round(gap * n) > min_examples)
    reason = (f"black-box robust accuracy {b:.3f} is {gap * 100:.1f} points below the best white-box {w:.3f}"
              if flagged else "white-box attacks are at least as strong as black-box ones")
    return Masking(flagged, w, b, gap, bb_only, reason)
