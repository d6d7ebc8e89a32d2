"""Paths with spaces, quotes, shell metacharacters and non-ASCII letters (issue 15) through
every command: train, quantize, bench, firmware, report and sweep all work on them, and no
part of a path is ever run as a command (the ``$(touch ...)`` in the names never creates its
file). The ssh ``bench`` has its own such test (test_bench_devices.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WEIRD = "wéird $(touch PWNED1) `touch PWNED2`; 'q' \"dq\" & | > < * ? 日本 ü"


def edgestar(*args, cwd):
    return subprocess.run([sys.executable, "-m", "edgestar", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.e2e
def test_every_command_works_on_paths_with_metacharacters_and_unicode(tmp_path):
    from PIL import Image

    base = tmp_path / WEIRD
    data = base / "données ; $HOME"
    rng = np.random.default_rng(0)
    for cls in ("chat $x", "chien 'y'"):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / cls / f"ïmg {i};.png")

    ckpts = base / "ckpts `x`"
    res = edgestar("train", "--variant", "s050", "--data", data, "--epochs", "1", "--batch-size", "8",
                   "--out", ckpts / "starnet s050 ü.pt", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = base / "run $(id)"
    res = edgestar("quantize", "--variant", "s050", "--weights", ckpts / "starnet s050 ü.pt", "--calib", data,
                   "--calib-samples", 16, "--eval", data, "--out", run, "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["inputs"]["evaluation"]["count"] == 16
    res = edgestar("bench", run, "--runs", 2, "--warmup", 0, "--threads", 1, "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = edgestar("firmware", run, "--board", "nano33ble", "--out", base / "fw ; ls", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["out"] == str(base / "fw ; ls") and list((base / "fw ; ls").glob("*.cc"))
    res = edgestar("report", run, "--out", base / "report & co", "--format", "md,csv,json,html", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (base / "report & co" / "report.html").is_file()
    res = edgestar("sweep", "--variants", "s050", "--precisions", "int8", "--weights", ckpts, "--calib", data,
                   "--calib-samples", 16, "--eval", data, "--format", "md", "--out", base / "sweep | x", "-q",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((base / "sweep | x" / "s050-32px" / "manifest.json").read_text())["status"] == "ok"
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert not list(Path.home().glob("PWNED*"))
