"""The Ray worker actor of :mod:`.distributed`: every model's session and mirror built once, shards run on them.

Kept free of a module-level ``import ray`` (the class is made an actor by the driver with
``ray.remote(Worker)``); the workers import laqonnx, so every node of a cluster needs it installed
with the same versions of onnxruntime, torch and ART as the driver for identical results.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LaqonnxError
from .attacks import AttackContext, Preset, Threat, attack_batch

__all__ = ["Worker", "ShardSpec", "FAULT_FILE_ENV"]

#: Test hook: when this environment variable (in the workers' environment) names an existing file, the
#: first Ray worker to take a shard it matches removes the file and dies (``os._exit``), so the retry
#: path can be exercised. The file holds ``attack/batch`` (e.g. ``pgd/2``), or nothing: any shard.
FAULT_FILE_ENV = "LAQONNX_RAY_FAULT_FILE"


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to rebuild one model's :class:`AttackContext` (hashable: its cache key)."""

    model_index: int
    threat: Threat
    preset: Preset
    input_shape: tuple[int, ...]
    nb_classes: int
    batch_size: int
    seed: int
    channels_first: bool
    mirror: bool  # the driver has a working mirror (else white-box attacks are not sent)
    reference: bool  # transfer attacks use the float reference


class Worker:
    """A Ray actor: sessions and mirrors of every model of the call, built once."""

    def __init__(self, payload: list[Any], output: str | None) -> None:
        import onnx
        import ray
        import torch

        # the models' bytes come as a nested ObjectRef (fetched here, kept alive by the driver for restarts)
        models, reference = ray.get(payload[0])

        from .evaluate import _build_mirror, _load_reference
        from .ort_estimator import OrtModel

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, int(round(cpus)))
        torch.set_num_threads(self.threads)
        self.models: dict[int, tuple[Any, Any] | LaqonnxError] = {}
        for i, blob in enumerate(models):
            if blob is None:
                continue
            try:
                ort = OrtModel(onnx.load_from_string(blob), threads=self.threads, output=output)
                self.models[i] = (ort, _build_mirror(ort.model)[0])
            except LaqonnxError as exc:  # the driver fails this model on its own; keep the reason
                self.models[i] = exc
        self.reference = (None if reference is None
                          else _load_reference(onnx.load_from_string(reference), output, self.threads))
        self._contexts: dict[ShardSpec, AttackContext] = {}

    def _context(self, spec: ShardSpec) -> AttackContext:
        from .mirror import mirror_classifier
        from .ort_estimator import ort_classifier

        if spec in self._contexts:
            return self._contexts[spec]
        built = self.models.get(spec.model_index)
        if isinstance(built, LaqonnxError) or built is None:
            raise built or LaqonnxError(f"model {spec.model_index} was not sent to the worker")
        ort, mirror = built
        t, shape, classes = spec.threat, spec.input_shape, spec.nb_classes
        mirror_art = (mirror_classifier(mirror, shape, classes, clip_values=t.input_range,
                                        channels_first=spec.channels_first)
                      if spec.mirror and mirror is not None else None)
        ref_art = (self.reference.classifier(shape, t)[0]
                   if spec.reference and self.reference is not None else None)
        ctx = AttackContext(threat=t, preset=spec.preset, ort=ort,
                            ort_art=ort_classifier(ort, shape, classes, clip_values=t.input_range,
                                                   channels_first=spec.channels_first),
                            mirror_art=mirror_art, reference_art=ref_art, nb_classes=classes, input_shape=shape,
                            batch_size=spec.batch_size, seed=spec.seed, channels_first=spec.channels_first,
                            model_index=spec.model_index)
        self._contexts[spec] = ctx
        return ctx

    def run(self, spec: ShardSpec, attack: str, batch: int, xs: np.ndarray, ys: np.ndarray) -> tuple:
        self._maybe_die(attack, batch)
        ctx = dataclasses.replace(self._context(spec), shard=(attack, batch))
        return spec.model_index, attack, batch, attack_batch(attack, ctx, xs, ys)

    @staticmethod
    def _maybe_die(attack: str, batch: int) -> None:
        fault = os.environ.get(FAULT_FILE_ENV)
        if not fault:
            return
        try:
            with open(fault) as f:
                want = f.read().strip()
            if want and want != f"{attack}/{batch}":
                return
            os.remove(fault)
        except FileNotFoundError:
            return
        os._exit(17)

    def threads_used(self) -> int:
        return self.threads
