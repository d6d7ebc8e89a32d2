"""The TensorFlow side of the conversion: runs as ``python -m edgestar.convert.worker``.

Started by :class:`edgestar.convert.client.Conversion` (``--serve WORKDIR``: import TensorFlow
and onnx2tf, wait for the job spec, build every format) and by
:class:`edgestar.convert.client.Requantizer` (``--requantize MODEL IO_TYPE``). Nothing here is
imported by the parent process except the module itself; TensorFlow is imported inside the
functions that need it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgestar.children import die_with_parent
from edgestar.convert.client import CALIBRATE_HERE, CALIBRATION_FILE, FLOAT_MODEL, RANGES_MODEL, SPEC_FILE
from edgestar.convert.tflite_file import add_metadata
from edgestar.files import atomic_write_bytes
from edgestar.memory import release_freed_memory


def _requantize_server(calibrated: str, io_type: str) -> int:
    """Requantizer's worker: one JSON request per stdin line until stdin closes."""
    model = Path(calibrated).read_bytes()
    for line in sys.stdin:
        request = json.loads(line)
        atomic_write_bytes(Path(request["out"]), _quantize(model, io_type, request["keep_float"]))
    return 0



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
                atomic_write_bytes(work / FLOAT_MODEL, model)
            _finish(spec, fmt, model, {"seconds": round(time.perf_counter() - t0, 3)}, result)
        if "int8" in outputs:
            t0 = time.perf_counter()
            calibrated = _wait_for_ranges(work)
            source = "edgestar"
            if calibrated is None:
                calibrated = _tflite_calibration(float_model, np.load(work / CALIBRATION_FILE))
                source = "tflite"
            if spec.get("keep_calibrated"):  # for a later float fallback (Requantizer)
                atomic_write_bytes(Path(spec["keep_calibrated"]), calibrated)
            model = _quantize(calibrated, spec["io_type"])
            _finish(spec, "int8", model, {"seconds": round(time.perf_counter() - t0, 3),
                                          "ranges": source}, result)
    except SystemExit as exc:  # onnx2tf reports errors this way
        result["error"] = f"onnx2tf stopped (exit code {exc.code})"  # the parent adds its reason
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
    atomic_write_bytes(Path(spec["outputs"][fmt]), add_metadata(model, {
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

    from edgestar.export.rewrite import strip_input_rotation

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
    die_with_parent()  # a killed quantize must not leave a converter writing into its run
    if sys.argv[1] == "--serve":
        _exit_now(_serve(sys.argv[2]))
    if sys.argv[1] == "--requantize":
        _exit_now(_requantize_server(sys.argv[2], sys.argv[3]))
    _exit_now(_worker(sys.argv[1]))
