"""``laqonnx.evaluate``: clean and robust accuracy of ONNX models, scored on onnxruntime.

For each model: clean accuracy on onnxruntime; the mirror's top-1 agreement with onnxruntime on
clean and on adversarial inputs (white-box results are flagged unreliable below 99 %); every
attack of the preset (see :mod:`.attacks`) with each candidate scored on onnxruntime; the
per-example worst case; the gradient-masking verdict; optionally latency, model size and a cheap
robust-accuracy-versus-eps sweep (PGD on the mirror + transfer) for the report's plot.

Models made by others are taken as they are: inputs in their own range (``input_range``, in whose
units eps is), their own layout (NHWC models get NHWC data), a fixed batch size (run chunk by
chunk), integer inputs (token ids: no Lp attack applies), several outputs (``output``). A model
onnxruntime cannot load or run is reported as failed and the others are still evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..errors import DataError, LaqonnxError, LaqonnxWarning, ModelError, OptionError, OutputError
from ..graph.passes import one_line
from ..vocab import AttackPreset
from .attacks import ATTACKS, PRESETS, AttackContext, AttackResult, NotApplicable, Preset, Threat
from .attacks import gradient_masking, run_attack, worst_case
from .distributed import LOCAL, Engine, start_engine
from .evaldata import RunOptions, channels_first, load_eval_data, model_size, warn_large_eps
from .evalreport import RELIABLE_AGREEMENT, EvaluationReport, FailedModel, ModelEvaluation, format_table
from .ort_estimator import OrtModel, load_model

__all__ = ["evaluate", "EvaluationReport", "ModelEvaluation", "FailedModel", "RELIABLE_AGREEMENT",
           "SWEEP_MULTIPLES", "format_table", "integer_input_reason"]

SWEEP_MULTIPLES: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5)


def integer_input_reason(dtype: Any) -> str:
    """Why no attack runs on a model whose input has the integer ``dtype``."""
    return f"Lp attacks need a continuous input; this model's input is {np.dtype(dtype).name}"


def _name(model: Any, i: int) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or f"model{i}"
    return os.fspath(model)


class _Bar:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="batch")

    def tick(self, n: int) -> None:
        self.bar.update(n)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_mirror(model: onnx.ModelProto) -> tuple[Any | None, str | None]:
    """The model's torch mirror, or None and why there is none."""
    from .mirror import build_mirror

    try:
        return build_mirror(model), None
    except ModelError as exc:
        return None, str(exc)


def _mirror_labels(mirror: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Top-1 of the mirror on ``x`` (any input dtype: integer inputs reach Gather as they are)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[i:i + batch_size])
            out.append(mirror(torch.from_numpy(chunk)).reshape(len(chunk), -1).argmax(dim=1).numpy())
    return np.concatenate(out)


@dataclass(frozen=True)
class _Reference:
    """The float model transfer attacks are crafted on."""

    name: str
    path: Path | None
    ort: OrtModel
    mirror: Any | None
    mirror_error: str | None

    def classifier(self, shape: tuple[int, ...], threat: Threat) -> tuple[Any | None, str | None]:
        """ART over the reference's mirror for inputs of ``shape``, or None and why not."""
        from .mirror import mirror_classifier

        if self.mirror is None:
            return None, f"no mirror of the reference: {self.mirror_error}"
        try:
            shape = self.ort.sample_shape(shape)
        except DataError:
            return None, f"the reference takes inputs {self.ort.declared_shape}, the model {shape}"
        classes = self.ort.predict(np.zeros((1, *shape), self.ort.input_dtype)).shape[1]
        return mirror_classifier(self.mirror, shape, classes, clip_values=threat.input_range,
                                 channels_first=channels_first(shape)), None


def _load_reference(reference: Any, output: str | None, threads: int | None) -> _Reference:
    proto = load_model(reference)
    names = {o.name for o in proto.graph.output}
    ort = OrtModel(proto, threads=threads or 1, output=output if output in names else None)
    mirror, why = _build_mirror(ort.model)
    path = None if isinstance(reference, onnx.ModelProto) else Path(reference).resolve()
    return _Reference(_name(reference, 0), path, ort, mirror, why)


