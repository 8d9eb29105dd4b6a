"""Data-dependent sensitivities of the logits to each layer's quantization error: the metric's terms.

For a calibration point ``x`` let ``z_l`` be the output of weighted layer ``l`` (its linear map
``T_l`` applied to its input ``a_l``) and ``t`` a tensor with an activation QDQ pair. Linearised
around the float network ``f``, quantizing the weight of ``l`` by ``dW`` and the tensor ``t`` with
error ``e_t = Q(t) - t`` changes the logits by

    f_hat(x) - f(x) ~= sum_l J_l(x) T_l[dW_l] a_l(x) + sum_t J_t(x) e_t(x),

``J_l = df/dz_l`` and ``J_t = df/dt``: the local gains from that point of the graph to the logits at
``x``, through the float model's differentiable mirror. Logits are centred (``P = I - 11^T/C``:
adding one constant to every logit changes no prediction). For every candidate this module returns

* ``clean``: ``E_x ||P J delta(x)||^2`` over the clean calibration points;
* ``adversarial``: ``E ||P (J(x') delta(x') - J(x) delta(x))||^2`` over pairs of a clean point and
  its adversarial example ``x'``: how much the quantization changes the network's response to the
  attack. It contains the change of amplification along the attack direction,
  ``J(x') T[dW] (a(x') - a(x))``, and the error of ranges clipped on clean data but exceeded under
  attack.

``||P J v||^2`` is a sum over projections, ``sum_k (u_k . J v)^2``: the rows of ``P`` (exact) for
models with at most :data:`EXACT_CLASSES` classes, else ``K`` random sign rows of ``P / sqrt(K)``
drawn afresh for every calibration example (unbiased; the same rows for every candidate and for
the two points of an adversarial pair, so candidates are compared on common projections). Each
projection is one backward pass of the mirror. A weight candidate then costs either one
application of the layer to its input (``T[dW] a``, contracted with the gradient at its output),
or nothing beyond one per-example weight gradient per projection, ``G = d(u_k . f)/dW``, since
``u_k . J T[dW] a = <dW, G>``: the two give the same terms, the second at a cost independent of
the number of candidates (:func:`_use_gradient` picks the cheaper per layer). An activation
candidate costs an elementwise product. Cross terms between layers are left out (independent
errors add in variance), which makes the whole-model prediction a sum of per-layer terms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError, OptionError
from ..graph import Layer

__all__ = ["EXACT_CLASSES", "SensitivityConfig", "Sensitivities", "projection_rows", "logits_mirror", "mirror_sensitivities"]

EXACT_CLASSES = 16
RANDOM_PROJECTIONS = 2


@dataclass(frozen=True)
class SensitivityConfig:
    """``projections``: rows of ``P`` per example (None: exact up to EXACT_CLASSES classes, else
    :data:`RANDOM_PROJECTIONS` random rows); ``memory_bytes``: bound on the gradients retained for
    one chunk of examples; ``seed``: of the random rows; ``weight_gradients``: measure the weight
    candidates through per-example weight gradients (True), by applying each candidate (False), or
    whichever is cheaper per layer (None: :func:`_use_gradient`'s cost rule)."""

    projections: int | None = None
    memory_bytes: int = 256 << 20
    seed: int = 0
    weight_gradients: bool | None = None

    def __post_init__(self) -> None:
        if self.projections is not None and (isinstance(self.projections, bool) or not isinstance(self.projections, int)
                                             or self.projections < 1):
            raise OptionError(f"projections must be None or a positive int, got {self.projections!r}")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes < 1 << 20:
            raise OptionError(f"memory_bytes must be an int >= 1 MiB, got {self.memory_bytes!r}")
        if self.weight_gradients not in (None, True, False):
            raise OptionError(f"weight_gradients must be None, True or False, got {self.weight_gradients!r}")


@dataclass(frozen=True)
class Sensitivities:
    """Terms per layer (one entry per weight candidate, in the order given) and per tensor (one per
    activation candidate). ``*_adversarial`` are None without adversarial examples."""

    weight_clean: Mapping[str, np.ndarray]
    weight_adversarial: Mapping[str, np.ndarray] | None
    activation_clean: Mapping[str, np.ndarray]
    activation_adversarial: Mapping[str, np.ndarray] | None
    projections: int
    exact: bool
    examples: int


def projection_rows(classes: int, examples: int, config: SensitivityConfig):
    """The rows ``u_k`` of every example as a torch float32 ``(N, K, C)`` tensor (the exact rows are
    the same for every example, a broadcast view), and whether they are exact."""
    import torch

    centre = torch.eye(classes) - 1.0 / classes
    k = config.projections if config.projections is not None else (classes if classes <= EXACT_CLASSES else RANDOM_PROJECTIONS)
    if k >= classes:
        return centre[None].expand(examples, -1, -1), True
    signs = np.random.default_rng(config.seed).choice([-1.0, 1.0], size=(examples, k, classes)).astype(np.float32)
    return torch.from_numpy(signs) @ centre / math.sqrt(k), False


def logits_mirror(pm):
    """The float model's differentiable mirror, on the logits of its classification output (a final
    Softmax/LogSoftmax is left out)."""
    from ..robustness.mirror import build_mirror
    from .guard import logits_view

    return build_mirror(logits_view(pm.model, pm.output_name))


def _linear_part(torch, layer: Layer):
    """``(a, w) -> T_w(a)`` for a batch of layer inputs: the layer without its bias."""
    if layer.op_type in ("Conv", "ConvTranspose"):
        if layer.attrs.get("pads") is None:
            raise ModelError(f"layer {layer.name}: its padding is unknown (auto_pad without an input shape)")
        from ..lipschitz.maps import _conv_map

        return lambda a, w: _conv_map(torch, layer, w)(a)
    if layer.op_type == "Gemm":
        if layer.attrs.get("transA", 0):
            raise ModelError(f"layer {layer.name}: Gemm with transA=1 is not supported by the metric")
        alpha = float(layer.attrs.get("alpha", 1.0))
        if layer.attrs.get("transB", 0):
            return lambda a, w: alpha * (a @ w.T)
        return lambda a, w: alpha * (a @ w)
    if layer.attrs.get("weight_input", 1) == 1:
        return lambda a, w: torch.matmul(a, w)
    return lambda a, w: torch.matmul(w, a)


def _forward(torch, mirror, x, keep: set[str]):
    """Run the mirror on ``x`` keeping the float tensors ``keep`` for gradients. A kept tensor that no
    gradient reaches from the input (the input itself, a constant subgraph) becomes a leaf that
    requires one, so the output is differentiable with respect to every kept tensor."""
    values = {name: getattr(mirror, attr) for name, attr in mirror._buffer_of.items()}
    kept = {}

    def put(name, value):
        if name in keep and isinstance(value, torch.Tensor) and value.is_floating_point():
            if not value.requires_grad:
                value = value.detach().requires_grad_(True)
            kept[name] = value
        values[name] = value

    put(mirror.input_name, x)
    for node, handler, ctx in mirror._nodes:
        outs = handler(ctx, [values[n] if n else None for n in node.input])
        for name, value in zip(node.output, outs):
            if name:
                put(name, value)
    return values[mirror.output_name], kept


def _use_gradient(forced: bool | None, candidates: int, projections: int, layer: Layer, g) -> bool:
    """Whether per-example weight gradients are cheaper than applying every candidate. A weight
    gradient costs about one application plus a pass over the weight per output position group:
    with ``P`` output positions per channel (the contraction length of the gradient), gradients win
    when ``K (P + 1024) < S P``, i.e. for large feature maps and many candidates (measured on 2 cores:
    2-3x faster at 56x56, slower at 14x14 and below, where the weight is large and ``P`` small)."""
    if forced is not None:
        return forced
    per_example = g[0, 0]
    channels = per_example.shape[0] if layer.op_type in ("Conv", "ConvTranspose") else per_example.shape[-1]
    positions = per_example.numel() // max(1, channels)
    return projections * (positions + 1024) < candidates * positions


def _conv_weight_gradient(torch, layer: Layer):
    """For a Conv: ``(a, g) -> dW`` of ``sum g . conv_W(a)`` for one example (batch of 1) without the
    forward pass autograd would run first (None for other layers)."""
    if layer.op_type != "Conv":
        return None
    from ..lipschitz.maps import _conv_geometry

    F = torch.nn.functional
    nd, begin, end, strides, dil, _, kw = _conv_geometry(layer)
    flat = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]
    shape = tuple(layer.weight_shape)

    def weight_gradient(a, g, w):
        if begin != end:
            a, padding = F.pad(a, flat), [0] * nd
        else:
            padding = list(begin)
        return torch.ops.aten.convolution_backward(g, a, w, None, list(strides), padding, list(dil), False, [0] * nd,
                                                   kw["groups"], [False, True, False])[1].reshape(shape)

    return weight_gradient


