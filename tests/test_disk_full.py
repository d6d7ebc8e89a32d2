"""Disk full (issue 15): a run whose output folder fills up mid-conversion fails with one line
that says so, and leaves nothing that looks finished. The full disk is a real one: a 2.5 MB
tmpfs mounted by the test (needs root and mount; skips otherwise)."""
import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.e2e
def test_a_full_disk_is_one_line_and_nothing_looks_finished(tiny_disk):
    run = tiny_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "edgestar", "quantize", "--variant", "s050", "--weights", "demo",
                           "--calib-samples", "16", "--eval-samples", "50", "--out", str(run), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "No space left on device" in last and "Traceback" not in proc.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.endswith((".tflite", ".onnx", ".json")) and n != "manifest.json"], names
    assert not (run / ".incomplete").exists()
