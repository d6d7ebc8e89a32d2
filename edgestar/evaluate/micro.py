"""The INT8 model on TensorFlow Lite Micro, the runtime ``--target micro`` builds it for.

TFLM's reference kernels round differently from LiteRT's XNNPACK by a few output LSB, so a
model validated only on LiteRT is not validated on a microcontroller. :func:`evaluate_on_micro`
runs TFLM's x86-64 Python interpreter (the ``tflite-micro`` wheel) in a child process over the
evaluation images, or a deterministic subsample of them sized to a time budget (the reference
kernels are slow), and measures it against the FP32 reference and the LiteRT INT8 model.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgestar.data.images import ImageFolder, Preprocessing, load_batch, subsample
from edgestar.errors import InputError
from edgestar.evaluate.runners import (MICRO_MISSING, MicroRunner, TFLiteRunner, dequantize, micro_available,
                                       micro_seconds_per_image)
from edgestar.evaluate.validate import EngineStats

# Seconds of TFLM inference one default run may add: 10 s is about 460 images of the demo
# StarNet-S1 at 32 px, 2,000 of s050, 9 of S1 at 224 px (estimates; see runners.py).
MICRO_BUDGET_S = 10.0
# Fewer images than this say little about agreement, so the budget gives way below it.
MICRO_MIN_IMAGES = 10


def default_micro_samples(int8_path: Path, available: int) -> int:
    """How many evaluation images fit the TFLM time budget, estimated from the model's
    multiply-accumulates (deterministic: the same model gets the same count everywhere)."""
    per_image = max(micro_seconds_per_image(int8_path), 1e-6)
    return min(available, max(MICRO_MIN_IMAGES, int(MICRO_BUDGET_S / per_image)))


def evaluate_on_micro(int8_path, folder: ImageFolder, pre: Preprocessing, reference_logits: np.ndarray,
                      *, samples: int | None = None, timeout_s: float | None = None,
                      host_logits: np.ndarray | None = None, seed: int = 0) -> dict:
    """Accuracy and agreement of the INT8 model ``int8_path`` on TFLite Micro's interpreter.

    ``reference_logits`` (FP32, one row per image of ``folder``, in its order) is what the
    statistics compare against, as for LiteRT in :func:`edgestar.evaluate.validate.evaluate`.
    ``host_logits``: the LiteRT INT8 model's logits on ``folder`` if the caller has them; else
    they are computed here (XNNPACK, LiteRT's default) on the images TFLM runs.
    ``samples``: how many images (a deterministic, class-mixed subsample drawn with ``seed``);
    None fits :data:`MICRO_BUDGET_S`. ``timeout_s``: for the TFLM child process; None scales
    with the images and the model.

    Returns, when tflite-micro is not installed, ``{"skipped": reason, "images": 0}``; else
    the keys of :meth:`EngineStats.summary` (``top1``, ``top5``, ``agreement_top1``,
    ``max_abs_logit_diff``, ``logit_sqnr_db``, ``lost_top1``, ``gained_top1``, ``images``,
    ``agreement_ci95``, ``top1_drop_ci95``) against ``reference_logits`` on the images used, and
    - ``of_images``: the evaluation set's size (``images`` < ``of_images`` for a subsample),
    - ``tflite_int8_same_images``: LiteRT INT8's ``top1``, ``top5``, ``agreement_top1`` on
      those same images (compare TFLM with these, not with LiteRT's full-set numbers),
    - ``vs``: ``{"tflite_int8": {agreement_top1, max_abs_logit_diff, logit_sqnr_db,
      max_lsb_diff}}``, TFLM against LiteRT INT8; ``max_lsb_diff`` is the largest difference
      of the raw output integers (None for a float-output model),
    - ``runtime`` (``tflite-micro <version>``), ``seconds`` (TFLM's child process, wall).
    A crash or a time-out of TFLM raises :class:`~edgestar.errors.StageError` (the model does
    not run on TFLM: that is a finding, not a reason to skip).
    """
    if not micro_available():
        return {"skipped": MICRO_MISSING, "images": 0}
    int8_path = Path(int8_path)
    _check_rows("reference_logits", reference_logits, folder)
    if host_logits is not None:
        _check_rows("host_logits", host_logits, folder)
    if samples is not None and samples < 1:
        raise InputError(f"TFLite Micro evaluation samples must be at least 1, got {samples}")

    count = samples if samples is not None else default_micro_samples(int8_path, len(folder))
    rows = subsample(list(range(len(folder))), count, seed)
    x = load_batch([folder.samples[i][0] for i in rows], pre)
    labels = np.array([folder.samples[i][1] for i in rows])
    reference = reference_logits[rows]

    micro = MicroRunner(int8_path, timeout_s=timeout_s)
    t0 = time.perf_counter()
    micro_raw = micro.quantized(x)
    seconds = time.perf_counter() - t0
    micro_logits = dequantize(micro_raw, micro.reference.out)
    host = host_logits[rows] if host_logits is not None else TFLiteRunner(int8_path)(x)

    k = min(5, reference.shape[1])
    own, litert, versus = EngineStats(), EngineStats(), EngineStats()
    own.update(micro_logits, labels, reference, k)
    litert.update(host, labels, reference, k)
    versus.update(micro_logits, labels, host, k)
    result = own.summary()
    host_summary, vs = litert.summary(), versus.summary()
    result.update(
        of_images=len(folder),
        tflite_int8_same_images={key: host_summary[key] for key in ("top1", "top5", "agreement_top1")},
        vs={"tflite_int8": {"agreement_top1": vs["agreement_top1"],
                            "max_abs_logit_diff": vs["max_abs_logit_diff"],
                            "logit_sqnr_db": vs["logit_sqnr_db"],
                            "max_lsb_diff": _max_lsb_diff(micro_raw, host, micro.reference.out)}},
        runtime=f"tflite-micro {_micro_version()}", seconds=round(seconds, 3))
    return result


def _check_rows(name: str, logits: np.ndarray, folder: ImageFolder) -> None:
    if len(logits) != len(folder):
        raise ValueError(f"{name} has {len(logits)} rows for {len(folder)} evaluation images")


def _max_lsb_diff(micro_raw: np.ndarray, host_logits: np.ndarray, out: dict) -> int | None:
    """Largest difference between TFLM's and LiteRT's output integers. LiteRT's logits were
    dequantized from integers, so dividing by the scale and rounding recovers them exactly."""
    if not np.issubdtype(micro_raw.dtype, np.integer):
        return None
    scale, zero = out["quantization"]
    host_raw = np.round(host_logits.astype(np.float64) / scale) + zero
    return int(np.abs(micro_raw.astype(np.int64) - host_raw.astype(np.int64)).max())


def _micro_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tflite-micro")
    except PackageNotFoundError:
        return "unknown version"
