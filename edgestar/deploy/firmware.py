"""``edgestar firmware``: an INT8 model as TensorFlow Lite Micro firmware sources, with the
arena it needs measured, not guessed.

Generated into ``--out`` (names derive from the model file, e.g. ``starnet_s1_32_int8``):

``<name>_model_data.cc/.h``   the model as ``alignas(16) const unsigned char`` data and its size
``<name>_op_resolver.h``      a ``MicroMutableOpResolver<N>`` registering exactly the model's ops
``<name>_model_info.h``       I/O shapes and quantization, class labels, the arena to reserve
                              (measured + a stated margin), and the preprocessing as a per-channel
                              256-entry table from a raw 8-bit pixel to the model's int8 input
``<name>_test_image.h``       one evaluation image (already resized) and the host's answer for it
``main.cc``, ``edgestar.mk``  an example application for the board family and a make fragment

The arena is measured by running the model in TFLite Micro's own interpreter (``tflite-micro``
on PyPI, x86-64) in a child process: its recording allocator reports what the model allocated.
A CMSIS-NN build can need more (scratch buffers): with ``run="qemu"`` the arena is measured
inside the firmware (:mod:`edgestar.deploy.firmware_build`) and the reserve rests on that.

Every run also compares TFLite Micro's outputs with LiteRT's reference kernels on evaluation
images. Two exact rewrites of the INT8 file are offered: ``rotation="app"``
(:func:`without_input_rotation`) and ``patches`` (:mod:`edgestar.convert.patches`).
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgestar.errors import InputError, StageError
from edgestar.files import scratch_dir

ASSETS = Path(__file__).resolve().parent.parent.parent / "firmware_assets"

# TFLite op -> MicroMutableOpResolver method (tensorflow/lite/micro/micro_mutable_op_resolver.h)
RESOLVER_METHODS = {
    "ADD": "AddAdd", "AVERAGE_POOL_2D": "AddAveragePool2D", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize",
    "FULLY_CONNECTED": "AddFullyConnected", "HARD_SWISH": "AddHardSwish", "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MUL": "AddMul", "PAD": "AddPad", "PADV2": "AddPadV2",
    "QUANTIZE": "AddQuantize", "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "REVERSE_V2": "AddReverseV2", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "TRANSPOSE": "AddTranspose",
    "CUSTOM:ethos-u": "AddEthosU",
}

# The arena reserved: what was measured plus 1 KiB plus 2 %, rounded up to 16 bytes. The host's
# figure (TFLM's x86 interpreter, reference kernels) is not what a CMSIS-NN build needs: its
# kernels add scratch buffers (S050 @ 32 px, 1000 classes, Cortex-M55: 75,540 B in the firmware vs
# 59,504 B on the host; the demo S1 @ 32 px: 181,316 vs 180,960 B). `--run qemu` therefore
# measures the arena inside the firmware and reserves from that.
ARENA_MARGIN_BYTES = 1024
ARENA_MARGIN_FRACTION = 0.02


@dataclass
class ModelFacts:
    """What the firmware needs to know about the model."""

    name: str  # C identifier stem
    data: bytes
    ops: dict[str, int]  # op -> count
    input_shape: list[int]
    input_dtype: str
    input_scale: float
    input_zero_point: int
    output_shape: list[int]
    output_dtype: str
    output_scale: float
    output_zero_point: int
    class_names: list[str] | None
    preprocessing: dict | None


def c_identifier(stem: str) -> str:
    """A name valid in C and C++ from a file stem: ``starnet-s1 32.int8`` -> ``starnet_s1_32_int8``."""
    ident = re.sub(r"[^0-9A-Za-z_]", "_", stem).strip("_").lower() or "model"
    return ident if not ident[0].isdigit() else f"m_{ident}"


def camel(ident: str) -> str:
    return "".join(part.capitalize() for part in ident.split("_") if part)


def model_facts(path: Path) -> ModelFacts:
    """Read the ``.tflite``: ops, I/O and edgestar's metadata; refuse what TFLM cannot run."""
    from edgestar.convert.tflite_file import op_counts, read_metadata
    from edgestar.deploy.models import TFLITE_IDENTIFIER

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    data = path.read_bytes()
    if data[4:8] != TFLITE_IDENTIFIER:
        raise InputError(f"{path} is not a TFLite model (no TFL3 identifier)")
    try:
        ops = dict(op_counts(data))
        meta = read_metadata(data) or {}
    except Exception as exc:  # a corrupt flatbuffer
        raise InputError(f"{path} cannot be read as a TFLite model ({type(exc).__name__})") from None
    missing = sorted(op for op in ops if op not in RESOLVER_METHODS)
    if missing:
        raise InputError(f"{path} uses {', '.join(missing)}, which TFLite Micro has no kernel for here")
    inp, out = _io_details(data)
    if inp["dtype"] != "int8" or out["dtype"] != "int8":
        raise InputError(f"{path} is not an INT8 model (input {inp['dtype']}, output {out['dtype']}); "
                         "firmware needs `edgestar quantize --target micro` output")
    return ModelFacts(
        name=c_identifier(path.stem), data=data, ops=ops,
        input_shape=inp["shape"], input_dtype=inp["dtype"], input_scale=inp["scale"],
        input_zero_point=inp["zero_point"], output_shape=out["shape"], output_dtype=out["dtype"],
        output_scale=out["scale"], output_zero_point=out["zero_point"],
        class_names=meta.get("class_names"), preprocessing=meta.get("preprocessing"))


