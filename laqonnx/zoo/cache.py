"""A cache of trained, exported zoo models so the demo and benchmarks never retrain needlessly.

Models live in ``cache_dir``, else ``$LAQONNX_CACHE``, else ``~/.cache/laqonnx``, as
``<arch>-<adversarial>-<key>.onnx`` plus ``<same name>.json`` holding the config, the metrics and
the versions. The key is a SHA-256 of the full :class:`TrainConfig` and the laqonnx, torch and onnx
versions, so any change to a setting or a dependency trains a fresh model. The JSON is written
after the ONNX file, atomically: a model counts as cached only when both are complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .._util.io import atomic_write_json
from ..errors import OutputError

__all__ = ["ZooModel", "get_model", "get_random_model", "resolve_cache_dir", "config_key", "CACHE_ENV", "CACHE_FORMAT"]

CACHE_ENV = "LAQONNX_CACHE"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ZooModel:
    """A cached ONNX model: its path, the config that trained it, and its metrics (JSON dict)."""

    path: Path
    config: Any  # laqonnx.zoo.train.TrainConfig
    metrics: dict[str, Any]


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder (created if missing): ``cache_dir``, ``$LAQONNX_CACHE`` or ``~/.cache/laqonnx``."""
    folder = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "laqonnx").expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the model cache folder {folder}: {exc.strerror or exc}") from exc
    return folder


def _versions() -> dict[str, str]:
    from .. import __version__

    out = {"laqonnx": __version__, "format": str(CACHE_FORMAT)}
    for dist in ("torch", "onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def config_key(config: Any) -> str:
    """SHA-256 (hex) of the full config plus the versions that shape the trained weights."""
    fields = dataclasses.asdict(config)
    for name, default in (("dataset", "digits"), ("eps_warmup", 0.0)):  # defaults: keys (and caches) stay as before
        if fields.get(name) == default:
            del fields[name]
    payload = {"config": fields, "versions": _versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_entry(meta_path: Path, key: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    return entry


def get_model(
    arch: str = "cnn",
    adversarial: str = "none",
    *,
    seed: int = 0,
    image_size: int | None = None,
    quick: bool = False,
    dataset: str = "digits",
    eps: float | None = None,
    config: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ZooModel:
    """Return the cached ONNX model for ``arch`` x ``adversarial``, training and exporting it first
    if needed.

    ``config`` (a :class:`laqonnx.zoo.train.TrainConfig`) overrides the defaults chosen by
    :func:`laqonnx.zoo.train.default_config` from ``arch``, ``adversarial``, ``seed``,
    ``image_size`` and ``quick``.
    """
    from . import export as _export
    from . import train as _train

    if config is None:
        config = _train.default_config(arch, adversarial, quick=quick, seed=seed, image_size=image_size, dataset=dataset, eps=eps)
    key = config_key(config)
    folder = resolve_cache_dir(cache_dir)
    stem = f"{config.arch}-{config.adversarial}-{'' if config.dataset == 'digits' else config.dataset + '-'}{key[:16]}"
    onnx_path, meta_path = folder / f"{stem}.onnx", folder / f"{stem}.json"
    entry = _read_entry(meta_path, key)
    if entry is not None and onnx_path.is_file():
        return ZooModel(onnx_path, config, entry["metrics"])
    trained = _train.train(config, progress=progress)
    _export.export_onnx(trained.module, onnx_path, (config.channels, config.image_size, config.image_size))
    metrics = trained.metrics.to_dict()
    atomic_write_json(
        meta_path,
        {"key": key, "onnx": onnx_path.name, "config": dataclasses.asdict(config), "metrics": metrics, "versions": _versions()},
    )
    return ZooModel(onnx_path, config, metrics)


def get_random_model(
    arch: str = "resnet18",
    *,
    num_classes: int = 1000,
    image_size: int = 224,
    channels: int = 3,
    width: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Export (once) an untrained ``arch`` with seeded random weights, for latency and
    quantize-time benchmarks (default: ResNet-18 at 3x224x224, 1000 classes)."""
    from ..errors import require
    from . import export as _export
    from .models import build_model

    torch = require("torch", "robustness")
    spec = {"arch": arch, "num_classes": num_classes, "image_size": image_size, "channels": channels, "width": width, "seed": seed, "versions": _versions()}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    path = resolve_cache_dir(cache_dir) / f"{arch}-random-{key[:16]}.onnx"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    module = build_model(arch, in_channels=channels, num_classes=num_classes, width=width, image_size=image_size)
    _export.export_onnx(module, path, (channels, image_size, image_size))
    return path
