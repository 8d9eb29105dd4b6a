"""Tables and the Markdown report with its PNG figures, from synthetic evaluation and analysis JSON."""

from __future__ import annotations

import copy
import re

import pytest
from PIL import Image

from laqonnx.errors import DataError, OutputError
from laqonnx.report import format_table, format_value, markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _model(label, clean, worst, attacks, agreement, masking, p50, size, curve):
    return {
        "path": f"out/{label}.onnx",
        "label": label,
        "clean_accuracy": clean,
        "robust_accuracy": {**attacks, "worst_case": worst},
        "mirror_agreement": agreement,
        "gradient_masking": masking,
        "latency_ms": {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 2},
        "size_bytes": size,
        "robust_vs_eps": [{"eps": k / 255, "robust_accuracy": a} for k, a in curve],
    }


EVALUATION = {
    "eps": 8 / 255,
    "norm": "linf",
    "data": "digits",
    "models": [
        _model("float", 0.962, 0.55, {"pgd": 0.61, "square": 0.66}, 1.0, False, 0.42, 412_345, [(2, 0.9), (8, 0.55)]),
        _model("int8", 0.951, 0.47, {"pgd": 0.52, "square": 0.6}, 0.985, True, 0.21, 118_000, [(2, 0.86), (8, 0.47)]),
        _model("laq", 0.955, 0.53, {"pgd": 0.57}, 0.995, {"flagged": False}, 0.23, 121_000, [(2, 0.88), (8, 0.53)]),
    ],
}

ANALYSIS = {
    "model": "out/float.onnx",
    "layers": [
        {"name": f"conv{i}", "op_type": "Conv", "weight": f"w{i}", "weight_shape": [8, 8, 3, 3],
         "input_shape": [1, 8, 8, 8], "lipschitz": 0.5 * (i + 1), "lipschitz_method": "power_iteration"}
        for i in range(12)
    ] + [{"name": "fc", "op_type": "Gemm", "weight": "wf", "weight_shape": [10, 512], "input_shape": None,
          "lipschitz": None, "lipschitz_method": None}],
    "network_bound": 123.4,
    "unknown_ops": [],
}


