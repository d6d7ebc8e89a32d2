"""The benchmark runner ``edgestar bench`` copies to a board and runs with the board's Python.

It is one self-contained file: the standard library, numpy and whichever TFLite runtime the
board has (``ai_edge_litert``, else ``tflite_runtime`` -- 32-bit ARM boards have only the
latter), so it runs on Python 3.7 and later. The same file runs on this machine for
``--device local``, so local and remote figures come from identical code.

    python3 board_runner.py JOB.json      # prints one JSON object on stdout

The job names the models (files beside the job), the configurations to time (model, kernels,
threads) and the rounds. Every round runs each configuration once, in an order rotated from
round to round (A, B, C, then B, C, A, ...): machine noise (another process, a clock change,
thermal throttling) then hits every configuration alike, and per-round ratios between two
models stay trustworthy when absolute times drift. Only ``invoke()`` is timed, as TFLite's
``benchmark_model`` does. With ``eval`` the runner also runs the given inputs (already in the
model's input type and layout) through a model and returns its raw outputs.

Exit codes: 0 ok; 3 the board lacks a runtime (a set-up problem); 4 the run failed.
"""
from __future__ import annotations

import base64
import io
import json
import os
import platform
import signal
import sys
import time

RUNNER_VERSION = 1
MAX_ROUNDS = 100000  # --min-seconds keeps rounds going; this bounds a tiny model's list of samples
NO_RUNTIME, RUN_FAILED = 3, 4


class RunnerError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: board_runner.py JOB.json\n")
        return 2
    try:
        result = run_job(argv[1])
    except RunnerError as exc:
        print(json.dumps({"error": exc.code, "message": str(exc)}))
        return exc.code
    except Exception as exc:  # anything else: one line the host can show
        print(json.dumps({"error": RUN_FAILED, "message": "%s: %s" % (type(exc).__name__, exc)}))
        return RUN_FAILED
    print(json.dumps(result))
    return 0


def run_job(job_path):
    with open(job_path) as f:
        job = json.load(f)
    folder = os.path.dirname(os.path.abspath(job_path))
    if job.get("deadline_s") and hasattr(signal, "alarm"):
        # SIGALRM's default action ends the process even inside a hung C kernel, so nothing
        # is left running on the board when the host gives up on it.
        signal.alarm(int(job["deadline_s"]) + 1)
    np = _numpy()
    runtime = _runtime(needed=any(m["kind"] == "tflite" for m in job["models"].values()))
    engines, seen = [], set()
    for config in job["configs"]:
        model = job["models"][config["model"]]
        threads = config["threads"] or cores()
        if (config["model"], config["kernels"], threads) in seen:
            continue  # e.g. 1 and "all cores" on a one-core board: time it once
        seen.add((config["model"], config["kernels"], threads))
        path = os.path.join(folder, model["file"])
        if model["kind"] == "onnx":
            engine = OnnxEngine(np, path, threads)
        else:
            engine = TFLiteEngine(np, runtime, path, threads, config["kernels"] == "xnnpack")
        engines.append((dict(config, threads=threads), engine))

    load_before = _load()
    samples = [[] for _ in engines]
    for _ in range(job["warmup"]):
        for _, engine in engines:
            engine.time_one()
    others = OtherProcesses()
    rounds, start = 0, time.perf_counter()
    while rounds < MAX_ROUNDS:
        if rounds >= job["runs"] and time.perf_counter() - start >= job.get("min_seconds", 0):
            break
        shift = rounds % len(engines)
        for i in list(range(shift, len(engines))) + list(range(shift)):
            samples[i].append(engines[i][1].time_one())
        rounds += 1
    seconds = time.perf_counter() - start
    busy_elsewhere = others.cores_used(seconds)

    evaluated = {}
    for item in job.get("eval", []):
        model = job["models"][item["model"]]
        engine = TFLiteEngine(np, runtime, os.path.join(folder, model["file"]),
                              item.get("threads") or cores(), True)
        outputs = engine.outputs(np.load(os.path.join(folder, item["inputs"])))
        buf = io.BytesIO()
        np.save(buf, outputs)
        evaluated[item["model"]] = {"outputs_npy_b64": base64.b64encode(buf.getvalue()).decode("ascii")}

    return {
        "runner_version": RUNNER_VERSION,
        "system": dict(system_info(), load_before=load_before, others_cores=busy_elsewhere),
        "runtime": runtime["info"] if runtime else None,
        "rounds": rounds,
        "seconds": round(seconds, 3),
        "configs": [dict(config, samples_ms=[round(t, 5) for t in s])
                    for (config, _), s in zip(engines, samples)],
        "eval": evaluated,
    }


