"""One runner per engine behind one interface: ``runner(x) -> logits``.

Inputs are always float32 NCHW batches of preprocessed images (as PyTorch takes them); each
runner converts to its engine's layout and types (NHWC, int8 quantization) itself, so
validation and benchmarking code never special-cases an engine.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgestar.children import exit_status as _exit_status
from edgestar.children import last_line as _last_line
from edgestar.errors import StageError
from edgestar.files import scratch_dir

LITERT_BANNER = "INFO: Created TensorFlow Lite XNNPACK delegate"


@contextmanager
def without_litert_banner():
    """LiteRT's C++ code prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` to
    the process's stderr when it first applies XNNPACK, and no setting turns that off (``-q``
    must be quiet). Capture file descriptor 2 meanwhile and pass on anything else it printed."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith(LITERT_BANNER):
                    sys.stderr.write(line)


class TorchRunner:
    name = "torch"

    def __init__(self, model):
        import torch

        self.model = model.eval()
        self._torch = torch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self.model(self._torch.from_numpy(np.ascontiguousarray(x))).numpy()


class OnnxRunner:
    name = "onnxruntime"

    def __init__(self, path: Path, num_threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.batch = self.input.shape[0] if isinstance(self.input.shape[0], int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if self.batch is None:
            return self.session.run(None, {self.input.name: x})[0]
        return np.concatenate([self.session.run(None, {self.input.name: x[i:i + 1]})[0]
                               for i in range(len(x))])


class TFLiteRunner:
    """ai-edge-litert interpreter; batch-1 models run per image.

    ``xnnpack=True`` (the runtime's default) applies the XNNPACK delegate; ``False`` runs
    TFLite's builtin kernels, which on some x86 CPUs are faster for int8 than XNNPACK.
    """

    name = "tflite"

    def __init__(self, path: Path, num_threads: int | None = None, *, xnnpack: bool = True):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with without_litert_banner():
            self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads,
                                           experimental_op_resolver_type=resolver)
            self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        shape = self.inp["shape"]
        self.nhwc = len(shape) == 4 and shape[3] == 3

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        return np.concatenate([self._one(x[i:i + 1]) for i in range(len(x))])

    def _one(self, x: np.ndarray) -> np.ndarray:
        interp = self.interpreter
        interp.set_tensor(self.inp["index"], quantize(x, self.inp))
        interp.invoke()
        return dequantize(interp.get_tensor(self.out["index"]), self.out)


def compare_latency(paths: dict, *, runs: int = 30, warmup: int = 3, num_threads: int = 1) -> dict:
    """Median milliseconds per single-image inference of each ``.tflite`` (name -> path) on
    LiteRT's default CPU path (XNNPACK), measured interleaved (A, B, A, B, ...) so that
    machine noise hits every model alike. For side-by-side ratios on this machine, not for
    a device's absolute latency."""
    import time

    runners = {name: TFLiteRunner(path, num_threads=num_threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + runs):
        for name, runner in runners.items():
            x = np.zeros(runner.inp["shape"], runner.inp["dtype"])
            t0 = time.perf_counter()
            runner.interpreter.set_tensor(runner.inp["index"], x)
            runner.interpreter.invoke()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: round(float(np.median(t)), 4) for name, t in times.items()}


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if dtype == np.float32:
        return np.ascontiguousarray(x, np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


# TFLite Micro's reference kernels ran the demo StarNet-S1 at 32 px (8.6 M multiply-accumulates)
# in 15-30 ms per image on a loaded 2-core x86 host, about 0.3-0.6 G MAC/s; the S1 at 224 px
# and S4 at 32 px ran at similar rates. Estimates assume the slow end.
MICRO_MACS_PER_SECOND = 4e8
# A time-out must not fire on a slow or loaded machine, only on a hang: allow ten times the
# estimate per image, plus a fixed allowance for starting Python and planning the arena.
MICRO_TIMEOUT_MARGIN = 10.0
MICRO_TIMEOUT_BASE_S = 60.0


def multiply_accumulates(path: Path) -> int:
    """Multiply-accumulates of one inference of a ``.tflite`` (its convolutions and fully
    connected layers, which dominate a CNN's cost; element-wise ops are not counted)."""
    from edgestar.convert.tflite_file import operators

    _, graph, ops = operators(path)
    total = 0
    for name, op in ops:
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        outputs = int(np.prod(graph.Tensors(op.Outputs(0)).ShapeAsNumpy()))
        # weights: CONV_2D [out, kh, kw, in], DEPTHWISE_CONV_2D [1, kh, kw, C], FULLY_CONNECTED [out, in]
        weights = graph.Tensors(op.Inputs(1)).ShapeAsNumpy()
        depthwise = name == "DEPTHWISE_CONV_2D"
        per_output = int(weights[1] * weights[2]) if depthwise else int(np.prod(weights[1:]))
        total += outputs * per_output
    return total


def micro_seconds_per_image(path: Path) -> float:
    """Estimated seconds per image of ``path`` in TFLite Micro's host interpreter."""
    return multiply_accumulates(path) / MICRO_MACS_PER_SECOND


def micro_timeout_s(path: Path, images: int) -> float:
    """Default time-out of one TFLite Micro run over ``images`` images of ``path``."""
    return MICRO_TIMEOUT_BASE_S + MICRO_TIMEOUT_MARGIN * images * micro_seconds_per_image(path)


class MicroUnavailableError(StageError):
    """The ``tflite-micro`` package (x86-64 wheels only) is not installed here."""


MICRO_MISSING = ("tflite-micro is not installed (pip install tflite-micro; its wheels exist "
                 "only for x86-64 Linux)")


def micro_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tflite_micro") is not None


class MicroRunner:
    """TensorFlow Lite Micro's reference interpreter (``pip install tflite-micro``).

    Runs in a subprocess: a TFLM kernel that hits an unsupported case aborts the whole process
    (tflite-micro issue #3499), and one that hangs is killed after ``timeout_s`` seconds
    (default: :func:`micro_timeout_s`, scaled by the number of images). Either raises
    :class:`~edgestar.errors.StageError` with a one-line message. Same interface as the other
    runners; :meth:`quantized` gives the model's raw int8 outputs.
    """

    name = "tflite-micro"

    def __init__(self, path: Path, arena_size: int = 8 << 20, *, timeout_s: float | None = None):
        if not micro_available():
            raise MicroUnavailableError(MICRO_MISSING)
        self.path, self.arena_size, self.timeout_s = Path(path), arena_size, timeout_s
        self.reference = TFLiteRunner(path)  # for the I/O quantization parameters

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return dequantize(self.quantized(x), self.reference.out)

    def quantized(self, x: np.ndarray) -> np.ndarray:
        """The model's outputs as TFLM computed them (int8 for an int8-output model)."""
        ref = self.reference
        if ref.nhwc:
            x = x.transpose(0, 2, 3, 1)
        timeout_s = self.timeout_s if self.timeout_s is not None else micro_timeout_s(self.path, len(x))
        return run_micro(self.path, quantize(x, ref.inp), arena_size=self.arena_size,
                         timeout_s=timeout_s)


def run_micro(path: Path, inputs: np.ndarray, *, arena_size: int, timeout_s: float) -> np.ndarray:
    """Outputs of TFLite Micro's interpreter on ``inputs`` (already in the model's input type
    and layout), computed in a child process that is killed after ``timeout_s`` seconds."""
    import subprocess

    from edgestar.children import child_env

    path = Path(path)
    with scratch_dir("tflm") as tmp:
        np.save(f"{tmp}/in.npy", inputs)
        command = _micro_command(path, f"{tmp}/in.npy", f"{tmp}/out.npy", arena_size)
        try:
            # On time-out subprocess.run kills the child (SIGKILL) and reaps it before raising.
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                  env=child_env())
        except subprocess.TimeoutExpired:
            raise StageError(f"TFLite Micro did not finish {len(inputs)} image(s) of {path} within "
                             f"its time-out of {_seconds(timeout_s)} s (a hung kernel?); the child "
                             "process was killed") from None
        if proc.returncode != 0:
            raise StageError(f"TFLite Micro failed on {path} ({_exit_status(proc.returncode)}): "
                             f"{_last_line(proc.stderr, proc.stdout)}")
        return np.load(f"{tmp}/out.npy")


def _micro_command(path: Path, inputs: str, outputs: str, arena_size: int) -> list[str]:
    """The child: this module's ``__main__`` (:func:`_micro_main`) in this same Python."""
    import sys

    return [sys.executable, "-m", "edgestar.evaluate.runners", str(path), inputs, outputs,
            str(arena_size)]


def _seconds(t: float) -> str:
    return f"{t:.0f}" if t >= 10 else f"{t:.1f}"


def _micro_main(model: str, inputs: str, outputs: str, arena_size: str) -> None:
    from tflite_micro.python.tflite_micro import runtime as tflm

    interp = tflm.Interpreter.from_file(model, arena_size=int(arena_size))
    batch = np.load(inputs)
    results = []
    for i in range(len(batch)):
        interp.set_input(batch[i:i + 1], 0)
        interp.invoke()
        results.append(np.array(interp.get_output(0)))
    np.save(outputs, np.concatenate(results))


if __name__ == "__main__":
    from edgestar.children import die_with_parent

    die_with_parent()
    _micro_main(*sys.argv[1:5])
