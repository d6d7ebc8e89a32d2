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
import tempfile
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


def wait_for_stage(proc, manifest: Path, stage: str, timeout=300, started=False):
    """Poll the run's manifest until ``stage`` is running (the process is then mid-stage), or
    with ``started`` until it has started (a stage of tenths of a second may be over by the
    time the poll sees it: the process is then in it or in the next)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            written = json.loads(manifest.read_text())
        except (OSError, ValueError):
            written = {}
        # the manifest of this process (an earlier, interrupted run may have left one there)
        stages = written.get("stages", {}) if written.get("process", {}).get("pid") == proc.pid else {}
        if stages.get(stage, {}).get("status") == "running" or (started and stage in stages):
            return
        time.sleep(0.01)
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


QUANTIZE_QAT = [*QUANTIZE, "--qat", "--qat-steps", "6", "--qat-batch", "32", "--qat-checkpoint-minutes", "0"]


@pytest.fixture(scope="module")
def qat_reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("qat-reference")
    proc = start([*QUANTIZE_QAT, "--out", work / "run"], work)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return tflite_digests(work / "run")


# One run folder, stopped in every stage in turn, each time by the same command run again: SIGKILL
# (no clean-up at all) or a signal edgestar handles. Input stages (load, calibration data) run
# before the folder exists: a kill there leaves nothing to check.
STOPS = [("fold", signal.SIGKILL), ("qat", signal.SIGKILL), ("export", signal.SIGKILL),
         ("convert", signal.SIGTERM), ("validate", signal.SIGINT), ("validate", signal.SIGKILL),
         ("diagnose", signal.SIGKILL)]


def _stop_in(stage, sig, run: Path, tmp_path: Path) -> tuple[int, dict]:
    """Start the command on ``run``, signal it in ``stage``; its pid and the manifest it left."""
    proc = start([*QUANTIZE_QAT, "--out", run], tmp_path)
    state = run / ".incomplete" / "qat-state.pt"
    if stage == "qat":
        # the state left by an earlier stop is replaced after the first step of this one
        mtime = state.stat().st_mtime_ns if state.exists() else None
        deadline = time.monotonic() + 300
        while not state.exists() or state.stat().st_mtime_ns == mtime:  # between QAT steps
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
    else:  # a stage of tenths of a second may be over when seen: then it is in the next one
        wait_for_stage(proc, run / "manifest.json", stage, started=True)
    workers = children_of(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    manifest = json.loads((run / "manifest.json").read_text())
    assert not list(run.glob("*.tflite")) and not list(run.glob("*.onnx")), stage  # nothing looks finished
    assert interrupted_run(run)
    if sig == signal.SIGKILL:
        assert proc.returncode == -9 and manifest["status"] == "running", (stage, err)
    else:
        name = signal.Signals(sig).name
        assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130}[name], err
        assert err.strip().splitlines()[-1] == (f"Error: interrupted by {name}; {run} is marked interrupted; "
                                                "run the command again to redo or resume")
        assert "Traceback" not in err and manifest["status"] == "interrupted"
        # the stage it landed in is marked (it may land between two stages: then none is)
        stopped = [rec for rec in manifest["stages"].values() if rec.get("status") != "ok"]
        assert all(rec == {**rec, "status": "interrupted", "error": f"interrupted by {name}"} for rec in stopped)
        assert len(stopped) <= 1, manifest["stages"]
        assert os.listdir(run / ".incomplete") == ["qat-state.pt"]  # only what the next run resumes from
        time.sleep(0.5)
        assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a child outlived the interrupted run"
    return proc.pid, manifest


@pytest.mark.e2e
def test_stopped_in_every_stage_then_the_same_command_finishes_with_the_uninterrupted_bytes(tmp_path,
                                                                                            qat_reference):
    run = tmp_path / "run"
    pids = []
    for stage, sig in STOPS:
        pid, manifest = _stop_in(stage, sig, run, tmp_path)
        pids.append(pid)
        if stage == "export":  # the run after the QAT kill resumed QAT from the step it had saved
            assert 1 <= manifest["stages"]["qat"]["resumed_from_step"] < 6, manifest["stages"]["qat"]
    killed_scratch = [p for pid in pids for p in Path(tempfile.gettempdir()).glob(f"edgestar-*-{pid}-*")]
    assert killed_scratch  # SIGKILLed processes' scratch folders (ONNX copies, converter files) ...
    again = start([*QUANTIZE_QAT, "--out", run], tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert tflite_digests(run) == qat_reference  # the same bytes as the uninterrupted run
    assert not [p for p in killed_scratch if p.exists()]  # ... removed by the next run
    # QAT finished before the last stops: its final state is resumed, no step is trained again
    assert json.loads((run / "manifest.json").read_text())["stages"]["qat"]["resumed_from_step"] == 6
    assert not (run / ".incomplete").exists()


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