def cores():
    """The cores this process may run on (taskset and cgroup CPU sets count; os.cpu_count does not)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _numpy():
    try:
        import numpy
    except ImportError:
        raise RunnerError(NO_RUNTIME, "numpy is not installed for %s (and a TFLite runtime needs it): "
                          "pip install ai-edge-litert (64-bit) or tflite-runtime (32-bit ARM)"
                          % sys.executable)
    return numpy


def _runtime(needed=True):
    """ai_edge_litert, else tflite_runtime: the interpreter class and what it is."""
    if not needed:
        return None
    for module, package in (("ai_edge_litert.interpreter", "ai-edge-litert"),
                            ("tflite_runtime.interpreter", "tflite-runtime")):
        try:
            interp = __import__(module, fromlist=["Interpreter"])
        except ImportError:
            continue
        top = __import__(module.split(".")[0])
        return {"Interpreter": interp.Interpreter,
                "OpResolverType": getattr(interp, "OpResolverType", None),
                "info": {"name": package, "version": _version(package) or getattr(top, "__version__", None)}}
    raise RunnerError(NO_RUNTIME, "no TFLite runtime for %s: pip install ai-edge-litert "
                      "(64-bit boards) or tflite-runtime (32-bit ARM)" % sys.executable)


def _version(package):
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return None


class TFLiteEngine:
    def __init__(self, np, runtime, path, threads, xnnpack):
        resolvers = runtime["OpResolverType"]
        kwargs = {"model_path": path, "num_threads": threads}
        if resolvers is not None:
            kwargs["experimental_op_resolver_type"] = (
                resolvers.AUTO if xnnpack else resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        elif not xnnpack:
            raise RunnerError(RUN_FAILED, "this TFLite runtime cannot turn XNNPACK off")
        try:
            self.interp = runtime["Interpreter"](**kwargs)
            self.interp.allocate_tensors()
        except Exception as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise RunnerError(RUN_FAILED, "cannot load %s: %s" % (os.path.basename(path), lines[-1]))
        self.np = np
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.interp.set_tensor(self.inp["index"], _random_input(np, self.inp["shape"], self.inp["dtype"]))

    def time_one(self):
        t0 = time.perf_counter()
        self.interp.invoke()
        return (time.perf_counter() - t0) * 1000.0

    def outputs(self, inputs):
        results = []
        for i in range(len(inputs)):
            self.interp.set_tensor(self.inp["index"], inputs[i:i + 1].astype(self.inp["dtype"]))
            self.interp.invoke()
            results.append(self.interp.get_tensor(self.out["index"]).copy())
        return self.np.concatenate(results)


class OnnxEngine:
    def __init__(self, np, path, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError(NO_RUNTIME, "onnxruntime is not installed for %s" % sys.executable)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        self.feed = {inp.name: _random_input(np, shape, np.float32)}

    def time_one(self):
        t0 = time.perf_counter()
        self.session.run(None, self.feed)
        return (time.perf_counter() - t0) * 1000.0


def _random_input(np, shape, dtype):
    rng = np.random.RandomState(0)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(tuple(shape)).astype(dtype)
    info = np.iinfo(dtype)  # int8/uint8/int16 inputs in practice; stay within 32 bits anyway
    low, high = max(int(info.min), -2 ** 31), min(int(info.max), 2 ** 31 - 2)
    return rng.randint(low, high + 1, size=tuple(shape)).astype(dtype)


class OtherProcesses:
    """How much CPU everything but this process used while it was timing: the machine's busy
    time (``/proc/stat``: user, system, interrupts, and time stolen by the hypervisor) minus
    this process's own CPU time, in cores. Linux only; None elsewhere."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system

    def cores_used(self, seconds):
        end = self._read()
        if self.start is None or end is None or seconds <= 0:
            return None
        machine = end[0] - self.start[0]
        mine = end[1] - self.start[1]
        return round(max(0.0, machine - mine) / seconds, 3)


def _load():
    """The 1-minute load average: how many processes were running or waiting on average."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def system_info():
    """What the board is: CPU model, cores, OS, Python."""
    info = {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
            "python": platform.python_version(), "cpus": cores(), "cpu": None, "model": None}
    try:
        with open("/proc/device-tree/model", "rb") as f:  # e.g. "Raspberry Pi 5 Model B Rev 1.0"
            info["model"] = f.read().decode("utf-8", "replace").strip("\0 \n")
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    info["cpu"] = info["cpu"] or value.strip()
    except OSError:
        pass
    return info


def _die_with_local_parent() -> None:
    """Started by edgestar on this machine (``local``: the parent's pid is in the environment):
    ask Linux for SIGKILL when that parent dies, even by SIGKILL, so a killed ``bench`` leaves no
    runner timing on. (This file runs standalone on boards: it cannot import edgestar.)"""
    parent = os.environ.get("EDGESTAR_PARENT_PID")
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the prctl
        os._exit(1)


if __name__ == "__main__":
    _die_with_local_parent()
    sys.exit(main(sys.argv))
