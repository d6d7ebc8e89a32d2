"""``report.html``: one self-contained page -- the table, both plots (PNG data URIs), which model
for which board, and each run's settings. No script, no external file, no network request:
it reads the same offline, mailed or opened from a USB stick."""
from __future__ import annotations

import base64
from html import escape

from edgestar.report.render import BOARDS_INTRO, COLUMNS, NO_ARENA, board_lines, cells

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1b1b1b; }
table { border-collapse: collapse; font-size: 0.88em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.text, th.text { text-align: left; white-space: normal; }
tr.front td.precision { font-weight: bold; }
tr.failed td { background: #fde8e8; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; font-size: 0.88em; }
dt { font-weight: bold; } dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
p.note { color: #555; font-size: 0.9em; }
div.scroll { overflow-x: auto; }
.warning { color: #a00; }
"""
TEXT_COLUMNS = {"variant", "precision", "device ms", "boards"}


def _table(rep) -> str:
    head = "".join(f'<th class="{"text" if n in TEXT_COLUMNS else ""}">{escape(n)}</th>' for n, _ in COLUMNS)
    body = []
    for row in rep.rows:
        failed = row.get("precision") is None
        cls = "failed" if failed else ("front" if row.get("pareto_size") else "")
        tds = []
        for (name, _), text in zip(COLUMNS, cells(row)):
            if failed and text == "":
                continue
            attrs = ' class="text"' if name in TEXT_COLUMNS else ""
            if name == "precision":
                attrs = ' class="text precision"'
            if failed and name == "params":  # the failed stage and its error, across the figures
                attrs = f' class="text" colspan="{len(COLUMNS) - 3}"'
            tds.append(f"<td{attrs}>{escape(text)}</td>")
        body.append(f'<tr class="{cls}">{"".join(tds)}</tr>')
    return (f'<div class="scroll"><table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            '</tbody></table></div>')


def _boards(rep) -> str:
    head = "".join(f'<th class="text">{h}</th>' for h in
                   ("board", "MCU", "budget (flash / arena RAM)", "most accurate model that fits", "why"))
    lines = board_lines(rep, markdown=False)
    if not lines:
        return f"<p>{escape(NO_ARENA)}</p>"
    rows = "".join("<tr>" + "".join(f'<td class="text">{escape(c)}</td>' for c in cells_) + "</tr>"
                   for cells_ in lines)
    return f'<table id="boards"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _dl(items: dict) -> str:
    return "<dl>" + "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in items.items()
                            if v not in (None, {}, [])) + "</dl>"


def _runs(rep) -> str:
    out = []
    for run in rep.runs:
        parts = [_dl(run["config"]), _dl({"status": run["status"], "created": run["created"],
                                          "bench devices": ", ".join(run["bench_devices"]),
                                          "firmware boards": ", ".join(run["firmware_boards"])})]
        if run["inputs"]:
            parts.append("<p>inputs (sha256)</p>" + _dl(run["inputs"]))
        if run["versions"]:
            parts.append("<p>tool versions</p>" + _dl(run["versions"]))
        if run["timings_s"]:
            parts.append("<p>seconds per stage</p>" + _dl(run["timings_s"]))
        parts += [f'<p class="warning">WARNING: {escape(w)}</p>' for w in run["warnings"]]
        parts += [f'<p class="note">note: {escape(n)}</p>' for n in run["notes"]]
        out.append(f"<details><summary>{escape(run['name'])} — {escape(str(run['status']))} "
                   f"<small>({escape(run['run'])})</small></summary>{''.join(parts)}</details>")
    return "".join(out)


def page(rep, pngs: dict[str, bytes]) -> str:
    from edgestar import __version__
    from edgestar.report.render import _settings_line

    plots = "".join(
        f'<figure><img class="plot" id="{name.removesuffix(".png").replace("_", "-")}" alt="{escape(alt)}" '
        f'src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}"></figure>'
        for name, alt in (("accuracy_vs_size.png", "top-1 vs model size"),
                          ("accuracy_vs_latency.png", "top-1 vs host latency")) if name in pngs)
    cpu = f"<h2>On the host CPU</h2><p>{escape(rep.cpu_pick['text'])}</p>" if rep.cpu_pick else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgestar report: accuracy vs size</title><style>{STYLE}</style></head>
<body>
<h1>Accuracy vs size</h1>
<p class="note">Generated {escape(rep.generated)} by edgestar {escape(__version__)} from the manifests of
{escape(', '.join(rep.sources))}. {escape(_settings_line(rep))}. "—": not measured. Drops are PyTorch FP32
minus this model, in points; <b>bold</b> precision: on the accuracy-vs-size Pareto front.</p>
{_table(rep)}
<h2>Plots</h2>
{plots}
<h2>Which model for which board</h2>
<p class="note">{escape(BOARDS_INTRO)}</p>
{_boards(rep)}
{cpu}
<h2>Runs</h2>
{_runs(rep)}
</body></html>
"""
