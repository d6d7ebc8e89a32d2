"""``edgestar bench`` without a device: --device parsing, profiles, statistics, which models a
run directory contributes, the board runner's own failures, adb command construction (a fake
``adb`` on PATH), and one-line errors for bad options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from edgestar.cli import cli
from edgestar.deploy.devices import parse_device
from edgestar.deploy.profiles import PROFILES, get_profile
from edgestar.deploy.stats import latency_stats, percentile, speedup
from edgestar.errors import InputError

# --------------------------------------------------------------------------- --device


@pytest.mark.parametrize("value, name, fields", [
    ("local", "local", {"kind": "local"}),
    ("ssh://raspberrypi.local", "ssh://raspberrypi.local", {"host": "raspberrypi.local", "user": None}),
    ("ssh://pi@192.168.1.20:2222", "ssh://pi@192.168.1.20:2222", {"user": "pi", "port": 2222}),
    ("ssh://pi5", "ssh://pi5", {"host": "pi5"}),  # a Host alias of the user's ssh config
    ("ssh://root@[fe80::1%eth0]:22", "ssh://root@[fe80::1%eth0]:22", {"host": "fe80::1%eth0"}),
    ("adb", "adb", {"kind": "adb", "serial": None}),
    ("adb:R58M42ABCDE", "adb:R58M42ABCDE", {"serial": "R58M42ABCDE"}),
    ("adb:192.168.1.5:5555", "adb:192.168.1.5:5555", {"serial": "192.168.1.5:5555"}),
    ("vela:ethos-u55-128", "vela:ethos-u55-128", {"kind": "vela", "config": "ethos-u55-128"}),
])
def test_device_values(value, name, fields):
    device = parse_device(value)
    assert device.name == name
    for k, v in fields.items():
        assert getattr(device, k) == v


@pytest.mark.parametrize("value", [
    "ssh://-oProxyCommand=touch${IFS}pwned",  # would be an ssh option
    "ssh://host;touch pwned", "ssh://$(touch pwned)", "ssh://a b", "ssh://`id`", "ssh://",
    "ssh://pi@", "ssh://-pi@host", "ssh://host:0", "ssh://host:70000", "ssh://host:22x",
    "adb:-s", "adb:a;b", "vela:", "vela:$(x)", "ftp://host", "", "sshhost",
])
def test_bad_device_values_are_refused(value):
    with pytest.raises(InputError):
        parse_device(value)


@given(st.text(max_size=40))
def test_device_parser_accepts_only_safe_hosts(text):
    """Whatever the text, the parser either refuses it with an InputError or returns a host
    that can be neither an ssh option nor a shell word needing quotes."""
    try:
        device = parse_device("ssh://" + text)
    except InputError:
        return
    assert not device.host.startswith("-")
    assert set(device.host) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:%")


# --------------------------------------------------------------------------- profiles

def test_profiles_table_has_the_issue_s_targets():
    for name in ("android-arm64", "rpi4", "rpi5", "arm64-linux", "x86-64", "ethos-u55-128",
                 "ethos-u65-256", "cortex-m4", "cortex-m7", "cortex-m55"):
        p = get_profile(name)
        assert p.target in ("cpu", "micro") and p.io_type in ("int8", "float32", "uint8")
    assert PROFILES["ethos-u55-128"].vela == "ethos-u55-128"
    assert all(p.target == "micro" for n, p in PROFILES.items() if n.startswith(("cortex-m", "ethos")))
    with pytest.raises(InputError, match="unknown profile"):
        get_profile("rpi9")


def test_profiles_command_lists_them():
    res = CliRunner().invoke(cli, ["profiles"])
    assert res.exit_code == 0 and "rpi5" in res.output and "vela:ethos-u65-256" in res.output
    data = json.loads(CliRunner().invoke(cli, ["profiles", "--json"]).output)
    assert data["cortex-m55"]["target"] == "micro"


def test_quantize_profile_sets_target_and_io_unless_given():
    from edgestar.pipeline.config import QuantizeConfig

    c = QuantizeConfig.for_profile("cortex-m55", variant="s050")
    assert (c.target, c.io_type, c.profile) == ("micro", "int8", "cortex-m55")
    c = QuantizeConfig.for_profile("cortex-m55", variant="s050", target="cpu")
    assert c.target == "cpu"
    with pytest.raises(InputError):
        QuantizeConfig.for_profile("nope", variant="s050")


# --------------------------------------------------------------------------- statistics

@given(st.lists(st.floats(0.001, 1e4), min_size=1, max_size=60), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_latency_stats_and_paired_speedup():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s == {"count": 5, "mean_ms": 4.0, "median_ms": 3.0, "p90_ms": 7.6, "min_ms": 1.0,
                 "max_ms": 10.0, "std_ms": round(float(np.std([1, 2, 3, 4, 10])), 4)}
    # rounds where the machine was slow slow down both: the per-round ratio stays 2
    fp32 = [4.0, 8.0, 40.0, 4.0]
    int8 = [2.0, 4.0, 20.0, 2.0]
    assert speedup(fp32, int8) == {"median": 2.0, "p10": 2.0, "p90": 2.0, "rounds": 4}
    assert speedup([], []) is None


# --------------------------------------------------------------------------- models of a run

FAKE_TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(24)


def fake_run(root: Path, status="ok", **files) -> Path:
    """A run directory as ``quantize`` leaves it, written with the pipeline's own RunDir."""
    from edgestar.pipeline.rundir import RunDir

    run = RunDir.create(root, tool="edgestar", config={})
    for key, name in (files or {"tflite_fp32": "m_fp32.tflite", "tflite_int8": "m_int8.tflite"}).items():
        path = run.staged(name)
        path.write_bytes(FAKE_TFLITE + name.encode())
        run.add_artifact(key, path)
    run.finish(status)
    return root


