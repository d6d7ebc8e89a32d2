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

from .errors import StageError
from .rundir import temp_path_for
from .tflite_file import add_metadata

FORMATS = ("fp32", "int8", "fp16", "dynamic")
IO_TYPES = ("int8", "uint8", "float")
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SPEC_FILE = "spec.json"
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
        env = dict(os.environ)
        # onnx2tf runs onnxsim from PATH; make sure our interpreter's scripts are found first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["CUDA_VISIBLE_DEVICES"] = "-1"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgestar.convert", "--serve", str(self.work)],
                                     cwd=self.work, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def submit(self, onnx_path: Path, outputs: dict[str, Path], *, calibration: np.ndarray,
               io_type: str, metadata: dict, mean, std) -> "Conversion":
        """Hand the worker its job. ``calibration`` holds float32 NCHW preprocessed inputs; it
        drives INT8 calibration and provides onnx2tf's sample images (``mean``/``std`` undo
        the normalisation for those)."""
        unknown = set(outputs) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown formats {sorted(unknown)}")
        if io_type not in IO_TYPES:
            raise ValueError(f"unknown io type {io_type}")
        work = self.work
        self.outputs = outputs
        shutil.copyfile(onnx_path, work / "model.onnx")
        np.save(work / "calibration.npy", calibration.transpose(0, 2, 3, 1).astype(np.float32))
        pixels = calibration.transpose(0, 2, 3, 1) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        np.save(work / ONNX2TF_SAMPLE, np.clip(pixels[:20], 0.0, 1.0).astype(np.float32))
        spec = {
            "onnx": str(work / "model.onnx"),
            "calibration": str(work / "calibration.npy"),
            "outputs": {fmt: str(Path(p).resolve()) for fmt, p in outputs.items()},
            "io_type": io_type,
            "metadata": metadata,
            "result": str(work / "result.json"),
        }
        (work / "spec.json.tmp").write_text(json.dumps(spec))
        os.replace(work / "spec.json.tmp", work / SPEC_FILE)  # the worker starts on this rename
        return self

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
        # formats while it does; INT8 last.
        order = (["fp32"] + [f for f in outputs if f not in ("fp32", "int8")]
                 + (["int8"] if "int8" in outputs else []))
        for fmt in order:
            t0 = time.perf_counter()
            details = {}
            if fmt == "int8":
                model, details["ranges"] = _quantize(graph, work, spec["io_type"])
            else:
                model = _to_tflite(graph, fmt)
            if fmt == "fp32":
                _write_atomic(work / FLOAT_MODEL, model)
            if fmt in outputs:
                _write_atomic(Path(outputs[fmt]), add_metadata(model, {
                    **spec["metadata"], "format": fmt,
                    "io_type": spec["io_type"] if fmt == "int8" else "float"}))
                result["formats"][fmt] = {"seconds": round(time.perf_counter() - t0, 3), **details}
    except SystemExit as exc:  # onnx2tf reports errors this way
        result["error"] = f"onnx2tf stopped (exit code {exc.code}); see the log for its message"
    except Exception as exc:  # anything TensorFlow raises: report one line, full trace in log
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


def _quantize(graph, work: Path, io_type: str) -> tuple[bytes, str]:
    """INT8 from the ranges the parent measured (``RANGES_MODEL``), or, when it asks for it
    (``CALIBRATE_HERE``), from TFLite's own calibrator over ``calibration.npy``."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    parent = os.getppid()
    while not (work / RANGES_MODEL).exists() and not (work / CALIBRATE_HERE).exists():
        if os.getppid() != parent:
            raise RuntimeError("the parent process went away before sending INT8 ranges")
        time.sleep(0.02)
    io_dtype = {"int8": tf.int8, "uint8": tf.uint8, "float": tf.float32}[io_type]
    if (work / RANGES_MODEL).exists():
        calibrated = (work / RANGES_MODEL).read_bytes()
        return mlir_quantize(calibrated, input_data_type=io_dtype, output_data_type=io_dtype), "edgestar"
    calibration = np.load(work / "calibration.npy")
    return _to_tflite(graph, "int8", calibration, io_dtype), "tflite"


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


def _to_tflite(graph, fmt: str, calibration: np.ndarray | None = None, io_dtype=None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([graph])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if fmt == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def representative_dataset():
            for i in range(len(calibration)):
                yield [calibration[i:i + 1]]

        converter.representative_dataset = representative_dataset
        converter.inference_input_type = io_dtype
        converter.inference_output_type = io_dtype
    return converter.convert()


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


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(_serve(sys.argv[2]))
    sys.exit(_worker(sys.argv[1]))
