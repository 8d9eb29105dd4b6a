"""Where :func:`laqonnx.evaluate` runs its attacks: in this process (:class:`Local`) or on Ray (:class:`Ray`).

Work is sharded by (model, attack, example batch) (see :mod:`.shards`): every shard is seeded from
what it is, so a Ray run gives the same per-example outcomes, and the same JSON figures, as a local
run with the same seed. On Ray, each worker is an actor holding ``threads`` CPUs (default 1, as a
local run) that builds, once in its constructor, the onnxruntime session and torch mirror of every
model of the call (and of the float reference) from the models' bytes (sessions cannot be pickled;
the bytes go to the object store once), with onnxruntime and torch threads matched to the CPUs Ray
assigned it. The driver keeps clean accuracy, mirror agreement on clean inputs, the eps sweep and
the latency measurement; it submits every shard of a model at once to the pool of actors and takes
the per-example worst case over the gathered shards exactly as locally. ``attack_seconds`` on Ray
is the sum over shards (compute seconds, not wall time).

Faults: a worker that dies (its process, its node) is replaced by a new actor and its shard re-run
there (each shard up to ``max_retries`` times; shard-level retries rather than Ray's actor restarts,
which cannot restart safely from constructor arguments in the object store); a cluster that cannot be reached, or that loses a worker
beyond its retries, is a :class:`~laqonnx.errors.ClusterError` naming it, raised before anything is
written. Without ray installed, ``Ray(...)`` raises :class:`~laqonnx.errors.DependencyError`
naming the ``laqonnx[distributed]`` extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ClusterError, LaqonnxError, LaqonnxWarning, OptionError, require
from ..graph.passes import one_line
from .attacks import ATTACKS, AttackContext, AttackResult, NotApplicable, Preset
from .attacks import gather, run_attack, shard_batches
from .worker import FAULT_FILE_ENV, ShardSpec, Worker

__all__ = ["Local", "Ray", "Engine", "LOCAL", "engine_from_options", "start_engine", "FAULT_FILE_ENV"]

_EXTRA = "distributed"


@dataclass(frozen=True)
class Local:
    """Run every shard in this process, one after the other (the default)."""

    def to_json(self) -> dict[str, Any]:
        return {"name": "local", "workers": 1}


@dataclass(frozen=True)
class Ray:
    """Run the shards on a Ray cluster.

    ``address`` None starts a local Ray cluster on this machine's CPUs (shut down at the end); else
    it is joined (``"auto"``, ``"host:port"``, ``"ray://host:port"``). A process that already joined
    a cluster (``ray.init``) runs on that one, whatever ``address``, and stays joined. ``workers`` actors (default: as many as the cluster's CPUs hold) of
    ``threads`` CPUs each (the evaluation's ``threads``, default 1). A worker that dies is
    replaced and its shard re-run, up to ``max_retries`` times per shard. Workers not placed within
    ``start_timeout`` seconds (another run holds the CPUs) are given up, with a warning; none placed
    is a :class:`~laqonnx.errors.ClusterError`. ``connect_timeout`` bounds reaching ``address``."""

    address: str | None = None
    workers: int | None = None
    max_retries: int = 3
    connect_timeout: float = 10.0
    start_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or int(self.workers) < 1):
            raise OptionError(f"workers must be >= 1, not {self.workers}")
        if int(self.max_retries) < 0:
            raise OptionError(f"max_retries must be >= 0, not {self.max_retries}")
        if self.address is not None and not str(self.address).strip():
            object.__setattr__(self, "address", None)


Engine = Local | Ray
LOCAL = Local()


def engine_from_options(ray: str | None, workers: int | None) -> Engine:
    """The engine of ``laqonnx evaluate --ray [ADDRESS] --workers N`` (``ray`` None: no --ray; "" : local
    cluster); ray is required up front (one line naming the extra)."""
    if ray is None:
        if workers is not None:
            raise OptionError("--workers needs --ray (the local engine runs in this process)")
        return LOCAL
    if ray and (ray.endswith(".onnx") or os.path.isfile(ray)):
        raise OptionError(f"--ray took {ray!r} as the cluster address; put --ray after the models, or write "
                          "--ray=ADDRESS")
    require("ray", _EXTRA)
    return Ray(address=ray or None, workers=workers)


class _LocalRunner:
    info = {"name": "local", "workers": 1}

    def prepare(self, ctx: AttackContext, attacks: Sequence[str], x: np.ndarray, y: np.ndarray,
                correct: np.ndarray) -> Callable[[str], AttackResult | NotApplicable]:
        return lambda attack: run_attack(attack, ctx, x, y, correct)


@contextlib.contextmanager
def start_engine(engine: Engine, models: Sequence[Any], reference: Any, output: str | None,
                 threads: int | None) -> Iterator[Any]:
    """A runner for ``engine``: ``runner.prepare(ctx, attacks, x, y, correct)`` returns ``get(attack)``
    giving the :class:`AttackResult` (or :class:`NotApplicable`) of each attack on ``ctx``'s model;
    ``runner.info`` is the JSON ``engine`` entry."""
    if isinstance(engine, Local):
        yield _LocalRunner()
        return
    if not isinstance(engine, Ray):
        raise OptionError(f"engine must be laqonnx.robustness.distributed.Local() or Ray(...), not {engine!r}")
    ray = require("ray", _EXTRA)
    started = _connect(ray, engine)
    runner = None
    try:
        runner = _RayRunner(ray, engine, models, reference, output, threads)
        yield runner
    except _WorkerLost as exc:
        raise ClusterError(str(exc)) from None
    finally:
        if runner is not None:
            runner.close()
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float) -> None:
    """A TCP connect to ``host:port`` (``ray.init`` would otherwise wait minutes on a wrong address)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _connect(ray: Any, engine: Ray) -> bool:
    """Join or start the cluster; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    if engine.address is None:
        kwargs.update(include_dashboard=False, num_cpus=os.cpu_count() or 1)
    elif engine.address != "auto":
        _check_reachable(engine.address, engine.connect_timeout)
    try:
        ray.init(address=engine.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = "start a local Ray cluster" if engine.address is None else f"join the Ray cluster at {engine.address}"
        raise ClusterError(f"cannot {where}: {one_line(exc, 300)}") from None
    return True


class _WorkerLost(RuntimeError):
    """A worker died beyond its retries, or the cluster went away (not a LaqonnxError: the run stops)."""


def _serialized(model: Any) -> bytes | None:
    from .ort_estimator import load_model

    try:
        return load_model(model).SerializeToString()
    except LaqonnxError:  # the driver reports this model as failed
        return None


@dataclass
class _Item:
    key: tuple[int, str, int]  # (model index, attack, batch index)
    args: tuple
    tries: int = 0


class _RayRunner:
    """A pool of worker actors fed one shard at a time; a shard whose worker died goes to a new worker."""

    def __init__(self, ray: Any, engine: Ray, models: Sequence[Any], reference: Any, output: str | None,
                 threads: int | None) -> None:
        self.ray, self.max_retries = ray, engine.max_retries
        cpus = threads or 1
        total = int(ray.cluster_resources().get("CPU", 0))
        fit = max(1, total // cpus)
        workers = engine.workers or fit
        if workers > fit:
            warnings.warn(f"the Ray cluster has {total} CPUs: {fit} worker(s) of {cpus} CPU(s) fit, not {workers}; "
                          f"running {fit}", LaqonnxWarning, stacklevel=4)
            workers = fit
        # the models' bytes go to the object store once; the driver keeps the ref alive for replacement workers
        self._payload = ray.put(([_serialized(m) for m in models], None if reference is None else _serialized(reference)))
        actor = ray.remote(Worker).options(num_cpus=cpus, max_restarts=0)
        self._new_actor = lambda: actor.remote([self._payload], output)
        self.actors = [self._new_actor() for _ in range(workers)]
        # the workers up (constructors done) before the first shard: a broken setup fails here, in one line.
        # Those not placed within start_timeout (CPUs taken by another run) are given up, never waited on forever.
        probes = {a.threads_used.remote(): a for a in self.actors}
        ready, pending = ray.wait(list(probes), num_returns=len(probes), timeout=engine.start_timeout)
        try:
            ray.get(ready)
        except ray.exceptions.RayError as exc:
            self.close()
            raise ClusterError(f"the Ray workers could not start: {_reason(exc)}") from None
        if not ready:
            self.close()
            raise ClusterError(f"no Ray worker started within {engine.start_timeout:g} s: the cluster's {total} CPUs "
                               f"are taken ({cpus} needed per worker)")
        if pending:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.kill(probes[ref])
            self.actors = [probes[ref] for ref in ready]
            warnings.warn(f"only {len(ready)} of {workers} Ray workers started within {engine.start_timeout:g} s "
                          "(the cluster's CPUs are taken); running with those", LaqonnxWarning, stacklevel=4)
        workers = len(self.actors)
        self.info = {"name": "ray", "workers": workers}
        self._idle: deque[Any] = deque(self.actors)
        self._queue: deque[_Item] = deque()
        self._inflight: dict[Any, tuple[Any, _Item]] = {}
        self._done: dict[tuple[int, str, int], Any] = {}
        self._tick: Callable[[int], None] = lambda n: None
        self._preset: Preset | None = None
        self.retried = 0  # shards re-run after their worker died

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors = []

    def _replace(self, dead: Any) -> Any:
        with contextlib.suppress(Exception):
            self.ray.kill(dead)
        fresh = self._new_actor()
        self.actors = [fresh if a is dead else a for a in self.actors]
        return fresh

    def _pump(self) -> None:
        while self._idle and self._queue:
            actor, item = self._idle.popleft(), self._queue.popleft()
            self._inflight[actor.run.remote(*item.args)] = (actor, item)

    def _next(self) -> None:
        """Wait for one shard; keep its outcome, or re-queue it on a new worker if its worker died."""
        errors = self.ray.exceptions
        self._pump()
        if not self._inflight:
            raise RuntimeError("no shard in flight")  # a bug: get() waits only for submitted shards
        (ref,), _ = self.ray.wait(list(self._inflight), num_returns=1)
        actor, item = self._inflight.pop(ref)
        try:
            _, attack, _, out = self.ray.get(ref)
        except errors.RayTaskError as exc:  # the shard raised: as it would locally
            self._idle.append(actor)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except errors.RayError as exc:  # the worker died (or its node): a new worker, the shard again
            item.tries += 1
            if item.tries > self.max_retries:
                raise _WorkerLost(f"a Ray worker died {item.tries} times on shard {item.key}: {_reason(exc)}") from None
            self.retried += 1
            self._idle.append(self._replace(actor))
            self._queue.appendleft(item)
            return
        self._idle.append(actor)
        self._done[item.key] = out
        self._tick(ATTACKS[attack].rounds(self._preset))

    def _drain(self) -> None:
        """Forget the shards of a model that failed half-way (wait for those in flight)."""
        self._queue.clear()
        while self._inflight:
            ref, (actor, _) = self._inflight.popitem()
            try:
                self.ray.get(ref)
                self._idle.append(actor)
            except self.ray.exceptions.RayTaskError:
                self._idle.append(actor)
            except self.ray.exceptions.RayError:
                self._idle.append(self._replace(actor))
        self._done.clear()

    def prepare(self, ctx: AttackContext, attacks: Sequence[str], x: np.ndarray, y: np.ndarray,
                correct: np.ndarray) -> Callable[[str], AttackResult | NotApplicable]:
        self._drain()
        self._tick, self._preset = ctx.tick, ctx.preset
        spec = self.ray.put(ShardSpec(ctx.model_index, ctx.threat, ctx.preset, tuple(ctx.input_shape), ctx.nb_classes,
                                  ctx.batch_size, ctx.seed, ctx.channels_first, ctx.mirror_art is not None,
                                  ctx.reference_art is not None))
        batches = shard_batches(ctx, correct)
        sent = [a for a in attacks if ctx.mirror_art is not None or ATTACKS[a].kind != "white-box"]
        for attack in sent:
            for b, sel in enumerate(batches):
                self._queue.append(_Item((ctx.model_index, attack, b), (spec, attack, b, x[sel], y[sel])))
        self._pump()

        def get(attack: str) -> AttackResult | NotApplicable:
            if attack not in sent or not batches:
                return run_attack(attack, ctx, x, y, correct)  # nothing to shard (NotApplicable or no example)
            keys = [(ctx.model_index, attack, b) for b in range(len(batches))]
            while any(k not in self._done for k in keys):
                self._next()
            return gather(attack, correct, batches, [self._done[k] for k in keys])

        return get


def _reason(exc: BaseException) -> str:
    text = one_line(exc, 300)
    return text or type(exc).__name__
