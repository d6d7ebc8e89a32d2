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
A Cortex-M build differs by a few hundred bytes (CMSIS-NN kernels keep scratch buffers), hence
the margin.
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgestar.errors import InputError, StageError

ASSETS = Path(__file__).resolve().parent.parent.parent / "firmware_assets"

# TFLite op -> MicroMutableOpResolver method (tensorflow/lite/micro/micro_mutable_op_resolver.h)
RESOLVER_METHODS = {
    "ADD": "AddAdd", "AVERAGE_POOL_2D": "AddAveragePool2D", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize",
    "FULLY_CONNECTED": "AddFullyConnected", "HARD_SWISH": "AddHardSwish", "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MUL": "AddMul", "PAD": "AddPad", "PADV2": "AddPadV2",
    "QUANTIZE": "AddQuantize", "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "REVERSE_V2": "AddReverseV2", "SOFTMAX": "AddSoftmax", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "TRANSPOSE": "AddTranspose",
    "CUSTOM:ethos-u": "AddEthosU",
}

# A Cortex-M build needs a little more arena than TFLM's x86 interpreter reports (the demo
# S1 @ 32 px: 181,316 B with CMSIS-NN on an emulated M55 vs 180,960 B on the host, facts.md):
# reserve 1 KiB plus 2 %, rounded up to 16 bytes.
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


