"""ONNX -> TFLite (float32, full-integer INT8, optionally float16 and dynamic-range).

Route: onnx2tf builds the Keras graph (NHWC) from the ONNX file, then TensorFlow's TFLite
converter writes each requested format, with builtin ops only, so an op TFLite cannot lower
fails the conversion instead of silently becoming a Flex op. INT8 comes from TFLite's
quantizer applied to the FP32 graph with activation ranges the parent measured in PyTorch
(:mod:`edgestar.calibrate`); TFLite's own calibrator over our calibration inputs is the
fallback. (onnx2tf would drop QDQ scales anyway.)

TensorFlow runs in a subprocess (``python -m edgestar.convert --serve WORKDIR``, see
:class:`Conversion`): onnx2tf exits with ``sys.exit``, logs heavily and holds ~1 GB; none of
that should reach the caller. The worker runs in a private working directory holding
``calibration_image_sample_data_20x128x128x3_float32.npy`` made from our images, because
onnx2tf otherwise downloads that file on every conversion, and on a private copy of the ONNX
file, because onnx2tf rewrites its input in place.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .data import save_nhwc
from .errors import StageError
from .memory import release_freed_memory
from .rundir import temp_path_for
from .tflite_file import add_metadata

FORMATS = ("fp32", "int8", "fp16", "dynamic")
IO_TYPES = ("int8", "uint8", "float")
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SPEC_FILE = "spec.json"
CALIBRATION_FILE = "calibration.npy"
FLOAT_MODEL = "fp32.tflite"  # worker -> parent: the FP32 graph, written before INT8 starts
RANGES_MODEL = "ranges.tflite"  # parent -> worker: that graph with activation ranges recorded
CALIBRATE_HERE = "calibrate_here"  # parent -> worker: no ranges, run TFLite's calibrator


def convert(onnx_path: Path, outputs: dict[str, Path], *, log_path: Path, **options) -> dict:
    """Build every format in ``outputs`` (format -> final path) from ``onnx_path`` and wait;
    INT8 is calibrated by TFLite's calibrator on ``calibration``.

    See :meth:`Conversion.submit` for the options. Returns per-format details (seconds).
    """
    job = Conversion(log_path).submit(onnx_path, outputs, **options)
    job.calibrate_in_worker()
    return job.wait()


class Conversion:
    """The TensorFlow worker subprocess; started at construction so that importing TensorFlow
    and onnx2tf (seconds) overlaps whatever the caller does before :meth:`submit`.

    The worker is mostly single-threaded (imports, onnx2tf, calibration), so after submitting
    the caller can work meanwhile (the pipeline evaluates PyTorch) and then ``wait()``.
    """

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.outputs: dict[str, Path] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="edgestar-convert-")
        self.work = Path(self._tmp.name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgestar.convert", "--serve", str(self.work)],
                                     cwd=self.work, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=_worker_env())

    def submit(self, onnx_path: Path, outputs: dict[str, Path], *, calibration: np.ndarray,
               io_type: str, metadata: dict, mean, std,
               keep_calibrated: Path | None = None) -> "Conversion":
        """Hand the worker its job. ``calibration`` holds float32 NCHW preprocessed inputs; it
        drives INT8 calibration and provides onnx2tf's sample images (``mean``/``std`` undo
        the normalisation for those). ``keep_calibrated``: where to leave the FP32 graph with
        its INT8 ranges recorded, for a :class:`Requantizer`."""
        unknown = set(outputs) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown formats {sorted(unknown)}")
        if io_type not in IO_TYPES:
            raise ValueError(f"unknown io type {io_type}")
        work = self.work
        self.outputs = outputs
        shutil.copyfile(onnx_path, work / "model.onnx")
        save_nhwc(self.calibration_file, calibration)
        pixels = calibration[:20].transpose(0, 2, 3, 1) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        np.save(work / ONNX2TF_SAMPLE, np.clip(pixels, 0.0, 1.0).astype(np.float32))
        spec = {
            "onnx": str(work / "model.onnx"),
            "calibration": str(self.calibration_file),
            "outputs": {fmt: str(Path(p).resolve()) for fmt, p in outputs.items()},
            "io_type": io_type,
            "metadata": metadata,
            "result": str(work / "result.json"),
            "keep_calibrated": str(Path(keep_calibrated).resolve()) if keep_calibrated else None,
        }
        (work / "spec.json.tmp").write_text(json.dumps(spec))
        os.replace(work / "spec.json.tmp", work / SPEC_FILE)  # the worker starts on this rename
        return self

    @property
    def calibration_file(self) -> Path:
        """The calibration inputs as float32 NHWC ``.npy``, written by :meth:`submit`; the
        caller can stream them back (:func:`edgestar.data.read_batches`) instead of keeping
        its own copy."""
        return self.work / CALIBRATION_FILE

    @property
    def float_model(self) -> Path:
        """Where the worker puts the FP32 graph (without metadata) before it quantizes."""
        return self.work / FLOAT_MODEL

    def quantize_with(self, ranges_model: bytes) -> None:
        """Let the worker quantize the FP32 graph with these recorded activation ranges
        (see :mod:`edgestar.calibrate`)."""
        _write_atomic(self.work / RANGES_MODEL, ranges_model)

    def calibrate_in_worker(self) -> None:
        """Let the worker measure the ranges itself with TFLite's calibrator."""
        (self.work / CALIBRATE_HERE).touch()

    def wait_for(self, path: Path, poll_s: float = 0.05) -> bool:
        """Block until ``path`` is written (outputs are renamed into place when complete) or
        the worker has ended; return whether the file exists."""
        path = Path(path)
        while not path.exists() and self.proc.poll() is None:
            time.sleep(poll_s)
        return path.exists()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def wait(self) -> dict:
        """Wait for the worker; raise StageError (naming the log) unless every output exists.
        An INT8 job whose caller sent no ranges must have been told to calibrate itself."""
        if "int8" in self.outputs and not any(
                (self.work / f).exists() for f in (RANGES_MODEL, CALIBRATE_HERE)):
            raise RuntimeError("INT8 requested: call quantize_with() or calibrate_in_worker() first")
        try:
            returncode = self.proc.wait()
            result_file = self.work / "result.json"
            result = json.loads(result_file.read_text()) if result_file.exists() else None
        finally:
            self._close()
        if returncode != 0 or result is None or result.get("error"):
            reason = (result or {}).get("error") or f"converter exited with code {returncode}"
            raise StageError(f"TFLite conversion failed: {reason} (log: {self.log_path})")
        missing = [fmt for fmt, p in self.outputs.items() if not Path(p).is_file()]
        if missing:
            raise StageError(f"TFLite conversion did not produce {', '.join(missing)} (log: {self.log_path})")
        return result["formats"]

    def _close(self) -> None:
        self._log.close()
        self._tmp.cleanup()


