"""The benchmark record: every digits model x method x seed, a ResNet-18 at 224x224, RESULTS.md.

    python benchmarks/record.py                 # the full matrix, then benchmarks/RESULTS.md
    python benchmarks/record.py --quick         # smoke run: cnn, seed 0, 60 examples (results/record-quick/)
    python benchmarks/record.py --report-only   # regenerate RESULTS.md and record.json from the cells

Resumable: one JSON per cell under ``benchmarks/results/record/`` (``<arch>-<training>-s<seed>/<method>.json``
with the quantize time, size, bits and the evaluation; ``latency.json`` per model; ``resnet18-224/``),
skipped if present. Quantized models are kept in ``--work`` (default ``~/.cache/laqonnx/record``)
for the latency cells; a missing one is quantized again. Models come from the zoo cache
(``laqonnx.zoo.get_model``, default training configs, seeded). Methods are
``laqonnx.zoo.demo.RECORD_METHODS`` (definitions in ``laqonnx.zoo.demo``'s docstring and in RESULTS.md).
Robust accuracy: ``laqonnx.evaluate`` (worst case over the preset's attacks, scored on onnxruntime,
transfer from the float model, with the robust-vs-eps sweep). Latency: all methods of a model
measured interleaved with ``laqonnx.latency.compare_latency`` at batch 1. RESULTS.md keeps the
hand-written text between ``<!-- claims:begin -->`` and ``<!-- claims:end -->`` when regenerated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laqonnx._util.io import atomic_write_json, atomic_write_text  # noqa: E402
from laqonnx.zoo.demo import RECORD_METHODS, MethodContext, int4_rule, quantize_method  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ORT_INT8 = ("ort-minmax", "ort-minmax-pc", "ort-entropy", "ort-percentile")
SWEEP_METHODS = ("float", *ORT_INT8, "laq-int8", "ort-mixed", "ort-int4")  # the methods claim 1 uses
R18_METHODS = ("float", "ort-minmax", "ort-minmax-pc", "laq-int8", "ort-mixed", "laq-mixed")
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ digits cells


def run_model(arch: str, adv: str, seed: int, o: dict[str, Any]) -> str:
    """All method cells and the latency cell of one trained model (skips cells already written)."""
    import torch

    from laqonnx.graph import load_model
    from laqonnx.latency import compare_latency
    from laqonnx.robustness.evaluate import evaluate
    from laqonnx.zoo import get_model

    torch.set_num_threads(1)
    key = f"{arch}-{adv}-s{seed}"
    cells, work = Path(o["cells"]) / key, Path(o["work"]) / key
    cells.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zoo = get_model(arch, adv, seed=seed, progress=False)
    sizes = [(layer.weight, math.prod(layer.weight_shape)) for layer in load_model(zoo.path).layers]
    int4, budget = int4_rule(sizes, o["mixed_bits"])
    ctx = MethodContext(zoo.path, work, o["eps"], "digits", o["calib_limit"], budget, int4, False)
    made = {}
    for m in o["methods"]:
        cell = cells / f"{m}.json"
        if cell.exists():
            continue
        q = made[m] = quantize_method(m, ctx)
        ev = evaluate(str(q.path), "digits", o["eps"], preset=o["preset"], attacks=o["attacks"], reference=str(zoo.path),
                      limit=o["examples"],
                      latency=False, sweep=o["sweep"] and m in SWEEP_METHODS, seed=seed, progress=False).models[0]
        atomic_write_json(cell, {"arch": arch, "training": adv, "seed": seed, "method": m, "when": _now(),
                                 "load_avg": _load(), "quantize": q.to_json(), "evaluation": ev.to_json(),
                                 "budget_bits": budget, "int4_rule": list(int4), "zoo_metrics": zoo.metrics,
                                 "settings": {k: o[k] for k in ("eps", "preset", "examples", "calib_limit", "mixed_bits")}})
        print(f"[{_now()}] {key} {m}: robust {ev.robust_accuracy['worst_case']:.3f} clean {ev.clean_accuracy:.3f} "
              f"quantize {q.seconds:.1f}s", flush=True)
    lat_cell = cells / "latency.json"
    if not lat_cell.exists() and o["latency"]:
        paths = {}
        for m in o["methods"]:
            p = zoo.path if m == "float" else work / f"{m}.onnx"
            if not p.exists():
                p = quantize_method(m, ctx).path
            paths[m] = p
        res = compare_latency(paths, batch_sizes=(1,), threads=1, runs=o["latency_runs"], warmup=10, rounds=10)
        atomic_write_json(lat_cell, {"when": _now(), "load_avg": _load(), "threads": 1, "batch_size": 1,
                                     "runs": o["latency_runs"], "rounds": 10,
                                     "p50_ms": {m: r.at(1).p50_ms for m, r in res.items()},
                                     "p90_ms": {m: r.at(1).p90_ms for m, r in res.items()}})
    return f"{key} done in {time.perf_counter() - t0:.0f}s"


# ------------------------------------------------------------------------------ ResNet-18 224


def run_resnet18(o: dict[str, Any]) -> None:
    """Quantize time (each method once, ORT ones ``repeats`` times) and interleaved latency, repeated."""
    from laqonnx.graph import load_model
    from laqonnx.latency import compare_latency
    from laqonnx.zoo import get_random_model

    cells, work = Path(o["cells"]) / "resnet18-224", Path(o["work"]) / "resnet18-224"
    cells.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path = get_random_model("resnet18", image_size=o["r18_size"])
    sizes = [(layer.weight, math.prod(layer.weight_shape)) for layer in load_model(path).layers]
    int4, budget = int4_rule(sizes, o["mixed_bits"])
    ctx = MethodContext(path, work, o["eps"], "digits", o["r18_calib"], budget, int4, False)
    paths = {"float": path}
    for m in R18_METHODS[1:]:
        cell = cells / f"quantize-{m}.json"
        data = _read(cell)
        if data is None:
            runs = []
            for _ in range(o["repeats"] if m.startswith("ort") else 1):
                q = quantize_method(m, ctx)
                runs.append(q.seconds)
            data = {"when": _now(), "load_avg": _load(), "seconds": runs, "median_s": statistics.median(runs),
                    **{k: v for k, v in q.to_json().items() if k != "seconds"}, "calib_examples": o["r18_calib"],
                    "budget_bits": budget, "int4_rule": list(int4)}
            atomic_write_json(cell, data)
            print(f"[{_now()}] resnet18 quantize {m}: {data['median_s']:.1f}s", flush=True)
        p = Path(data["path"])
        paths[m] = p if p.exists() else quantize_method(m, ctx).path
    cell = cells / "latency.json"
    if _read(cell) is None and o["latency"]:
        # int8 models: `repeats` interleaved comparisons; the int4 ones (not fused, ~10x slower) once, few runs
        int8 = {m: p for m, p in paths.items() if "mixed" not in m}
        reps = []
        for _ in range(o["repeats"]):
            res = compare_latency(int8, batch_sizes=(1,), threads=o["threads"], runs=o["r18_runs"], warmup=5,
                                  rounds=10)
            reps.append({m: r.at(1).p50_ms for m, r in res.items()})
            print(f"[{_now()}] resnet18 latency repeat: " + ", ".join(f"{m} {v:.1f}" for m, v in reps[-1].items()),
                  flush=True)
        res = compare_latency(paths, batch_sizes=(1,), threads=o["threads"], runs=10, warmup=2, rounds=5)
        mixed = {m: r.at(1).p50_ms for m, r in res.items()}
        atomic_write_json(cell, {"when": _now(), "load_avg": _load(), "threads": o["threads"], "batch_size": 1,
                                 "runs": o["r18_runs"], "image_size": o["r18_size"], "p50_ms_per_repeat": reps,
                                 "p50_ms_all_10_runs": mixed,
                                 "sizes": {m: Path(p).stat().st_size for m, p in paths.items()}})


# ------------------------------------------------------------------------------ aggregation


def _med(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(cells: Path) -> dict[str, Any]:
    """Medians over seeds per (arch, training, method)."""
    per: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for d in sorted(p for p in cells.iterdir() if p.is_dir() and p.name != "resnet18-224"):
        lat = _read(d / "latency.json") or {}
        quick = {m: _read(d / f"{m}.json") for m in RECORD_METHODS}
        ort_s = (quick.get("ort-minmax-pc") or {}).get("quantize", {}).get("seconds")
        for m, c in quick.items():
            if c is None:
                continue
            ev, q = c["evaluation"], c["quantize"]
            p50 = (lat.get("p50_ms") or {}).get(m)
            f50 = (lat.get("p50_ms") or {}).get("float")
            sweep = {round(pt["eps"], 6): pt["robust_accuracy"] for pt in ev.get("robust_vs_eps") or []}
            per.setdefault((c["arch"], c["training"], m), []).append({
                "seed": c["seed"], "clean": ev["clean_accuracy"], "robust": ev["robust_accuracy"]["worst_case"],
                "p50_ms": p50, "lat_ratio": p50 / f50 if p50 and f50 else None, "bytes": q["size_bytes"],
                "bits": q["avg_weight_bits"], "quant_s": q["seconds"] if m != "float" else None,
                "quant_ratio": q["seconds"] / ort_s if m != "float" and ort_s else None,
                "masking": ev["gradient_masking"], "mirror": ev["mirror_agreement"], "sweep": sweep,
                "budget_bits": c["budget_bits"], "settings": c["settings"]})
    rows = []
    for (arch, adv, m), runs in per.items():
        floats = {r["seed"]: r for r in per.get((arch, adv, "float"), [])}
        d_rob = [r["robust"] - floats[r["seed"]]["robust"] for r in runs if r["seed"] in floats]
        eps_keys = sorted({e for r in runs for e in r["sweep"]})
        rows.append({"arch": arch, "training": adv, "method": m, "seeds": sorted(r["seed"] for r in runs),
                     **{k: _med([r[k] for r in runs]) for k in ("clean", "robust", "p50_ms", "lat_ratio", "bytes",
                                                                  "bits", "quant_s", "quant_ratio", "mirror")},
                     "d_robust": _med(d_rob), "masking_flags": sum(bool(r["masking"]) for r in runs),
                     "sweep": {str(e): _med([r["sweep"].get(e) for r in runs]) for e in eps_keys},
                     "per_seed": {str(r["seed"]): {"clean": r["clean"], "robust": r["robust"]} for r in runs},
                     "settings": runs[0]["settings"]})
    order = {m: i for i, m in enumerate(RECORD_METHODS)}
    rows.sort(key=lambda r: (r["arch"], r["training"], order[r["method"]]))
    return {"rows": rows}


def resnet18_summary(cells: Path) -> dict[str, Any] | None:
    d = cells / "resnet18-224"
    lat = _read(d / "latency.json")
    quant = {m: _read(d / f"quantize-{m}.json") for m in R18_METHODS[1:]}
    if lat is None and not any(quant.values()):
        return None
    out: dict[str, Any] = {"quantize_s": {m: q["median_s"] for m, q in quant.items() if q},
                           "bytes": {m: q["size_bytes"] for m, q in quant.items() if q},
                           "bits": {m: q["avg_weight_bits"] for m, q in quant.items() if q}}
    ort = out["quantize_s"].get("ort-minmax-pc")
    out["quantize_ratio_to_ort_pc"] = {m: s / ort for m, s in out["quantize_s"].items()} if ort else {}
    if lat:
        reps = lat["p50_ms_per_repeat"]
        out["p50_ms"] = {m: statistics.median(r[m] for r in reps) for m in reps[0]}
        out["ratio_to_float"] = {m: statistics.median(r[m] / r["float"] for r in reps) for m in reps[0]}
        short = lat.get("p50_ms_all_10_runs") or {}
        for m, v in short.items():  # the int4 models: one short interleaved run with everything
            if m not in out["p50_ms"]:
                out["p50_ms"][m] = v
                out["ratio_to_float"][m] = v / short["float"]
        out["laq_over_ort_pc"] = statistics.median(r["laq-int8"] / r["ort-minmax-pc"] for r in reps)
        out["laq_over_ort_pt"] = statistics.median(r["laq-int8"] / r["ort-minmax"] for r in reps)
        out["float_over_laq"] = statistics.median(r["float"] / r["laq-int8"] for r in reps)
        out["latency_settings"] = {k: lat[k] for k in ("threads", "runs", "image_size", "load_avg", "when")}
        out["bytes"]["float"] = lat["sizes"]["float"]
    return out



# ------------------------------------------------------------------------------ goals and claims


def _row(rows: list[dict[str, Any]], arch: str, adv: str, m: str) -> dict[str, Any] | None:
    return next((r for r in rows if (r["arch"], r["training"], r["method"]) == (arch, adv, m)), None)


def goals(rows: list[dict[str, Any]], r18: dict[str, Any] | None, margin: float = 0.02) -> dict[str, Any]:
    out: dict[str, Any] = {"goal1": {}, "goal2": {}, "goal3": None, "margin": margin}
    archs = sorted({r["arch"] for r in rows})
    for a in archs:
        f, laq = _row(rows, a, "pgd", "float"), _row(rows, a, "pgd", "laq-int8")
        base = [r for m in ORT_INT8 if (r := _row(rows, a, "pgd", m))]
        if f and laq and base:
            best = max(base, key=lambda r: r["robust"])
            out["goal1"][a] = {"laq_int8": laq["robust"], "best_ort": best["robust"], "best_ort_method": best["method"],
                               "float": f["robust"], "met_vs_ort": laq["robust"] >= best["robust"],
                               "met_vs_float": f["robust"] - laq["robust"] <= 0.01}
        for adv in ("pgd", "none"):
            for laq_m, ort_m in (("laq-mixed", "ort-mixed"), ("laq-int4", "ort-int4")):
                lq, ot = _row(rows, a, adv, laq_m), _row(rows, a, adv, ort_m)
                if lq and ot:
                    wins = sum(lq["per_seed"][s]["robust"] > ot["per_seed"][s]["robust"] for s in lq["per_seed"]
                               if s in ot["per_seed"])
                    out["goal2"][f"{a}/{adv}/{laq_m}"] = {
                        "laq": lq["robust"], "ort": ot["robust"], "delta": lq["robust"] - ot["robust"],
                        "clean_delta": lq["clean"] - ot["clean"], "laq_bytes": lq["bytes"], "ort_bytes": ot["bytes"],
                        "laq_bits": lq["bits"], "ort_bits": ot["bits"], "seeds_laq_better": wins,
                        "seeds": len(lq["per_seed"]), "met": lq["robust"] - ot["robust"] >= margin}
    if r18 and "p50_ms" in r18:
        out["goal3"] = {"laq_over_ort_pc": r18["laq_over_ort_pc"], "laq_over_ort_pt": r18["laq_over_ort_pt"],
                        "float_over_laq": r18["float_over_laq"],
                        "met": r18["laq_over_ort_pc"] <= 1.05 and r18["float_over_laq"] >= 1.3}
    return out


def claim1(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Robust-accuracy drop from float, plain vs PGD-trained, per arch and quantizer group."""
    out = []
    groups = {"onnxruntime int8 (mean of 4)": ORT_INT8, "ort-mixed": ("ort-mixed",), "ort-int4": ("ort-int4",),
              "laq-int8": ("laq-int8",)}
    for a in sorted({r["arch"] for r in rows}):
        for g, ms in groups.items():
            entry: dict[str, Any] = {"arch": a, "quantizer": g}
            for adv in ("none", "pgd"):
                f = _row(rows, a, adv, "float")
                qs = [r for m in ms if (r := _row(rows, a, adv, m))]
                if not f or not qs:
                    break
                drop = statistics.mean(f["robust"] - q["robust"] for q in qs)
                entry[adv] = {"float": f["robust"], "drop": drop,
                              "relative": drop / f["robust"] if f["robust"] > 0 else None}
                low = sorted(f["sweep"])[1:3]  # 0.25 and 0.5 x eps: plain models keep some robustness there
                entry[adv]["sweep_drop"] = {e: statistics.mean(f["sweep"][e] - q["sweep"].get(e, f["sweep"][e])
                                                               for q in qs) for e in low}
                entry[adv]["sweep_float"] = {e: f["sweep"][e] for e in low}
            else:
                out.append(entry)
    return out


