"""`laqonnx demo` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="(not available yet)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    print("laqonnx demo is not available in this build yet")
    return 1