@pytest.mark.parametrize(
    "value,text",
    [(None, "—"), (float("nan"), "—"), (True, "yes"), (False, "no"), (7, "7"), (0.912345, "0.9123"), (8.25, "8.25"),
     (123.456, "123.5"), (12345.6, "12,346"), (2.5e-05, "2.5e-05"), (0.0, "0.0"), (float("inf"), "∞"), ("x", "x")],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_format_table_alignment():
    rows = [{"name": "a", "ms": 1.5, "n": None}, {"name": "longer", "ms": 12.25, "n": 3, "extra": 1}]
    text = format_table(rows, [("name", "Model"), ("ms", "p50"), ("n", "Runs")])
    assert text.splitlines() == [
        "Model     p50  Runs",
        "------  -----  ----",
        "a         1.5     —",
        "longer  12.25     3",
    ]


def test_format_table_dotted_keys_and_formatters():
    rows = [{"m": "x", "lat": {"p50": 2.0}}, {"m": "y"}]
    text = format_table(rows, [("m", "M"), ("lat.p50", "p50", lambda v: f"{v:.1f} ms")])
    assert text.splitlines()[2:] == ["x  2.0 ms", "y       —"]
    assert format_table([], [("m", "M")]).splitlines() == ["M", "-"]


def test_markdown_table():
    rows = [{"name": "a|b", "acc": 0.5}, {"name": "c", "acc": None}]
    assert markdown_table(rows, [("name", "Name"), ("acc", "Acc")]).splitlines() == [
        "| Name | Acc |",
        "|---|---:|",
        "| a\\|b | 0.5 |",
        "| c | — |",
    ]


def _check_png(path, min_px=(300, 200)):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024
    with Image.open(path) as img:
        assert img.size[0] >= min_px[0] and img.size[1] >= min_px[1]
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # drawn on, not a blank canvas


def test_write_report_full(tmp_path):
    out = tmp_path / "rep"
    md_path = write_report(EVALUATION, out, analyses={"float.onnx": ANALYSIS}, title="Digits CNN")
    assert md_path == out / "report.md"
    md = md_path.read_text()
    assert md.startswith("# Digits CNN\n")
    assert "ε: 0.03137 (= 8/255), norm: L∞" in md and "- data: digits" in md
    rows: dict[str, str] = {}
    for line in md.splitlines():  # the results table comes first; the latency table repeats model names
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert rows["float"].split(" | ")[1:9] == ["402.7 KiB", "0.42", "96.2%", "61.0%", "66.0%", "55.0%", "100.0%", "no"]
    assert rows["int8"].split(" | ")[1:9] == ["115.2 KiB", "0.21", "95.1%", "52.0%", "60.0%", "47.0%",
                                              "98.5% ⚠ white-box unreliable", "yes ⚠"]
    assert rows["laq"].split(" | ")[1:9] == ["118.2 KiB", "0.23", "95.5%", "57.0%", "—", "53.0%", "99.5%", "no"]
    assert md.count("white-box unreliable") == 1  # only the int8 row (0.985 < 0.99)
    assert "gradient masking suspected" in rows["int8"]
    assert "| 0.42 | 0.63 | 0.84 |" in md  # latency table: p50, p90, p99
    assert "## Lipschitz analysis: float" in md and "Network bound: 123.4" in md
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == ["accuracy_tradeoff.png", "lipschitz.png", "robust_vs_eps.png"]
    for name in figures:
        _check_png(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted(figures + ["report.md"])  # no temp files left
    write_report(EVALUATION, out)  # rewriting into the same folder is fine


@pytest.mark.parametrize("drop", ["robust_vs_eps", "latency_ms", "size_bytes", "robust_accuracy", "mirror_agreement",
                                  "gradient_masking", "clean_accuracy", "label"])
def test_missing_optional_fields(tmp_path, drop):
    ev = copy.deepcopy(EVALUATION)
    for m in ev["models"]:
        m.pop(drop)
    md = write_report(ev, tmp_path).read_text()
    names = ["float.onnx", "int8.onnx", "laq.onnx"] if drop == "label" else ["float", "int8", "laq"]
    assert all(f"| {name} |" in md for name in names)
    assert ("96.2%" in md) == (drop != "clean_accuracy")
    assert ("white-box unreliable |" in md) == (drop != "mirror_agreement")
    assert ("yes ⚠" in md) == (drop != "gradient_masking")
    assert md.count("no robust accuracy measured") == (3 if drop == "robust_accuracy" else 0)
    assert (tmp_path / "robust_vs_eps.png").exists() == (drop != "robust_vs_eps")
    assert ("robust_vs_eps.png" in md) == (drop != "robust_vs_eps")
    _check_png(tmp_path / "accuracy_tradeoff.png")  # with latency or size missing, the other panel remains
    assert not (tmp_path / "lipschitz.png").exists()


def test_evaluate_json_extras_become_notes_and_setup(tmp_path):
    ev = copy.deepcopy(EVALUATION)
    ev.update({"preset": "quick", "attacks": ["pgd", "square"], "reference": None, "seed": 0})
    m = ev["models"][1]
    m.update({"n_examples": 50, "gradient_masking_detail": {"reason": "square beats pgd by 8 points"},
              "skipped_attacks": {"transfer": "no reference model"}, "mirror_error": None})
    ev["models"][2].update({"mirror_agreement": None, "mirror_error": "no converter for Erf"})
    md = write_report(ev, tmp_path).read_text()
    assert "- preset: quick" in md and "- attacks: pgd, square" in md and "- seed: 0" in md
    assert "- reference" not in md and "- examples evaluated: 50" in md
    assert "gradient masking suspected (square beats pgd by 8 points); transfer skipped: no reference model" in md
    laq = next(line for line in md.splitlines() if line.startswith("| laq |"))
    assert "| — | no | no white-box mirror: no converter for Erf |" in laq


def test_minimal_and_bad_evaluations(tmp_path):
    md = write_report({"models": [{"path": "m.onnx"}, {"path": "m.onnx"}]}, tmp_path / "a").read_text()
    assert "| m.onnx |" in md and "| m.onnx (2) |" in md and "## Figures" not in md
    assert write_report({"models": []}, tmp_path / "b").exists()
    with pytest.raises(DataError):
        write_report({"eps": 0.1}, tmp_path / "c")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        write_report(EVALUATION, tmp_path / "file")


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (192_183, "187.7 KiB"),
                                     (5 * 2**20 + 2**19, "5.5 MiB"), (3 * 2**30, "3.0 GiB")])
def test_one_size_unit_everywhere(n, text):
    from laqonnx.report import format_bytes
    from laqonnx.report.tables import _bytes

    assert format_bytes(n) == text and _bytes(n) == text


def test_tradeoff_styles_and_spread_tell_16_models_apart():
    from laqonnx.report.plots import _spread, _styles

    labels = [f"m{i}" for i in range(16)]
    styles = _styles(labels)
    assert len(set(styles.values())) == 16  # colour + marker pairs
    assert len({c for c, _ in styles.values()}) == 16 and all(styles[a][1] != styles[b][1] for a, b in zip(labels, labels[1:]))
    xs = [100.0] * 10 + [400.0, 401.0, 250.0]
    moved = [x + d for x, d in zip(xs, _spread(xs, 400.0))]
    assert len(set(moved[:10])) == 10 and max(moved[:10]) - min(moved[:10]) <= 0.08 * 400 + 1e-9
    assert abs(sum(moved[:10]) / 10 - 100.0) < 1e-9  # symmetric around the true x
    assert moved[12] == 250.0 and moved[10] < moved[11]


def test_lipschitz_plot_grows_with_the_layers_and_names_each(tmp_path):
    from laqonnx.report.plots import _plot_lipschitz

    many = {"layers": [{"name": f"/features/block{i}/conv/Conv", "lipschitz": 1.0 + i, "lipschitz_method": "power_iteration"}
                       for i in range(40)], "network_bound": 10.0}
    few = {"layers": many["layers"][:4], "network_bound": 10.0}
    _plot_lipschitz({"big": many}, tmp_path / "many.png")
    _plot_lipschitz({"small": few}, tmp_path / "few.png")
    with Image.open(tmp_path / "many.png") as a, Image.open(tmp_path / "few.png") as b:
        assert a.size[1] > 3 * b.size[1]  # a row per layer: labels never overlap
        assert a.size[1] / 40 >= 20  # >= 20 px a row at 110 dpi, 8-pt labels