def generate(facts: ModelFacts, arena: dict, out: Path, *, test_image: dict | None = None,
             family: str = "arm-cortex-m") -> list[Path]:
    """Write the firmware sources for ``facts`` into ``out``; returns the files written."""
    from edgestar.files import atomic_write_bytes, ensure_writable_dir

    ensure_writable_dir(out)
    n, cam = facts.name, camel(facts.name)
    ops = sorted(facts.ops)
    lut = input_lookup_table(facts)
    pre = facts.preprocessing or {}
    labels = facts.class_names or [str(i) for i in range(int(np.prod(facts.output_shape[1:])))]
    reserve = arena_to_reserve(arena["total"])
    h, w = (facts.input_shape[1], facts.input_shape[2]) if len(facts.input_shape) == 4 else (0, 0)
    values = {
        "NAME": n, "CAMEL": cam, "GUARD": n.upper(),
        "MODEL_BYTES": len(facts.data), "MODEL_DATA": _bytes_as_c(facts.data),
        "OP_COUNT": len(ops), "ADD_OPS": "\n".join(f"  TF_LITE_ENSURE_STATUS(resolver.{RESOLVER_METHODS[op]}());"
                                                   for op in ops),
        "OP_LIST": ", ".join(f"{op} x{facts.ops[op]}" for op in ops),
        "ARENA_MEASURED": arena["total"], "ARENA_HEAD": arena.get("head", 0), "ARENA_TAIL": arena.get("tail", 0),
        "ARENA_RESERVE": reserve, "MARGIN": f"{ARENA_MARGIN_BYTES} B + {ARENA_MARGIN_FRACTION:.0%}",
        "IN_H": h, "IN_W": w, "IN_C": facts.input_shape[-1],
        "IN_SCALE": f"{facts.input_scale:.9g}f", "IN_ZERO": facts.input_zero_point,
        "OUT_CLASSES": len(labels), "OUT_SCALE": f"{facts.output_scale:.9g}f", "OUT_ZERO": facts.output_zero_point,
        "LABELS": ",\n".join(f"    {_c_string(s)}" for s in labels),
        "LUT": ",\n".join("    {" + ", ".join(str(int(v)) for v in row) + "}" for row in lut),
        "PRE_SIZE": pre.get("img_size", h), "PRE_CROP": pre.get("crop_pct", 1.0),
        "PRE_INTERP": pre.get("interpolation", "bicubic"),
        "PRE_MEAN": ", ".join(f"{v:g}" for v in pre.get("mean", [])),
        "PRE_STD": ", ".join(f"{v:g}" for v in pre.get("std", [])),
        "ROTATE_NOTE": ("the graph starts with REVERSE_V2 (edgestar's PAD-free rotation): feed pixels in their "
                        "normal order, the model rotates them itself" if "REVERSE_V2" in facts.ops else
                        "feed pixels in their normal order"),
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
    written = []
    for name, text in files.items():
        atomic_write_bytes(out / name, text.encode())
        written.append(out / name)
    return written


def test_image(facts: ModelFacts, model: Path, source: str = "demo", *, seed: int = 0) -> dict:
    """One evaluation image for the example app, resized and cropped as the app would, and the
    class the host's LiteRT run chooses on exactly the int8 input the firmware computes."""
    from edgestar.data.images import Preprocessing, evaluation_set, load_rgb, resize_and_crop
    from edgestar.evaluate.runners import TFLiteRunner

    if not facts.preprocessing:
        raise InputError(f"{model} carries no preprocessing metadata (not made by edgestar)")
    pre = Preprocessing.from_dict(facts.preprocessing)
    folder = evaluation_set(source, samples=1, seed=seed)
    path, label = folder.samples[0]
    pixels = np.asarray(resize_and_crop(load_rgb(path), pre), dtype=np.uint8)  # H x W x 3
    lut = input_lookup_table(facts)
    q = np.stack([lut[c][pixels[..., c]] for c in range(3)], axis=-1)[None].astype(np.int8)
    host = TFLiteRunner(model)
    host.interpreter.set_tensor(host.inp["index"], q)
    host.interpreter.invoke()
    top1 = int(host.interpreter.get_tensor(host.out["index"]).argmax())
    names = facts.class_names
    labelled = bool(names) and list(names) == list(folder.classes)
    name = (lambda i: names[i] if names and 0 <= i < len(names) else None)  # noqa: E731
    return {"pixels": pixels.tobytes(), "label": int(label) if labelled else -1, "host_top1": top1,
            "label_name": name(int(label)) if labelled else None, "host_top1_name": name(top1),
            "source": f"{Path(path).parent.name}/{Path(path).name}"}


@dataclass(kw_only=True)
class FirmwareConfig:
    board: str
    out: Path | None = None  # [default: <run>/firmware-<board>, or beside the model]
    family: str | None = None  # example app: arm-cortex-m or esp32 [default: the board's]
    test_images: str = "demo"  # where the compiled-in test image comes from


def firmware(path, config: FirmwareConfig, *, log=None) -> dict:
    """Firmware sources for the INT8 model of ``path`` (a run directory or a ``.tflite``), the
    arena measured, and whether it fits ``config.board``. Returns a JSON-able summary."""
    from edgestar.deploy.boards import format_verdict, get_board, verdict
    from edgestar.deploy.models import collect_models

    log = log or (lambda msg: None)
    board = get_board(config.board)
    path = Path(path)
    if path.is_dir():
        models = [m for m in collect_models([path]) if m.kind == "tflite" and m.fmt == "int8"]
        if not models:
            raise InputError(f"{path} holds no INT8 .tflite")
        model = models[0].path
    else:
        model = path
    facts = model_facts(model)
    out = Path(config.out) if config.out else model.parent / f"firmware-{board.name}"
    log(f"measuring the arena of {model.name} in TFLite Micro's interpreter")
    arena = measure_arena(model)
    image = test_image(facts, model, config.test_images)
    family = config.family or ("esp32" if board.family == "esp32" else "arm-cortex-m")
    files = generate(facts, arena, out, test_image=image, family=family)
    fit = verdict(board, model_bytes=len(facts.data), arena_bytes=arena_to_reserve(arena["total"]))
    return {
        "model": str(model), "name": facts.name, "board": board.name, "out": str(out),
        "files": [f.name for f in files], "ops": facts.ops, "model_bytes": len(facts.data),
        "arena": {**arena, "reserve": arena_to_reserve(arena["total"]),
                  "margin": f"{ARENA_MARGIN_BYTES} B + {ARENA_MARGIN_FRACTION:.0%}",
                  "measured_by": "tflite-micro (x86 interpreter, reference kernels)"},
        "reverse_v2": "REVERSE_V2" in facts.ops,
        "test_image": {k: v for k, v in image.items() if k != "pixels"},
        "verdict": fit, "verdict_text": format_verdict(fit),
    }


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
