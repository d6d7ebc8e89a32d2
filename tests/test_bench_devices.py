"""``edgestar bench`` for real: a quantized StarNet timed here (``local``) and on a "board"
reached through a real OpenSSH server on 127.0.0.1 (this machine plays the board), with
on-device evaluation, and each way a board can fail: wrong port, refused key, no runtime,
a hung runner, hostile model paths."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sshd
from processes import alive, descendants

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                           for m in ("onnx2tf", "tensorflow", "ai_edge_litert")),
                       reason="needs the conversion tools"),
]


def edgestar(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgestar.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The shipped demo StarNet-S1 (CIFAR-10, 32 px), quantized: trained weights, so top-1
    on the device means something."""
    work = tmp_path_factory.mktemp("bench")
    res = edgestar("quantize", "--variant", "s1", "--weights", "demo", "--calib-samples", 32,
                   "--eval-samples", 16, "--out", work / "run", "-q", cwd=work, timeout=900)
    assert res.returncode == 0, res.stderr
    return work / "run"


@pytest.fixture
def run_copy(demo_run, tmp_path):
    """A fresh copy per test: bench writes into the run directory."""
    return Path(shutil.copytree(demo_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    why = sshd.unavailable()
    if why:
        pytest.skip(why)
    try:
        server = sshd.start(tmp_path_factory.mktemp("sshd"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run a loopback sshd here: {exc}")
    yield server
    server.stop()


def remote_folders() -> set:
    return set(Path("/tmp").glob("edgestar-????????"))


def test_local_bench_times_every_model_interleaved_and_stores_results(run_copy):
    before = json.loads((run_copy / "manifest.json").read_text())
    res = edgestar("bench", run_copy, "--runs", 8, "--warmup", 1, "--threads", "1,2", "--json", "-q")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    rows = {(r["model"], r["kernels"], r["threads"]): r for r in result["rows"]}
    expected = {("onnx fp32", "onnxruntime", t) for t in (1, 2)} | {
        (m, k, t) for m in ("tflite fp32", "tflite int8") for k in ("xnnpack", "builtin") for t in (1, 2)}
    assert set(rows) == expected
    for r in rows.values():
        assert r["count"] == 8 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
        assert r["min_ms"] <= r["mean_ms"] <= r["max_ms"]
    int8 = rows["tflite int8", "xnnpack", 1]["vs_fp32"]
    assert int8["rounds"] == 8 and int8["p10"] <= int8["median"] <= int8["p90"]
    assert rows["tflite fp32", "xnnpack", 1]["vs_fp32"] is None

    stored = json.loads((run_copy / "bench.json").read_text())["devices"]["local"]
    assert stored["rows"] == result["rows"]
    manifest = json.loads((run_copy / "manifest.json").read_text())
    entry = manifest["device_latency"]["local"]
    assert len(entry["rows"]) == len(expected) and entry["system"]["machine"]
    assert {k: v for k, v in manifest.items() if k != "device_latency"} == before  # nothing else touched


def test_ssh_bench_with_on_device_evaluation_cleans_up(run_copy, board):
    before = remote_folders()
    res = edgestar("bench", run_copy, "--device", "ssh://board", "--ssh-config", board.config,
                   "--remote-python", sys.executable, "--runs", 5, "--warmup", 1, "--threads", 1,
                   "--eval", "demo", "--eval-samples", 40)
    assert res.returncode == 0, res.stderr
    assert "device: ssh://board" in res.stdout and "tflite int8  xnnpack" in res.stdout
    assert "on-device evaluation, tflite int8, 40 images" in res.stdout
    result = json.loads((run_copy / "bench.json").read_text())["devices"]["ssh://board"]
    assert {r["model"] for r in result["rows"]} == {"tflite fp32", "tflite int8"}  # no ONNX on a board
    (ev,) = [e for e in result["evaluation"] if e["model"] == "tflite int8"]
    # the "board" is this machine with the same runtime: the same outputs, bit for bit
    assert ev["images"] == 40 and ev["agreement_with_host"] == 1.0 and ev["bit_exact_images"] == 1.0
    assert ev["top1"] == ev["host_top1"] and ev["top1"] > 0.4  # trained demo model; chance is 0.1
    assert "ssh://board" in json.loads((run_copy / "manifest.json").read_text())["device_latency"]
    assert remote_folders() == before  # what was copied is gone


def test_hostile_model_paths_neither_break_nor_inject(demo_run, board, tmp_path):
    nasty = tmp_path / "my models $(touch PWNED) `touch PWNED2`; rm -rf x" / "s1 int8 'q' \"d\".tflite"
    nasty.parent.mkdir()
    shutil.copyfile(demo_run / "starnet_s1_32_int8.tflite", nasty)
    res = edgestar("bench", nasty, "--device", "ssh://board", "--ssh-config", board.config,
                   "--remote-python", sys.executable, "--runs", 3, "--warmup", 0, "--threads", 1,
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "tflite int8" in res.stdout
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.home().glob("PWNED*"))
    assert not list(Path("/tmp").glob("PWNED*"))


@pytest.mark.parametrize("device, extra, code, words", [
    ("ssh://board:1", [], 2, "cannot connect"),  # port 1: nothing listens (the alias's port is overridden)
    ("ssh://board-badkey", [], 2, "authentication refused"),
    ("ssh://board", ["--remote-python", "/nonexistent/python3"], 2, "not found or not executable on the device"),
])
def test_ssh_failures_are_one_line_errors_naming_the_host(demo_run, board, device, extra, code, words):
    res = edgestar("bench", demo_run / "starnet_s1_32_int8.tflite", "--device", device, "--ssh-config",
                   board.config, "--runs", 2, "--no-save", *extra, timeout=120)
    assert res.returncode == code, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {device}: ") and words in last, res.stderr
    assert "Traceback" not in res.stderr


def test_a_board_without_any_tflite_runtime(demo_run, board, tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    before = remote_folders()
    res = edgestar("bench", demo_run / "starnet_s1_32_int8.tflite", "--device", "ssh://board",
                   "--ssh-config", board.config, "--remote-python", bare / "bin" / "python", "--no-save")
    assert res.returncode == 2, res.stderr
    assert "Error: ssh://board: numpy is not installed" in res.stderr and "ai-edge-litert" in res.stderr
    assert remote_folders() == before


def test_a_hung_board_is_stopped_on_the_board_and_cleaned_up(demo_run, board, tmp_path):
    """A runner that hangs (here a stand-in that sleeps) is killed on the board by the device's
    ``timeout`` at the deadline: no process is left behind, nor the folder."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 1234\n")
    slow.chmod(0o755)
    before = remote_folders()
    res = edgestar("bench", demo_run / "starnet_s1_32_int8.tflite", "--device", "ssh://board",
                   "--ssh-config", board.config, "--remote-python", slow, "--timeout", 2, "--no-save",
                   timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Error: ssh://board: the benchmark runner was killed (SIGKILL: the deadline of 2 s" in res.stderr
    assert remote_folders() == before
    assert subprocess.run(["pgrep", "-f", "sleep 1234"], capture_output=True).returncode == 1


def test_the_runner_stops_itself_at_its_deadline(demo_run, board):
    res = edgestar("bench", demo_run / "starnet_s1_32_int8.tflite", "--device", "ssh://board",
                   "--ssh-config", board.config, "--remote-python", sys.executable, "--timeout", 3,
                   "--min-seconds", 60, "--no-save", timeout=120)
    assert res.returncode == 1, res.stderr
    assert "the benchmark runner stopped itself at its deadline of 3 s (--timeout)" in res.stderr


def test_several_runs_are_compared_each_with_its_own_fp32(demo_run, tmp_path):
    a = Path(shutil.copytree(demo_run, tmp_path / "a"))
    b = Path(shutil.copytree(demo_run, tmp_path / "b"))
    res = edgestar("bench", a, b, "--runs", 4, "--warmup", 0, "--threads", 1, "--kernels", "xnnpack",
                   "--eval", "demo", "--eval-samples", 8)
    assert res.returncode == 0, res.stderr
    assert "a: tflite int8" in res.stdout and "b: tflite int8" in res.stdout
    assert "on-device evaluation, a: tflite int8" in res.stdout and "on-device evaluation, b: tflite int8" in res.stdout
    for run in (a, b):
        stored = json.loads((run / "bench.json").read_text())["devices"]["local"]
        assert {r["run_dir"] for r in stored["rows"]} == {str(run)}
        assert [r["vs_fp32"]["reference"] for r in stored["rows"] if r["model"] == "tflite int8"] == [
            f"{run.name}: tflite fp32"]
        # each run keeps the evaluation of its own files
        assert sorted(Path(e["path"]).parent for e in stored["evaluation"]) == [run, run]


def test_one_core_dedupes_all_cores_and_one_thread(run_copy):
    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed")
    res = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "edgestar.cli", "bench", str(run_copy),
                          "--runs", "3", "--warmup", "0", "--threads", "1,0", "--kernels", "xnnpack", "--json", "-q",
                          "--no-save"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    keys = [(r["model"], r["kernels"], r["threads"]) for r in result["rows"]]
    assert len(keys) == len(set(keys)) and {k[2] for k in keys} == {1} and result["system"]["cpus"] == 1


FAKE_BENCHMARK_MODEL = """#!/bin/sh
# Stands in for TFLite's benchmark_model on the "board": records its arguments, prints the
# output of a real build (fixtures/benchmark_model/, see their README).
printf '%s\\n' "$*" >> "{log}"
case "$*" in
  *--enable_op_profiling=true*) cat "{fixtures}/op_profiling_starnet.txt" ;;
  *) cat "{fixtures}/classic_litert_percentiles.txt" ;;
esac
"""


def test_ssh_with_a_benchmark_model_binary(demo_run, board, tmp_path):
    from edgestar.deploy.benchmark_output import parse_benchmark_output

    fixtures = Path(__file__).parent / "fixtures" / "benchmark_model"
    fake = tmp_path / "benchmark_model"
    fake.write_text(FAKE_BENCHMARK_MODEL.format(log=tmp_path / "calls.log", fixtures=fixtures))
    fake.chmod(0o755)
    before = remote_folders()
    res = edgestar("bench", demo_run, "--device", "ssh://board", "--ssh-config", board.config,
                   "--benchmark-binary", fake, "--threads", "1,0", "--runs", 4, "--op-profile",
                   "--no-save", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2 * 2 * 4 + 2  # 2 models x threads 1 and all cores x 4 rounds, + 2 profiles
    assert all("--use_xnnpack=true --num_runs=1" in c for c in calls)
    assert result["settings"]["threads"] == [1, os.cpu_count()] and result["system"]["machine"]
    expected = parse_benchmark_output((fixtures / "classic_litert_percentiles.txt").read_text())
    for row in result["rows"]:
        assert row["mean_ms"] == pytest.approx(expected.mean_ms) and row["p90_ms"] is None
        assert row["count"] == 4 * expected.count
    int8 = next(r for r in result["rows"] if r["model"] == "tflite int8")
    assert int8["vs_fp32"]["median"] == pytest.approx(1.0)  # the same fixture for both models
    (ops,) = [p["op_types"] for p in result["op_profile"] if p["model"] == "tflite int8"]
    assert {o["op_type"] for o in ops} >= {"DEPTHWISE_CONV_2D", "MUL", "CONV_2D"}
    assert "op types by time, tflite int8" in res.stderr
    assert remote_folders() == before


# --------------------------------------------------------------------------- interruptions (issue 15)

def _start_and_signal(args, sig, *, ready=None):
    """Start ``edgestar bench``, wait until it is timing (``ready()``, by default: its runner
    process is up, and a second more), signal it."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgestar.cli", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (ready() if ready else descendants(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # well into the timing rounds
    children = descendants(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    time.sleep(0.5)
    return proc.returncode, err, [p for p in children if alive(p)]


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGKILL", -9)])  # SIGINT: test_interrupt.py
def test_an_interrupted_local_bench_leaves_the_run_as_it_was_and_the_same_command_finishes(run_copy, sig, code):
    import signal

    before = (run_copy / "manifest.json").read_bytes()
    earlier = set(Path(tempfile.gettempdir()).glob("edgestar-bench-*"))
    args = ["bench", run_copy, "--runs", 400, "--warmup", 1, "--threads", 1, "-q"]
    returncode, err, left = _start_and_signal(args, getattr(signal, sig))
    assert returncode == code, err
    folders = set(Path(tempfile.gettempdir()).glob("edgestar-bench-*")) - earlier
    if sig != "SIGKILL":  # a signal it can handle: one line, no traceback, no runner left
        assert err.strip().splitlines()[-1] == f"Error: interrupted by {sig}; run the command again to redo or resume"
        assert "Traceback" not in err and not left, left
    for p in left:  # after SIGKILL the runner dies with its parent (children.die_with_parent)
        pytest.fail(f"process {p} outlived the killed bench: {Path(f'/proc/{p}/cmdline').read_bytes()!r}")
    assert (run_copy / "manifest.json").read_bytes() == before  # no half-recorded latency
    assert not (run_copy / "bench.json").exists() and not list(run_copy.glob(".*.tmp"))
    res = edgestar("bench", run_copy, "--runs", 5, "--warmup", 1, "--threads", 1, "--json", "-q")
    assert res.returncode == 0, res.stderr
    assert "local" in json.loads((run_copy / "manifest.json").read_text())["device_latency"]
    # the killed bench's copies of the models: removed by the next bench (their process is gone)
    assert not folders & set(Path(tempfile.gettempdir()).glob("edgestar-bench-*"))


def test_sigterm_ends_the_ssh_session_and_cleans_the_board(demo_run, board):
    import signal

    before = remote_folders()
    args = ["bench", demo_run / "starnet_s1_32_int8.tflite", "--device", "ssh://board", "--ssh-config",
            board.config, "--remote-python", sys.executable, "--runs", 3000, "--warmup", 0, "--threads", 1,
            "--no-save"]
    def runner_is_timing():  # the board (sshd's child here) runs it: not a child of edgestar
        return subprocess.run(["pgrep", "-f", "board_runner.py job.json"], capture_output=True).returncode == 0

    returncode, err, left = _start_and_signal(args, signal.SIGTERM, ready=runner_is_timing)
    assert returncode == 143, err
    assert err.strip().splitlines()[-1] == "Error: interrupted by SIGTERM; run the command again to redo or resume", err
    assert not left, (left, err)  # the ssh client is gone
    import time

    deadline = time.monotonic() + 10  # bench stopped the remote runner (through its pid file)
    while runner_is_timing() and time.monotonic() < deadline:
        time.sleep(0.2)
    still = subprocess.run(["pgrep", "-af", "board_runner.py job.json"], capture_output=True, text=True).stdout
    assert not still, (still, err)
    assert remote_folders() == before, err