class Requantizer:
    """A TensorFlow subprocess that re-quantizes one calibrated FP32 graph (see
    ``Conversion.submit(keep_calibrated=...)``) with chosen tensors kept float, as often as
    asked: the float fallback of ``quantize --fallback`` tries a few sets in a row and pays
    the TensorFlow import once. Requests go through stdin, models come back as files."""

    def __init__(self, calibrated: Path, io_type: str, log_path: Path):
        if io_type not in IO_TYPES:
            raise ValueError(f"unknown io type {io_type}")
        self._tmp = tempfile.TemporaryDirectory(prefix="edgestar-requantize-")
        self.work = Path(self._tmp.name)
        self._count = 0
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgestar.convert", "--requantize", str(calibrated), io_type],
            cwd=self.work, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            env=_worker_env())

    def __call__(self, keep_float: list[str]) -> bytes:
        """The INT8 model with the ops writing ``keep_float`` (tensor names) in float."""
        self._count += 1
        out = self.work / f"model{self._count}.tflite"
        self.proc.stdin.write((json.dumps({"keep_float": keep_float, "out": str(out)}) + "\n").encode())
        self.proc.stdin.flush()
        while not out.exists() and self.proc.poll() is None:
            time.sleep(0.02)
        if not out.exists():
            raise StageError(f"re-quantization failed (exit code {self.proc.returncode}; "
                             f"log: {self._log.name})")
        data = out.read_bytes()
        out.unlink()
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _worker_env() -> dict:
    """Environment of a TensorFlow subprocess: CPU only, quiet, our interpreter's scripts
    first on PATH (onnx2tf runs onnxsim from PATH)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _requantize_server(calibrated: str, io_type: str) -> int:
    """Requantizer's worker: one JSON request per stdin line until stdin closes."""
    model = Path(calibrated).read_bytes()
    for line in sys.stdin:
        request = json.loads(line)
        _write_atomic(Path(request["out"]), _quantize(model, io_type, request["keep_float"]))
    return 0


# --------------------------------------------------------------------------- worker side

