"""User-facing errors.

Every error a user can cause (bad model, bad data, bad plan, unwritable output) is a
:class:`LaqonnxError`. The CLI prints it as one line and exits non-zero; the Python API raises it.
Anything else escaping is a bug in laqonnx. An invalid option value is an :class:`OptionError`,
which is also a ``ValueError``. Notes laqonnx emits with :mod:`warnings` are :class:`LaqonnxWarning`.
"""

from __future__ import annotations

__all__ = [
    "LaqonnxError",
    "ModelError",
    "DataError",
    "PlanError",
    "OutputError",
    "DependencyError",
    "OptionError",
    "ClusterError",
    "LaqonnxWarning",
]


class LaqonnxError(Exception):
    """Base class: a problem with the user's input, printed as one line by the CLI."""


class ModelError(LaqonnxError):
    """The model file is missing, unreadable, invalid, or unsupported."""


class DataError(LaqonnxError):
    """Calibration or evaluation data is missing, malformed, unsafe, or does not fit the model."""


class PlanError(LaqonnxError):
    """A quantization plan is invalid or does not match the model."""


class OutputError(LaqonnxError):
    """An output cannot be written (unwritable path, or it would overwrite the input)."""


class DependencyError(LaqonnxError):
    """An optional dependency (an extra such as ``laqonnx[robustness]``) is not installed."""


class OptionError(LaqonnxError, ValueError):
    """An option or argument has an invalid value (out of range, unknown name, conflicting options)."""


class ClusterError(LaqonnxError):
    """A Ray cluster cannot be reached or started, or lost a worker beyond its retries."""


class LaqonnxWarning(UserWarning):
    """A note laqonnx emits with :func:`warnings.warn` (the CLI prints it as one line)."""


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`DependencyError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise DependencyError(
            f"{module!r} is not installed; install it with: pip install 'laqonnx[{extra}]'"
        ) from exc