# ------------------------------------------------------------------------------ RESULTS.md


def _seeds(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for r in rows:
        out.setdefault(r["arch"], set()).update(r["seeds"])
    return {a: sorted(v) for a, v in sorted(out.items())}


def _attacks(preset: str, only: Any = None) -> str:
    from laqonnx.robustness.attacks import PRESETS

    p = PRESETS[preset]
    budget = {"fgsm": "FGSM", "pgd": f"PGD-{p.pgd_steps}x{p.pgd_restarts}", "apgd-ce": f"APGD-CE-{p.apgd_steps}x{p.apgd_restarts}",
              "apgd-dlr": f"APGD-DLR-{p.apgd_steps}x{p.apgd_restarts}", "transfer": "transfer",
              "square": f"Square-{p.square_queries}x{p.square_restarts}", "hsj": f"HopSkipJump-{p.hsj_iters}"}
    return ", ".join(budget.get(a, a) for a in p.attacks if only is None or a in only)


def _p(v: Any, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v * 100:+.1f}" if signed else f"{v * 100:.1f}"


def _f(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def results_md(meta: dict[str, Any], rows: list[dict[str, Any]], r18: dict[str, Any] | None, g: dict[str, Any],
               c1: list[dict[str, Any]], old: str) -> str:
    s = meta["settings"]
    invocations = meta.get("invocations") or [{"command": meta["command"]}]
    cmd = " && ".join(i["command"] for i in invocations)
    L = ["# laqonnx benchmark record", "",
         f"Generated by `python benchmarks/record.py` (then `python benchmarks/record.py --report-only` regenerates this file from the "
         f"JSON cells in `benchmarks/results/{meta['cells_dir']}/`; summary in `benchmarks/results/{meta['summary']}`). "
         "Only the section between the `claims` markers is hand-written. The cells were made by these invocations "
         "(same settings; each skips the cells already present):", "",
         *[f"- `{i['command']}` ({i.get('started', '?')} – {i.get('finished', 'not finished')}, load "
           f"{i.get('load_start')} → {i.get('load_end')}, commit {i.get('git', '?')})" for i in invocations], "",
         "## Setup", "",
         f"- Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} logical cores, {meta['machine']['platform']}; "
         f"onnxruntime {meta['machine']['onnxruntime']}, torch {meta['machine']['torch']}, Python {meta['machine']['python']}.",
         f"- Load: the machine is shared with ~6 other engineers; 1/5/15-min load averages at the start "
         f"{meta.get('load_start')} and end {meta.get('load_end')} of the run ({meta.get('started')} – {meta.get('finished')}). "
         "Timings are noisy; latency *ratios* are measured interleaved in one process and are the robust figures.",
         "- Data: scikit-learn's bundled digits, stratified 80/20 split, upsampled to 16x16, 1 channel. Models: "
         "`laqonnx.zoo.get_model(arch, training, seed=s)` with the zoo's default configs (cnn 15 epochs, resnet and "
         "mobilenet 10; PGD training at L∞ ε = 0.1, 5 steps).",
         "- Seeds (training seed = attack seed; every figure is the median over the seeds listed): "
         + "; ".join(f"{a}: {', '.join(map(str, sd))}" for a, sd in _seeds(rows).items()) + ".",
         f"- Robust accuracy: `laqonnx.evaluate`, preset `{s['preset']}` restricted to {_attacks(s['preset'], s.get('attacks'))} "
         "(white-box attacks on the fake-quant mirror, transfer PGD crafted on the float model), per-example "
         f"worst case, scored on onnxruntime, L∞ ε = {s['eps']:g}, first {s['examples']} test examples.",
         *(["- Why no Square (black-box) attack: with it, one PGD-model cell took 1-3 minutes on this machine, "
            "too long for the matrix in the time available. The first 30 cells were made with Square and 200 examples "
            "(`benchmarks/results/record-partial-200ex-square/`, cnn and resnet, seed 0): there the worst case equalled "
            "the best non-Square single attack in 26 of 30 cells and was at most 1 point lower in the others; Square "
            "was the strongest single attack only on the PGD-trained resnet's float model (84.5 % vs 85.0 %). "
            "Gradient masking cannot be flagged without a black-box attack: the mirror agreement is still checked."]
           if s.get("attacks") and "square" not in s["attacks"] else []),
         f"- Calibration: the first {s['calib_limit']} training images for every method (same data for onnxruntime and LAQ). "
         "LAQ is `laqonnx.quantize` with its defaults (objective `laq`, ε as above, clean calibration).",
         "- Latency: all methods of one model measured interleaved (`laqonnx.latency.compare_latency`, batch 1, "
         f"1 thread, {s['latency_runs']} runs in 10 rounds); ×float = p50 / float p50 (below 1 is faster).",
         "- Quantize time: wall time from loading the float model to writing the quantized one (calibration "
         "included); ×ORT = time / onnxruntime MinMax per-channel (`ort-minmax-pc`) time on the same model.", "",
         "## Methods and the equal-size comparison", "",
         "- `float`: the exported model. `ort-minmax`: onnxruntime `quantize_static`, QDQ, uint8 activations, int8 "
         "weights per tensor, MinMax. `ort-minmax-pc`: the same per channel. `ort-entropy`, `ort-percentile`: "
         "per tensor with onnxruntime's entropy / percentile calibration. `laq-int8`: LAQ with int8 only.",
         f"- **Uniform onnxruntime alternative at equal size** (`ort-mixed`): onnxruntime `quantize_static` (MinMax, "
         "per-channel int8) with int4 weights (TensorQuantOverrides) on the largest weighted layers by parameter "
         f"count, largest first, until the parameter-weighted average weight bits is ≤ {s['mixed_bits']:g}. The rule "
         "looks only at layer sizes (method-independent). Its achieved average B is the budget given to "
         "`laq-mixed` (LAQ, `--avg-weight-bits B`, int4/int8 per layer chosen by the objective), and to the "
         "ablations `mse-mixed` (quantization-error term only) and `lipschitz-mixed` (Lipschitz term only).",
         "- `ort-int4`: every weight int4 per channel (MinMax); `laq-int4`: LAQ at 4.0 average bits (all int4; LAQ "
         "chooses granularity, weight range and activation range per layer).",
         "- Bytes are the ONNX file sizes; at equal average bits the two files still differ slightly (scales, zero "
         "points, per-tensor vs per-channel choices); both are listed.", ""]
    L += ["## Results per model", "",
          f"Command: `{cmd}`. Medians over seeds; robust = worst-case robust accuracy (%), Δrobust vs float (points).", ""]
    for arch in sorted({r["arch"] for r in rows}):
        for adv in ("none", "pgd"):
            sub = [r for r in rows if r["arch"] == arch and r["training"] == adv]
            if not sub:
                continue
            L += [f"### {arch}, {'plain' if adv == 'none' else 'PGD-trained'}", "",
                  "| method | w-bits | KB | clean % | robust % | Δrobust | p50 ms | ×float | quant s | ×ORT | seeds | masking flags |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in sub:
                L.append(f"| {r['method']} | {_f(r['bits'], '.2f')} | {_f(r['bytes'] and r['bytes'] / 1024, '.1f')} | "
                         f"{_p(r['clean'])} | {_p(r['robust'])} | {_p(r['d_robust'], True)} | {_f(r['p50_ms'], '.3f')} | "
                         f"{_f(r['lat_ratio'], '.2f')} | {_f(r['quant_s'], '.1f')} | {_f(r['quant_ratio'], '.1f')} | "
                         f"{len(r['seeds'])} | {r['masking_flags']} |")
            L.append("")
    if r18:
        size = s.get("r18_size", 224)
        L += [f"## ResNet-18 at 3x{size}x{size} (random weights): latency and quantize time", "",
              f"Command: `{cmd}` (phase `resnet18`). Latency: batch 1, {r18.get('latency_settings', {}).get('threads')} "
              f"threads, {r18.get('latency_settings', {}).get('runs')} runs per repeat, all models interleaved; "
              "medians over repeats of p50 and of the per-repeat ratios (the int4 mixed models, not fused by onnxruntime, from one "
              "shorter interleaved run of all six models, 10 runs). Quantize: ORT methods median of repeats, LAQ once; "
              f"calibration on {s.get('r18_calib')} digits images upsampled to 3x{size}x{size}.", "",
              "| method | w-bits | MB | p50 ms | ×float | quantize s | ×ORT (pc) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m in R18_METHODS:
            L.append(f"| {m} | {_f(r18['bits'].get(m, 32.0 if m == 'float' else None), '.2f')} | "
                     f"{_f(r18['bytes'].get(m) and r18['bytes'][m] / 1e6, '.2f')} | "
                     f"{_f(r18.get('p50_ms', {}).get(m), '.1f')} | {_f(r18.get('ratio_to_float', {}).get(m), '.2f')} | "
                     f"{_f(r18['quantize_s'].get(m), '.1f')} | {_f(r18['quantize_ratio_to_ort_pc'].get(m), '.1f')} |")
        L.append("")
    L += ["## Goals", "", f"Computed by the script from the medians above (\"clear margin\" = at least "
          f"{g['margin'] * 100:.0f} points of worst-case robust accuracy).", ""]
    for a, v in g["goal1"].items():
        ok = v["met_vs_ort"] and v["met_vs_float"]
        L.append(f"- Goal 1, {a} (PGD-trained): LAQ int8 robust {_p(v['laq_int8'])} % vs best onnxruntime int8 "
                 f"{_p(v['best_ort'])} % ({v['best_ort_method']}) and float {_p(v['float'])} % → "
                 f"{'**met**' if ok else '**missed**'} (≥ best ORT: {'yes' if v['met_vs_ort'] else 'no'}; within 1 point "
                 f"of float: {'yes' if v['met_vs_float'] else 'no'}).")
    for k, v in g["goal2"].items():
        L.append(f"- Goal 2, {k} vs its onnxruntime alternative: robust {_p(v['laq'])} vs {_p(v['ort'])} % "
                 f"(Δ {_p(v['delta'], True)}, clean Δ {_p(v['clean_delta'], True)}), LAQ better on {v['seeds_laq_better']}/"
                 f"{v['seeds']} seeds; {v['laq_bits']:.2f} vs {v['ort_bits']:.2f} bits, {v['laq_bytes'] / 1024:.1f} vs "
                 f"{v['ort_bytes'] / 1024:.1f} KB → {'**met**' if v['met'] else '**missed**'}.")
    if g["goal3"]:
        v = g["goal3"]
        L.append(f"- Goal 3, ResNet-18 {s.get('r18_size', 224)}: LAQ int8 p50 / onnxruntime int8 per-channel = {v['laq_over_ort_pc']:.3f} "
                 f"(per-tensor: {v['laq_over_ort_pt']:.3f}; goal ≤ 1.05), float / LAQ int8 = {v['float_over_laq']:.2f} "
                 f"(goal ≥ 1.3) → {'**met**' if v['met'] else '**missed**'}.")
    L += ["", "## The paper's claims: numbers", "",
          "Claim 1 (adversarially-trained models lose more robust accuracy under PTQ than plain ones): loss = float "
          "robust − quantized robust (points, positive = robust accuracy lost, negative = gained; median over seeds; for the int8 group the mean over the four "
          "onnxruntime int8 methods). At the evaluated ε plain models are often at 0 % already (nothing left to "
          "lose), so the loss is also given at 0.25ε and 0.5ε from the sweep (PGD on the mirror + transfer only).", "",
          "| arch | quantizer | plain: float robust → loss | PGD: float robust → loss | plain loss @0.25ε / 0.5ε | PGD loss @0.25ε / 0.5ε |",
          "|---|---|---:|---:|---:|---:|"]
    for e in c1:
        def cell(adv: str) -> str:
            return f"{_p(e[adv]['float'])} → {_p(e[adv]['drop'], True)}"

        def sw(adv: str) -> str:
            return " / ".join(f"{_p(d, True)}" for d in e[adv]["sweep_drop"].values()) or "—"

        L.append(f"| {e['arch']} | {e['quantizer']} | {cell('none')} | {cell('pgd')} | {sw('none')} | {sw('pgd')} |")
    L += ["", "Claim 2 (Lipschitz-guided layer-wise selection recovers robust accuracy of quantized PGD-trained models "
          "better than uniform settings at equal size), with the ablations at the same budget:", "",
          "| arch | float | ort-mixed | laq-mixed | mse-mixed | lipschitz-mixed | ort-int4 | laq-int4 | bits (mixed) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in sorted({r["arch"] for r in rows}):
        vals = {m: _row(rows, a, "pgd", m) for m in ("float", "ort-mixed", "laq-mixed", "mse-mixed", "lipschitz-mixed",
                                                      "ort-int4", "laq-int4")}
        if vals["float"] is None:
            continue
        bits = vals["ort-mixed"]["bits"] if vals["ort-mixed"] else None
        L.append(f"| {a} | " + " | ".join(_p(v["robust"]) if v else "—" for v in vals.values()) + f" | {_f(bits, '.2f')} |")
    L += ["", "## Verdicts (hand-written)", ""]
    kept = old.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") if BEGIN in old and END in old else \
        "(to be written from the numbers above)"
    L += [BEGIN, kept, END, ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------ main


def _git() -> str:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" (uncommitted changes in the tree)" if dirty else "")


def _machine() -> dict[str, Any]:
    from importlib import metadata

    from laqonnx.latency import cpu_info

    info = cpu_info()
    return {"cpu": info.model_name, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": metadata.version("onnxruntime"),
            "torch": metadata.version("torch"), "int8_isa": info.int8_isa()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: cnn, seed 0, 60 examples, small ResNet-18")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0)")
    ap.add_argument("--archs", default=None, help="default cnn,resnet,mobilenet (--quick: cnn)")
    ap.add_argument("--adversarial", default="none,pgd", help="training modes (default none,pgd)")
    ap.add_argument("--methods", default=",".join(RECORD_METHODS), help="methods (laqonnx.zoo.demo.RECORD_METHODS)")
    ap.add_argument("--preset", default="quick", help="laqonnx.evaluate attack preset (default quick)")
    ap.add_argument("--examples", type=int, default=None, help="test examples per evaluation (default 100; --quick 60)")
    ap.add_argument("--attacks", default="fgsm,pgd,apgd-ce,transfer",
                    help="attacks of the preset to run (default fgsm,pgd,apgd-ce,transfer: the quick preset without "
                         "Square, which dominated the run time; in the first 30 cells run with it (200 examples, "
                         "results/record-partial-200ex-square/) the worst case was within 1 point of the best "
                         "non-Square attack; 'preset' = all of the preset's attacks)")
    ap.add_argument("--eps", type=float, default=0.1, help="L-inf eps in input units (default 0.1 = training eps)")
    ap.add_argument("--calib-limit", type=int, default=256, help="calibration images (default 256)")
    ap.add_argument("--mixed-bits", type=float, default=6.0, help="nominal budget of the uniform int4 rule (default 6)")
    ap.add_argument("--latency-runs", type=int, default=200, help="timed runs per digits model (default 200)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the robust-vs-eps sweep")
    ap.add_argument("--no-latency", action="store_true",
                    help="skip the latency cells (measure them in a later, quieter invocation)")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes over models (default 2)")
    ap.add_argument("--no-resnet18", action="store_true", help="skip the ResNet-18 224 phase")
    ap.add_argument("--only-resnet18", action="store_true", help="only the ResNet-18 224 phase")
    ap.add_argument("--r18-size", type=int, default=None, help="ResNet-18 input size (default 224; --quick 64)")
    ap.add_argument("--r18-calib", type=int, default=32, help="ResNet-18 calibration images (default 32)")
    ap.add_argument("--r18-runs", type=int, default=None, help="ResNet-18 timed runs per repeat (default 100; --quick 20)")
    ap.add_argument("--repeats", type=int, default=None, help="ResNet-18 latency/ORT-quantize repeats (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads for ResNet-18 latency (default 2)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "laqonnx" / "record",
                    help="folder for the quantized models (default ~/.cache/laqonnx/record)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md and the summary JSON")
    ap.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="where to write RESULTS.md")
    a = ap.parse_args()
    q = a.quick
    name = "record-quick" if q else "record"
    cells = RESULTS / name
    cells.mkdir(parents=True, exist_ok=True)
    o = {"cells": str(cells), "work": str(a.work / ("quick" if q else "full")), "eps": a.eps, "preset": a.preset,
         "examples": a.examples or (60 if q else 100),
         "attacks": None if a.attacks == "preset" else tuple(a.attacks.split(",")), "calib_limit": a.calib_limit, "mixed_bits": a.mixed_bits,
         "methods": tuple(a.methods.split(",")), "sweep": not a.no_sweep, "latency": not a.no_latency, "latency_runs": a.latency_runs,
         "seeds": [int(s) for s in (a.seeds or ("0" if q else "0,1,2")).split(",")],
         "archs": (a.archs or ("cnn" if q else "cnn,resnet,mobilenet")).split(","),
         "adversarial": a.adversarial.split(","), "r18_size": a.r18_size or (64 if q else 224),
         "r18_calib": a.r18_calib, "r18_runs": a.r18_runs or (20 if q else 100), "repeats": a.repeats or (1 if q else 3),
         "threads": a.threads}
    meta_path = cells / "run.json"
    meta = _read(meta_path) or {}
    if not a.report_only:
        fixed = ("eps", "preset", "attacks", "examples", "calib_limit", "mixed_bits", "r18_size", "r18_calib")
        before = meta.get("settings") or {}
        changed = [k for k in fixed if k in before and before[k] != json.loads(json.dumps(o[k]))]
        if changed:
            print(f"{cells} holds cells made with other settings ({', '.join(changed)}): "
                  "remove the folder or use the same settings", file=sys.stderr)
            return 2
        command = "python benchmarks/record.py " + " ".join(sys.argv[1:])
        runs = meta.get("invocations", []) + [{"command": command, "started": _now(), "load_start": _load(),
                                               "git": _git()}]
        meta = {"command": command, "cells_dir": name, "summary": f"{name}.json", "settings": o,
                "machine": _machine(), "started": runs[0]["started"], "load_start": runs[0]["load_start"],
                "invocations": runs}
        atomic_write_json(meta_path, meta)
        if not a.only_resnet18:
            tasks = [(arch, adv, s) for s in o["seeds"] for arch in o["archs"] for adv in o["adversarial"]]
            with ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn")) as pool:
                futs = [pool.submit(run_model, *t, o) for t in tasks]
                for f in as_completed(futs):
                    print(f"[{_now()}] {f.result()}", flush=True)
        if not a.no_resnet18:
            run_resnet18(o)
        done = {"finished": _now(), "load_end": _load()}
        latest = _read(meta_path) or meta  # another invocation may have run meanwhile: keep its record
        runs = latest.get("invocations") or meta["invocations"]
        for inv in runs:
            if inv["started"] == meta["invocations"][-1]["started"]:
                inv.update(done)
        meta.update(done, invocations=runs)
        atomic_write_json(meta_path, meta)
    if not meta:
        print("no run.json: run the record first", file=sys.stderr)
        return 2
    rows = aggregate(cells)["rows"]
    r18 = resnet18_summary(cells)
    g = goals(rows, r18)
    c1 = claim1(rows)
    atomic_write_json(RESULTS / f"{name}.json", {**meta, "rows": rows, "resnet18": r18, "goals": g, "claim1": c1})
    old = a.results_md.read_text() if a.results_md.exists() else ""
    atomic_write_text(a.results_md, results_md(meta, rows, r18, g, c1, old))
    print(f"wrote {RESULTS / f'{name}.json'} and {a.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
