"""``edgestar report``: every output rendered from manifests written by the pipeline's own
writers (tests/test_report_runs.py:write_run, bench's summary_entry, firmware's record), the
board choice, missing figures shown as "—", failed runs kept, and the CLI's errors."""
import base64
import csv
import io
import json
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from PIL import Image

from edgestar.cli import cli
from edgestar.deploy.boards import Board
from edgestar.files import atomic_write_json
from edgestar.report.build import collect, report
from edgestar.report.choose import board_choices
from edgestar.report.runs import read_manifest
from test_report_runs import write_run


def add_latency(run, ms: dict):
    """Store host latencies the way ``edgestar bench`` does (bench.summary_entry)."""
    from edgestar.deploy.bench import summary_entry

    manifest = read_manifest(run)
    rows = [{"model": f"tflite {fmt}", "format": fmt, "kernels": k, "threads": 1, "median_ms": v}
            for fmt, per in ms.items() for k, v in per.items()]
    share = {"device": "local", "measured": "2026-12-01T00:00:00+00:00", "estimate": False, "system": {},
             "runtime": {}, "rows": rows, "evaluation": []}
    manifest["device_latency"] = {"local": summary_entry(share)}
    atomic_write_json(run / "manifest.json", manifest)


def add_firmware(run, board="corstone-300", arena=60_000, fits=True):
    """Record a firmware result with ``edgestar.deploy.firmware.record`` (the writer firmware uses)."""
    from edgestar.deploy.firmware import record

    manifest = read_manifest(run)
    model = run / manifest["artifacts"]["tflite_int8"]["path"]
    result = {"board": board, "model_bytes": model.stat().st_size, "rotation": "graph", "patches": None,
              "arena": {"total": arena, "head": arena // 4, "tail": arena - arena // 4, "reserve": arena + 2048,
                        "reserve_from": "host", "firmware_used": None},
              "verdict": {"fits": fits, "reason": None if fits else "RAM: too big",
                          "flash": {"used_bytes": 1, "code_bytes_is_default": True}},
              "host_check": {"bit_exact": True}, "build": None, "qemu": None, "out": str(run / "fw")}
    record(run, result, source=model)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "sweep"
    a = write_run(root / "s050-32px", variant="s050", flip=0.3, seed=1)
    b = write_run(root / "s1-32px", variant="s1", flip=0.05, seed=2)
    write_run(root / "s100-32px", variant="s100", fail_at="validate")
    add_latency(a, {"fp32": {"xnnpack": 1.0, "builtin": 1.2}, "int8": {"xnnpack": 8.0, "builtin": 0.6}})
    add_firmware(a)
    return root, a, b


def test_every_format_from_recorded_manifests(runs, tmp_path):
    root, a, b = runs
    rep = report([root], out=tmp_path / "out")
    names = sorted(p.name for p in rep.files)
    assert names == ["accuracy_vs_latency.png", "accuracy_vs_size.png", "report.csv", "report.html",
                     "report.json", "report.md"]
    md = (tmp_path / "out" / "report.md").read_text()
    table = [line for line in md.split("## Which model")[0].splitlines() if line.startswith("| s")]
    assert len(table) == 5  # 2 runs x (fp32, int8) + the failed run
    s050_int8 = next(line for line in table if line.startswith("| s050 | 32 | ") and "int8" in line)
    assert "0.600 builtin" in s050_int8  # the faster kernel set at one thread, named
    assert "58.6 KiB" in s050_int8 and "corstone-300 fits" in s050_int8
    s1_fp32 = next(line for line in table if line.startswith("| s1 | 32 | ") and "fp32" in line)
    cells = [c.strip() for c in s1_fp32.strip("|").split("|")]
    assert cells[11] == "—" and cells[13] == "—"  # never bench'ed, no firmware: "—", never 0
    failed = next(line for line in table if line.startswith("| s100"))
    assert "FAILED at validate: the FP32 TFLite model disagrees with PyTorch" in failed
    # CSV: one row per table row, missing values empty
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "report.csv").read_text())))
    assert len(rows) == 5
    s1 = next(r for r in rows if r["variant"] == "s1" and r["precision"] == "fp32")
    assert s1["host_latency_ms"] == "" and float(s1["top1"]) > 0
    # JSON: rows, fronts, boards
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(data["rows"]) == 5 and set(data["pareto_front"]) == {"size", "latency"}
    assert {b["board"] for b in data["which_model_for_which_board"]} >= {"corstone-300", "nano33ble"}
    for name in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.width > 600 and im.height > 400


