"""On-device evaluation: the evaluation images through the model *on the board*, compared with
this host's run of the same model on the same inputs.

Different CPUs take different kernel paths (x86 AVX-512 VNNI vs ARM NEON dot-product, XNNPACK
vs builtin kernels), so an INT8 model's outputs can differ by a few quantization steps between
machines. What users need to know is whether that changes the answers: top-1 on the board,
agreement with the host's top-1, and how many images came out bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgestar.deploy.models import BenchModel
from edgestar.errors import InputError


@dataclass
class EvalInputs:
    """The evaluation images of one model, ready for the board: in the model's input type and
    layout (int8 NHWC for an int8-input model), as the board's runtime takes them."""

    model: BenchModel
    inputs: np.ndarray  # what is sent to the board
    labels: np.ndarray
    labelled: bool
    why: str  # whether top-1 may be reported against these labels, and why
    source: str
    host_outputs: np.ndarray  # this host's raw outputs (LiteRT, XNNPACK) on the same inputs


def prepare(model: BenchModel, source: str, *, samples: int | None, seed: int = 0,
            progress_factory=None) -> EvalInputs:
    from edgestar.data.images import Preprocessing, evaluation_set, load_images
    from edgestar.evaluate.runners import TFLiteRunner, quantize

    if model.preprocessing is None:
        raise InputError(f"{model.path} carries no preprocessing (not made by edgestar, and no "
                         "run manifest beside it); --eval cannot prepare its inputs")
    try:
        pre = Preprocessing.from_dict(model.preprocessing)
    except ValueError as exc:
        raise InputError(f"{model.path}: {exc}") from None
    folder = evaluation_set(source, samples=samples, seed=seed)
    host = TFLiteRunner(model.path)
    classes = int(np.prod(host.out["shape"][1:]))
    names = model.class_names
    if names and list(names) == list(folder.classes):
        labelled, why = True, "the model's class names are the evaluation set's"
    elif not names and len(folder.classes) == classes:
        labelled, why = True, f"the model has no class names; the {classes} folders are taken to be its classes"
    else:
        labelled = False
        why = ("the model's classes are not the evaluation set's" if names else
               f"the evaluation set has {len(folder.classes)} classes, the model {classes}")
    bar = progress_factory(len(folder), f"preparing {model.label} images") if progress_factory else None
    x = load_images([p for p, _ in folder.samples], pre, progress=bar)
    if bar is not None:
        bar.close()
    if host.nhwc:
        x = x.transpose(0, 2, 3, 1)
    inputs = np.ascontiguousarray(quantize(x, host.inp))
    host_out = []
    for i in range(len(inputs)):
        host.interpreter.set_tensor(host.inp["index"], inputs[i:i + 1])
        host.interpreter.invoke()
        host_out.append(host.interpreter.get_tensor(host.out["index"]).copy())
    labels = np.array([label for _, label in folder.samples])
    return EvalInputs(model, inputs, labels, labelled, why, str(folder.root), np.concatenate(host_out))


def score(prepared: EvalInputs, device_outputs: np.ndarray) -> dict:
    """Top-1 on the device (when the labels are the model's), agreement with the host's top-1,
    and how close the raw outputs are (in output quantization steps for an int8 model)."""
    from edgestar.evaluate.validate import proportion_interval

    host, dev = prepared.host_outputs, np.asarray(device_outputs)
    if dev.shape != host.shape:
        raise InputError(f"the device returned outputs of shape {dev.shape}, expected {host.shape}")
    n = len(dev)
    dev_top1, host_top1 = dev.argmax(axis=1), host.argmax(axis=1)
    agree = int((dev_top1 == host_top1).sum())
    diff = np.abs(dev.astype(np.float64) - host.astype(np.float64)).reshape(n, -1).max(axis=1)
    result = {
        "images": n,
        "source": prepared.source,
        "labelled": prepared.labelled,
        "labels": prepared.why,
        "top1": None, "top1_ci95": None,
        "host_top1": None,
        "agreement_with_host": round(agree / n, 5),
        "agreement_ci95": [round(v, 5) for v in proportion_interval(agree, n)],
        "bit_exact_images": round(float((diff == 0).mean()), 5),
        "max_abs_output_diff": float(diff.max()),
        "output_unit": "LSB" if np.issubdtype(dev.dtype, np.integer) else "float",
    }
    if prepared.labelled:
        correct = int((dev_top1 == prepared.labels).sum())
        result["top1"] = round(correct / n, 5)
        result["top1_ci95"] = [round(v, 5) for v in proportion_interval(correct, n)]
        result["host_top1"] = round(float((host_top1 == prepared.labels).mean()), 5)
    return result
