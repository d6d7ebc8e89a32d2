"""edgestar: StarNet from a PyTorch checkpoint to a validated INT8 TFLite model.

The library API; the CLI and the ``bench/`` scripts use it::

    from edgestar import QuantizeConfig, quantize
    result = quantize(QuantizeConfig(variant="s1", weights="demo"))
    print(result.manifest["metrics"]["int8_top1_drop_pt"])

The package reads top-down in the order data flows:

``models``    StarNet variants, checkpoints, BatchNorm folding, StarNet's anatomy
``data``      images, label files, arrays, the demo set, preprocessing, distilled inputs
``export``    PyTorch -> ONNX, exact graph rewrites
``convert``   ONNX -> TFLite: client, TensorFlow worker, the ``.tflite`` file
``quant``     INT8 ranges, PTQ techniques, QAT, the per-tensor error table, float fallback
``evaluate``  one runner per engine and the shared validator
``pipeline``  the commands' stages over a run directory (``quantize``, ``train``, ``sweep``)
``report``    reports rendered from manifests alone
``deploy``    deployment to devices (``bench``, ``firmware``)

Names are imported lazily, so ``import edgestar`` does not import PyTorch or TensorFlow.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # quantize
    "quantize": "edgestar.pipeline.quantize",
    "QuantizeResult": "edgestar.pipeline.quantize",
    "QuantizeConfig": "edgestar.pipeline.config",
    "TARGETS": "edgestar.pipeline.config",
    "CALIBRATORS": "edgestar.pipeline.config",
    "FALLBACKS": "edgestar.pipeline.config",
    "EXTRA_FORMATS": "edgestar.pipeline.config",
    "DISTILLED": "edgestar.pipeline.config",
    "IO_TYPES": "edgestar.convert",
    "PTQ_TECHNIQUES": "edgestar.pipeline.config",
    # train
    "train": "edgestar.pipeline.train",
    "TrainConfig": "edgestar.pipeline.train",
    # sweep and report
    "sweep": "edgestar.pipeline.sweep",
    "SweepConfig": "edgestar.pipeline.sweep",
    "SweepResult": "edgestar.pipeline.sweep",
    "report": "edgestar.report.build",
    "Report": "edgestar.report.build",
    # firmware
    "firmware": "edgestar.deploy.firmware",
    "FirmwareConfig": "edgestar.deploy.firmware",
    # bench
    "bench": "edgestar.deploy.bench",
    "BenchConfig": "edgestar.deploy.bench",
    "BenchResult": "edgestar.deploy.bench",
    "PROFILES": "edgestar.deploy.profiles",
    "get_profile": "edgestar.deploy.profiles",
    "parse_device": "edgestar.deploy.devices",
    # models and data
    "VARIANTS": "edgestar.models.registry",
    "DOWNSAMPLE_FACTOR": "edgestar.models.registry",
    "build_model": "edgestar.models.checkpoints",
    "save_checkpoint": "edgestar.models.checkpoints",
    "Preprocessing": "edgestar.data.images",
    "evaluation_set": "edgestar.data.images",
    "calibration_inputs": "edgestar.data.images",
    "demo_split": "edgestar.data.images",
    # artifacts and run directories
    "read_metadata": "edgestar.convert.tflite_file",
    "op_counts": "edgestar.convert.tflite_file",
    "TorchRunner": "edgestar.evaluate.runners",
    "OnnxRunner": "edgestar.evaluate.runners",
    "TFLiteRunner": "edgestar.evaluate.runners",
    "MicroRunner": "edgestar.evaluate.runners",
    "load_manifest": "edgestar.pipeline.rundir",
    "summary_table": "edgestar.report.summary",
    # errors
    "EdgestarError": "edgestar.errors",
    "InputError": "edgestar.errors",
    "StageError": "edgestar.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'edgestar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
