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
            stages = json.loads(manifest.read_text()).get("stages", {})
        except (OSError, ValueError):
            stages = {}
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


@pytest.mark.e2e
@pytest.mark.parametrize("sig, code, stage", [(signal.SIGTERM, 143, "convert"), (signal.SIGINT, 130, "validate")])
def test_a_signal_stops_quantize_cleanly_and_the_same_command_finishes(tmp_path, qat_reference, sig, code, stage):
    run = tmp_path / "run"
    proc = start([*QUANTIZE_QAT, "--out", run], tmp_path)
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
    assert not list(run.glob("*.tflite"))  # nothing looks finished
    assert os.listdir(run / ".incomplete") == ["qat-state.pt"]  # only what the next run resumes from
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a child outlived the interrupted run"
    again = start([*QUANTIZE_QAT, "--out", run], tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert tflite_digests(run) == qat_reference  # the same bytes as the uninterrupted run
    assert json.loads((run / "manifest.json").read_text())["stages"]["qat"]["resumed_from_step"] == 6


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["fold", "qat", "export", "convert", "validate", "diagnose"])
def test_sigkill_in_any_stage_leaves_nothing_finished_and_the_command_finishes_the_job(tmp_path, qat_reference,
                                                                                        stage):
    """SIGKILL (no clean-up at all) in each stage of a QAT run; the same command then ends with
    the bytes of an uninterrupted run. QAT itself resumes from its last saved step."""
    run = tmp_path / "run"
    proc = start([*QUANTIZE_QAT, "--out", run], tmp_path)
    state = run / ".incomplete" / "qat-state.pt"
    if stage == "qat":
        deadline = time.monotonic() + 300
        while not state.exists():  # a QAT state is saved: the process is between QAT steps
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
    else:
        wait_for_stage(proc, run / "manifest.json", stage, started=True)
    proc.kill()
    proc.communicate(timeout=60)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "running" and interrupted_run(run)
    scratch = list(Path(tempfile.gettempdir()).glob(f"edgestar-*-{proc.pid}-*"))
    assert scratch  # the killed process's scratch folders (ONNX copies, converter files) ...
    assert not list(run.glob("*.tflite")) and not list(run.glob("*.onnx"))  # nothing under a finished name
    again = start([*QUANTIZE_QAT, "--out", run], tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert tflite_digests(run) == qat_reference
    assert not [p for p in scratch if p.exists()]  # ... removed by the next run
    resumed = json.loads((run / "manifest.json").read_text())["stages"]["qat"]["resumed_from_step"]
    if stage == "qat":
        assert resumed is not None and 1 <= resumed <= 6
    elif stage != "fold":  # QAT was over: its final state is resumed, no step is trained again
        assert resumed == 6
    assert not state.exists() and not (run / ".incomplete").exists()


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
