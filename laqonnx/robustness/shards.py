"""Shards of an attack: (model, attack, example batch), each seeded from what it is, never from who runs it.

An attack on one model runs on the model's clean-correct examples cut into batches of
``batch_size`` (in example order). Each batch is a shard: it runs on its own, seeded by
:func:`shard_seed` from (seed, model index, attack name, batch index, restart) through a stable
hash (SHA-256, not Python's salted ``hash``), and returns a :class:`BatchOutcome`. The same shard
gives the same candidates in this process or in a Ray worker (:mod:`.distributed`), so the
per-example worst case gathered from shards is the same whichever engine ran them, in any order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = ["shard_seed", "plan_batches", "BatchOutcome"]


def shard_seed(seed: int, model_index: int, attack: str, batch: int, restart: int = 0) -> int:
    """A 32-bit seed (numpy's and torch's global RNGs) for one restart of one shard."""
    key = f"laqonnx-shard/{int(seed)}/{int(model_index)}/{attack}/{int(batch)}/{int(restart)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def plan_batches(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The example indices ``idx`` (clean-correct examples, in order) cut into shards of ``batch_size``."""
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


@dataclass(frozen=True)
class BatchOutcome:
    """One shard's result: which of its examples some valid candidate fooled on onnxruntime, the
    mirror's agreement with onnxruntime on white-box candidates, and the seconds it took."""

    fooled: np.ndarray  # bool, one per example of the shard
    seconds: float
    mirror_agree: int = 0
    mirror_total: int = 0
