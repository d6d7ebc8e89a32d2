"""``report``: the accuracy-vs-size report of run directories, from their manifests alone.

:func:`report` gathers the rows (:mod:`edgestar.report.runs`), the Pareto fronts, the board
choices (:mod:`edgestar.report.choose`) and each run's settings, then writes the formats asked:
``report.md``, ``report.csv``, ``report.json``, ``report.html`` (:mod:`edgestar.report.html`)
and the two plots (:mod:`edgestar.report.plots`). Every file is written atomically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgestar import __version__
from edgestar.errors import InputError
from edgestar.report.runs import PRECISION_ORDER, find_runs, pareto_front, read_manifest, rows_of

FORMATS = ("md", "csv", "json", "html", "png")
PLOTS = ("accuracy_vs_size.png", "accuracy_vs_latency.png")
SWEEP_FILE = "sweep.json"


@dataclass
class Report:
    rows: list[dict]
    runs: list[dict]  # per run: its folder and settings (config, versions, inputs, timings, notes)
    fronts: dict  # "size" / "latency": the rows (indices) on the Pareto front
    boards: list[dict]  # which model for which board (edgestar.report.choose)
    cpu_pick: dict | None
    sources: list[str]
    generated: str
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"edgestar_version": __version__, "generated": self.generated, "sources": self.sources,
                "rows": self.rows, "pareto_front": self.fronts, "which_model_for_which_board": self.boards,
                "cpu_pick": self.cpu_pick, "runs": self.runs}


def sort_key(row: dict):
    from edgestar.models.registry import VARIANTS

    order = list(VARIANTS)
    v = row.get("variant")
    p = row.get("precision")
    return (order.index(v) if v in order else len(order), str(v), row.get("img_size") or 0,
            PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER), str(p), row["run"])


def read_sweep(folder: Path) -> dict | None:
    """A sweep folder's ``sweep.json`` (None for another folder): its plan and precisions."""
    f = Path(folder) / SWEEP_FILE
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
        plan, precisions = list(record["plan"]), list(record["config"]["precisions"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{f} is not a sweep record edgestar can read") from None
    return {"plan": plan, "precisions": precisions}


def expand(paths) -> tuple[list[Path], tuple[str, ...] | None]:
    """The folders to search for runs, and the precisions asked for: a sweep folder stands for
    the runs of its last plan (not whatever older runs lie beside them) and its precisions."""
    out, wanted = [], []
    for p in map(Path, paths):
        record = read_sweep(p) if p.is_dir() else None
        if record is None:
            out.append(p)
            continue
        out += [p / name for name in record["plan"] if (p / name / "manifest.json").is_file()]
        wanted += record["precisions"]
    return out, tuple(dict.fromkeys(wanted)) or None


def collect(paths, *, precisions=None) -> Report:
    """The report's data for every run below ``paths`` (rows of other precisions dropped when
    ``precisions`` is given, or when a path is a sweep folder: the precisions it was asked for)."""
    from edgestar.report.choose import board_choices, cpu_pick

    folders, swept = expand(paths)
    runs = find_runs(folders) if folders else []
    if not runs:
        raise InputError(f"no run directories (with a manifest.json) below {', '.join(map(str, paths))}")
    precisions = precisions or swept
    rows, settings = [], []
    for run in runs:
        manifest = read_manifest(run)
        try:
            found, setting = rows_of(run, manifest), run_settings(run, manifest)
            for row in found:
                check_row(row)
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
            raise InputError(f"{run / 'manifest.json'} has fields edgestar cannot read "
                             f"({type(exc).__name__}: {str(exc)[:80]})") from None
        rows += [r for r in found if precisions is None or r["precision"] is None or r["precision"] in precisions]
        settings.append(setting)
    rows.sort(key=sort_key)
    fronts = {
        "size": pareto_front([(r.get("bytes"), r.get("top1")) for r in rows]),
        "latency": pareto_front([(r.get("host_latency_ms"), r.get("top1")) for r in rows]),
    }
    for name, front in fronts.items():
        for i in front:
            rows[i][f"pareto_{name}"] = True
    return Report(rows=rows, runs=settings, fronts=fronts, boards=board_choices(rows), cpu_pick=cpu_pick(rows),
                  sources=[str(p) for p in paths],
                  generated=datetime.now(timezone.utc).isoformat(timespec="seconds"))


NUMBERS = ("img_size", "num_classes", "params", "macs", "bytes", "top1", "top5", "drop_pt", "agreement",
           "logit_sqnr_db", "images", "host_latency_ms", "host_threads", "arena_bytes", "arena_reserve_bytes")


def check_row(row: dict) -> None:
    """A row's figures are numbers or None; anything else (a hand-edited manifest) is refused."""
    import math

    for key in NUMBERS:
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{key} is {v!r}, not a number")
    for key in ("top1_ci95", "top5_ci95", "drop_ci95_pt"):
        v = row.get(key)
        if v is not None and (not isinstance(v, (list, tuple)) or len(v) != 2
                              or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"{key} is {v!r}, not an interval")
    for key in ("variant", "precision", "status"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{key} is {row[key]!r}, not a name")
    for device, ms, _ in row.get("device_latency_ms") or []:
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms):
            raise ValueError(f"the latency on {device} is {ms!r}, not a number")
    if any(not isinstance(v, (bool, type(None))) for v in (row.get("boards") or {}).values()):
        raise ValueError("a board verdict is not true or false")


def run_settings(run: Path, manifest: dict) -> dict:
    config = manifest.get("config") or {}
    keep = ("variant", "weights", "img_size", "calib", "calib_samples", "calibrator", "target", "io_type",
            "eval", "eval_samples", "formats", "qat", "qat_epochs", "qat_steps", "qat_lr", "seed")
    inputs = manifest.get("inputs") or {}
    return {
        "run": str(run), "name": run.name, "status": manifest.get("status"), "created": manifest.get("created"),
        "config": {k: config.get(k) for k in keep if k in config},
        "versions": manifest.get("versions"),
        "inputs": {k: (v.get("sha256") if isinstance(v, dict) else v) for k, v in inputs.items()},
        "timings_s": manifest.get("timings_s"),
        "notes": manifest.get("notes") or [], "warnings": manifest.get("warnings") or [],
        "bench_devices": sorted((manifest.get("device_latency") or {})),
        "firmware_boards": sorted((manifest.get("firmware") or {})),
    }


def report(paths, *, out: Path, formats=None, precisions=None) -> Report:
    """Collect the report of ``paths`` and write ``formats`` (default: all) into ``out``."""
    from edgestar.files import atomic_write_bytes, atomic_write_json, ensure_writable_dir
    from edgestar.report import render

    formats = tuple(formats or FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise InputError(f"unknown report format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    rep = collect(paths, precisions=precisions)
    out = ensure_writable_dir(Path(out))
    pngs = {}
    if "png" in formats or "html" in formats:
        from edgestar.report.plots import accuracy_vs_latency, accuracy_vs_size

        pngs = {PLOTS[0]: accuracy_vs_size(rep.rows), PLOTS[1]: accuracy_vs_latency(rep.rows)}
    written = []
    if "png" in formats:
        for name, data in pngs.items():
            atomic_write_bytes(out / name, data)
            written.append(out / name)
    if "md" in formats:
        atomic_write_bytes(out / "report.md", render.markdown(rep, plots="png" in formats).encode())
        written.append(out / "report.md")
    if "csv" in formats:
        atomic_write_bytes(out / "report.csv", render.csv_text(rep.rows).encode())
        written.append(out / "report.csv")
    if "json" in formats:
        atomic_write_json(out / "report.json", rep.to_json())
        written.append(out / "report.json")
    if "html" in formats:
        from edgestar.report.html import page

        atomic_write_bytes(out / "report.html", page(rep, pngs).encode())
        written.append(out / "report.html")
    rep.files = written
    return rep