def _by_weight_gradient(torch, fn, a, g, dw, memory_bytes: int, direct=None):
    """``(S, K, B)``: ``<dW_s, G_kb>`` with ``G_kb`` the weight gradient of ``g_kb . T_W(a_b)`` for
    every example ``b`` and projection ``k`` (equal to ``g_kb . T[dW_s](a_b)``: ``T`` is linear in
    ``W``), in groups of examples whose gradients fit ``memory_bytes``; ``direct``: the layer's
    :func:`_conv_weight_gradient`, if it has one (else autograd through ``fn``)."""
    from torch.func import grad, vmap

    w = torch.zeros_like(dw[0])

    def response(w, a1, g1):
        return (fn(a1[None], w)[0] * g1).sum()

    if direct is not None:
        one = lambda w, a1, g1: direct(a1[None], g1[None], w)  # noqa: E731
    else:
        one = grad(response)
    per_example = vmap(vmap(one, in_dims=(None, 0, 0)), in_dims=(None, None, 0))  # (K, B, *W)
    flat = dw.reshape(dw.shape[0], -1)
    step = max(1, memory_bytes // max(1, 4 * g.shape[0] * flat.shape[1]))
    parts = []
    for i in range(0, a.shape[0], step):
        gw = per_example(w, a[i:i + step], g[:, i:i + step])
        parts.append(torch.einsum("sw,kbw->skb", flat, gw.flatten(2)))
    return torch.cat(parts, dim=2)


def _chunk_size(mirror, keep_sizes: int, k: int, n: int, memory_bytes: int) -> int:
    if mirror.fixed_batch:
        return int(mirror.fixed_batch)
    per_example = max(1, 4 * k * keep_sizes)
    return int(max(1, min(n, memory_bytes // per_example)))


def mirror_sensitivities(
    mirror,
    layers: Sequence[Layer],
    weight_deltas: Mapping[str, np.ndarray],
    act_params: Mapping[str, np.ndarray],
    clean: np.ndarray,
    adversarial: np.ndarray | None = None,
    config: SensitivityConfig = SensitivityConfig(),
    *,
    sizes: Mapping[str, int] | None = None,
    progress: bool = False,
) -> Sensitivities:
    """The terms of every candidate, through ``mirror`` (the float model's, e.g. :func:`logits_mirror`).

    ``weight_deltas[layer]``: ``(S, *weight_shape)`` float32, ``Q_s(W) - W`` per weight candidate;
    ``act_params[tensor]``: ``(S, 4)`` float64 rows ``(scale, zero_point, qmin, qmax)`` per activation
    candidate; ``clean`` and (paired, same order) ``adversarial`` calibration inputs; ``sizes``:
    elements per example of the kept tensors, to size the chunks (else one chunk per 32 examples).
    """
    import torch
    from tqdm.auto import tqdm

    fns = {layer.name: _linear_part(torch, layer) for layer in layers}
    direct = {layer.name: _conv_weight_gradient(torch, layer) for layer in layers}
    deltas = {name: torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)) for name, d in weight_deltas.items()}
    params = {t: torch.from_numpy(np.asarray(p, dtype=np.float32)) for t, p in act_params.items()}
    keep = set(params) | {layer.output for layer in layers} | {layer.input for layer in layers}
    n = len(clean)
    if adversarial is not None and len(adversarial) != n:
        raise ValueError(f"{len(adversarial)} adversarial examples for {n} clean ones: they must be paired")
    with torch.no_grad():
        probe, _ = _forward(torch, mirror, torch.from_numpy(np.ascontiguousarray(clean[:1])), set())
    rows, exact = projection_rows(int(probe.reshape(probe.shape[0], -1).shape[1]), n, config)
    k = rows.shape[1]
    chunk = _chunk_size(mirror, sum(sizes.get(t, 0) for t in keep) if sizes else 0, k, n, config.memory_bytes)
    if not sizes and not mirror.fixed_batch:
        chunk = min(chunk, 32)

    def project(x: np.ndarray, u):
        xt = torch.from_numpy(np.ascontiguousarray(x))
        out, kept = _forward(torch, mirror, xt, keep)
        out = out.reshape(out.shape[0], -1)
        names = list(kept)
        grads = torch.autograd.grad(out, [kept[t] for t in names], grad_outputs=u.transpose(0, 1).contiguous(),
                                    is_grads_batched=True, allow_unused=True)
        g = {t: (gr if gr is not None else torch.zeros((k, *kept[t].shape))) for t, gr in zip(names, grads)}
        acts = {t: v.detach() for t, v in kept.items()}
        pw, pa = {}, {}
        with torch.no_grad():
            for layer in layers:
                a, dw = acts[layer.input], deltas[layer.name]
                if dw.shape[0] == 0:  # only float settings: nothing to measure
                    pw[layer.name] = torch.zeros((0, k, a.shape[0]))
                elif _use_gradient(config.weight_gradients, dw.shape[0], k, layer, g[layer.output]):
                    pw[layer.name] = _by_weight_gradient(torch, fns[layer.name], a, g[layer.output], dw, config.memory_bytes,
                                                         direct[layer.name])
                else:
                    d = torch.stack([fns[layer.name](a, dw[s]) for s in range(dw.shape[0])])  # (S, B, ...)
                    pw[layer.name] = torch.einsum("sbn,kbn->skb", d.flatten(2), g[layer.output].flatten(2))
            for t, q in params.items():
                v, gt = acts[t], g[t].flatten(2)
                terms = []
                for scale, zp, lo, hi in q.tolist():  # in place, one candidate at a time: ~3x faster than broadcasting
                    e = torch.div(v, scale).round_().add_(zp).clamp_(lo, hi).sub_(zp).mul_(scale).sub_(v)
                    terms.append(torch.einsum("bn,kbn->kb", e.flatten(1), gt))
                pa[t] = torch.stack(terms) if terms else torch.zeros((0, k, v.shape[0]))
        return pw, pa

    sums: dict[tuple[str, bool, str], torch.Tensor] = {}

    def add(key, value):
        sums[key] = sums[key] + value if key in sums else value

    bar = tqdm(total=n * (1 if adversarial is None else 2), desc="sensitivities", unit="ex", disable=not progress, leave=False)
    for start in range(0, n, chunk):
        u = rows[start:start + chunk]
        pc = project(clean[start:start + chunk], u)
        pv = project(adversarial[start:start + chunk], u) if adversarial is not None else None
        for kind, (terms_c, terms_v) in enumerate(zip(pc, pv if pv is not None else (None, None))):
            for key, p in terms_c.items():
                add(("clean", bool(kind), key), (p * p).sum((1, 2)))
                if terms_v is not None:
                    diff = terms_v[key] - p
                    add(("adversarial", bool(kind), key), (diff * diff).sum((1, 2)))
        bar.update(min(chunk, n - start) * (1 if adversarial is None else 2))
    bar.close()

    def table(kind: str, activation: bool):
        return {key: (v / n).double().numpy() for (k, act, key), v in sums.items() if k == kind and act == activation}

    return Sensitivities(
        weight_clean=table("clean", False),
        weight_adversarial=table("adversarial", False) if adversarial is not None else None,
        activation_clean=table("clean", True),
        activation_adversarial=table("adversarial", True) if adversarial is not None else None,
        projections=int(k),
        exact=exact,
        examples=n,
    )
