"""``edgestar bench``: latency (and, with ``eval``, accuracy) of a run's models on a device.

One call, :func:`bench`, for every device:

* ``local`` and ``ssh://`` run :mod:`edgestar.deploy.board_runner` -- the same file -- with
  a Python that has a TFLite runtime: every model, kernel set and thread count is timed once
  per round, interleaved, so that per-round INT8/FP32 ratios survive a noisy machine.
* ``adb`` (and ``ssh://`` with ``benchmark_binary``) run TFLite's C++ ``benchmark_model`` you
  supply, alternating models between invocations (A, B, A, B, ...), and parse its output.
* ``vela:CONFIG`` compiles each INT8 model with Arm's Vela: an *estimate* for an Ethos-U NPU.

Results go to each run directory: ``bench.json`` (everything, per device) and a
``device_latency`` entry per device in ``manifest.json``, both written atomically.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgestar.deploy.devices import KERNELS, Device, parse_device
from edgestar.deploy.models import BenchModel, collect_models
from edgestar.deploy.stats import latency_stats, speedup
from edgestar.errors import EdgestarError, InputError, StageError
from edgestar.files import scratch_dir

BENCH_FILE = "bench.json"
BENCH_VERSION = 1
ALL_CORES = 0  # a thread count meaning: as many threads as the device has cores


@dataclass(kw_only=True)
class BenchConfig:
    device: str | None = None  # local, ssh://..., adb[:SERIAL], vela:CONFIG [default: the profile's, else local]
    profile: str | None = None
    threads: tuple[int, ...] | None = None  # [default: the profile's, else 1 and all cores]; 0 = all cores
    kernels: tuple[str, ...] | None = None  # [default: xnnpack and builtin locally, xnnpack on a board]
    runs: int = 50  # timed rounds at least
    warmup: int = 5
    min_seconds: float = 0.0  # and keep going until this long has passed
    eval: str | None = None  # evaluation images to run on the device: DIR or demo
    eval_samples: int | None = None
    seed: int = 0
    remote_python: str = "python3"
    ssh_config: Path | None = None
    connect_timeout: int = 10
    benchmark_binary: Path | None = None
    cpu_mask: str | None = None  # adb/ssh binary runs: taskset mask, e.g. f0 = the big cores
    op_profile: bool = False  # binary runs: also one --enable_op_profiling run per model
    timeout_s: float | None = None  # for the whole run on the device [default: estimated]
    write: bool = True  # store results in the run directories


@dataclass
class BenchResult:
    device: str
    estimate: bool  # Vela: every figure is an estimate, not a measurement
    system: dict | None
    runtime: dict | None
    settings: dict
    rows: list[dict] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)  # per model: on-device scores
    op_profile: list[dict] = field(default_factory=list)  # per model: time per op type (benchmark_model)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    measured: str = ""
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)  # run directories the results went to
    store_errors: list[str] = field(default_factory=list)  # run directories they could not go to

    def to_json(self) -> dict:
        return {"bench_version": BENCH_VERSION, **asdict(self)}


def bench(paths, config: BenchConfig | None = None, *, log=None, progress_factory=None) -> BenchResult:
    """Benchmark the models of ``paths`` (run directories or model files) on ``config.device``."""
    config = config or BenchConfig()
    log = log or (lambda msg: None)
    device, threads, kernels = _resolve(config)
    _check_options(config, device)
    models = collect_models(paths, host=device.kind == "local")
    if config.write:
        _check_writable(models)
    settings = {"runs": config.runs, "warmup": config.warmup, "min_seconds": config.min_seconds,
                "threads": list(threads), "kernels": list(kernels), "profile": config.profile}
    t0 = time.perf_counter()
    if device.kind == "vela":
        result = _vela(models, device, settings, log)
    elif config.benchmark_binary is not None or device.kind == "adb":
        result = _binary(models, device, config, threads, kernels, settings, log)
    else:
        result = _runner(models, device, config, threads, kernels, settings, log, progress_factory)
    result.measured = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.seconds = round(time.perf_counter() - t0, 2)
    if config.write:
        result.written, result.store_errors = store(result, models)
    return result


def _check_writable(models: list[BenchModel]) -> None:
    """Refuse, before a long device run, run directories the results could not be written to."""
    import os

    for run_dir in dict.fromkeys(m.run_dir for m in models if m.run_dir is not None):
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise InputError(f"run directory {run_dir} is not writable (pass --no-save to only print)")
        if (Path(run_dir) / BENCH_FILE).is_dir():
            raise InputError(f"{Path(run_dir) / BENCH_FILE} is a directory")


def _resolve(config: BenchConfig):
    from edgestar.deploy.profiles import get_profile

    profile = get_profile(config.profile) if config.profile else None
    value = config.device
    if value is None and profile is not None:
        if profile.device is None:
            raise InputError(f"profile {profile.name} is a microcontroller: edgestar bench does not "
                             "run TFLite Micro boards (use a vela: device for an Ethos-U estimate)")
        if profile.device in ("ssh", "adb"):
            raise InputError(f"profile {profile.name} runs on a board: give --device "
                             + ("ssh://[user@]host" if profile.device == "ssh" else "adb[:SERIAL]"))
        value = f"vela:{profile.vela}" if profile.device == "vela" else profile.device
    device = parse_device(value or "local")
    threads = tuple(config.threads or (profile.threads if profile else ()) or
                    ((1, ALL_CORES) if device.kind != "vela" else (1,)))
    if any(t < 0 for t in threads):
        raise InputError("--threads must be 0 (all cores) or more")
    threads = tuple(dict.fromkeys(threads))
    kernels = tuple(dict.fromkeys(config.kernels or (KERNELS if device.kind == "local" else ("xnnpack",))))
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise InputError(f"unknown --kernels {bad[0]!r}; choose from {', '.join(KERNELS)}")
    return device, threads, kernels


def _check_options(config: BenchConfig, device: Device) -> None:
    binary = config.benchmark_binary is not None or device.kind == "adb"
    if config.runs < 1 or config.warmup < 0 or config.min_seconds < 0:
        raise InputError("--runs must be at least 1, --warmup and --min-seconds at least 0")
    if device.kind == "adb" and config.benchmark_binary is None:
        raise InputError("adb needs --benchmark-binary PATH: Android has no Python, so edgestar runs "
                         "TFLite's benchmark_model built for the phone (android_aarch64)")
    if config.benchmark_binary is not None:
        b = Path(config.benchmark_binary)
        if not b.is_file():
            raise InputError(f"--benchmark-binary {b} is not a file")
        if device.kind == "vela":
            raise InputError("--benchmark-binary does not apply to a vela: device")
    if config.ssh_config is not None:
        if device.kind != "ssh":
            raise InputError("--ssh-config applies to ssh:// devices only")
        if not Path(config.ssh_config).is_file():
            raise InputError(f"--ssh-config {config.ssh_config} is not a file")
    if config.eval is not None and (binary or device.kind == "vela"):
        what = "a vela: estimate" if device.kind == "vela" else "benchmark_model"
        raise InputError(f"--eval needs the Python runner on the device; {what} cannot return "
                         "the model's outputs (use ssh:// without --benchmark-binary)")
    if config.op_profile and not binary:
        raise InputError("--op-profile applies to benchmark_model runs (adb, or --benchmark-binary)")
    if config.eval_samples is not None and config.eval is None:
        raise InputError("--eval-samples needs --eval")
    if device.kind in ("ssh", "adb") and not binary:
        remote_python(config)  # a value that does not parse fails now, not after the eval inputs
    if config.cpu_mask is not None and not binary:
        raise InputError("--cpu-mask applies to benchmark_model runs (adb, or --benchmark-binary)")
    if config.cpu_mask is not None and not all(c in "0123456789abcdefABCDEF" for c in config.cpu_mask):
        raise InputError(f"--cpu-mask {config.cpu_mask!r} is not a hexadecimal CPU mask (e.g. f0)")


def remote_python(config: BenchConfig) -> list[str]:
    """``--remote-python`` as words (``/usr/bin/env python3`` is two); each is quoted on the board."""
    import shlex

    try:
        words = shlex.split(config.remote_python)
    except ValueError as exc:
        raise InputError(f"--remote-python {config.remote_python!r}: {exc}") from None
    if not words:
        raise InputError("--remote-python is empty")
    return words


# --------------------------------------------------------------------------- the Python runner

def _transport(device: Device, config: BenchConfig):
    from edgestar.deploy.transports import AdbTransport, LocalTransport, SshTransport

    if device.kind == "ssh":
        return SshTransport(device, ssh_config=config.ssh_config, connect_timeout=config.connect_timeout)
    if device.kind == "adb":
        return AdbTransport(device)
    return LocalTransport()


def _runner(models, device, config, threads, kernels, settings, log, progress_factory) -> BenchResult:
    from edgestar.deploy import board_runner
    from edgestar.deploy.device_eval import prepare, score

    files = _ids(models, ".tflite")
    job_models = {name: {"file": name, "kind": m.kind} for name, m in files.items()}
    configs = [{"model": name, "kernels": k, "threads": t}
               for name, m in files.items() for t in threads
               for k in (kernels if m.kind == "tflite" else ("onnxruntime",))]
    job = {"models": job_models, "configs": configs, "warmup": config.warmup, "runs": config.runs,
           "min_seconds": config.min_seconds, "eval": []}
    prepared = {}
    if config.eval is not None:
        for name, m in files.items():
            if m.kind == "tflite":
                log(f"preparing evaluation inputs for {m.label}")
                prepared[name] = prepare(m, config.eval, samples=config.eval_samples, seed=config.seed,
                                         progress_factory=progress_factory)
                job["eval"].append({"model": name, "inputs": f"{name}.eval.npy", "threads": ALL_CORES})
    timeout = config.timeout_s or _runner_timeout(models, configs, config, prepared)
    job["deadline_s"] = timeout
    python = [sys.executable] if device.kind == "local" else remote_python(config)

    with scratch_dir("bench") as tmp:
        staged = _staged_copies(tmp, files)
        for name, p in prepared.items():
            np.save(Path(tmp) / f"{name}.eval.npy", p.inputs)
            staged.append(Path(tmp) / f"{name}.eval.npy")
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        staged += [Path(tmp) / "job.json", Path(board_runner.__file__)]
        transport = _transport(device, config)
        log(f"{device.name}: {len(configs)} configurations x {config.runs} interleaved rounds"
            + (f", then {len(prepared)} model(s) on {len(next(iter(prepared.values())).inputs)} images"
               if prepared else ""))
        with transport:
            transport.push(staged)
            # the runner stops itself at the deadline (SIGALRM); the device's `timeout` a little
            # later; this side last
            proc = transport.run([*python, Path(board_runner.__file__).name, "job.json"], timeout + 5)
        warnings = list(transport.warnings)
    out = _runner_output(proc, device, python[0], timeout)

    result = BenchResult(device=device.name, estimate=False, system=out["system"], runtime=out["runtime"],
                         settings=settings, warnings=warnings)
    result.settings["rounds"] = out["rounds"]
    result.settings["timed_seconds"] = out["seconds"]
    samples = {}
    for c in out["configs"]:
        samples[c["model"], c["kernels"], c["threads"]] = c["samples_ms"]
        result.rows.append(_row(c["model"], files, c["kernels"], c["threads"], latency_stats(c["samples_ms"])))
    _add_speedups(result.rows, files, samples)
    result.warnings += busy_warnings(result.system, result.rows)
    for name, p in prepared.items():
        outputs = _decode_npy(out["eval"].get(name, {}).get("outputs_npy_b64"), device)
        result.evaluation.append({**_identity(name, files), **score(p, outputs)})
        if not p.labelled:
            result.notes.append(f"{files[name].name}: no top-1 on the device ({p.why}); agreement only")
    if device.kind == "local" and "onnxruntime" in {r["kernels"] for r in result.rows}:
        result.runtime = dict(result.runtime or {}, onnxruntime=_version("onnxruntime"))
    return result


BUSY_CORES = 0.25  # other processes using this much CPU (in cores) while timing: the device was busy
NOISY_SPREAD = 1.5  # p90 / median above this: the row's times varied too much to take at face value


def busy_warnings(system: dict | None, rows: list[dict]) -> list[str]:
    """Say so, next to the numbers, when the device was busy or a row's times scattered:
    absolute milliseconds are then suspect, though ratios from the same rounds still hold.
    "Busy" is measured, not guessed: the CPU time every other process used while the rounds ran
    (the load average would count this tool's own previous run)."""
    warnings = []
    others = (system or {}).get("others_cores")
    if others is not None and others >= BUSY_CORES:
        warnings.append(f"other processes used {others:.2f} of the device's {system.get('cpus')} cores while "
                        "timing: absolute times are inflated; compare the side-by-side ratios")
    noisy = [f"{r['name']} {r['kernels']} {r['threads']}t" for r in rows
             if r.get("p90_ms") and r.get("median_ms") and r["p90_ms"] > NOISY_SPREAD * r["median_ms"]]
    if noisy:
        warnings.append(f"{len(noisy)} row(s) with p90 > {NOISY_SPREAD} x median ({', '.join(noisy[:4])}"
                        + (", ..." if len(noisy) > 4 else "") + "): noisy, run again on a quiet device "
                        "or with more --runs")
    return warnings


def _runner_timeout(models, configs, config, prepared) -> float:
    """Generous: a slow board may be 20x slower than this host; a hang is what it catches."""
    per_round = sum(m.path.stat().st_size for m in models) / 1e6 * 0.02 * max(1, len(configs) // len(models))
    images = sum(len(p.inputs) for p in prepared.values())
    return 300 + 20 * (config.warmup + config.runs) * per_round + config.min_seconds * 2 + 0.5 * images


def _runner_output(proc, device: Device, python: str, timeout: float) -> dict:
    from edgestar.children import last_line
    from edgestar.deploy.board_runner import NO_RUNTIME

    lines = [ln for ln in (proc.stdout or "").splitlines() if ln.startswith("{")]
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if isinstance(out, dict) and "error" in out:
        cls = InputError if out["error"] == NO_RUNTIME else StageError
        raise cls(f"{device.name}: {out['message']}")
    if proc.returncode in (126, 127):
        raise InputError(f"{device.name}: {python!r} not found or not executable on the device "
                         f"(--remote-python): {last_line(proc.stderr)}")
    if proc.returncode != 0:
        raise StageError(f"{device.name}: the benchmark runner {signal_cause(proc.returncode, timeout)}: "
                         f"{last_line(proc.stderr or proc.stdout)}")
    if not isinstance(out, dict) or "configs" not in out:
        raise StageError(f"{device.name}: the benchmark runner returned no result: "
                         f"{last_line(proc.stderr or proc.stdout)}")
    return out


def signal_cause(returncode: int, timeout: float) -> str:
    """What a non-zero exit status says. A shell reports a child killed by signal N as 128 + N;
    Python's subprocess as -N."""
    import signal

    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
    if number == signal.SIGALRM:
        return f"stopped itself at its deadline of {timeout:.0f} s (--timeout)"
    if number == signal.SIGKILL:
        return f"was killed (SIGKILL: the deadline of {timeout:.0f} s, or out of memory)"
    if number is not None:
        try:
            return f"was killed by {signal.Signals(number).name}"
        except ValueError:
            pass
    return f"failed (exit {returncode})"


def _decode_npy(b64: str | None, device: Device) -> np.ndarray:
    import base64
    import io

    if not b64:
        raise StageError(f"{device.name}: the runner returned no evaluation outputs")
    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- benchmark_model

def _binary(models, device, config, threads, kernels, settings, log) -> BenchResult:
    """benchmark_model on the device, models alternated invocation by invocation."""
    from edgestar.deploy.benchmark_output import parse_benchmark_output, pooled

    files = _ids([m for m in models if m.kind == "tflite"], ".tflite")
    rounds = max(1, min(5, config.runs))
    per_round = math.ceil(config.runs / rounds)
    timeout = config.timeout_s or 600.0
    runs: dict[tuple, list] = {}
    profiles = {}
    transport = _transport(device, config)
    with scratch_dir("bench") as tmp:
        binary = Path(tmp) / "benchmark_model"
        shutil.copyfile(config.benchmark_binary, binary)
        with transport:
            transport.push([binary, *_staged_copies(tmp, files)])
            chmod = transport.run(["chmod", "755", "benchmark_model"], 60)
            if chmod.returncode != 0:
                raise StageError(f"{device.name}: cannot make benchmark_model executable")
            system = _device_system(transport, device)
            # 0 = all cores, as for the Python runner (benchmark_model's own default is 1)
            threads = list(dict.fromkeys(t or system.get("cpus") or 1 for t in threads))
            settings["threads"] = threads
            for r in range(rounds):
                for name in files:
                    for t in threads:
                        for k in kernels:
                            argv = _benchmark_argv(name, t, k, per_round, config)
                            log(f"{device.name}: round {r + 1}/{rounds}: {files[name].name}, {k}, {t} thread(s)")
                            text = _checked(transport.run(argv, timeout), device, timeout)
                            runs.setdefault((name, k, t), []).append(parse_benchmark_output(text))
            if config.op_profile:
                for name in files:
                    argv = _benchmark_argv(name, threads[0], kernels[0], per_round, config) + [
                        "--enable_op_profiling=true"]
                    profiles[name] = parse_benchmark_output(_checked(transport.run(argv, timeout), device, timeout))
        warnings = list(transport.warnings)
    result = BenchResult(device=device.name, estimate=False, system=system, runtime={"name": "benchmark_model"},
                         settings=settings, warnings=warnings)
    result.settings.update(rounds=rounds, runs_per_invocation=per_round)
    means = {}
    for (name, k, t), parsed in runs.items():
        stats = pooled(parsed)
        means[name, k, t] = [p.mean_ms for p in parsed]
        result.rows.append(_row(name, files, k, t, {
            "count": stats["count"], "mean_ms": stats["mean_ms"], "median_ms": stats.get("median_ms"),
            "p90_ms": None, "min_ms": stats["min_ms"], "max_ms": stats["max_ms"], "std_ms": stats["std_ms"]},
            memory_mb=max((p.memory_overall_mb or 0 for p in parsed), default=None) or None))
    _add_speedups(result.rows, files, means, per="invocation")
    for name, parsed in profiles.items():
        result.op_profile.append({**_identity(name, files), "op_types": [asdict(o) for o in parsed.op_types]})
    result.notes.append("benchmark_model reports aggregates per invocation: p90 is not available, "
                        "median is the median of the invocations' medians where the build prints one")
    return result


def _device_system(transport, device: Device) -> dict:
    """What the device is, from standard commands (nothing is required to answer)."""
    def ask(*argv) -> str | None:
        try:
            proc = transport.run(list(argv), 60)
        except EdgestarError:  # an old phone without nproc is no reason to stop
            return None
        out = (proc.stdout or "").strip()
        return out.splitlines()[-1].strip() if proc.returncode == 0 and out else None

    cpus = ask("nproc")
    system = {"machine": ask("uname", "-m"), "cpus": int(cpus) if cpus and cpus.isdigit() else None,
              "model": ask("getprop", "ro.product.model") if device.kind == "adb" else None}
    return {k: v for k, v in system.items() if v is not None}


def _staged_copies(tmp: str, files: dict) -> list[Path]:
    """Copies of the models under the names edgestar chose (``model_0.tflite``, ...): the
    user's file names never reach the device's shell or scp's path parsing."""
    staged = []
    for name, m in files.items():
        shutil.copyfile(m.path, Path(tmp) / name)
        staged.append(Path(tmp) / name)
    return staged


def _benchmark_argv(name: str, threads: int, kernels: str, runs: int, config: BenchConfig) -> list[str]:
    argv = ["./benchmark_model", f"--graph={name}", f"--num_threads={threads}",
            f"--use_xnnpack={'true' if kernels == 'xnnpack' else 'false'}",
            f"--num_runs={runs}", f"--warmup_runs={max(1, config.warmup)}",
            f"--min_secs={config.min_seconds:g}"]
    if config.cpu_mask:
        argv = ["taskset", config.cpu_mask, *argv]
    return argv


def _checked(proc, device: Device, timeout: float) -> str:
    """benchmark_model's output, or a one-line error. stdout and stderr are joined without a
    separator: a last line cut off in stdout must stay visibly cut for the parser."""
    from edgestar.children import last_line

    text = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode in (126, 127) or "Exec format error" in text:
        raise InputError(f"{device.name}: benchmark_model cannot run there ({last_line(text)}); "
                         "is it built for this device's CPU?")
    if proc.returncode != 0:
        raise StageError(f"{device.name}: benchmark_model {signal_cause(proc.returncode, timeout)}: "
                         f"{last_line(text)}")
    return text


# --------------------------------------------------------------------------- Vela

def _vela(models, device, settings, log) -> BenchResult:
    from edgestar.deploy.vela import vela_estimate

    result = BenchResult(device=device.name, estimate=True, system={"device": device.name},
                         runtime={"name": "ethos-u-vela"}, settings=settings)
    files = _ids(models, ".tflite")
    for name, m in files.items():
        if m.kind != "tflite" or m.fmt in ("fp32", "fp16", "dynamic", "mixed"):
            result.notes.append(f"{m.name}: skipped, Vela compiles only fully quantized models")
            continue
        log(f"{device.name}: compiling {m.name} with Vela")
        est = vela_estimate(m.path, accelerator=device.config)
        result.runtime = {"name": "ethos-u-vela", "version": est.get("vela_version")}
        est.pop("model", None)
        result.rows.append({**_identity(name, files), "format": m.fmt, "kernels": "ethos-u", "threads": 1, **est})
    if not result.rows:
        raise InputError("no INT8 model to compile with Vela among the models given")
    return result


# --------------------------------------------------------------------------- rows, storage

def _ids(models: list[BenchModel], suffix: str) -> dict[str, BenchModel]:
    """Each model under the name it has on the device (``model_0.tflite``, ...), which is also
    its key in rows, evaluation and op profile: labels repeat across runs, these do not."""
    return {f"model_{i}{m.path.suffix or suffix}": m for i, m in enumerate(models)}


def _identity(name: str, files: dict[str, BenchModel]) -> dict:
    m = files[name]
    return {"id": name, "name": m.name, "model": m.label, "path": str(m.path),
            "run_dir": str(m.run_dir) if m.run_dir is not None else None, "group": m.group}


def _row(name: str, files: dict, kernels: str, threads: int, stats: dict, **extra) -> dict:
    return {**_identity(name, files), "format": files[name].fmt, "kernels": kernels, "threads": threads,
            **stats, "vs_fp32": None, **extra}


def _add_speedups(rows, files, samples, per: str = "round") -> None:
    """Each model against its group's FP32 ``.tflite`` at the same kernels and threads, from
    pairs timed in the same round (or invocation round). A group with more than one FP32
    model has no reference (which one would it be?)."""
    fp32 = {}
    for name, m in files.items():
        if m.kind == "tflite" and m.fmt == "fp32":
            fp32.setdefault(m.group, []).append(name)
    for row in rows:
        refs = fp32.get(row["group"], [])
        if len(refs) != 1 or refs[0] == row["id"] or files[row["id"]].kind != "tflite":
            continue
        pair = samples.get((refs[0], row["kernels"], row["threads"])), samples.get((row["id"], row["kernels"], row["threads"]))
        if None not in pair:
            s = speedup(*pair)
            if s is not None:
                row["vs_fp32"] = {**s, "per": per, "reference": files[refs[0]].name}


def store(result: BenchResult, models: list[BenchModel]) -> tuple[list[str], list[str]]:
    """Write each run directory's share of the result: ``bench.json`` (per device, merged with
    what other devices measured before) and ``manifest.json``'s ``device_latency``, each
    atomically. Returns (run directories written, one-line errors for those that failed)."""
    from edgestar.files import atomic_write_json
    from edgestar.pipeline.rundir import MANIFEST, load_manifest

    written, errors = [], []
    for run_dir in dict.fromkeys(m.run_dir for m in models if m.run_dir is not None):
        mine = lambda items: [x for x in items if x.get("run_dir") == str(run_dir)]  # noqa: E731
        share = {**result.to_json(), "rows": mine(result.rows), "evaluation": mine(result.evaluation),
                 "op_profile": mine(result.op_profile)}
        if not share["rows"]:
            continue
        for key in ("written", "store_errors"):
            share.pop(key, None)
        path = Path(run_dir) / BENCH_FILE
        existing = {}
        if path.exists():
            try:
                existing = json.loads(path.read_text())
                if not isinstance(existing, dict) or not isinstance(existing.get("devices"), dict):
                    raise ValueError("no devices")
            except (OSError, ValueError) as exc:
                result.warnings.append(f"{path} was unreadable ({exc}); it now holds only this device")
                existing = {}
        devices = {**existing.get("devices", {}), result.device: share}
        try:
            atomic_write_json(path, {"bench_version": BENCH_VERSION, "devices": devices})
            manifest = load_manifest(run_dir)
            manifest.setdefault("device_latency", {})[result.device] = summary_entry(share)
            atomic_write_json(Path(run_dir) / MANIFEST, manifest)
        except (OSError, InputError) as exc:
            errors.append(f"cannot write the results into {run_dir}: {getattr(exc, 'strerror', None) or exc}")
            continue
        written.append(str(run_dir))
    return written, errors


def summary_entry(share: dict) -> dict:
    """The manifest's compact record of one device's results (``bench.json`` has the rest)."""
    keep = ("model", "format", "kernels", "threads", "median_ms", "mean_ms", "p90_ms", "std_ms",
            "vs_fp32", "inference_ms_estimate", "sram_bytes", "flash_bytes", "npu_ops", "cpu_ops")
    return {
        "device": share["device"], "measured": share["measured"], "estimate": share["estimate"],
        "system": share["system"], "runtime": share["runtime"], "bench_file": BENCH_FILE,
        "rows": [{k: r[k] for k in keep if k in r} for r in share["rows"]],
        "evaluation": [{f: e.get(f) for f in ("model", "images", "top1", "agreement_with_host", "bit_exact_images")}
                       for e in share["evaluation"]],
    }
