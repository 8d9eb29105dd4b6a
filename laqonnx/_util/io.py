"""Safe output writing: atomic replace, never the input file, clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import OutputError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_model", "check_output_path",
           "check_output_dir"]


def check_output_path(output: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> Path:
    """Validate an output path: its folder exists and is writable, and it is none of ``inputs``."""
    out = Path(output)
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(inp)
        if ip.exists() and out.exists() and os.path.samefile(ip, out):
            raise OutputError(f"refusing to overwrite the input {ip}: choose another output path")
        if out.resolve() == ip.resolve():
            raise OutputError(f"refusing to overwrite the input {ip}: choose another output path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
        what = ("does not exist" if blocker is None else "is a file, not a folder" if blocker == parent
                else f"cannot exist: {blocker} is a file")
        raise OutputError(f"cannot write {out}: folder {parent} {what}")
    if out.is_dir():
        raise OutputError(f"cannot write {out}: it is a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {out}: folder {parent} is not writable")
    _probe(out, parent)
    return out


def check_output_dir(folder: str | os.PathLike[str]) -> Path:
    """Validate an output folder before any work: it is a writable folder, or it can be made (its
    nearest existing ancestor is a writable folder). Nothing is created."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write to the folder {out}: it is a file")
    existing = next(p for p in (out, *out.parents) if p.exists())  # the root or "." at the latest
    if not existing.is_dir():
        raise OutputError(f"cannot make the folder {out}: {existing} is a file")
    try:
        _probe(existing / "probe", existing)
    except OutputError:
        verb = "write to" if existing == out else "make"
        raise OutputError(f"cannot {verb} the folder {out}: {existing} is not writable") from None
    return out


def _probe(out: Path, parent: Path) -> None:
    """Create and remove a temporary file beside ``out``: ``os.access`` says yes for root, and for
    folders such as /proc whose files cannot be created; this finds out before any work is done."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: folder {parent} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:  # pragma: no cover - a folder that lets one create but not delete
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    out = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_model(model: Any, path: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> Path:
    """Serialize an ``onnx.ModelProto`` atomically; refuses to overwrite any of ``inputs``.

    Models over 2 GB are not supported by a single protobuf; they raise :class:`OutputError`.
    """
    out = check_output_path(path, *inputs)
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses > 2 GB
        raise OutputError(f"cannot serialize the model for {out}: {exc}") from exc
    return atomic_write_bytes(out, data)
