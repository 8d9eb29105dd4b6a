"""The ``laqonnx`` command: a thin dispatcher over one module per sub-command.

Each module in :mod:`laqonnx.commands` exposes ``add_parser(subparsers)`` (registering its
sub-parser and ``set_defaults(run=...)``) and keeps heavy imports inside its ``run`` function, so
``laqonnx --help`` is instant and a deployment install without torch still works.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import LaqonnxError

__all__ = ["main", "build_parser"]

COMMANDS: tuple[str, ...] = ("analyze", "quantize", "evaluate", "demo", "deploy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laqonnx",
        description=(
            "Adversarial-aware int8 quantization of ONNX classifiers, with robustness measured on "
            "the quantized model itself."
        ),
        epilog="Run 'laqonnx COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"laqonnx {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"laqonnx.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LaqonnxError as exc:
        if args.debug:
            raise
        print(f"laqonnx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"laqonnx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in laqonnx: still one line unless --debug
        if args.debug:
            raise
        print(
            f"laqonnx {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
