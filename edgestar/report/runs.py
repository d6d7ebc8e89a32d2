"""Rows of an accuracy-vs-size report, read from run manifests alone (no model is run), and the
Pareto front of accuracy against size or latency.

One row per (run, precision): every ``tflite_<format>`` artifact of a run is a row (a QAT run's
are ``int8-qat``, and ``fp32-qat`` for the fine-tuned float model it also converts). A failed run is one row saying which stage failed and why. Missing
figures are None (rendered as "—"), never 0.
"""
from __future__ import annotations

from pathlib import Path

from edgestar.errors import InputError

PRECISION_ORDER = ("fp32", "fp16", "dynamic", "int8", "int8-qat", "fp32-qat", "mixed")


def find_runs(paths) -> list[Path]:
    """Run directories: each path is one (it holds ``manifest.json``) or a folder searched
    recursively. Hidden folders (``.incomplete``) are skipped. Sorted, without duplicates, in
    the form the paths were given (relative stays relative, so reports can be moved)."""
    found = {}
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"{p} does not exist")
        if (p / "manifest.json").is_file():
            found.setdefault(p.resolve(), p)
        elif p.is_dir():
            for m in p.rglob("manifest.json"):
                if not any(part.startswith(".") for part in m.relative_to(p).parts[:-1]):
                    found.setdefault(m.parent.resolve(), m.parent)
        else:
            raise InputError(f"{p} is neither a run directory nor a folder of runs")
    return sorted(found.values())


def read_manifest(run: Path) -> dict:
    """The manifest of ``run`` (:func:`edgestar.pipeline.rundir.load_manifest`: a corrupt one or
    one of another schema version raises InputError)."""
    from edgestar.pipeline.rundir import load_manifest

    return load_manifest(run)


def failed_stage(manifest: dict) -> tuple[str | None, str | None]:
    for name, stage in (manifest.get("stages") or {}).items():
        if isinstance(stage, dict) and stage.get("status") not in (None, "ok", "skipped"):
            return name, stage.get("error") or stage.get("status")
    return None, manifest.get("error")


def _interval(top1, images):
    from edgestar.evaluate.validate import proportion_interval

    if top1 is None or not images:
        return None
    k = round(top1 * images)
    return [round(v, 5) for v in proportion_interval(k, images)]


def _macs(model: dict) -> int | None:
    from edgestar.deploy.fit import macs
    from edgestar.models.registry import VARIANTS

    spec = VARIANTS.get(model.get("variant"))
    if spec is None or not model.get("img_size") or not model.get("num_classes"):
        return None
    return macs(spec, int(model["img_size"]), int(model["num_classes"]))


def _latency(manifest: dict, fmt: str):
    """The latency of the run's ``.tflite`` of format ``fmt`` from ``device_latency`` (what
    ``edgestar bench`` stored): at the fewest threads measured, the fastest kernel set (XNNPACK
    or LiteRT's builtin kernels: on some CPUs XNNPACK's INT8 path is the slower one). Returns
    (host ms, host kernels, host threads, [(device, ms, kernels)]); "local" is the host. Vela
    estimates are not latencies and are skipped."""
    host = kernels = threads = None
    devices = []
    for device, entry in (manifest.get("device_latency") or {}).items():
        if not isinstance(entry, dict) or entry.get("estimate"):
            continue
        rows = [r for r in entry.get("rows", []) if r.get("format") == fmt
                and str(r.get("model", "")).startswith("tflite") and r.get("median_ms") is not None]
        if not rows:
            continue
        fewest = min(r.get("threads") or 0 for r in rows)
        best = min((r for r in rows if (r.get("threads") or 0) == fewest),
                   key=lambda r: (r["median_ms"], str(r.get("kernels"))))
        if device == "local":
            host, kernels, threads = best["median_ms"], best.get("kernels"), best.get("threads")
        else:
            devices.append((device, best["median_ms"], best.get("kernels")))
    return host, kernels, threads, devices


def _mcu(manifest: dict, artifact: dict) -> dict:
    """The MCU arena (TFLite Micro's x86 interpreter: the same for every board; the reserve is
    what the firmware allots) and the board verdicts ``edgestar firmware`` recorded for this very
    file."""
    found = {b: e for b, e in (manifest.get("firmware") or {}).items()
             if isinstance(e, dict) and e.get("source_sha256") == artifact.get("sha256")}
    if not found:
        return {"arena_bytes": None, "arena_reserve_bytes": None, "boards": {}}
    first = next(iter(found.values()))["arena"]
    return {"arena_bytes": first.get("total"), "arena_reserve_bytes": first.get("reserve"),
            "boards": {b: e.get("fits") for b, e in sorted(found.items())}}


def rows_of(run: Path, manifest: dict) -> list[dict]:
    """The report rows of one run (see the module docstring)."""
    model = manifest.get("model") or {}
    config = manifest.get("config") or {}
    base = {"run": str(run), "variant": model.get("variant") or config.get("variant"),
            "img_size": model.get("img_size") or config.get("img_size"), "num_classes": model.get("num_classes"),
            "params": model.get("params"), "macs": _macs(model), "status": manifest.get("status"),
            "target": config.get("target"), "weights": config.get("weights")}
    if manifest.get("status") != "ok":
        stage, why = failed_stage(manifest)
        return [{**base, "precision": None, "failed_stage": stage, "error": why}]
    metrics = manifest.get("metrics") or {}
    images = metrics.get("eval_images")
    labelled = bool(metrics.get("eval_labelled"))
    fp32_top1 = (metrics.get("torch_fp32") or {}).get("top1") if labelled else None
    out = []
    for key, art in (manifest.get("artifacts") or {}).items():
        if not key.startswith("tflite_"):
            continue
        fmt = key.removeprefix("tflite_")
        m = metrics.get(key) or {}
        top1 = m.get("top1") if labelled else None
        host, kernels, threads, devices = _latency(manifest, fmt)
        row = {**base, "precision": f"{fmt}-qat" if config.get("qat") else fmt,
               "artifact": art.get("path"), "bytes": art.get("bytes"),
               "top1": top1, "top1_ci95": _interval(top1, images),
               "top5": m.get("top5") if labelled else None, "top5_ci95": _interval(m.get("top5") if labelled else None,
                                                                                   images),
               "drop_pt": None if top1 is None or fp32_top1 is None else round((fp32_top1 - top1) * 100, 3),
               "drop_ci95_pt": metrics.get("int8_top1_drop_ci95_pt") if fmt == "int8" else None,
               "agreement": m.get("agreement"), "logit_sqnr_db": m.get("logit_sqnr_db"),
               "images": images, "labelled": labelled,
               "host_latency_ms": host, "host_kernels": kernels, "host_threads": threads,
               "device_latency_ms": devices,
               **_mcu(manifest, art), "failed_stage": None, "error": None}
        out.append(row)
    return out


def dominated(a: tuple, b: tuple) -> bool:
    """Is point ``a`` = (cost, accuracy) dominated by ``b``: no costlier, no less accurate, and
    strictly better in one?"""
    return b[0] <= a[0] and b[1] >= a[1] and (b[0] < a[0] or b[1] > a[1])


def pareto_front(points: list) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates, by increasing cost.
    Points with a None coordinate are never on it; identical points are all on it."""
    valid = [(i, p) for i, p in enumerate(points) if p[0] is not None and p[1] is not None]
    front = [i for i, p in valid if not any(dominated(p, q) for _, q in valid)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))