def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec_path).parent
    result: dict = {"formats": {}}
    try:
        keras_model, seconds = _onnx_to_keras(spec["onnx"])
        result["onnx2tf_seconds"] = seconds
        graph = _concrete_function(keras_model)
        outputs = spec["outputs"]
        # FP32 first: the parent needs it to measure INT8 ranges; then the other float
        # formats while it does; INT8 last, from the FP32 flatbuffer alone.
        floats = ["fp32"] + [f for f in outputs if f not in ("fp32", "int8")]
        for i, fmt in enumerate(floats):
            t0 = time.perf_counter()
            model = _to_tflite(graph, fmt)
            if i == len(floats) - 1:  # INT8 needs only the FP32 flatbuffer
                del keras_model, graph  # ~100 MB at 224 px; the parent is about to match tensors
            release_freed_memory()  # and the converter's working memory
            if fmt == "fp32":
                float_model = model
                _write_atomic(work / FLOAT_MODEL, model)
            _finish(spec, fmt, model, {"seconds": round(time.perf_counter() - t0, 3)}, result)
        if "int8" in outputs:
            t0 = time.perf_counter()
            calibrated = _wait_for_ranges(work)
            source = "edgestar"
            if calibrated is None:
                calibrated = _tflite_calibration(float_model, np.load(work / CALIBRATION_FILE))
                source = "tflite"
            if spec.get("keep_calibrated"):  # for a later float fallback (Requantizer)
                _write_atomic(Path(spec["keep_calibrated"]), calibrated)
            model = _quantize(calibrated, spec["io_type"])
            _finish(spec, "int8", model, {"seconds": round(time.perf_counter() - t0, 3),
                                          "ranges": source}, result)
    except SystemExit as exc:  # onnx2tf reports errors this way
        result["error"] = f"onnx2tf stopped (exit code {exc.code}); see the log for its message"
    except Exception as exc:  # anything TensorFlow raises: report one line, full trace in log
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


def _wait_for_ranges(work: Path) -> bytes | None:
    """The FP32 graph with the parent's activation ranges (``RANGES_MODEL``), or None when
    the parent asks for TFLite's own calibrator instead (``CALIBRATE_HERE``)."""
    parent = os.getppid()
    while not (work / RANGES_MODEL).exists() and not (work / CALIBRATE_HERE).exists():
        if os.getppid() != parent:
            raise RuntimeError("the parent process went away before sending INT8 ranges")
        time.sleep(0.02)
    return (work / RANGES_MODEL).read_bytes() if (work / RANGES_MODEL).exists() else None


def _tflite_calibration(float_model: bytes, calibration_nhwc: np.ndarray) -> bytes:
    """``float_model`` with ranges from TFLite's own calibrator (what ``TFLiteConverter``
    does for full-integer quantization: reference kernels, one image at a time)."""
    from tensorflow.lite.python.optimize import calibrator

    def images():
        for i in range(len(calibration_nhwc)):
            yield [calibration_nhwc[i:i + 1]]

    model = calibrator.add_intermediate_tensors(float_model)
    return calibrator.Calibrator(model).calibrate(images)


def _finish(spec: dict, fmt: str, model: bytes, details: dict, result: dict) -> None:
    """Write format ``fmt`` with edgestar's metadata (when it was asked for) and record it."""
    if fmt not in spec["outputs"]:
        return
    _write_atomic(Path(spec["outputs"][fmt]), add_metadata(model, {
        **spec["metadata"], "format": fmt,
        "io_type": spec["io_type"] if fmt == "int8" else "float"}))
    result["formats"][fmt] = details


def _io_dtype(io_type: str):
    import tensorflow as tf

    return {"int8": tf.int8, "uint8": tf.uint8, "float": tf.float32}[io_type]


def _quantize(calibrated: bytes, io_type: str, keep_float: list[str] | None = None) -> bytes:
    """Full-integer INT8 from a float flatbuffer whose activation ranges are recorded; the ops
    writing the tensors named in ``keep_float`` stay float, between DEQUANTIZE and QUANTIZE."""
    from tensorflow.lite.python.convert import mlir_quantize

    dtype = _io_dtype(io_type)
    return mlir_quantize(calibrated, input_data_type=dtype, output_data_type=dtype,
                         denylisted_nodes=keep_float or None)


def _keep_residual_adds_nhwc() -> None:
    """Work around an onnx2tf 1.29.24 layout bug that turns depthwise convs into grouped ones.

    After building an ``Add``, onnx2tf compares the TF result's shape (NHWC) with the ONNX
    output shape (NCHW) and, finding them different, "rescues" the op by transposing both
    operands to NCHW. Every StarNet residual add then yields an NCHW tensor, and the next
    block's depthwise conv sees ``shape[-1] = W != groups`` and is emitted as a grouped
    CONV_2D (11 of 30 in S1). The rescue only runs when the ONNX output shape is known, so
    while onnx2tf builds an add of two equal-shaped 4-D tensors we hide that shape from it.
    """
    import onnx2tf.ops.Add as add_op

    if getattr(add_op.make_node, "_edgestar_patched", False):
        return
    original = add_op.make_node

    def make_node(*, graph_node, tf_layers_dict, **kwargs):
        output = graph_node.outputs[0]
        shapes = [getattr(t, "shape", None) for t in graph_node.inputs]
        hide = (len(shapes) == 2 and all(s is not None and len(s) == 4 for s in shapes)
                and list(shapes[0]) == list(shapes[1]))
        saved = output.shape
        if hide:
            output.shape = None
        try:
            original(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)
        finally:
            output.shape = saved
        if hide and graph_node.outputs[0].name in tf_layers_dict:
            tf_layers_dict[graph_node.outputs[0].name]["shape"] = saved

    make_node._edgestar_patched = True
    add_op.make_node = make_node