def _io_details(data: bytes):
    from edgestar.convert.tflite_file import flatbuffer_schema

    schema = flatbuffer_schema()
    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def detail(index):
        t = graph.Tensors(index)
        q = t.Quantization()
        scale = float(q.ScaleAsNumpy()[0]) if q is not None and q.ScaleLength() else 0.0
        zero = int(q.ZeroPointAsNumpy()[0]) if q is not None and q.ZeroPointLength() else 0
        return {"shape": [int(d) for d in t.ShapeAsNumpy()], "dtype": types.get(t.Type(), "?"),
                "scale": scale, "zero_point": zero}

    return detail(graph.Inputs(0)), detail(graph.Outputs(0))


# --------------------------------------------------------------------------- the arena

def measure_arena(path: Path, *, timeout_s: float = 300) -> dict:
    """The arena TFLite Micro's interpreter allocates for ``path``: total, head (the activations,
    planned by TFLM's memory planner) and tail (persistent: per-channel quantization data, op
    state), in bytes, from its recording allocator. Runs in a child process."""
    from edgestar.children import child_env
    from edgestar.evaluate.runners import MICRO_MISSING, micro_available

    if not micro_available():
        raise StageError(MICRO_MISSING)
    try:
        proc = subprocess.run([sys.executable, "-m", "edgestar.deploy.firmware", "arena", str(Path(path).absolute())],
                              capture_output=True, text=True, timeout=timeout_s, env=child_env())
    except subprocess.TimeoutExpired:
        raise StageError(f"TFLite Micro did not allocate {path} within {timeout_s:.0f} s") from None
    found = dict(re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", proc.stderr))
    if proc.returncode != 0 or "total" not in found:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise StageError(f"TFLite Micro could not allocate {path}: {lines[-1] if lines else 'no output'}")
    return {k: int(v) for k, v in found.items()}


def arena_to_reserve(measured: int) -> int:
    """The measured arena plus the margin, rounded up to 16 bytes (TFLM aligns to 16)."""
    size = measured + ARENA_MARGIN_BYTES + int(measured * ARENA_MARGIN_FRACTION)
    return (size + 15) // 16 * 16


# --------------------------------------------------------------------------- the input rotation

# How the 180-degree input rotation of edgestar's PAD-free graph (``convert/worker.py``) is done.
ROTATE_NOTES = {
    "graph": "normal order; the graph starts with REVERSE_V2 (edgestar's PAD-free rotation), so the "
             "model rotates the image itself (TFLite Micro has that op since mid-2025, reference kernel only)",
    "app": "rotated by 180 degrees: input pixel i is camera pixel H*W-1-i (row-major), the model's REVERSE_V2 "
           "was moved into the application (`edgestar firmware --rotation app`); a camera's "
           "horizontal+vertical flip registers do the same for free",
    "none": "normal order",
}


def rotation(facts: ModelFacts) -> str:
    """``graph`` (the model's first op rotates its input), ``app`` (the app must) or ``none``."""
    if (facts.preprocessing or {}).get("input_rotation") == "180-by-app":
        return "app"
    return "graph" if _leading_rotation(facts.data) is not None else "none"


def _leading_rotation(data: bytes):
    """The (ModelT, op) of a REVERSE_V2 over H and W applied to the graph input, else None."""
    from edgestar.convert.tflite_file import flatbuffer_schema

    schema = flatbuffer_schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    graph = model.subgraphs[0]
    codes = model.operatorCodes
    for op in graph.operators:
        code = codes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.REVERSE_V2:
            continue
        if len(graph.inputs) != 1 or op.inputs[0] != graph.inputs[0]:
            continue
        axes = model.buffers[graph.tensors[op.inputs[1]].buffer].data
        if axes is None or sorted(np.frombuffer(bytes(axes), np.int32).tolist()) != [1, 2]:
            continue
        return model, op
    return None


def without_input_rotation(data: bytes) -> bytes:
    """The model with its input REVERSE_V2 removed: the rotated tensor becomes the input, and the
    metadata's preprocessing says the application rotates (``input_rotation: 180-by-app``). The
    rest of the graph, every weight and every quantization parameter are unchanged."""
    from edgestar.convert.tflite_file import add_metadata, pack_model, read_metadata

    found = _leading_rotation(data)
    if found is None:
        raise InputError("the model has no input rotation (REVERSE_V2 on the input) to move into the app")
    model, op = found
    graph = model.subgraphs[0]
    old_input, axes, rotated = op.inputs[0], op.inputs[1], op.outputs[0]
    src, dst = graph.tensors[old_input], graph.tensors[rotated]
    if (list(src.shape) != list(dst.shape) or src.type != dst.type
            or list(src.quantization.scale) != list(dst.quantization.scale)
            or list(src.quantization.zeroPoint) != list(dst.quantization.zeroPoint)):
        raise InputError("the input rotation changes the tensor's type or quantization; cannot move it")
    graph.operators = [o for o in graph.operators if o is not op]
    used = {i for o in graph.operators for i in list(o.inputs) + list(o.outputs) if i >= 0}
    dropped = {i for i in (old_input, axes) if i not in used}
    keep = [i for i in range(len(graph.tensors)) if i not in dropped]
    index = {old: new for new, old in enumerate(keep)}
    graph.tensors = [graph.tensors[i] for i in keep]
    for o in graph.operators:
        o.inputs = [index[i] if i >= 0 else i for i in o.inputs]
        o.outputs = [index[i] for i in o.outputs]
    graph.inputs = [index[rotated]]
    graph.outputs = [index[i] for i in graph.outputs]
    graph.tensors[index[rotated]].name = src.name
    for sig in model.signatureDefs or []:
        for t in list(sig.inputs or []) + list(sig.outputs or []):
            t.tensorIndex = index[rotated] if t.tensorIndex == old_input else index[t.tensorIndex]
    codes_used = sorted({o.opcodeIndex for o in graph.operators})
    recode = {old: new for new, old in enumerate(codes_used)}
    model.operatorCodes = [model.operatorCodes[i] for i in codes_used]
    for o in graph.operators:
        o.opcodeIndex = recode[o.opcodeIndex]
    packed = pack_model(model, size_hint=len(data))
    meta = read_metadata(data)
    if meta is not None:
        meta = dict(meta, preprocessing={**(meta.get("preprocessing") or {}), "input_rotation": "180-by-app"})
        packed = add_metadata(packed, meta)
    return packed


# --------------------------------------------------------------------------- preprocessing

def input_lookup_table(facts: ModelFacts) -> np.ndarray:
    """``lut[c][v]``: the int8 input value for raw 8-bit pixel value ``v`` of channel ``c``
    (R, G, B): ``round((v / 255 - mean[c]) / std[c] / scale) + zero_point``, clamped. The same
    arithmetic as the host's ``edgestar.evaluate.runners.quantize`` on a preprocessed image."""
    from edgestar.evaluate.runners import quantize

    pre = facts.preprocessing or {}
    mean = np.array(pre.get("mean", [0.485, 0.456, 0.406]), np.float32).reshape(3, 1)
    std = np.array(pre.get("std", [0.229, 0.224, 0.225]), np.float32).reshape(3, 1)
    v = np.arange(256, dtype=np.float32).reshape(1, 256)
    x = ((v / np.float32(255.0)) - mean) / std  # float32, as preprocess_image computes it
    detail = {"dtype": np.int8, "quantization": (facts.input_scale, facts.input_zero_point)}
    return quantize(x.astype(np.float32), detail)


# --------------------------------------------------------------------------- sources

def _bytes_as_c(data: bytes, per_line: int = 12) -> str:
    lines = []
    for i in range(0, len(data), per_line):
        lines.append("    " + ", ".join(f"0x{b:02x}" for b in data[i:i + per_line]) + ",")
    return "\n".join(lines)


def _template(name: str) -> str:
    from importlib import resources

    try:
        return (resources.files("edgestar._firmware_assets") / "templates" / name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (ASSETS / "templates" / name).read_text()


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise AssertionError(f"template placeholder {left[0]} not filled")
    return text


HOST_BASIS = ("B measured by TFLite Micro's x86 interpreter (CMSIS-NN kernels can need more for their "
              "scratch buffers; `edgestar firmware --run qemu` measures it inside the firmware)")


def generate(facts: ModelFacts, arena: dict, out: Path, *, test_image: dict | None = None,
             family: str = "arm-cortex-m", harness: bool = False, reserve: int | None = None,
             basis: str | None = None) -> list[Path]:
    """Write the firmware sources for ``facts`` into ``out``; returns the files written. The arena
    reserved is ``reserve`` (what ``basis`` says it rests on) or the host measurement plus the margin."""
    from edgestar.files import atomic_write_bytes, ensure_writable_dir

    ensure_writable_dir(out)
    n, cam = facts.name, camel(facts.name)
    ops = sorted(facts.ops)
    lut = input_lookup_table(facts)
    pre = facts.preprocessing or {}
    labels = facts.class_names or [str(i) for i in range(int(np.prod(facts.output_shape[1:])))]
    if reserve is None:
        reserve, basis = arena_to_reserve(arena["total"]), f"{arena['total']:,} {HOST_BASIS}"
    h, w = (facts.input_shape[1], facts.input_shape[2]) if len(facts.input_shape) == 4 else (0, 0)
    values = {
        "NAME": n, "CAMEL": cam, "GUARD": n.upper(),
        "MODEL_BYTES": len(facts.data), "MODEL_DATA": _bytes_as_c(facts.data),
        "OP_COUNT": len(ops), "ADD_OPS": "\n".join(f"  TF_LITE_ENSURE_STATUS(resolver.{RESOLVER_METHODS[op]}());"
                                                   for op in ops),
        "OP_LIST": ", ".join(f"{op} x{facts.ops[op]}" for op in ops),
        "ARENA_MEASURED": arena["total"], "ARENA_HEAD": arena.get("head", 0), "ARENA_TAIL": arena.get("tail", 0),
        "ARENA_RESERVE": reserve, "ARENA_BASIS": basis, "MARGIN": f"{ARENA_MARGIN_BYTES} B + {ARENA_MARGIN_FRACTION:.0%}",
        "IN_H": h, "IN_W": w, "IN_C": facts.input_shape[-1],
        "IN_SCALE": f"{facts.input_scale:.9g}f", "IN_ZERO": facts.input_zero_point,
        "OUT_CLASSES": len(labels), "OUT_SCALE": f"{facts.output_scale:.9g}f", "OUT_ZERO": facts.output_zero_point,
        "LABELS": ",\n".join(f"    {_c_string(s)}" for s in labels),
        "LUT": ",\n".join("    {" + ", ".join(str(int(v)) for v in row) + "}" for row in lut),
        "PRE_SIZE": pre.get("img_size", h), "PRE_CROP": pre.get("crop_pct", 1.0),
        "PRE_INTERP": pre.get("interpolation", "bicubic"),
        "PRE_MEAN": ", ".join(f"{v:g}" for v in pre.get("mean", [])),
        "PRE_STD": ", ".join(f"{v:g}" for v in pre.get("std", [])),
        "ROTATE_NOTE": ROTATE_NOTES[rotation(facts)], "ROTATE_180": "true" if rotation(facts) == "app" else "false",
    }
    image = test_image or {"pixels": bytes(h * w * 3), "label": -1, "host_top1": -1, "source": "none (zeros)"}
    values.update({"TEST_PIXELS": _bytes_as_c(bytes(image["pixels"])), "TEST_LABEL": image["label"],
                   "TEST_HOST_TOP1": image["host_top1"], "TEST_SOURCE": image["source"]})
    files = {
        f"{n}_model_data.h": _fill(_template("model_data.h"), values),
        f"{n}_model_data.cc": _fill(_template("model_data.cc"), values),
        f"{n}_op_resolver.h": _fill(_template("op_resolver.h"), values),
        f"{n}_model_info.h": _fill(_template("model_info.h"), values),
        f"{n}_test_image.h": _fill(_template("test_image.h"), values),
        "main.cc": _fill(_template(f"{family}/main.cc"), values),
        "edgestar.mk": _fill(_template("edgestar.mk"), values),
    }
    if harness:
        files["harness.cc"] = _fill(_template("qemu/harness.cc"), values)
    written = []
    for name, text in files.items():
        atomic_write_bytes(out / name, text.encode())
        written.append(out / name)
    return written


def evaluation_pixels(facts: ModelFacts, source: str = "demo", samples: int = 1, *, seed: int = 0):
    """``samples`` labelled images from ``source``, resized and cropped as the app would:
    (uint8 N x H x W x 3 pixels, labels or None when the folder's classes are not the model's,
    the images' paths)."""
    from edgestar.data.images import Preprocessing, evaluation_set, load_rgb, resize_and_crop

    if not facts.preprocessing:
        raise InputError("the model carries no preprocessing metadata (not made by edgestar)")
    pre = Preprocessing.from_dict(facts.preprocessing)
    folder = evaluation_set(source, samples=samples, seed=seed)
    pixels = np.stack([np.asarray(resize_and_crop(load_rgb(p), pre), dtype=np.uint8) for p, _ in folder.samples])
    labelled = bool(facts.class_names) and list(facts.class_names) == list(folder.classes)
    labels = np.array([label for _, label in folder.samples]) if labelled else None
    return pixels, labels, [p for p, _ in folder.samples]


def input_tensor(facts: ModelFacts, pixels: np.ndarray) -> np.ndarray:
    """The int8 input tensors the firmware computes from 8-bit pixels (N x H x W x 3): the
    lookup table, then the 180-degree rotation when the app does it."""
    lut = input_lookup_table(facts)
    q = np.stack([lut[c][pixels[..., c]] for c in range(3)], axis=-1).astype(np.int8)
    return np.ascontiguousarray(q[:, ::-1, ::-1, :]) if rotation(facts) == "app" else q


def host_reference(model: Path, facts: ModelFacts, pixels: np.ndarray) -> np.ndarray:
    """The outputs of TFLite Micro's x86 interpreter (reference kernels) on exactly the firmware's
    inputs; the firmware is bit-exact with it (and with LiteRT's BUILTIN_REF kernels, facts.md)."""
    from edgestar.evaluate.runners import micro_timeout_s, run_micro

    x = input_tensor(facts, pixels)
    y = run_micro(model, x, arena_size=64 << 20, timeout_s=micro_timeout_s(model, len(x)))
    return y.reshape(len(x), -1)


def litert_reference(model: Path, x: np.ndarray) -> np.ndarray:
    """LiteRT's reference kernels (``BUILTIN_REF``) on int8 inputs ``x``. ai-edge-litert 2.1's
    BUILTIN_REF registers REVERSE_V2 only up to version 2 (int8 versions 2 and 3 compute the
    same), so it runs a copy that declares version 2."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgestar.convert.tflite_file import flatbuffer_schema, pack_model
    from edgestar.evaluate.runners import without_litert_banner

    s = flatbuffer_schema()
    data = Path(model).read_bytes()
    obj = s.ModelT.InitFromObj(s.Model.GetRootAs(data, 0))
    for code in obj.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == s.BuiltinOperator.REVERSE_V2:
            code.version = min(code.version, 2)
    with scratch_dir("ref") as tmp:
        copy = Path(tmp) / "model.tflite"
        copy.write_bytes(pack_model(obj, size_hint=len(data)))
        with without_litert_banner():
            interp = Interpreter(model_path=str(copy), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
            interp.allocate_tensors()
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        outputs = []
        for i in range(len(x)):
            interp.set_tensor(inp["index"], x[i:i + 1])
            interp.invoke()
            outputs.append(interp.get_tensor(out["index"]).reshape(-1).copy())
    return np.stack(outputs)


def host_check(model: Path, facts: ModelFacts, pixels: np.ndarray, micro: np.ndarray) -> dict:
    """TFLite Micro's outputs (``micro``) against LiteRT's reference kernels on the same inputs."""
    ref = litert_reference(model, input_tensor(facts, pixels)).astype(np.int16)
    diff = np.abs(micro.astype(np.int16) - ref).max(axis=1)
    return {"images": len(diff), "bit_exact_images": int((diff == 0).sum()), "bit_exact": bool((diff == 0).all()),
            "max_abs_diff_lsb": int(diff.max()), "top1_agreement": float((micro.argmax(1) == ref.argmax(1)).mean()),
            "runtimes": "tflite-micro x86 interpreter vs ai-edge-litert BUILTIN_REF kernels"}


def compare_outputs(ran, reference: np.ndarray, labels, facts: ModelFacts) -> dict:
    """What the firmware computed on QEMU against the host reference, as a JSON-able dict."""
    got = ran.outputs.astype(np.int16)
    ref = reference.astype(np.int16)
    if got.shape != ref.shape:
        raise StageError(f"the firmware printed {got.shape} outputs, the host computed {ref.shape}")
    diff = np.abs(got - ref).max(axis=1)
    top1, ref_top1 = got.argmax(1), ref.argmax(1)
    ins = sorted(ran.instructions)
    return {
        "machine": ran.machine, "images": len(got), "bit_exact_images": int((diff == 0).sum()),
        "bit_exact": bool((diff == 0).all()), "max_abs_diff_lsb": int(diff.max()) if len(diff) else 0,
        "top1_agreement": float((top1 == ref_top1).mean()),
        "top1_firmware": float((top1 == labels).mean()) if labels is not None else None,
        "top1_host": float((ref_top1 == labels).mean()) if labels is not None else None,
        "reference": "tflite-micro x86 interpreter (reference kernels) on the same int8 inputs",
        "instructions_median": ins[len(ins) // 2] if ins else None, "instructions_min": ins[0] if ins else None,
        "instructions_max": ins[-1] if ins else None,
        "instructions_note": "QEMU -icount shift=0: executed instructions per inference, not cycles or latency",
        "arena_used_bytes": ran.arena_used, "qemu_seconds": round(ran.seconds, 1),
        "outputs_sha256": hashlib.sha256(ran.outputs.tobytes()).hexdigest(),
    }


def test_image(facts: ModelFacts, model: Path, source: str = "demo", *, seed: int = 0) -> dict:
    """One evaluation image for the example app, resized and cropped as the app would, and the
    class LiteRT's reference kernels (which TFLite Micro matches bit for bit) choose on exactly
    the int8 input the firmware computes."""
    if not facts.preprocessing:
        raise InputError(f"{model} carries no preprocessing metadata (not made by edgestar)")
    pixels, labels, paths = evaluation_pixels(facts, source, 1, seed=seed)
    top1 = int(litert_reference(model, input_tensor(facts, pixels))[0].argmax())
    names = facts.class_names
    name = (lambda i: names[i] if names and 0 <= i < len(names) else None)  # noqa: E731
    label = int(labels[0]) if labels is not None else -1
    return {"pixels": pixels[0].tobytes(), "label": label, "host_top1": top1,
            "label_name": name(label) if label >= 0 else None, "host_top1_name": name(top1),
            "source": f"{Path(paths[0]).parent.name}/{Path(paths[0]).name}"}


@dataclass(kw_only=True)
class FirmwareConfig:
    board: str
    out: Path | None = None  # [default: <run>/firmware-<board>, or beside the model]
    family: str | None = None  # example app: arm-cortex-m or esp32 [default: the board's]
    test_images: str = "demo"  # labelled images: the compiled-in test image, --run's evaluation images
    rotation: str = "graph"  # graph: keep the model's REVERSE_V2; app: the application rotates
    build: bool = False  # compile for the board's core (needs tflm_root)
    tflm_root: Path | None = None  # [default: $EDGESTAR_TFLM_ROOT]
    kernels: str = "cmsis_nn"  # or reference
    run: str | None = None  # "qemu": run the build on QEMU's emulated board for the core
    patches: str = "none"  # none, auto, or STEM[,STAR] strips of patch-based inference (convert/patches.py)
    eval_samples: int = 20  # evaluation images: TFLM vs LiteRT, and what --run feeds the firmware
    record: bool = True  # given a run directory: store the summary in its manifest (``firmware``)


def firmware(path, config: FirmwareConfig, *, log=None) -> dict:
    """Firmware sources for the INT8 model of ``path`` (a run directory or a ``.tflite``), the
    arena measured, and whether it fits ``config.board``; with ``build``/``run``, the sources
    compiled for the board's core and run on QEMU. Returns a JSON-able summary."""
    import os

    from edgestar.deploy.boards import format_verdict, get_board, verdict
    from edgestar.deploy.models import collect_models
    from edgestar.files import atomic_write_bytes, check_can_create, ensure_writable_dir
    from edgestar.pipeline.rundir import MANIFEST

    log = log or (lambda msg: None)
    board = get_board(config.board)
    if config.rotation not in ("graph", "app"):
        raise InputError(f"--rotation must be graph or app, not {config.rotation!r}")
    if config.run not in (None, "qemu"):
        raise InputError(f"--run supports qemu only, not {config.run!r}")
    build = config.build or config.run is not None
    tflm_root = config.tflm_root or os.environ.get("EDGESTAR_TFLM_ROOT")
    if build and not tflm_root:
        raise InputError("--build/--run need --tflm-root DIR (a standalone TFLite Micro tree) or $EDGESTAR_TFLM_ROOT")
    if build and board.family != "arm-cortex-m":
        raise InputError(f"--build compiles for Arm Cortex-M; {board.name} has a {board.core_name} "
                         "(build the generated sources with ESP-IDF and esp-tflite-micro)")
    if build:
        from edgestar.deploy.firmware_build import BUILD_CPUS, MACHINES, check_tree

        tflm_root = check_tree(Path(tflm_root))
        if board.core not in BUILD_CPUS:
            raise InputError(f"--build: the TFLite Micro tree's Makefile does not build for {board.core}")
        if config.run == "qemu" and board.core not in MACHINES:
            raise InputError(f"--run qemu: QEMU has no plain bare-metal board with a {board.core_name} here "
                             "(have: " + ", ".join(f"{c} on {m.name}" for c, m in MACHINES.items())
                             + "); use --build for the sizes")
    path = Path(path)
    run_dir = path if path.is_dir() else None
    if path.is_dir():
        models = [m for m in collect_models([path]) if m.kind == "tflite" and m.fmt == "int8"]
        if not models:
            raise InputError(f"{path} holds no INT8 .tflite")
        model = models[0].path
    else:
        model = path
    facts = model_facts(model)
    facts_source = model
    name = facts.name
    out = Path(config.out) if config.out else model.parent / f"firmware-{board.name}"
    check_can_create(out, "firmware folder")  # refused before any work, like every output
    if build:
        from edgestar.deploy.firmware_build import cache_root

        try:
            check_can_create(cache_root(), "TFLite Micro build cache")
        except InputError as exc:
            raise InputError(f"{exc}; set $EDGESTAR_CACHE to a writable folder") from None
    recording = run_dir is not None and config.record and all(
        os.access(p, os.W_OK) for p in (run_dir, run_dir / MANIFEST))  # a shared, read-only run is fine
    if run_dir is not None and config.record and not recording:
        log(f"{run_dir} is read-only: the result is not recorded in its manifest")
    if config.rotation == "app" and rotation(facts) == "graph":
        ensure_writable_dir(out)
        rotated = out / f"{model.stem}_rotation-app.tflite"
        atomic_write_bytes(rotated, without_input_rotation(facts.data))
        log(f"moved the input rotation (REVERSE_V2) into the application: {rotated.name}")
        model, facts = rotated, model_facts(rotated)
    elif config.rotation == "app" and rotation(facts) == "none":
        log("the model has no input rotation (REVERSE_V2): the application feeds pixels in their normal order")
    patches = None
    if config.patches != "none":
        model, facts, patches = patched_model(model, facts, out, config, log)
    facts.name = name  # the C identifiers stay the model's, whatever was rewritten
    if patches:  # measured while choosing: the model kept is the patched one, or the whole one
        arena = patches["arena_after"] if patches["applied"] else patches["arena_before"]
    else:
        log(f"measuring the arena of {model.name} in TFLite Micro's interpreter")
        arena = measure_arena(model)
    image = test_image(facts, model, config.test_images)
    family = config.family or ("esp32" if board.family == "esp32" else "arm-cortex-m")
    sources = dict(facts=facts, arena=arena, out=out, test_image=image, family=family, harness=build)
    files = generate(**sources)
    reserve = arena_to_reserve(arena["total"])
    result = {
        "model": str(model), "name": facts.name, "board": board.name, "out": str(out),
        "files": [f.name for f in files], "ops": facts.ops, "model_bytes": len(facts.data),
        "arena": {**arena, "reserve": reserve, "margin": f"{ARENA_MARGIN_BYTES} B + {ARENA_MARGIN_FRACTION:.0%}",
                  "measured_by": "tflite-micro (x86 interpreter, reference kernels)", "reserve_from": "host",
                  "firmware_used": None},
        "rotation": rotation(facts), "reverse_v2": "REVERSE_V2" in facts.ops, "patches": patches,
        "build": None, "qemu": None,
        "test_image": {k: v for k, v in image.items() if k != "pixels"},
    }
    pixels, labels, _ = evaluation_pixels(facts, config.test_images, config.eval_samples)
    log(f"comparing TFLite Micro with LiteRT's reference kernels on {len(pixels)} images")
    reference = host_reference(model, facts, pixels)
    result["host_check"] = host_check(model, facts, pixels, reference)
    if build:
        result.update(_build_and_run(model, facts, sources, board, config, Path(tflm_root), result["arena"],
                                     (pixels, labels, reference), log))
    fit = verdict(board, model_bytes=len(facts.data), arena_bytes=result["arena"]["reserve"],
                  code_bytes_estimate=result["build"]["code_bytes"] if result["build"] else None)
    result["verdict"], result["verdict_text"] = fit, format_verdict(fit)
    result["suggestion"] = None if fit["fits"] else _suggestion(board, model, facts, patches["arena_before"]
                                                                if patches else arena, log)
    if result["build"]:
        result["verdict_text"] = result["verdict_text"].replace(
            f"code {result['build']['code_bytes']:,} B", f"code {result['build']['code_bytes']:,} B (in the ELF)")
    result["recorded_in"] = str(run_dir / MANIFEST) if recording else None
    if recording:
        record(run_dir, result, source=facts_source)
    return result


def record(run_dir: Path, result: dict, *, source: Path) -> None:
    """Store the summary of a firmware result in the run's manifest under ``firmware.<board>``
    (what ``edgestar report`` reads: arena, fit, sizes, emulated instructions), atomically."""
    from edgestar.files import atomic_write_json
    from edgestar.models.checkpoints import sha256_file
    from edgestar.pipeline.rundir import MANIFEST, load_manifest

    build, qemu, arena = result["build"], result["qemu"], result["arena"]
    entry = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": source.name, "source_sha256": sha256_file(source),
        "model_bytes": result["model_bytes"], "rotation": result["rotation"],
        "patches": ({"applied": result["patches"]["applied"], "strips": result["patches"].get("strips"),
                     "star_strips": result["patches"].get("star_strips")} if result["patches"] else None),
        "arena": {k: arena[k] for k in ("total", "head", "tail", "reserve", "reserve_from", "firmware_used")},
        "fits": result["verdict"]["fits"], "reason": result["verdict"]["reason"],
        "flash_used_bytes": result["verdict"]["flash"]["used_bytes"],
        "code_bytes_is_default": result["verdict"]["flash"]["code_bytes_is_default"],
        "host_check_bit_exact": result["host_check"]["bit_exact"],
        "build": {k: build[k] for k in ("cpu", "kernels", "flash_bytes", "ram_bytes", "code_bytes")} if build else None,
        "qemu": ({k: qemu[k] for k in ("machine", "instructions_median", "bit_exact", "arena_used_bytes")}
                 if qemu else None),
        "out": result["out"],
    }
    try:
        manifest = load_manifest(run_dir)
        manifest.setdefault("firmware", {})[result["board"]] = entry
        atomic_write_json(Path(run_dir) / MANIFEST, manifest)
    except OSError as exc:
        raise InputError(f"cannot record the firmware result in {run_dir}: {exc.strerror}") from None


def _suggestion(board, model: Path, facts: ModelFacts, arena: dict, log) -> dict | None:
    """The largest variant and input size that would fit (edgestar.deploy.fit), or None when
    the model carries no edgestar metadata to scale from."""
    from edgestar.convert.tflite_file import read_metadata
    from edgestar.deploy.fit import measured_candidates, suggest
    from edgestar.models.registry import VARIANTS

    meta = read_metadata(facts.data) or {}
    size = (facts.preprocessing or {}).get("img_size")
    if meta.get("variant") not in VARIANTS or not size:
        return None
    base = {"variant": meta["variant"], "img_size": int(size), "model_bytes": len(facts.data),
            "head": arena["head"], "tail": arena["tail"], "num_classes": int(np.prod(facts.output_shape[1:])),
            "rotated": "REVERSE_V2" in facts.ops}
    measured = measured_candidates(model, log=log) if (model.parent / "manifest.json").is_file() else []
    return suggest(board, base=base, measured=measured)


PATCH_GRID = [(stem, star) for stem in (4, 6, 8, 10) for star in (0, 2, 3, 4)]


def parse_patches(spec: str) -> list[tuple[int, int | None]]:
    """``auto`` -> the grid to search; ``8`` -> [(8, None)]; ``8,3`` -> [(8, 3)]."""
    if spec == "auto":
        return list(PATCH_GRID)
    try:
        parts = [int(p) for p in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise InputError(f"--patches takes none, auto, STRIPS or STRIPS,STAR_STRIPS (e.g. 8,3), not {spec!r}")
    return [(parts[0], parts[1] if len(parts) == 2 else None)]


def patched_model(model: Path, facts: ModelFacts, out: Path, config: FirmwareConfig, log):
    """Patch-based inference of the first layers (:mod:`edgestar.convert.patches`): the strip
    counts given, or (``auto``) those of a small grid with the smallest arena in TFLite Micro's
    interpreter. The result must give the unpatched model's outputs bit for bit on the
    evaluation images (TFLite Micro's interpreter), or the run stops."""
    from edgestar.convert.patches import patch_first_layers
    from edgestar.evaluate.runners import micro_timeout_s, run_micro
    from edgestar.files import atomic_write_bytes, ensure_writable_dir

    ensure_writable_dir(out)
    before = measure_arena(model)
    best = None
    with scratch_dir("patches") as tmp:
        for strips, star in parse_patches(config.patches):
            data, summary = patch_first_layers(facts.data, strips=strips, star_strips=star)
            trial = Path(tmp) / "trial.tflite"
            trial.write_bytes(data)
            arena = measure_arena(trial)
            if best is None or arena["total"] < best[2]["total"]:
                best = (data, summary, arena)
    data, summary, arena = best
    if config.patches == "auto" and arena["total"] >= before["total"]:
        log(f"patch-based inference does not lower this model's arena (best {arena['total']:,} B with "
            f"{summary['strips']},{summary['star_strips']} strips vs {before['total']:,} B): keeping the graph whole")
        return model, facts, {**summary, "applied": False, "arena_before": before, "arena_after": arena}
    patched = out / f"{model.stem}_patched.tflite"
    atomic_write_bytes(patched, data)
    log(f"patch-based inference: stem pair in {summary['strips']} strips, {summary['star_chains']} star chain(s) "
        f"in {summary['star_strips']}; arena {before['total']:,} -> {arena['total']:,} B (TFLM x86): {patched.name}")
    pixels, _, _ = evaluation_pixels(facts, config.test_images, max(8, min(config.eval_samples, 32)))
    x = input_tensor(facts, pixels)
    timeout = micro_timeout_s(model, len(x))
    same = np.array_equal(run_micro(model, x, arena_size=64 << 20, timeout_s=timeout),
                          run_micro(patched, x, arena_size=64 << 20, timeout_s=timeout))
    if not same:
        raise StageError(f"the patched model does not compute what {model.name} computes (TFLite Micro, "
                         f"{len(x)} images): not using it")
    info = {**summary, "applied": True, "model": str(patched), "arena_before": before, "arena_after": arena,
            "parity": {"images": len(x), "bit_exact": True, "runtime": "tflite-micro x86 interpreter"}}
    return patched, model_facts(patched), info


def _build_and_run(model: Path, facts: ModelFacts, sources: dict, board, config: FirmwareConfig, tflm_root: Path,
                   arena: dict, evaluation: tuple, log) -> dict:
    """``--build``: compile for the board's core. ``--run qemu``: first run once with a generous
    arena to measure what the firmware really uses, then regenerate with that (plus the margin)
    reserved, rebuild, and run the evaluation images on exactly the firmware the user gets."""
    from edgestar.deploy.firmware_build import MACHINES, build, run_qemu

    def compile_():
        return build(sources["out"], facts.name, facts.ops, cpu=board.core, tflm_root=tflm_root,
                     kernels=config.kernels, log=log)

    pixels, labels, reference = evaluation
    if config.run == "qemu":
        ram = MACHINES[board.core].ram[1]
        probe = min(max(2 * arena["reserve"], arena["reserve"] + (256 << 10)), ram - (64 << 10))
        generate(**sources, reserve=probe, basis=f"{probe:,} B (a probe build)")
        log(f"measuring the arena inside the firmware on QEMU (a build with {probe:,} B)")
        used = run_qemu(compile_().elf, board.core, pixels[:1], timeout_s=600).arena_used
        reserve = arena_to_reserve(used)
        generate(**sources, reserve=reserve,
                 basis=f"{used:,} B used inside the firmware ({board.core}, {config.kernels} kernels, "
                       f"on QEMU {MACHINES[board.core].name})")
        arena.update(reserve=reserve, reserve_from="firmware", firmware_used=used)
    built = compile_()
    log(f"built {built.elf.name} for {board.core} ({config.kernels} kernels): flash {built.flash_bytes:,} B, "
        f"RAM {built.ram_bytes:,} B")
    code = built.flash_bytes - len(facts.data)
    result = {"build": {**built.as_dict(), "code_bytes": code,
                        "note": f"linked for {'QEMU ' + built.machine if built.machine else 'a generic memory map'} "
                                "with semihosting stdio; a board build adds its own start-up and drivers"}}
    if config.run != "qemu":
        return result
    log(f"running {built.elf.name} on QEMU {built.machine} with {len(pixels)} images")
    ran = run_qemu(built.elf, board.core, pixels, timeout_s=120 + 30 * len(pixels))
    result["qemu"] = compare_outputs(ran, reference, labels, facts)
    return result


def _c_string(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "backslashreplace").decode() + '"'


def parse_c_array(text: str) -> bytes:
    """The bytes of the first ``{ 0x.., ... }`` array in C source ``text`` (for tests and checks)."""
    body = text[text.index("{") + 1:text.index("}")]
    return bytes(int(v, 16) for v in re.findall(r"0x([0-9a-fA-F]{2})", body))


def _arena_main(model: str) -> None:
    from tflite_micro.python.tflite_micro import runtime as tflm

    interp = tflm.Interpreter.from_file(model, arena_size=64 << 20)
    interp.print_allocations()  # to the C-level stderr the parent reads


if __name__ == "__main__":
    from edgestar.children import die_with_parent

    die_with_parent()
    if sys.argv[1:2] == ["arena"]:
        _arena_main(sys.argv[2])
