"""Interruptions (issue 15): SIGINT and SIGTERM stop ``quantize`` and ``sweep`` cleanly -- one
line, exit code 130 / 143, the run directory marked interrupted, no converter left running --
and SIGKILL leaves nothing that looks finished. The same command run again finishes the job
with the same ``.tflite`` bytes as an uninterrupted run."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgestar.errors import InputError
from edgestar.pipeline.rundir import RunDir, interrupted_run

QUANTIZE = ["quantize", "--variant", "s050", "--weights", "demo", "--img-size", "32", "--calib-samples", "16",
            "--eval-samples", "50", "-q"]


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "edgestar", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_stage(proc, manifest: Path, stage: str, timeout=300):
    """Poll the run's manifest until ``stage`` is running (the process is then mid-stage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            stages = json.loads(manifest.read_text()).get("stages", {})
        except (OSError, ValueError):
            stages = {}
        if stages.get(stage, {}).get("status") == "running":
            return
        time.sleep(0.05)
    pytest.fail(f"stage {stage} never started")


def children_of(pid: int) -> list[int]:
    """Processes started by edgestar for ``pid`` (children carry EDGESTAR_PARENT_PID)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"EDGESTAR_PARENT_PID={pid}".encode() in env.split(b"\0"):
            found.append(int(proc.name))
    return found


def tflite_digests(run: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("*.tflite"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same command."""
    work = tmp_path_factory.mktemp("reference")
    proc = start([*QUANTIZE, "--out", work / "run"], work)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return tflite_digests(work / "run")


@pytest.mark.e2e
@pytest.mark.parametrize("sig, code, stage", [(signal.SIGTERM, 143, "convert"), (signal.SIGINT, 130, "validate")])
def test_a_signal_stops_quantize_cleanly_and_the_same_command_finishes(tmp_path, reference, sig, code, stage):
    run = tmp_path / "run"
    proc = start([*QUANTIZE, "--out", run], tmp_path)
    wait_for_stage(proc, run / "manifest.json", stage)
    workers = children_of(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    name = signal.Signals(sig).name
    assert err.strip().splitlines()[-1] == (f"Error: interrupted by {name}; {run} is marked interrupted; "
                                            "run the command again to redo or resume")
    assert "Traceback" not in err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["stages"][stage] == {**manifest["stages"][stage], "status": "interrupted",
                                         "error": f"interrupted by {name}"}
    assert not (run / ".incomplete").exists() and not list(run.glob("*.tflite"))  # nothing looks finished
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a child outlived the interrupted run"
    again = start([*QUANTIZE, "--out", run], tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert tflite_digests(run) == reference  # the same bytes as the uninterrupted run


@pytest.mark.e2e
def test_sigkill_leaves_nothing_that_looks_finished_and_the_command_starts_over(tmp_path, reference):
    run = tmp_path / "run"
    proc = start([*QUANTIZE, "--out", run], tmp_path)
    wait_for_stage(proc, run / "manifest.json", "convert")
    proc.kill()
    proc.communicate(timeout=60)
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert not list(run.glob("*.tflite")) and interrupted_run(run)
    again = start([*QUANTIZE, "--out", run], tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert tflite_digests(run) == reference


def test_a_run_in_progress_is_never_replaced(tmp_path):
    run = RunDir.create(tmp_path / "run", tool="test")  # this process: alive, but it is us
    assert interrupted_run(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "edgestar"])
    try:
        manifest["process"]["pid"] = sleeper.pid
        (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(InputError, match=f"a run is in progress in .* \\(pid {sleeper.pid}\\)"):
            RunDir.check_new(tmp_path / "run")
    finally:
        sleeper.kill()
        sleeper.wait()
    RunDir.check_new(tmp_path / "run")  # its process is gone: an interrupted run, started over
    run.manifest["status"] = "failed"
    run.save()
    with pytest.raises(InputError, match="is not empty"):  # a failed run's record is kept
        RunDir.check_new(tmp_path / "run")
    assert os.path.isdir(tmp_path / "run")


@pytest.mark.e2e
def test_an_interrupted_sweep_resumes_keeping_what_was_complete(tmp_path):
    args = ["sweep", "--variants", "s050", "--precisions", "int8,int8-qat", "--qat-steps", "1",
            "--calib-samples", "16", "--eval-samples", "50", "--format", "json", "--out", tmp_path / "sw", "-q"]
    proc = start(args, tmp_path)
    wait_for_stage(proc, tmp_path / "sw" / "s050-32px-qat" / "manifest.json", "qat")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("Error: interrupted by SIGTERM; ")
    assert json.loads((tmp_path / "sw" / "s050-32px-qat" / "manifest.json").read_text())["status"] == "interrupted"
    again = start([*args, "--json"], tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    kept = {c["name"]: c["reused"] for c in json.loads(out.strip().splitlines()[-1])["combinations"]}
    assert kept == {"s050-32px": True, "s050-32px-qat": False}
