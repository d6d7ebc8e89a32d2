"""The report's table as text: the cells (shared by Markdown and HTML), ``report.md`` and
``report.csv``. A figure that was not measured is "—", never 0."""
from __future__ import annotations

import csv
import io
import json

from edgestar.deploy.boards import core_display_name

NONE = "—"


def _num(value, fmt: str) -> str:
    return NONE if value is None else format(value, fmt)


def _si(value, unit: str = "") -> str:
    """Counts: 1234567 -> 1.23 M (decimal prefixes)."""
    if value is None:
        return NONE
    for div, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".strip()


def size(value) -> str:
    """Bytes in binary units, as the board table counts them: 1 KiB = 1,024 B."""
    if value is None:
        return NONE
    for div, unit in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= div:
            return f"{value / div:.3g} {unit}" if value < 100 * div else f"{value / div:.0f} {unit}"
    return f"{value} B"


def _percent_ci(value, ci) -> str:
    if value is None:
        return NONE
    text = f"{value * 100:.1f} %"
    return text + (f" ({ci[0] * 100:.1f}–{ci[1] * 100:.1f})" if ci else "")


def _drop(row) -> str:
    if row.get("drop_pt") is None:
        return NONE
    text = f"{row['drop_pt']:+.2f}"
    ci = row.get("drop_ci95_pt")
    return text + (f" ({ci[0]:+.2f} to {ci[1]:+.2f})" if ci else "")


def _host(row) -> str:
    if row.get("host_latency_ms") is None:
        return NONE
    return f"{row['host_latency_ms']:.3f} {row.get('host_kernels') or ''}".strip()


def _devices(row) -> str:
    return ", ".join(f"{d}: {ms:.2f} {k or ''}".strip() for d, ms, k in row.get("device_latency_ms") or []) or NONE


def _boards(row) -> str:
    boards = row.get("boards") or {}
    return ", ".join(f"{b} {'fits' if fits else 'no'}" for b, fits in boards.items()) or NONE


COLUMNS = (
    ("variant", lambda r: f"{r['variant']}"),
    ("px", lambda r: _num(r.get("img_size"), "d")),
    ("precision", lambda r: r.get("precision") or NONE),
    ("params", lambda r: _si(r.get("params"))),
    ("MACs", lambda r: _si(r.get("macs"))),
    (".tflite", lambda r: size(r.get("bytes"))),
    ("top-1 (95 % CI)", lambda r: _percent_ci(r.get("top1"), r.get("top1_ci95"))),
    ("top-5", lambda r: _percent_ci(r.get("top5"), None)),
    ("drop vs FP32, pt (95 % CI)", _drop),
    ("agreement", lambda r: NONE if r.get("agreement") is None else f"{r['agreement'] * 100:.1f} %"),
    ("logit SQNR dB", lambda r: _num(r.get("logit_sqnr_db"), ".1f")),
    ("host ms", _host),
    ("device ms", _devices),
    ("MCU arena", lambda r: size(r.get("arena_bytes"))),
    ("boards", _boards),
)


def cells(row: dict) -> list[str]:
    """The table cells of one row; a failed run says where it failed instead of figures."""
    if row.get("precision") is None:  # a failed or interrupted run
        what = "interrupted" if row.get("status") == "running" else "FAILED"
        first = [f(row) for _, f in COLUMNS[:2]]
        message = f"{what} at {row.get('failed_stage') or '?'}: {row.get('error') or 'no error recorded'}"
        return first + [NONE] + [message] + [""] * (len(COLUMNS) - 4)
    return [f(row) for _, f in COLUMNS]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def latency_setting(rows) -> str | None:
    """How the host latencies were measured, in words (None: not measured)."""
    threads = sorted({r.get("host_threads") for r in rows if r.get("host_latency_ms") is not None},
                     key=lambda t: (t is None, t or 0))
    if not threads:
        return None
    words = ", ".join("all cores" if t in (0, None) else f"{t} thread{'s' if t != 1 else ''}" for t in threads)
    return f"{words}, the faster of XNNPACK and LiteRT's builtin kernels for each model (named in the cell)"


def _settings_line(rep) -> str:
    rows = [r for r in rep.rows if r.get("precision")]
    images = sorted({r["images"] for r in rows if r.get("images")})
    labelled = any(r.get("labelled") for r in rows)
    setting = latency_setting(rows)
    parts = [f"{len(rep.runs)} runs, {len(rows)} models",
             (f"top-1 on {', '.join(map(str, images))} labelled images with Wilson 95 % intervals"
              if labelled and images else "no labelled accuracy (agreement with PyTorch FP32 only)")]
    parts.append(f"host latency: median, {setting}" if setting else "host latency: not measured")
    return "; ".join(parts)


def markdown(rep, *, plots: bool = True) -> str:
    lines = ["# Accuracy vs size", "",
             f"Generated {rep.generated} by edgestar from the manifests of {', '.join(rep.sources)}. "
             f"{_settings_line(rep)}. \"—\": not measured. Drops are PyTorch FP32 minus this model, in points.",
             ""]
    head = [name for name, _ in COLUMNS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rep.rows:
        cell = [_md_escape(c) for c in cells(row)]
        if row.get("pareto_size"):
            cell[2] = f"**{cell[2]}**"
        lines.append("| " + " | ".join(cell) + " |")
    lines += ["", "**Bold** precision: on the accuracy-vs-size Pareto front (no other model is both "
              "smaller and more accurate).", ""]
    if plots:
        lines += ["![top-1 vs model size](accuracy_vs_size.png)", "",
                  "![top-1 vs host latency](accuracy_vs_latency.png)", ""]
    lines += ["## Which model for which board", "", BOARDS_INTRO, "", *(board_lines(rep, markdown=True)
                                                                  or [NO_ARENA]), ""]
    if rep.cpu_pick:
        lines += ["## On the host CPU", "", rep.cpu_pick["text"], ""]
    return "\n".join(lines)


BOARDS_INTRO = ("The most accurate INT8 model whose .tflite (plus a code-size estimate) fits the flash and whose "
                "arena reserve, measured by TFLite Micro, fits the RAM of each board in edgestar's board table.")
NO_ARENA = ("No INT8 model here has a measured arena, so no board can be matched: run `edgestar sweep "
            "--firmware BOARD,...` or `edgestar firmware RUN_DIR --board BOARD`.")


def board_lines(rep, *, markdown: bool) -> list[str]:
    """The board section: a table (Markdown) or rows of cells (HTML)."""
    out = []
    if not any(b["choice"] or b["choice_text"] != "unknown" for b in rep.boards):
        return []  # nothing measured: the caller says so in one sentence
    if markdown:
        out += ["| board | MCU | budget (flash / arena RAM) | most accurate model that fits | why |",
                "|---|---|---|---|---|"]
    for b in rep.boards:
        cells_ = [b["board"], f"{b['mcu']} ({core_display_name(b['core'])}, {b['clock_mhz']} MHz)",
                  f"{size(b['flash_budget'])} / {size(b['arena_budget'])}", b["choice_text"], b["why"]]
        out.append("| " + " | ".join(_md_escape(c) for c in cells_) + " |" if markdown else cells_)
    return out


def csv_text(rows: list[dict]) -> str:
    """Every field of every row, one column per field; lists as JSON, missing as empty."""
    fields = []
    for row in rows:
        for k in row:
            if k not in fields:
                fields.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else "" if v is None else v)
                         for k, v in row.items()})
    return buf.getvalue()
