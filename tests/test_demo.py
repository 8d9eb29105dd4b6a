"""laqonnx.zoo.demo: the int4 rule, the method registry, and one tiny end-to-end demo run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from laqonnx.cli import main
from tests import models
from laqonnx.zoo.demo import DemoConfig, run_demo
from laqonnx.zoo.methods import DEMO_METHODS, METHODS, RECORD_METHODS, SWEEP_METHODS, int4_rule
from laqonnx.zoo.digits import load_digits

pytest.importorskip("torch")

SIZE = 8  # native digits size: the smallest, fastest configuration


# ---------------------------------------------------------------- the equal-bits rule


@pytest.mark.parametrize(
    "sizes, target, int4, bits",
    [
        ([("a", 100), ("b", 300), ("c", 600)], 6.0, ("c",), 8 - 4 * 0.6),  # largest alone reaches 5.6 <= 6
        ([("a", 100), ("b", 300), ("c", 600)], 5.0, ("c", "b"), 8 - 4 * 0.9),  # 5.6 > 5: add the next largest
        ([("a", 100), ("b", 300), ("c", 600)], 4.0, ("c", "b", "a"), 4.0),
        ([("a", 100), ("b", 300), ("c", 600)], 8.0, (), 8.0),
        ([("a", 500), ("b", 500)], 7.0, ("a",), 6.0),  # ties: graph order
        ([], 6.0, (), 8.0),
    ],
)
def test_int4_rule(sizes, target, int4, bits):
    got, achieved = int4_rule(sizes, target)
    assert got == int4
    assert achieved == pytest.approx(bits)
    total = sum(n for _, n in sizes) or 1
    assert achieved == pytest.approx(8 - 4 * sum(n for w, n in sizes if w in got) / total)


def test_registry_covers_the_record():
    assert set(DEMO_METHODS) <= set(METHODS) and set(RECORD_METHODS) <= set(METHODS)
    assert {'ort-int4', 'laq-int4-ada'} <= set(DEMO_METHODS)  # the demo shows a low-bit row


@pytest.mark.parametrize("bad", [{"methods": ("ort-minmax",)}, {"methods": ("float", "nope")}, {"preset": "huge"},
                                 {"mixed_bits": 3.0}, {"n_eval": 0}, {"epochs": 0}])
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        DemoConfig(**bad)


@pytest.mark.parametrize("argv", [["demo", "--archs", "vgg"], ["demo", "--examples", "0"], ["demo", "--eps", "8/0"],
                                  ["demo", "--mixed-bits", "x"]])
def test_cli_refuses_bad_options(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's type= refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("laqonnx demo: error:") and "Traceback" not in "\n".join(err)


def test_cli_takes_fractions_and_says_where_everything_is(tmp_path, monkeypatch, capsys):
    """--eps 8/255 as everywhere else; the run itself is replaced (the real one trains)."""
    from laqonnx.zoo import demo as demo_module

    seen = {}

    def fake(config, progress=True):
        seen["config"] = config
        return demo_module.DemoResult((), "TABLE", tmp_path / "report" / "report.md", tmp_path / "results.json", 1.0,
                                      tmp_path / "models")

    monkeypatch.setattr(demo_module, "run_demo", fake)
    assert main(["demo", "--eps", "8/255", "--mixed-bits", "13/2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen["config"].eps == pytest.approx(8 / 255) and seen["config"].mixed_bits == 6.5
    out = capsys.readouterr().out
    assert f"models: {tmp_path / 'models'}/" in out and "float.onnx" in out and str(tmp_path / "results.json") in out


def test_float_model_is_copied_out_of_the_cache(tmp_path):
    from laqonnx.zoo.demo import copy_float_model

    cached = tmp_path / "cache" / "cnn-pgd-0123abcd.onnx"
    cached.parent.mkdir()
    onnx.save(models.cnn(), cached)
    (tmp_path / "out").mkdir()
    copy = copy_float_model(cached, tmp_path / "out")
    assert copy == tmp_path / "out" / "float.onnx" and copy.read_bytes() == cached.read_bytes()


# ---------------------------------------------------------------- end to end (one tiny run)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out_dir=tmp / "out", archs=("cnn",), adversarial=("pgd",), image_size=SIZE, epochs=3, width=8,
                     n_eval=60, calib_limit=64, attacks=("pgd", "transfer"), sweep=True, latency_runs=10,
                     cache_dir=tmp / "cache")
    return cfg, run_demo(cfg, progress=False)


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_rows_and_table(demo):
    cfg, result = demo
    assert [(r["model"], r["method"]) for r in result.rows] == [("cnn/pgd", m) for m in DEMO_METHODS]
    for line, row in zip(result.table.splitlines()[2:], result.rows):
        assert line.split()[:2] == ["cnn/pgd", row["method"]]
    rows = {r["method"]: r for r in result.rows}
    assert rows["float"]["d_robust"] == 0 and rows["float"]["lat_ratio"] == 1 and rows["float"]["bits"] == 32
    for r in result.rows:
        assert 0 <= r["robust"] <= r["clean"] <= 1
        assert r["d_robust"] == pytest.approx(r["robust"] - rows["float"]["robust"])
        assert r["lat_ratio"] == pytest.approx(r["p50_ms"] / rows["float"]["p50_ms"])
    for m in ("ort-minmax", "ort-minmax-pc", "ort-entropy", "ort-percentile", "laq-int8"):
        assert rows[m]["bits"] == 8
    # equal average weight bits: LAQ's mixed budget is the uniform onnxruntime alternative's
    assert rows["ort-mixed"]["bits"] < 8
    assert rows["laq-mixed-ada"]["bits"] <= rows["ort-mixed"]["bits"] + 1e-6


def test_models_load_and_agree(demo):
    cfg, result = demo
    x, y = load_digits(SIZE, "test")
    models = sorted((cfg.out_dir / "models" / "cnn-pgd").glob("*.onnx"))
    assert {p.stem for p in models} == set(DEMO_METHODS)  # float.onnx: the copy out of the cache
    data = json.loads(result.results_json.read_text())
    float_path = Path(next(m["path"] for m in data["evaluation"]["models"] if m["label"].endswith(" float")))
    assert float_path.resolve() == (cfg.out_dir / "models" / "cnn-pgd" / "float.onnx").resolve()  # not the cache
    assert result.models == cfg.out_dir / "models"
    ref = _predict(float_path, x).argmax(1)
    for path in models:
        logits = _predict(path, x)
        assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
    agree = (_predict(cfg.out_dir / "models" / "cnn-pgd" / "laq-int8.onnx", x).argmax(1) == ref).mean()
    assert agree >= 0.9
    # the clean accuracy in the table is onnxruntime's on the first n_eval test examples
    rows = {r["method"]: r for r in result.rows}
    assert rows["float"]["clean"] == pytest.approx((ref[: cfg.n_eval] == y[: cfg.n_eval]).mean())


def test_ort_mixed_puts_int4_on_the_largest_layer(demo):
    cfg, result = demo
    data = json.loads(result.results_json.read_text())
    rule = data["evaluation"]["models"][0]["int4_rule"]
    assert rule  # the CNN's first Linear layer holds most weights
    model = onnx.load(str(cfg.out_dir / "models" / "cnn-pgd" / "ort-mixed.onnx"))
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4 and len(i.dims) > 1}
    assert int4 == {f"{w}_quantized" for w in rule}


def test_report_files(demo):
    cfg, result = demo
    assert result.report == cfg.out_dir / "report" / "report.md"
    text = result.report.read_text()
    for name in ("accuracy_tradeoff.png", "lipschitz.png", "robust_vs_eps.png"):
        assert (cfg.out_dir / "report" / name).stat().st_size > 1000
        assert f"({name})" in text
    assert "cnn/pgd laq-mixed-ada" in text
    assert (cfg.out_dir / "table.txt").read_text().strip() == result.table
    data = json.loads(result.results_json.read_text())
    assert len(data["rows"]) == len(DEMO_METHODS)
    # the robust-vs-eps sweep (0 .. 1.5 eps) only for the methods the figure shows
    swept = {m["label"].split()[-1]: m.get("robust_vs_eps") for m in data["evaluation"]["models"]}
    assert {k for k, v in swept.items() if v} == set(SWEEP_METHODS)
    for curve in filter(None, swept.values()):
        assert [p["eps"] for p in curve] == pytest.approx([0, 0.025, 0.05, 0.1, 0.15])
        assert curve[0]["robust_accuracy"] >= curve[-1]["robust_accuracy"]