def _onnx_to_keras(onnx_path: str):
    import onnx
    import onnx2tf

    from .rewrite import strip_input_rotation

    _keep_residual_adds_nhwc()
    t0 = time.perf_counter()
    proto = onnx.load(onnx_path)
    rotated = strip_input_rotation(proto)
    if rotated:
        onnx.save(proto, onnx_path)
    model = onnx2tf.convert(
        input_onnx_file_path=onnx_path,
        output_folder_path=str(Path(onnx_path).parent / "saved_model"),
        output_signaturedefs=True,
        copy_onnx_input_output_names_to_tflite=True,
        disable_model_save=True,
        not_use_onnxsim=True,
        verbosity="warn",
    )
    if rotated:
        model = _prepend_rotation(model)
    return model, round(time.perf_counter() - t0, 3)


def _prepend_rotation(model):
    """The same Keras model behind a 180-degree rotation of its NHWC input (REVERSE_V2)."""
    import tensorflow as tf
    import tf_keras

    source = model.inputs[0]
    image = tf_keras.Input(shape=source.shape[1:], batch_size=source.shape[0], name="input")
    rotated = tf_keras.layers.Lambda(lambda t: tf.reverse(t, axis=[1, 2]), name="rotate_180")(image)
    return tf_keras.Model(image, model(rotated))


def _concrete_function(keras_model):
    """The model as one traced TF function.

    Converting this instead of the Keras model matters: ``from_keras_model`` first writes a
    SavedModel, and tf_keras serializes the metadata of every onnx2tf op layer (configs that
    embed constant arrays) in pure Python: 28 s instead of 0.7 s for StarNet-S1, growing with
    the parameter count.
    """
    import tensorflow as tf

    spec = tf.TensorSpec(keras_model.inputs[0].shape, tf.float32, name="input")
    return tf.function(lambda x: keras_model(x, training=False)).get_concrete_function(spec)


def _to_tflite(graph, fmt: str) -> bytes:
    """A float format (fp32, fp16 weights, dynamic-range int8 weights) of the traced graph."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([graph])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if fmt == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt != "fp32":
        raise ValueError(f"not a float format: {fmt}")
    return _convert_constant_graph(converter, graph)


def _convert_constant_graph(converter, graph) -> bytes:
    """``converter.convert()`` without TensorFlow's freezing step.

    The public ``convert()`` first "freezes" the function: it rebuilds the whole graph as a
    new Python-side FuncGraph with the captured weights inlined. For StarNet-S1 (1,410 nodes)
    that costs ~150 MB and half the conversion time, and it is the worker's memory peak. The
    weights onnx2tf captures are constants already, so inlining them into the GraphDef
    directly gives the converter the same frozen graph (the .tflite is identical except for
    TFLite's CONVERSION_METADATA entry, which only the public method adds). Where this TF
    version lacks the internal entry point, the public method runs.
    """
    import tensorflow as tf
    from tensorflow.lite.python import lite

    base = getattr(lite, "TFLiteConverterBaseV2", None)
    if base is None or not callable(getattr(base, "convert", None)):
        return converter.convert()
    graph_def = graph.graph.as_graph_def()
    weights = {internal.op.name: external for external, internal in graph.graph.captures}
    for node in graph_def.node:
        if node.name in weights:  # a Placeholder fed by a captured tensor
            node.op = "Const"
            node.ClearField("input")
            for key in [k for k in node.attr if k != "dtype"]:
                del node.attr[key]
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(weights[node.name].numpy()))
    inputs = graph.inputs[: len(graph.inputs) - len(graph.captured_inputs)]
    return base.convert(converter, graph_def, inputs, graph.outputs)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = temp_path_for(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _serve(work: str) -> int:
    """Import the heavy modules, then wait for the job spec (or for the parent to go away)."""
    parent = os.getppid()
    import onnx2tf  # noqa: F401  (the point: pay the import while the parent works)
    import tensorflow  # noqa: F401

    spec = Path(work) / SPEC_FILE
    while not spec.exists():
        if os.getppid() != parent:
            return 1
        time.sleep(0.02)
    return _worker(str(spec))


def _exit_now(code: int) -> None:
    """End the worker without TensorFlow's interpreter teardown, which holds the worker's
    peak memory for seconds after its results are written (they are, and are closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _exit_now(_serve(sys.argv[2]))
    if sys.argv[1] == "--requantize":
        _exit_now(_requantize_server(sys.argv[2], sys.argv[3]))
    _exit_now(_worker(sys.argv[1]))
