"""Latency measurement: real onnxruntime runs on tiny models, and the bookkeeping on a fake clock."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest

from laqonnx.latency import cpu as latency_cpu
from laqonnx.latency import measure as latency_measure
from laqonnx.errors import ModelError
from laqonnx.latency import (
    CpuInfo,
    LatencyStats,
    compare_latency,
    cpu_info,
    measure_latency,
    parse_cpuinfo,
)
from tests import models

X86_BLOCK = """processor\t: {i}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: {core}
flags\t\t: fpu sse sse2 avx avx2 fma {extra}

"""


def _x86(extra: str, n: int = 4, smt: int = 2) -> str:
    return "".join(X86_BLOCK.format(i=i, core=i // smt, extra=extra) for i in range(n))


@pytest.mark.parametrize(
    "extra,vnni,amx,avx512,isa",
    [
        ("avx512f avx512bw avx512_vnni", True, False, True, ["avx512_vnni"]),
        ("avx_vnni", True, False, False, ["avx_vnni"]),
        ("avx512f avx512_vnni avx_vnni amx_tile amx_int8", True, True, True, ["avx512_vnni", "avx_vnni", "amx_int8"]),
        ("avx512f avx512bw", False, False, True, []),
        ("", False, False, False, []),
    ],
)
def test_parse_cpuinfo_x86(extra, vnni, amx, avx512, isa):
    info = parse_cpuinfo(_x86(extra))
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert (info.logical_cores, info.physical_cores) == (4, 2)
    assert (info.vnni, info.amx, info.avx512) == (vnni, amx, avx512)
    assert info.int8_isa() == isa
    warning = info.int8_warning()
    if isa:
        assert warning is None
    else:
        assert "VNNI" in warning and "slower than float" in warning


def test_parse_cpuinfo_arm_and_unknown():
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n\nprocessor\t: 1\nFeatures\t: fp asimd asimddp i8mm\n"
    info = parse_cpuinfo(arm)
    assert info.logical_cores == 2 and info.physical_cores is None
    assert info.int8_isa() == ["asimddp", "i8mm"] and not info.vnni and info.int8_warning() is None
    empty = parse_cpuinfo("processor\t: 0\nmodel name\t: Mystery\n")
    assert empty.flags == frozenset() and empty.note is not None
    assert empty.int8_warning().startswith("int8 speed unknown")


def test_cpu_info_is_cached_and_consistent():
    info = cpu_info()
    assert info is cpu_info()
    assert info.logical_cores >= 1
    assert set(info.int8_isa()) <= info.flags


def test_cpu_info_without_proc_cpuinfo(monkeypatch):
    class NoFile:
        def __init__(self, *a):
            pass

        def read_text(self, *a, **k):
            raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(latency_cpu, "Path", NoFile)
    info = latency_cpu.cpu_info.__wrapped__()  # bypass the cache
    assert info.flags == frozenset() and not (info.vnni or info.amx or info.avx512)
    assert info.model_name and info.logical_cores >= 1
    assert "not read" in info.note and info.int8_warning().startswith("int8 speed unknown")


def test_stats_percentiles_are_exact():
    s = LatencyStats.from_times(4, list(range(1, 101)))  # numpy's linear interpolation, by hand
    assert (s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.runs) == (50.5, pytest.approx(90.1), pytest.approx(99.01), 50.5, 100)
    assert s.throughput == pytest.approx(4 * 1000 / 50.5)


@pytest.mark.parametrize("build", [models.cnn, models.residual])
@pytest.mark.parametrize("batch_sizes", [(1,), (1, 3), (5, 2)])
def test_measure_latency_on_tiny_models(build, batch_sizes):
    res = measure_latency(build(), batch_sizes=batch_sizes, threads=1, warmup=2, runs=7)
    assert [s.batch_size for s in res.stats] == list(batch_sizes)
    assert res.threads == 1 and res.providers == ("CPUExecutionProvider",)
    for s in res.stats:
        assert s.runs == 7
        assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
        assert s.throughput == pytest.approx(s.batch_size * 1000 / s.mean_ms)
    out = res.to_json()
    head = res.at(min(batch_sizes))
    assert (out["p50"], out["p90"], out["p99"], out["batch_size"]) == (head.p50_ms, head.p90_ms, head.p99_ms, head.batch_size)
    assert sorted(out["by_batch"]) == sorted(str(b) for b in batch_sizes)
    assert out["threads"] == 1 and out["int8_isa"] == cpu_info().int8_isa()
    with pytest.raises(KeyError):
        res.at(64)


def _dynamic_hw() -> onnx.ModelProto:
    m = models.residual()  # GlobalAveragePool before the Gemm: any H, W runs
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return m


def test_dynamic_non_batch_dim_needs_input_shape():
    with pytest.raises(ModelError, match="dynamic dimensions"):
        measure_latency(_dynamic_hw(), batch_sizes=(1,), runs=1, warmup=0)
    with pytest.raises(ModelError, match="input_shape"):
        measure_latency(_dynamic_hw(), batch_sizes=(1,), runs=1, warmup=0, input_shape=(6, 6))
    res = measure_latency(_dynamic_hw(), batch_sizes=(2,), runs=3, warmup=0, input_shape=(1, 9, 7))
    assert res.at(2).runs == 3


def test_fixed_batch_is_measured_only_at_its_size(tmp_path):
    m = models.cnn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(m, path)
    res = measure_latency(path, batch_sizes=(1, 8), runs=2, warmup=0)
    assert res.model == str(path) and [s.batch_size for s in res.stats] == [1]
    with pytest.raises(ModelError, match="fixed batch"):
        measure_latency(path, batch_sizes=(8,), runs=2, warmup=0)


def test_bad_inputs(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        measure_latency(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError):
        measure_latency(tmp_path / "junk.onnx")
    for bad in [dict(batch_sizes=()), dict(batch_sizes=(0,)), dict(batch_sizes=(2, 2)), dict(runs=0),
                dict(threads=0), dict(min_time_s=-1.0)]:
        with pytest.raises(ValueError):
            measure_latency(models.cnn(), **bad)


class _Fake:
    """Stands in for an onnxruntime session: each run advances a fake clock by ``cost_ms``."""

    def __init__(self, name, cost_ms, log, clock):
        self.name, self.cost_ms, self.log, self.clock = name, cost_ms, log, clock
        self.input_dims = ["N", 1, 8, 8]
        self.session = types.SimpleNamespace(get_providers=lambda: ["FakeProvider"])

    def accepts(self, batch):
        return True

    def prepare(self, batch):
        self.log.append(("prepare", self.name, batch))

    def run(self, batch):
        self.log.append((self.name, batch))
        self.clock[0] += int(self.cost_ms * batch * 1e6)


@pytest.fixture
def fakes(monkeypatch):
    log, clock = [], [0]
    costs = {"a": 2.0, "b": 5.0, "c": 1.0}
    monkeypatch.setattr(latency_measure, "_open", lambda name, model, opts: _Fake(name, costs[name], log, clock))
    monkeypatch.setattr(latency_measure, "time", types.SimpleNamespace(perf_counter_ns=lambda: clock[0]))
    return log


def test_compare_latency_interleaves_round_robin(fakes):
    res = compare_latency({"a": None, "b": None, "c": None}, batch_sizes=(1,), warmup=1, runs=4, rounds=2, threads=1)
    expected = [("prepare", "a", 1), ("a", 1), ("prepare", "b", 1), ("b", 1), ("prepare", "c", 1), ("c", 1)]
    expected += [("a", 1)] * 2 + [("b", 1)] * 2 + [("c", 1)] * 2  # round 0
    expected += [("b", 1)] * 2 + [("c", 1)] * 2 + [("a", 1)] * 2  # round 1 starts one model later
    assert fakes == expected
    for name, cost in [("a", 2.0), ("b", 5.0), ("c", 1.0)]:
        s = res[name].at(1)
        assert (s.p50_ms, s.p99_ms, s.mean_ms, s.runs) == (cost, cost, cost, 4)
        assert s.throughput == pytest.approx(1000 / cost)
        assert res[name].providers == ("FakeProvider",)


def test_min_time_extends_runs_and_batches_scale(fakes):
    res = compare_latency({"a": None, "b": None}, batch_sizes=(1, 4), warmup=0, runs=2, rounds=1, min_time_s=0.02)
    # runs come in blocks of runs/rounds = 2; a costs 2 ms per example: 20 ms takes 10 runs at batch 1,
    # and 4 runs of 8 ms at batch 4 (3 would do, but blocks are whole)
    assert [s.runs for s in res["a"].stats] == [10, 4]
    assert [s.runs for s in res["b"].stats] == [4, 2]  # 5 ms and 20 ms per run
    assert res["a"].at(4).p50_ms == 8.0 and res["a"].at(4).throughput == pytest.approx(500.0)
    timed = [e for e in fakes if e[0] != "prepare"]
    assert timed[:4] == [("a", 1), ("a", 1), ("b", 1), ("b", 1)]


def test_compare_latency_real_models():
    res = compare_latency({"cnn": models.cnn(), "res": models.residual()}, batch_sizes=(2,), warmup=1, runs=6, rounds=3,
                          progress=True)
    assert set(res) == {"cnn", "res"} and res["cnn"].model == "cnn" and res["res"].model == "residual"  # graph names
    assert all(r.at(2).runs == 6 for r in res.values())
    with pytest.raises(TypeError):
        compare_latency({"cnn": models.cnn()}, bogus=1)


def test_cpuinfo_dataclass_is_frozen():
    info = CpuInfo("x", 1, frozenset(), False, False, False)
    with pytest.raises(Exception):
        info.vnni = True  # type: ignore[misc]
    assert np.isfinite(LatencyStats.from_times(1, [1.0]).throughput)
