"""One runner per engine behind one interface: ``runner(x) -> logits``.

Inputs are always float32 NCHW batches of preprocessed images (as PyTorch takes them); each
runner converts to its engine's layout and types (NHWC, int8 quantization) itself, so
validation and benchmarking code never special-cases an engine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


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


class MicroRunner:
    """TensorFlow Lite Micro's reference interpreter (``pip install --pre tflite-micro``).

    Runs in a subprocess: a TFLM kernel that hits an unsupported case aborts the whole process
    (tflite-micro issue #3499). Same interface as the other runners.
    """

    name = "tflite-micro"

    def __init__(self, path: Path, arena_size: int = 8 << 20):
        import importlib.util

        if importlib.util.find_spec("tflite_micro") is None:
            raise RuntimeError("tflite-micro is not installed (pip install --pre tflite-micro)")
        self.path, self.arena_size = Path(path), arena_size
        self.reference = TFLiteRunner(path)  # for the I/O quantization parameters

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import subprocess
        import sys
        import tempfile

        ref = self.reference
        if ref.nhwc:
            x = x.transpose(0, 2, 3, 1)
        with tempfile.TemporaryDirectory(prefix="edgestar-tflm-") as tmp:
            np.save(f"{tmp}/in.npy", quantize(x, ref.inp))
            proc = subprocess.run([sys.executable, "-m", "edgestar.evaluate.runners", str(self.path),
                                   f"{tmp}/in.npy", f"{tmp}/out.npy", str(self.arena_size)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"TFLite Micro failed (exit {proc.returncode}): {tail[0]}")
            return dequantize(np.load(f"{tmp}/out.npy"), ref.out)


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
    import sys

    _micro_main(*sys.argv[1:5])
