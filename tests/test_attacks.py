"""The attack suite: agreement with an independent PGD, worst-case aggregation, the masking flag."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from laqonnx.robustness.attacks import (
    PRESETS, AttackContext, AttackResult, NotApplicable, Preset, Threat, gradient_masking, perturbation_norm,
    run_attack, worst_case,
)
from laqonnx.robustness.evaluate import evaluate
from laqonnx.robustness.mirror import build_mirror, mirror_classifier
from laqonnx.robustness.ort_estimator import OrtModel, ort_classifier
from tests._digits_model import digits_cnn


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """As evaluate() does: tiny models attack fastest on one thread (and the machine is shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _hand_pgd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, norm: str,
              seed: int) -> torch.Tensor:
    """Plain-torch PGD (random start, Madry step 2.5 eps / steps), written independently of ART."""
    gen = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    flat = lambda t: t.reshape(len(t), -1)  # noqa: E731
    if norm == "inf":
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=gen)
        r = torch.rand(len(x), generator=gen) ** (1 / flat(x).shape[1])
        delta = d / flat(d).norm(dim=1).view(-1, 1, 1, 1) * (eps * r).view(-1, 1, 1, 1)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_()
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x_adv), y), x_adv)
        with torch.no_grad():
            if norm == "inf":
                x_adv = torch.min(torch.max(x_adv + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
            else:
                g = grad / flat(grad).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = x_adv + alpha * g - x
                n = flat(delta).norm(dim=1).view(-1, 1, 1, 1)
                x_adv = (x + delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.6)])
def test_toolkit_pgd_agrees_with_handwritten_pgd(norm: str, eps: float) -> None:
    net, model, x, y, _ = digits_cnn()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        clean = net(xt).argmax(1) == yt
    steps = PRESETS["quick"].pgd_steps
    adv = _hand_pgd(net, xt, yt, eps, steps, norm, seed=1)
    assert perturbation_norm((adv - xt).numpy(), norm).max() <= eps * (1 + 1e-5)
    with torch.no_grad():
        hand = float((clean & (net(adv).argmax(1) == yt)).float().mean())
    report = evaluate(model, (x, y), eps, norm=norm, attacks=["pgd"], latency=False, progress=False)
    ours = report.models[0].robust_accuracy["pgd"]
    assert report.models[0].clean_accuracy == pytest.approx(float(clean.float().mean()))
    assert 0.1 < hand < report.models[0].clean_accuracy - 0.1  # the attack does something, not everything
    assert abs(ours - hand) <= 0.02, (ours, hand)


def _ctx(model: onnx.ModelProto, threat: Threat, preset: Preset, reference: onnx.ModelProto | None = None):
    ort = OrtModel(model)
    return AttackContext(threat=threat, preset=preset, ort=ort, ort_art=ort_classifier(ort, (1, 8, 8), 10),
                         mirror_art=mirror_classifier(build_mirror(model), (1, 8, 8), 10),
                         reference_art=None if reference is None else mirror_classifier(build_mirror(reference),
                                                                                          (1, 8, 8), 10),
                         nb_classes=10, input_shape=(1, 8, 8))


SMALL = dataclasses.replace(PRESETS["quick"], name="small", pgd_restarts=2, apgd_steps=10, square_queries=100,
                            hsj_iters=2, hsj_max_eval=50, hsj_init_eval=10)


def test_worst_case_is_below_every_attack_and_matches_per_example_union() -> None:
    _, model, x, y, _ = digits_cnn()
    x, y = x[:80], y[:80]
    ctx = _ctx(model, Threat(0.1), SMALL)
    correct = ctx.ort.labels(x) == y
    results = []
    for name in ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "hsj"):
        r = run_attack(name, ctx, x, y, correct)
        assert isinstance(r, AttackResult), name
        assert not (r.robust & ~correct).any()  # clean-wrong examples are never robust
        results.append(r)
    wc = worst_case(correct, results)
    assert all(wc.mean() <= r.robust_accuracy for r in results)
    brute = [bool(correct[i]) and not any(r.fooled[i] for r in results) for i in range(len(x))]
    assert wc.tolist() == brute
    assert wc.mean() < min(r.robust_accuracy for r in results) + 1e-9
    report = evaluate(model, (x, y), 0.1, attacks=["fgsm", "pgd", "square"], latency=False, progress=False)
    acc = report.models[0].robust_accuracy
    assert acc["worst_case"] <= min(acc["fgsm"], acc["pgd"], acc["square"])


def test_worst_case_on_explicit_masks() -> None:
    correct = np.array([True, True, True, False])
    mk = lambda fooled, kind="white-box": AttackResult("a", kind, np.array(fooled), correct & ~np.array(fooled), 0.0)  # noqa: E731
    results = [mk([True, False, False, False]), mk([False, False, True, True], "black-box")]
    assert worst_case(correct, results).tolist() == [False, True, False, False]


