"""The context every stage of ``quantize`` works on: :class:`Run`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestar.data.images import Preprocessing
from edgestar.pipeline.config import QuantizeConfig
from edgestar.pipeline.rundir import RunDir
from edgestar.pipeline.scoring import EvaluationImages
from edgestar.pipeline.torch_work import batch_size_for

CONVERT_LOG = "convert.log"  # the converter's (and re-quantizer's) output, kept in the run


@dataclass
class Run:
    """What the stages share: the configuration, the run directory and what each stage made
    for the next. A stage reads the fields of earlier stages and sets its own."""

    config: QuantizeConfig
    dir: RunDir
    scratch: Path
    log: object
    progress: object
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # load
    model: object = None
    ckpt: object = None
    pre: Preprocessing | None = None
    # evaluation_data, calibration_data
    eval: EvaluationImages | None = None
    calib: np.ndarray | None = None
    # fold .. qat
    techniques: tuple[str, ...] = ()
    folded: object = None
    qat: object = None
    # export, convert
    onnx: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)  # format -> staged .tflite
    calibrated: Path | None = None  # FP32 graph with INT8 ranges, for the float fallback
    reference: np.ndarray | None = None  # PyTorch FP32 logits on the evaluation images
    others: dict = field(default_factory=dict)  # further PyTorch logits (QAT, bias-corrected)
    engines: dict = field(default_factory=dict)  # per-engine statistics (validate)
    error_rows: list[dict] | None = None  # the error table (diagnose)

    @property
    def manifest(self) -> dict:
        return self.dir.manifest

    @property
    def batch(self) -> int:
        return batch_size_for(self.pre.img_size)

    def artifact_name(self, fmt: str) -> str:
        return f"starnet_{self.config.variant}_{self.pre.img_size}_{fmt}.tflite"