def test_a_run_contributes_its_models_checked_against_the_manifest(tmp_path):
    from edgestar.deploy.models import collect_models

    run = fake_run(tmp_path / "run", onnx="model.onnx", tflite_fp32="a.tflite", tflite_int8="b.tflite")
    models = collect_models([run])
    assert [m.label for m in models] == ["onnx fp32", "tflite fp32", "tflite int8"]
    assert [m.label for m in collect_models([run], host=False)] == ["tflite fp32", "tflite int8"]
    # a model file of a run counts as the run's (its results go to the run)
    (m,) = collect_models([run / "b.tflite"])
    assert m.run_dir == run and m.fmt == "int8"

    (run / "b.tflite").write_bytes(FAKE_TFLITE + b"changed")
    with pytest.raises(InputError, match="changed since the run wrote it"):
        collect_models([run])


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.tflite", "does not exist"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a run directory"),
    (lambda p: (p / "x.tflite").write_bytes(b"not a model") and p / "x.tflite", "not a TFLite model"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not an edgestar run directory"),
    (lambda p: fake_run(p / "failed", status="failed"), "that run failed"),
])
def test_unusable_bench_inputs(tmp_path, make, match):
    from edgestar.deploy.models import collect_models

    with pytest.raises(InputError, match=match):
        collect_models([make(tmp_path)])


# --------------------------------------------------------------------------- board runner

