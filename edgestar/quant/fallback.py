"""Float fallback: an INT8 model with its worst tensors kept in float, to meet an accuracy bound.

The per-tensor error table (:mod:`edgestar.quant.diagnose`) ranks tensors by the error their
own int8 rounding causes. :func:`float_fallback` re-quantizes the calibrated FP32 graph with
the 1, 2, 4, ... worst of them (ending with all) kept in float until the top-1 drop is within
the bound. It keeps whole regions float (a tensor's writer and all its readers): keeping only
the writer float changed nothing measurable, because its output was re-quantized to the same
int8 grid by the next op. The result is a *mixed* model: int8 I/O, some float compute inside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class FallbackResult:
    float_tensors: list[str]  # TFLite tensor names kept float
    stats: dict  # the mixed model's evaluation (as for any engine)
    tried: list[dict] = field(default_factory=list)


def float_fallback(calibrated: Path, ranked_tensors: list[str], *, evaluate: Callable[[Path], dict],
                   ref_top1: float, max_drop: float, io_type: str, metadata: dict, out: Path,
                   log_path: Path, tried: list[dict]) -> FallbackResult | None:
    """Write the first model meeting ``max_drop`` (points below ``ref_top1``) to ``out`` and
    return what it cost; None (``out`` not written) when even all tensors float is not enough.
    ``evaluate(path)`` scores a candidate; every candidate's numbers are appended to ``tried``."""
    from edgestar.convert.client import Requantizer
    from edgestar.convert.tflite_file import add_metadata, float_region
    from edgestar.files import atomic_write_bytes

    counts = [2 ** i for i in range(len(ranked_tensors).bit_length()) if 2 ** i < len(ranked_tensors)]
    trial = Path(calibrated).with_name("fallback-trial.tflite")
    with Requantizer(calibrated, io_type, log_path) as requantize:
        for count in counts + [len(ranked_tensors)]:
            keep = ranked_tensors[:count]
            model = requantize(float_region(calibrated, keep))
            trial.write_bytes(add_metadata(model, {**metadata, "float_tensors": keep}))
            stats = evaluate(trial)
            drop = (ref_top1 - stats["top1"]) * 100.0
            tried.append({"float_tensors": len(keep), "top1": stats["top1"], "drop_pt": drop,
                          "agreement": stats["agreement_top1"], "logit_sqnr_db": stats["logit_sqnr_db"]})
            if drop <= max_drop:
                atomic_write_bytes(out, trial.read_bytes())
                return FallbackResult(keep, stats, tried)
    return None
