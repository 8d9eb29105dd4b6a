"""``evaluate(..., engine=Ray(...))`` and ``laqonnx evaluate --ray``: the same figures as a local run,
a killed worker retried, one-line errors without ray or without a cluster.

The Ray tests share one local cluster (``ray.init(num_cpus=2)``) and skip when ray is not installed
(``pip install 'laqonnx[distributed]'``).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest

import laqonnx
from laqonnx.cli import main
from laqonnx.errors import ClusterError, OptionError
from laqonnx.robustness.distributed import FAULT_FILE_ENV, Local, Ray, _check_reachable
from laqonnx.robustness.shards import plan_batches, shard_seed
from tests._digits_model import digits_cnn, quantize

ATTACKS = ["fgsm", "pgd", "transfer"]
KW = dict(attacks=ATTACKS, latency=False, progress=False, seed=5, batch_size=8)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    fault = tmp_path_factory.mktemp("fault") / "kill-once"
    old = os.environ.get(FAULT_FILE_ENV)
    os.environ[FAULT_FILE_ENV] = str(fault)  # the workers inherit it; the file exists only in the fault test
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield fault
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop(FAULT_FILE_ENV, None)
        else:
            os.environ[FAULT_FILE_ENV] = old


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(int8 QDQ model, its float reference, x, y): files, as the CLI and a cluster get them."""
    _, model, x, y, calib = digits_cnn()
    folder = tmp_path_factory.mktemp("models")
    onnx.save(model, str(folder / "float.onnx"))
    onnx.save(quantize(model, calib, per_channel=True), str(folder / "int8.onnx"))
    return folder / "int8.onnx", folder / "float.onnx", x[:40], y[:40]


def _figures(data: dict) -> dict:
    """The JSON without what legitimately differs between engines (timings, the engine entry)."""
    out = {k: v for k, v in data.items() if k != "engine"}
    out["models"] = [{k: v for k, v in m.items() if k != "attack_seconds"} for m in data["models"]]
    return out


def test_shard_seeds_are_stable() -> None:
    # a stable hash (not Python's salted hash()): the same seeds in every process and every run
    assert shard_seed(0, 0, "pgd", 0, 0) == shard_seed(0, 0, "pgd", 0, 0) == 2448894446
    assert len({shard_seed(0, m, a, b) for m in range(2) for a in ("pgd", "square") for b in range(3)}) == 12
    assert [len(b) for b in plan_batches(np.arange(20), 8)] == [8, 8, 4]


def test_engine_options() -> None:
    with pytest.raises(OptionError):
        Ray(workers=0)
    assert Ray(address="").address is None and Local().to_json() == {"name": "local", "workers": 1}
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1", 2.0)
    with pytest.raises(ClusterError, match="not host:port"):
        _check_reachable("nowhere", 2.0)


def test_ray_missing_is_one_line(monkeypatch, capsys, digits) -> None:
    path, _, _, _ = digits
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = main(["evaluate", str(path), "--data", "digits", "--eps", "0.1", "--limit", "8", "--attacks", "fgsm",
               "--no-latency", "--no-progress", "--ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "laqonnx[distributed]" in err


def test_unreachable_cluster_is_one_line(capsys, digits, tmp_path) -> None:
    """Nothing written, one line, exit 2 (run before the cluster fixture joins this process to a cluster)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process already joined a Ray cluster (--ray then uses it)")
    path, _, _, _ = digits
    out = tmp_path / "eval.json"
    rc = main(["evaluate", str(path), "--data", "digits", "--eps", "0.1", "--limit", "8", "--attacks", "fgsm",
               "--no-latency", "--no-progress", "--json", str(out), "--ray=127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and "cannot reach the Ray cluster at 127.0.0.1:1" in err
    assert not out.exists() and not ray.is_initialized()


def test_local_seeding_figures_as_before(digits) -> None:
    """Per-shard seeding changed the random draws of pgd/square (fgsm draws none), not these figures:
    the values below are what the previous seeding (seed + restart, one stream over all batches) gave
    on this model, 40 examples, seed 0, batch 128 (measured at commit 9a39853)."""
    _, path, x, y = digits
    kw = dict(attacks=["fgsm", "pgd", "square"], latency=False, progress=False, seed=0)
    a = laqonnx.evaluate(path, (x, y), 0.1, **kw)
    assert a.to_json()["engine"] == {"name": "local", "workers": 1}
    assert a.models[0].robust_accuracy == pytest.approx({"fgsm": 0.6, "pgd": 0.525, "square": 0.625, "worst_case": 0.525})
    assert laqonnx.evaluate(path, (x, y), 0.1, **kw).models[0].robust_accuracy == a.models[0].robust_accuracy


def test_ray_matches_local_cli(cluster, digits, tmp_path, capsys) -> None:
    path, ref, _, _ = digits
    args = ["evaluate", str(path), "--data", "digits", "--eps", "0.1", "--limit", "40", "--attacks", *ATTACKS,
            "--reference", str(ref), "--batch-size", "8", "--seed", "5", "--no-latency", "--no-progress"]
    assert main([*args, "--json", str(tmp_path / "local.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "ray.json"), "--ray", "--workers", "2"]) == 0
    local = json.loads((tmp_path / "local.json").read_text())
    ray = json.loads((tmp_path / "ray.json").read_text())
    assert local["engine"] == {"name": "local", "workers": 1} and ray["engine"] == {"name": "ray", "workers": 2}
    assert _figures(ray) == _figures(local)
    model = local["models"][0]
    assert model["clean_accuracy"] > 0.5 and set(model["robust_accuracy"]) == {*ATTACKS, "worst_case"}


def test_killed_worker_is_retried(cluster, digits) -> None:
    path, ref, x, y = digits
    local = laqonnx.evaluate([path, path], (x, y), 0.1, **KW, reference=ref)
    cluster.write_text("pgd/2")  # the worker taking pgd's third shard dies: mid-run
    ray = laqonnx.evaluate([path, path], (x, y), 0.1, **KW, reference=ref, engine=Ray(workers=2))
    assert not cluster.exists()  # a worker did die
    assert _figures(ray.to_json()) == _figures(local.to_json())
    assert [m.robust_accuracy for m in ray.models] == [m.robust_accuracy for m in local.models]


def test_worker_lost_beyond_retries(cluster, digits) -> None:
    path, ref, x, y = digits
    cluster.write_text("")  # the first shard's worker dies; no retry allowed
    try:
        with pytest.raises(ClusterError, match="died 1 times"):
            laqonnx.evaluate(path, (x, y), 0.1, **KW, engine=Ray(workers=1, max_retries=0))
    finally:
        cluster.unlink(missing_ok=True)


def test_no_free_cpu_is_one_error(cluster, digits) -> None:
    """A run whose workers cannot be placed (another run holds the CPUs) stops with a ClusterError, never hangs."""
    import ray

    path, _, x, y = digits

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        with pytest.raises(ClusterError, match="no Ray worker started within 2 s"):
            laqonnx.evaluate(path, (x[:8], y[:8]), 0.1, **KW, engine=Ray(workers=1, start_timeout=2))
    finally:
        ray.kill(hog)