def test_board_runner_without_a_runtime_says_so(tmp_path):
    """A board whose Python has no numpy / TFLite runtime: exit code 3 and a JSON error
    (``-S``: no site-packages, as on a fresh board)."""
    from edgestar.deploy import board_runner

    (tmp_path / "m.tflite").write_bytes(FAKE_TFLITE)
    (tmp_path / "job.json").write_text(json.dumps({
        "models": {"m": {"file": "m.tflite", "kind": "tflite"}},
        "configs": [{"model": "m", "kernels": "xnnpack", "threads": 1}], "warmup": 0, "runs": 1}))
    proc = subprocess.run([sys.executable, "-S", "-I", board_runner.__file__, str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == board_runner.NO_RUNTIME
    out = json.loads(proc.stdout)
    assert out["error"] == board_runner.NO_RUNTIME and "ai-edge-litert" in out["message"]


def test_board_runner_reports_an_unloadable_model(tmp_path):
    from edgestar.deploy import board_runner

    (tmp_path / "m.tflite").write_bytes(FAKE_TFLITE)
    (tmp_path / "job.json").write_text(json.dumps({
        "models": {"m": {"file": "m.tflite", "kind": "tflite"}},
        "configs": [{"model": "m", "kernels": "xnnpack", "threads": 1}], "warmup": 0, "runs": 1}))
    proc = subprocess.run([sys.executable, board_runner.__file__, str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == board_runner.RUN_FAILED
    assert "cannot load m.tflite" in json.loads(proc.stdout.splitlines()[-1])["message"]


# --------------------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("args, match", [
    (["--device", "ftp://x"], "is not local, ssh://"),
    (["--device", "ssh://a;b"], "is not a host name"),
    (["--threads", "1,a"], "comma-separated list of whole numbers"),
    (["--kernels", "gpu"], "unknown value 'gpu'"),
    (["--device", "adb"], "adb needs --benchmark-binary"),
    (["--device", "vela:ethos-u55-128", "--eval", "demo"], "--eval needs the Python runner"),
    (["--cpu-mask", "f0"], "--cpu-mask applies to benchmark_model runs"),
    (["--ssh-config", "/nonexistent"], "--ssh-config applies to ssh:// devices only"),
    (["--device", "ssh://h", "--ssh-config", "/nonexistent"], "is not a file"),
    (["--profile", "cortex-m4"], "is a microcontroller"),
    (["--profile", "rpi5"], "give --device ssh://"),
    (["--runs", "0"], "0 is not in the range"),
    (["--device", "ssh://h", "--remote-python", "'oops"], "No closing quotation"),
    (["--device", "ssh://h", "--remote-python", ""], "--remote-python is empty"),
    (["--op-profile"], "--op-profile applies to benchmark_model runs"),
    (["--eval-samples", "5"], "--eval-samples needs --eval"),
    (["--device", "vela:--help"], "give a Vela accelerator configuration"),
])
def test_bad_bench_options_are_one_line_errors(tmp_path, args, match):
    run = fake_run(tmp_path / "run")
    res = CliRunner().invoke(cli, ["bench", str(run), *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert not (run / "bench.json").exists()


def test_bench_of_a_missing_path_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(cli, ["bench", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


# --------------------------------------------------------------------------- adb (a fake adb)

FAKE_ADB = r'''#!/bin/sh
# Records its arguments (one per line, then ---) and answers like adb and benchmark_model would.
for a in "$@"; do printf '%s\n' "$a"; done >> "$ADB_LOG"
echo --- >> "$ADB_LOG"
case "$*" in
  *benchmark_model*) cat "$ADB_OUTPUT" ;;
  *nproc*) echo 8 ;;
  *uname*) echo aarch64 ;;
  *getprop*) echo "Pixel 7" ;;
  *push*) echo "1 file pushed" ;;
esac
exit 0
'''


def test_adb_runs_benchmark_model_with_quoted_commands_and_cleans_up(tmp_path, monkeypatch):
    from edgestar import BenchConfig, bench

    output = Path(__file__).parent / "fixtures" / "benchmark_model" / "android_adb_shell_crlf.txt"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "adb").write_text(FAKE_ADB)
    (bindir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ADB_LOG", str(tmp_path / "adb.log"))
    monkeypatch.setenv("ADB_OUTPUT", str(output))
    run = fake_run(tmp_path / "my run $(touch PWNED)")
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF fake")

    result = bench([run], BenchConfig(device="adb:R58M42", benchmark_binary=binary, threads=(1, 4),
                                      kernels=("xnnpack",), runs=6, cpu_mask="f0"))
    calls = [c.strip("\n").split("\n") for c in (tmp_path / "adb.log").read_text().split("---\n") if c.strip()]
    assert all(c[:2] == ["-s", "R58M42"] for c in calls)
    folder = calls[0][-1].split()[-1]
    assert calls[0][2:] == ["shell", f"mkdir -m 700 {folder}"] and folder.startswith("/data/local/tmp/edgestar-")
    pushes = [c for c in calls if c[2] == "push"]
    assert [Path(c[4]).name for c in pushes] == ["benchmark_model", "model_0.tflite", "model_1.tflite"]
    runs = [c[3] for c in calls if c[2] == "shell" and "./benchmark_model" in c[3]]
    assert len(runs) == 2 * 2 * 5  # 2 models x 2 thread counts x 5 invocation rounds of 2 runs
    command = ("taskset f0 ./benchmark_model --graph=model_0.tflite --num_threads=1 "
               "--use_xnnpack=true --num_runs=2 --warmup_runs=5 --min_secs=0")
    assert runs[0] == (f"cd {folder} && if command -v timeout >/dev/null 2>&1; then timeout -s KILL 600 "
                       f"{command} & else {command} & fi; echo $! > .edgestar.pid; wait $!")
    assert calls[-1][2:] == ["shell", f"rm -rf {folder}"]
    assert not any("PWNED" in " ".join(c) for c in calls)
    assert {(r["model"], r["threads"]) for r in result.rows} == {
        (m, t) for m in ("tflite fp32", "tflite int8") for t in (1, 4)}
    assert all(r["mean_ms"] > 0 for r in result.rows)
    assert result.system == {"machine": "aarch64", "cpus": 8, "model": "Pixel 7"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["device_latency"]["adb:R58M42"]["rows"]
    assert "adb:R58M42" in json.loads((run / "bench.json").read_text())["devices"]
    assert not list(tmp_path.rglob("PWNED"))


def test_a_busy_device_or_scattered_times_are_said_next_to_the_numbers():
    from edgestar.deploy.bench import busy_warnings

    row = {"name": "tflite int8", "kernels": "xnnpack", "threads": 1, "median_ms": 2.0, "p90_ms": 2.2}
    assert busy_warnings({"others_cores": 0.05, "cpus": 4}, [row]) == []
    (w,) = busy_warnings({"others_cores": 0.9, "cpus": 2}, [row])
    assert "other processes used 0.90 of the device's 2 cores" in w
    (w,) = busy_warnings({"others_cores": 0.0, "cpus": 2}, [dict(row, p90_ms=5.0)])
    assert "tflite int8 xnnpack 1t" in w and "noisy" in w


def test_the_runner_measures_what_other_processes_use_while_timing():
    """A process burning one core beside the runner's measurement shows up as about one core."""
    import time

    from edgestar.deploy.board_runner import OtherProcesses

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        others = OtherProcesses()
        t0 = time.perf_counter()
        time.sleep(1.0)
        used = others.cores_used(time.perf_counter() - t0)
    finally:
        burner.kill()
        burner.wait()
    assert 0.6 <= used <= 1.6


def test_remote_commands_quote_every_word_and_expand_only_a_leading_home():
    from edgestar.deploy.transports import remote_words

    assert remote_words(["~/venv/bin/python", "a b", "$(x)", "~user"]) == \
        "\"$HOME\"/venv/bin/python 'a b' '$(x)' '~user'"
    out = subprocess.run(["sh", "-c", "printf '%s\\n' " + remote_words(["~/x y", "$(echo hi)", "`id`;"])],
                         capture_output=True, text=True, env={"HOME": "/h", "PATH": os.environ["PATH"]})
    assert out.stdout.splitlines() == ["/h/x y", "$(echo hi)", "`id`;"]


@pytest.mark.parametrize("manifest, match", [
    ([], "is not a manifest"),
    ({"manifest_version": 1, "artifacts": {"tflite_int8": {"bytes": 3}}}, "has no plain file name"),
    ({"manifest_version": 1, "artifacts": {"tflite_int8": {"path": "../outside.tflite"}}}, "has no plain file name"),
    ({"manifest_version": 1, "artifacts": {"tflite_int8": {"path": "/etc/passwd"}}}, "has no plain file name"),
    ({"manifest_version": 1, "artifacts": {"tflite_int8": "x"}}, "has no plain file name"),
    ({"manifest_version": 2, "versions": {"edgestar": "9.0"}, "artifacts": {}},
     "manifest_version 2 (written by edgestar 9.0); this edgestar (0.1.0) reads version 1"),
])
def test_malformed_manifests_are_one_line_errors(tmp_path, manifest, match):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(cli, ["bench", str(run)])
    assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output


def test_loose_files_are_compared_only_with_the_same_network_and_named_uniquely(tmp_path):
    from edgestar.deploy.bench import _add_speedups, _ids, _row
    from edgestar.deploy.models import collect_models

    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("a.tflite", "b.tflite"):
        (loose / name).write_bytes(FAKE_TFLITE + name.encode())  # no edgestar metadata
    a, b = collect_models([loose / "a.tflite", loose / "b.tflite"])
    assert a.group != b.group  # nothing says they are the same network

    run = fake_run(tmp_path / "run", tflite_fp32="f.tflite", tflite_int8="i.tflite", tflite_dynamic="d.tflite")
    models = collect_models([run])
    files = _ids(models, ".tflite")
    samples = {("model_0.tflite", "xnnpack", 1): [4.0, 4.0], ("model_1.tflite", "xnnpack", 1): [2.0, 2.0],
               ("model_2.tflite", "xnnpack", 1): [1.0, 1.0]}
    rows = [_row(n, files, "xnnpack", 1, {}) for n in files]
    _add_speedups(rows, files, samples)
    assert [r["vs_fp32"] and r["vs_fp32"]["median"] for r in rows] == [None, 2.0, 4.0]

    models = collect_models([run, loose / "a.tflite"])
    assert [m.name for m in models] == ["run: tflite fp32", "run: tflite int8", "run: tflite dynamic",
                                        "loose: a.tflite"]


def test_bench_out_makes_its_folder_and_refuses_a_directory(tmp_path):
    run = fake_run(tmp_path / "run")
    res = CliRunner().invoke(cli, ["bench", str(run), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.output


def test_an_unwritable_bench_json_is_refused_before_the_run(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "bench.json").mkdir()
    res = CliRunner().invoke(cli, ["bench", str(run)])
    assert res.exit_code == 2 and "bench.json is a directory" in res.output


def test_adb_phone_without_nproc_still_benchmarks(tmp_path, monkeypatch):
    from edgestar import BenchConfig, bench

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "adb").write_text(FAKE_ADB.replace('*nproc*) echo 8 ;;',
                                                 '*nproc*) echo "/system/bin/sh: nproc: not found" >&2; exit 127 ;;'))
    (bindir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ADB_LOG", str(tmp_path / "adb.log"))
    monkeypatch.setenv("ADB_OUTPUT", str(Path(__file__).parent / "fixtures" / "benchmark_model"
                                         / "classic_tf_desktop.txt"))
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"fake")
    result = bench([fake_run(tmp_path / "run")], BenchConfig(device="adb", benchmark_binary=binary, runs=2,
                                                              write=False))
    assert result.settings["threads"] == [1] and "cpus" not in result.system  # 1 and "all cores" = 1