def test_the_pareto_front_is_marked_in_the_rows(runs):
    root, a, b = runs
    rep = collect([root])
    ok = [r for r in rep.rows if r["precision"]]
    front = [r for r in ok if r.get("pareto_size")]
    for r in ok:  # no row off the front is both smaller and more accurate than a front row
        if not r.get("pareto_size"):
            assert any(f["bytes"] <= r["bytes"] and f["top1"] >= r["top1"] for f in front)
    assert [r["precision"] for r in rep.rows if r.get("pareto_latency")]  # the bench'ed run has a latency front


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.imgs = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        for key in ("src", "href", "action", "data"):
            if attrs.get(key):
                self.refs.append(attrs[key])
        if tag == "img":
            self.imgs.append(attrs)
        if tag in ("script", "link", "iframe", "object"):
            self.refs.append(f"<{tag}>")


def test_html_is_self_contained(runs, tmp_path):
    root, _, _ = runs
    report([root], out=tmp_path / "out", formats=("html",))
    parser = _Refs()
    parser.feed((tmp_path / "out" / "report.html").read_text())
    assert {"results", "boards", "accuracy-vs-size", "accuracy-vs-latency"} <= parser.ids
    assert all(ref.startswith("data:image/png;base64,") for ref in parser.refs), parser.refs
    html = (tmp_path / "out" / "report.html").read_text()
    failed = html[html.index('<tr class="failed">'):].split("</tr>")[0]
    assert f'colspan="12">FAILED at validate: the FP32 TFLite model disagrees' in failed  # spans the figures
    for img in parser.imgs:
        data = base64.b64decode(img["src"].split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG"
    assert not (tmp_path / "out" / "accuracy_vs_size.png").exists()  # only the formats asked


def test_which_model_for_which_board():
    def board(name, flash, arena):
        return Board(name=name, description="d", mcu="m", core="cortex-m4", clock_mhz=1, flash_bytes=flash,
                     ram_bytes=arena, arena_region_bytes=arena, reserve_bytes=0, family="arm-cortex-m", sources={})

    boards = {b.name: b for b in (board("big", 4_000_000, 1_000_000), board("small", 1_000_000, 200_000),
                                  board("tiny", 200_000, 50_000))}

    def row(variant, top1, size, arena, precision="int8"):
        return {"run": variant, "variant": variant, "img_size": 32, "precision": precision, "top1": top1,
                "bytes": size, "arena_reserve_bytes": arena}

    rows = [row("s1", 0.80, 2_800_000, 180_000), row("s050", 0.76, 480_000, 54_000),
            row("s100", 0.78, 850_000, 150_000), row("s100b", 0.78, 800_000, 150_000),  # a tie: smaller wins
            row("s2", 0.90, 100, 1, precision="fp32"),  # not INT8: never a candidate
            row("s3", 0.95, 100_000, None)]  # no measured arena: never guessed at
    got = {b["board"]: b for b in board_choices(rows, boards)}
    assert got["big"]["choice"]["variant"] == "s1"
    assert got["small"]["choice"]["variant"] == "s100b"  # s1 is over the flash; s100 and s100b both fit: the tie goes to the smaller
    assert got["tiny"]["choice"] is None and "nothing" in got["tiny"]["choice_text"]
    assert "s050" in got["tiny"]["why"] and "exceeds" in got["tiny"]["why"]
    none = board_choices([row("s3", 0.95, 100_000, None)], boards)
    assert all(b["choice_text"] == "unknown" for b in none)


def test_report_cli(runs, tmp_path):
    root, _, _ = runs
    result = CliRunner().invoke(cli, ["report", str(root), "--out", str(tmp_path / "r"), "--format", "md,csv"])
    assert result.exit_code == 0, result.output
    assert "5 rows from 3 runs (1 failed)" in result.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.csv", "report.md"]


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "does not exist"),
    (["EMPTY"], "no run directories"),
    (["RUNS", "--format", "pdf"], "unknown value 'pdf'"),
    (["BROKEN"], "is not valid JSON"),
])
def test_report_cli_errors(runs, tmp_path, args, message):
    root, _, _ = runs
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    paths = {"EMPTY": str(tmp_path / "empty"), "RUNS": str(root), "BROKEN": str(broken),
             "nowhere": str(tmp_path / "nowhere")}
    result = CliRunner().invoke(cli, ["report", *[paths.get(a, a) for a in args], "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output.strip().splitlines()[-1]
    assert "Traceback" not in result.output