@pytest.mark.parametrize("wb_fooled,bb_fooled,n,flagged", [
    (10, 10, 200, False),  # equal
    (10, 14, 200, False),  # 2 points: not more than the margin
    (10, 15, 200, True),   # 2.5 points and 5 examples
    (2, 4, 20, False),     # 10 points but only 2 examples
    (2, 5, 20, True),      # 3 examples and 15 points
    (30, 10, 200, False),  # white-box stronger
])
def test_gradient_masking_definition(wb_fooled: int, bb_fooled: int, n: int, flagged: bool) -> None:
    correct = np.ones(n, dtype=bool)

    def result(kind: str, k: int) -> AttackResult:
        fooled = np.zeros(n, dtype=bool)
        fooled[:k] = True
        return AttackResult(kind, kind, fooled, correct & ~fooled, 0.0)

    verdict = gradient_masking([result("white-box", wb_fooled), result("black-box", bb_fooled)])
    assert verdict.flagged is flagged
    assert verdict.gap == pytest.approx((bb_fooled - wb_fooled) / n)
    assert verdict.black_box_only == max(0, bb_fooled - wb_fooled)
    assert not gradient_masking([result("white-box", 0)]).flagged  # no black-box attack: no verdict


def _input_rounding(model: onnx.ModelProto, levels: float) -> onnx.ModelProto:
    """Prepend x -> Round(x * levels) / levels: a hard input quantizer with zero gradient (no STE)."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    g = masked.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == "input":
                node.input[i] = "input_q"
    g.initializer.append(numpy_helper.from_array(np.array(levels, np.float32), "levels"))
    pre = [helper.make_node("Mul", ["input", "levels"], ["scaled"]), helper.make_node("Round", ["scaled"], ["rounded"]),
           helper.make_node("Div", ["rounded", "levels"], ["input_q"])]
    for node in reversed(pre):
        g.node.insert(0, node)
    onnx.checker.check_model(masked)
    return masked


def test_gradient_masked_model_is_flagged_and_plain_model_is_not() -> None:
    _, model, x, y, _ = digits_cnn()
    x, y = x[:150], y[:150]
    masked = _input_rounding(model, 4.0)
    report = evaluate([model, masked], (x, y), 0.15, attacks=["fgsm", "pgd", "square"], latency=False,
                      progress=False)
    plain, mask = report.models
    assert mask.clean_accuracy > 0.8
    assert mask.mirror_agreement == 1.0  # the mirror is exact; its gradient is just useless
    assert mask.masking.flagged, mask.masking
    assert mask.robust_accuracy["square"] < mask.robust_accuracy["pgd"] - 0.05
    assert not plain.masking.flagged, plain.masking
    assert plain.robust_accuracy["pgd"] <= plain.robust_accuracy["square"]


def test_hsj_counts_only_within_eps() -> None:
    _, model, x, y, _ = digits_cnn()
    x, y = x[:20], y[:20]
    correct = OrtModel(model).labels(x) == y
    tiny = run_attack("hsj", _ctx(model, Threat(1e-4, "2"), SMALL), x, y, correct)
    assert isinstance(tiny, AttackResult) and not tiny.fooled.any()  # HSJ finds only far adversarials
    big = run_attack("hsj", _ctx(model, Threat(4.0, "2"), SMALL), x, y, correct)
    assert isinstance(big, AttackResult) and big.fooled.sum() >= correct.sum() // 2


def test_transfer_needs_a_reference_and_scores_on_the_target() -> None:
    _, model, x, y, _ = digits_cnn()
    x, y = x[:60], y[:60]
    correct = OrtModel(model).labels(x) == y
    assert isinstance(run_attack("transfer", _ctx(model, Threat(0.1), SMALL), x, y, correct), NotApplicable)
    same = run_attack("transfer", _ctx(model, Threat(0.1), SMALL, reference=model), x, y, correct)
    direct = run_attack("pgd", _ctx(model, Threat(0.1), SMALL), x, y, correct)
    assert isinstance(same, AttackResult) and isinstance(direct, AttackResult)
    assert same.fooled.tolist() == direct.fooled.tolist()  # same model, same seeds: identical examples


def test_zero_eps_fools_nobody() -> None:
    _, model, x, y, _ = digits_cnn()
    report = evaluate(model, (x[:40], y[:40]), 0.0, attacks=["pgd", "square"], latency=False, progress=False)
    m = report.models[0]
    assert m.robust_accuracy["worst_case"] == m.clean_accuracy


@pytest.mark.parametrize("kwargs,match", [
    ({"attacks": ("pgd", "nope")}, "unknown attack"),
    ({"pgd_steps": 0}, "pgd_steps"),
])
def test_preset_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(PRESETS["quick"], **kwargs)


@pytest.mark.parametrize("eps,norm", [(-0.1, "inf"), (float("nan"), "inf"), (0.1, "1")])
def test_threat_validation(eps: float, norm: str) -> None:
    with pytest.raises(ValueError):
        Threat(eps, norm)  # type: ignore[arg-type]