def _sweep(ctx: AttackContext, x: np.ndarray, y: np.ndarray, correct: np.ndarray,
           with_transfer: bool) -> tuple[dict[str, float], ...]:
    p = dataclasses.replace(ctx.preset, pgd_steps=min(ctx.preset.pgd_steps, 20), pgd_restarts=1)
    points = []
    for mult in SWEEP_MULTIPLES:
        sub = dataclasses.replace(ctx, threat=dataclasses.replace(ctx.threat, eps=ctx.threat.eps * mult), preset=p)
        results = [r for name in ("pgd", "transfer") if name != "transfer" or with_transfer
                   for r in [run_attack(name, sub, x, y, correct)] if isinstance(r, AttackResult)]
        points.append({"eps": sub.threat.eps, "robust_accuracy": float(worst_case(correct, results).mean())})
    return tuple(points)


@dataclass(frozen=True)
class _Job:
    """What every model of one :func:`evaluate` call is evaluated with."""

    data: Any
    limit: int | None
    attacks: tuple[str, ...]
    threat: Threat
    preset: Preset
    output: str | None
    reference: _Reference | None
    opts: RunOptions
    runner: Any = None  # distributed.start_engine's: where the attacks run


def _evaluate_one(model: Any, name: str, job: _Job, index: int = 0) -> ModelEvaluation:
    from .mirror import mirror_classifier
    from .ort_estimator import ort_classifier

    opts, threat = job.opts, job.threat
    proto = load_model(model)
    ort = OrtModel(proto, threads=opts.threads or 1, output=job.output)
    x, y = load_eval_data(job.data, ort, limit=job.limit, input_range=threat.input_range)
    shape = ort.sample_shape(tuple(x.shape[1:]))
    logits = ort.predict(x, opts.batch_size)
    classes, pred = logits.shape[1], logits.argmax(axis=1)
    if y.max() >= classes or y.min() < 0:
        raise DataError(f"labels range over [{y.min()}, {y.max()}] but {name} has {classes} outputs")
    correct = pred == y
    mirror, mirror_error = _build_mirror(ort.model)
    agree_clean = None
    if mirror is not None:
        try:
            agree_clean = float((_mirror_labels(mirror, x, opts.batch_size) == pred).mean())
        except RuntimeError as exc:  # torch could not evaluate the graph (shapes it does not support)
            mirror, mirror_error = None, f"the mirror failed on this model: {str(exc).splitlines()[0]}"
    results: list[AttackResult] = []
    skipped: dict[str, str] = {}
    sweep = None
    if ort.integer_input:
        skipped = {a: integer_input_reason(ort.input_dtype) for a in job.attacks}
    else:
        first = channels_first(shape)
        mirror_art = None if mirror is None else mirror_classifier(mirror, shape, classes, clip_values=threat.input_range,
                                                                    channels_first=first)
        ref_art, ref_reason = None, None
        if job.reference is not None and "transfer" in job.attacks:
            same = not isinstance(model, onnx.ModelProto) and Path(model).resolve() == job.reference.path
            ref_art, ref_reason = ((None, "the model is the float reference itself") if same
                                   else job.reference.classifier(shape, threat))
        ctx = AttackContext(threat=threat, preset=job.preset, ort=ort,
                            ort_art=ort_classifier(ort, shape, classes, clip_values=threat.input_range, channels_first=first),
                            mirror_art=mirror_art, reference_art=ref_art, nb_classes=classes, input_shape=shape,
                            batch_size=opts.batch_size, seed=opts.seed, channels_first=first, model_index=index)
        chunks = -(-int(correct.sum()) // opts.batch_size)
        bar = _Bar(sum(ATTACKS[a].rounds(job.preset) for a in job.attacks) * chunks, name, opts.progress)
        ctx.tick = bar.tick
        outcome = job.runner.prepare(ctx, job.attacks, x, y, correct)
        for attack in job.attacks:
            bar.bar.set_description(f"{Path(name).name}: {attack}")
            if attack == "transfer" and ref_reason:
                skipped[attack] = ref_reason
                continue
            if ATTACKS[attack].kind == "white-box" and mirror_error:
                skipped[attack] = f"no mirror: {mirror_error}"
                continue
            out = outcome(attack)
            if isinstance(out, NotApplicable):
                skipped[attack] = out.reason
            else:
                results.append(out)
        bar.bar.close()
        with_transfer = ref_art is not None
        if opts.sweep and (mirror_art is not None or with_transfer):  # else no attack to sweep with
            sweep = _sweep(ctx, x, y, correct, with_transfer=with_transfer)
    total = sum(r.mirror_total for r in results)
    robust: dict[str, float | None] = {r.name: r.robust_accuracy for r in results}
    # no attack ran on an integer input: robust accuracy is not measured (None), never claimed to equal clean
    robust["worst_case"] = None if ort.integer_input else float(worst_case(correct, results).mean())
    latency = None
    if opts.latency:
        from ..latency import measure_latency

        latency = measure_latency(proto, batch_sizes=(ort.fixed_batch or 1,), input_shape=shape,
                                  threads=opts.threads).to_json()
    return ModelEvaluation(
        path=name, n_examples=len(x), clean_accuracy=float(correct.mean()), robust_accuracy=robust, skipped=skipped,
        attack_seconds={r.name: r.seconds for r in results}, mirror_agreement_clean=agree_clean,
        mirror_agreement_adversarial=sum(r.mirror_agree for r in results) / total if total else None,
        masking=gradient_masking(results), size_bytes=model_size(model, proto), latency_ms=latency,
        robust_vs_eps=sweep, softmax_stripped=ort.softmax_stripped, mirror_error=mirror_error,
        output_name=ort.output_name, input_shape=shape, input_dtype=ort.input_dtype.name,
    )


def evaluate(
    models: Any,
    data: Any,
    eps: float,
    *,
    norm: str = "inf",
    preset: str = "quick",
    attacks: Sequence[str] | None = None,
    reference: Any = None,
    limit: int | None = None,
    batch_size: int = 128,
    latency: bool = True,
    sweep: bool | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    analyses: Mapping[str, dict] | None = None,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
    input_range: tuple[float, float] = (0.0, 1.0),
    output: str | None = None,
    engine: Engine = LOCAL,
) -> EvaluationReport:
    """Attack each model (path or ``onnx.ModelProto``, or a list of them) and score it on onnxruntime.

    ``data`` is a data spec (see :func:`laqonnx.data.open_data`, test split), a ``DataSource`` or an
    ``(x, y)`` tuple, in each model's own units and layout: ``input_range`` ``(lo, hi)`` (default
    ``(0, 1)``) is the models' valid input range; arrays outside it are refused (:class:`DataError`
    naming it), pixel sources (digits, mnist, images, CIFAR) are mapped onto it, an ``(H, W, C)``
    model gets channels-last images. ``eps`` is in the units of ``input_range`` (8/255 in [0, 1] is
    16/255 in [-1, 1]); every candidate is clipped to it. An L-inf eps of at least half the range's
    width warns (:class:`LaqonnxWarning`). ``output`` names the classifier output of multi-output
    models (default: the first; an unknown name is a :class:`ModelError` listing the outputs).

    A model with a fixed batch size runs chunk by chunk at that size (onnxruntime, mirror, latency).
    A model with an integer input (token ids) gets its clean accuracy, mirror agreement and
    latency; every attack is skipped with :func:`integer_input_reason` (Lp balls need a
    continuous input) and ``robust_accuracy["worst_case"]`` is None: not measured, rather than
    claimed equal to the clean accuracy. A model that cannot be evaluated (onnxruntime cannot load
    or run it, the data do not fit it) is listed in ``report.failed`` with its one-line reason and
    a warning, and the others are evaluated; if none can be, its error (or, for several models, one
    naming each) is raised.

    ``attacks`` restricts the preset's attacks (names in
    :data:`~laqonnx.robustness.attacks.ATTACK_NAMES`, run with the preset's budgets). ``reference``
    is the float model used for transfer attacks. ``sweep`` (default: on iff ``report_dir``)
    adds robust accuracy at 0, 0.25, 0.5, 1 and 1.5 x eps. ``report_dir`` writes the Markdown +
    PNG report through :func:`laqonnx.report.write_report`, with ``analyses`` (default: computed
    by :func:`laqonnx.lipschitz.analyze.analyze` for each model); the folder is checked before any
    attack, and if writing it fails anyway the :class:`OutputError` raised carries the finished
    report as its ``report`` attribute. Seeds numpy's and torch's global RNGs.

    ``threads`` is the number of onnxruntime and torch threads used by the attacks (default 1:
    attacks run small batches where per-op overhead dominates, and multi-threaded torch was
    measured 10-50x slower on a loaded 2-core machine); the latency measurement uses ``threads``
    if given, else :func:`laqonnx.latency.measure_latency`'s default (physical cores).

    ``engine`` is where the attacks run: :class:`~laqonnx.robustness.distributed.Local` (this process)
    or :class:`~laqonnx.robustness.distributed.Ray` (a Ray cluster; same results for the same seed).
    """
    preset = AttackPreset.check(preset, "preset")
    threat = Threat(float(eps), str(norm), tuple(input_range))  # type: ignore[arg-type]
    chosen = PRESETS[preset]
    names = tuple(attacks) if attacks is not None else chosen.attacks
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise OptionError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise OptionError("batch_size and limit must be >= 1")
    model_list = list(models) if isinstance(models, (list, tuple)) else [models]
    if not model_list:
        raise OptionError("give at least one model")
    if threads is not None and threads < 1:
        raise OptionError(f"threads must be >= 1, not {threads}")
    if report_dir is not None:
        from .._util.io import check_output_dir

        check_output_dir(report_dir)  # before any attack: an unwritable report folder loses nothing
    warn_large_eps(threat)
    opts = RunOptions(threads=threads, batch_size=batch_size, seed=seed, progress=progress, latency=latency,
                      sweep=bool(report_dir) if sweep is None else sweep)
    evaluations: list[ModelEvaluation] = []
    failed: list[tuple[Any, FailedModel, LaqonnxError]] = []
    with _torch_threads(threads or 1), start_engine(engine, model_list, reference if "transfer" in names else None,
                                                     output, threads) as runner:
        ref = _load_reference(reference, output, threads) if reference is not None and "transfer" in names else None
        job = _Job(data, limit, names, threat, chosen, output, ref, opts, runner)
        for i, model in enumerate(model_list):
            name = _name(model, i)
            try:
                evaluations.append(_evaluate_one(model, name, job, i))
            except LaqonnxError as exc:
                failed.append((model, FailedModel(name, one_line(exc, 500)), exc))
    if not evaluations:
        errors = [e for _, _, e in failed]
        if len(errors) == 1:
            raise errors[0]
        kind = type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) else ModelError
        raise kind("no model could be evaluated: " + "; ".join(f"{Path(f.path).name}: {f.error}" for _, f, _ in failed))
    for _, f, _ in failed:
        warnings.warn(f"{f.path} was not evaluated: {f.error}", LaqonnxWarning, stacklevel=2)
    report = EvaluationReport(eps=threat.eps, norm=threat.norm, preset=preset, attacks=names,
                              models=tuple(evaluations), reference=None if ref is None else ref.name, seed=seed,
                              input_range=threat.input_range, failed=tuple(f for _, f, _ in failed),
                              engine=runner.info)
    if report_dir is not None:
        from ..report import write_report

        if analyses is None:
            bad = {id(m) for m, _, _ in failed}
            analyses = _analyses([m for m in model_list if id(m) not in bad], evaluations)
        try:
            write_report(report.to_json(), report_dir, analyses=analyses)
        except OutputError as exc:  # the results are kept: the CLI still prints them and writes --json
            exc.report = report  # type: ignore[attr-defined]
            raise
    return report


def _analyses(models: list[Any], evaluations: list[ModelEvaluation]) -> dict[str, dict]:
    """Per-layer Lipschitz analyses for the report's plot; a model the analysis rejects is left out."""
    from ..lipschitz.analyze import analyze

    out: dict[str, dict] = {}
    for model, ev in zip(models, evaluations):
        try:
            out[ev.path] = analyze(model, (1, *(ev.input_shape or ())), progress=False).to_json()
        except LaqonnxError as exc:
            warnings.warn(f"no Lipschitz analysis of {ev.path} in the report: {exc}", LaqonnxWarning, stacklevel=3)
    return out
