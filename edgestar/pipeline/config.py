"""What ``quantize`` can be asked: :class:`QuantizeConfig`, the choices of every option
(the CLI reads them from here), and the checks that reject a bad configuration before any
work starts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgestar.convert import IO_TYPES
from edgestar.errors import InputError
from edgestar.quant import TECHNIQUES as PTQ_TECHNIQUES  # noqa: F401  (the --ptq choices)
from edgestar.quant import parse_techniques

DISTILLED = "distilled"  # --calib value: no images, inputs synthesized from BatchNorm statistics

TARGETS = {
    "cpu": "LiteRT with XNNPACK (phones, Raspberry Pi, ARM boards): 7x7 depthwise convs on maps "
           ">= 14 px are split into three dilated ones, which XNNPACK runs in one pass each",
    "micro": "TFLite Micro: 7x7 depthwise convs kept whole (fewer ops, smaller arena)",
}

CALIBRATORS = {
    "edgestar": "min/max of each activation measured on the folded PyTorch model",
    "tflite": "TFLite's own calibrator on the FP32 .tflite (single-threaded reference kernels)",
}

DEFAULT_PTQ: tuple[str, ...] = ()  # plain min/max: the ablation in bench/RESULTS.md found no top-1 gain

FALLBACKS = {
    "none": "a drop beyond --max-drop fails the run",
    "float": "keep the worst tensors (error table order) in float until the drop is within --max-drop",
}

EXTRA_FORMATS = ("fp16", "dynamic")  # built on request besides FP32 and INT8


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``quantize`` needs; mirrors the CLI options one to one."""

    variant: str
    weights: str = "official"
    num_classes: int | None = None
    img_size: int | None = None
    calib: str = "demo"
    calib_samples: int = 300
    calibrator: str = "edgestar"  # where INT8 activation ranges are measured, see CALIBRATORS
    ptq: str | tuple[str, ...] | None = None  # edgestar.ptq techniques ("a,b" or a tuple); None: DEFAULT_PTQ
    target: str = "cpu"  # the runtime the graph is shaped for, see TARGETS
    eval: str | None = None  # None: the demo evaluation set, used with labels if classes match
    eval_samples: int | None = None
    labels: str | None = None  # a label file for a flat --eval folder (see edgestar.data)
    io_type: str = "int8"
    formats: tuple[str, ...] = ()  # extra formats beyond fp32 and int8: "fp16", "dynamic"
    max_drop: float | None = None
    fallback: str = "none"  # "float": meet max_drop by keeping the worst tensors float
    qat: bool = False  # fine-tune with INT8 simulation before converting (see edgestar.qat)
    train: str | None = None  # QAT images: a folder or "demo" [default: the --calib source]
    qat_epochs: int = 1
    qat_steps: int | None = None  # stop QAT after this many steps (smoke tests, quick runs)
    qat_lr: float = 2e-5
    qat_batch: int = 64
    qat_checkpoint_minutes: float = 5.0  # QAT state saved this often (and every epoch) for resuming
    out: Path | None = None
    allow_pickle: bool = False
    seed: int = 0
    profile: str | None = None  # the target profile the options came from (recorded only)

    @classmethod
    def for_profile(cls, profile: str, **options) -> "QuantizeConfig":
        """A configuration with a target profile's graph shape and I/O type (see
        :mod:`edgestar.deploy.profiles`); ``options`` given explicitly win."""
        from edgestar.deploy.profiles import get_profile

        p = get_profile(profile)
        options.setdefault("target", p.target)
        options.setdefault("io_type", p.io_type)
        return cls(profile=p.name, **options)


def check_config(config: QuantizeConfig) -> None:
    from edgestar.models.registry import check_img_size, get_variant

    get_variant(config.variant)
    if config.profile is not None:
        from edgestar.deploy.profiles import get_profile

        get_profile(config.profile)
    if config.img_size is not None:
        check_img_size(config.img_size)
    if config.io_type not in IO_TYPES:
        raise InputError(f"unknown --io {config.io_type!r}; choose one of {', '.join(IO_TYPES)}")
    bad = [f for f in config.formats if f not in ("fp32", "int8", *EXTRA_FORMATS)]
    if bad:
        raise InputError(f"unknown format {bad[0]!r}; choose from {', '.join(EXTRA_FORMATS)}")
    if config.target not in TARGETS:
        raise InputError(f"unknown target {config.target!r}; choose one of {', '.join(TARGETS)}")
    if config.calibrator not in CALIBRATORS:
        raise InputError(f"unknown calibrator {config.calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
    techniques = ptq_techniques(config)
    if "mse-ranges" in techniques and config.calibrator != "edgestar":
        raise InputError("--ptq mse-ranges sets ranges edgestar measures; it cannot be combined "
                         "with --calibrator tflite")
    if config.calib_samples < 1:
        raise InputError(f"--calib-samples must be at least 1, got {config.calib_samples}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not config.qat:
        raise InputError("several torchrun processes are only used for --qat; run quantize alone")
    if config.qat:
        source = config.train or config.calib
        if source != "demo" and (Path(source).suffix.lower() == ".npy" or not Path(source).is_dir()):
            raise InputError(f"--qat trains on a folder of images; {source} is not one (pass --train DIR)")
        qat_options(config).validate()
    if config.labels is not None and config.eval is None:
        raise InputError("--labels names the labels of an --eval folder; pass --eval DIR too")
    if config.fallback not in FALLBACKS:
        raise InputError(f"unknown fallback {config.fallback!r}; choose one of {', '.join(FALLBACKS)}")
    if config.fallback != "none" and config.max_drop is None:
        raise InputError("--fallback needs --max-drop: it keeps tensors in float until the drop is within it")
    if config.max_drop is not None and config.max_drop < 0:
        raise InputError(f"--max-drop must be >= 0, got {config.max_drop}")


def ptq_techniques(config: QuantizeConfig) -> tuple[str, ...]:
    """The :mod:`edgestar.ptq` techniques this run applies: ``config.ptq``, or by default
    DEFAULT_PTQ (without mse-ranges under TFLite's calibrator, which sets its own ranges)."""
    if config.ptq is not None:
        return parse_techniques(config.ptq)
    return tuple(t for t in DEFAULT_PTQ if config.calibrator == "edgestar" or t != "mse-ranges")


def config_dict(config: QuantizeConfig) -> dict:
    d = {k: getattr(config, k) for k in config.__dataclass_fields__}
    d["out"] = str(d["out"]) if d["out"] else None
    d["formats"] = list(d["formats"])
    d["ptq"] = list(d["ptq"]) if isinstance(d["ptq"], (tuple, list)) else d["ptq"]
    return d


def qat_options(config: QuantizeConfig):
    from edgestar.quant.qat import QATConfig

    return QATConfig(epochs=config.qat_epochs, batch_size=config.qat_batch, lr=config.qat_lr,
                     max_steps=config.qat_steps, seed=config.seed,
                     checkpoint_minutes=config.qat_checkpoint_minutes)


