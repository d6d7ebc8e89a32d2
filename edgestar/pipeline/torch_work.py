"""The PyTorch side of ``quantize``: calibration inputs, the model as it will be converted
(folded, rescaled, split), QAT (under torchrun too) and the INT8 range measurement."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgestar.data.images import Preprocessing, batches, calibration_inputs, read_batches
from edgestar.models.checkpoints import build_model
from edgestar.models.starnet import fold_batchnorms, split_large_depthwise
from edgestar.pipeline.config import DISTILLED, QuantizeConfig, ptq_techniques, qat_options
from edgestar.pipeline.rundir import QAT_STATE, STAGING
from edgestar.quant.ptq import EXACT as EXACT_RESCALINGS
from edgestar.quant.ptq import calibration_ranges, correct_biases, rescale


def preprocessing_for(config: QuantizeConfig, ckpt) -> Preprocessing:
    pre = ckpt.preprocessing if ckpt and ckpt.preprocessing else Preprocessing(224)
    return pre.with_size(config.img_size) if config.img_size else pre


def batch_size_for(img_size: int) -> int:
    """Images per PyTorch batch: 8 at 224 px, more at lower resolutions (activation memory
    grows with the pixel count: S1's stem output alone is 1.6 MB per 224 px image)."""
    return int(max(4, min(256, 8 * (224 / img_size) ** 2)))


def logits_of(runner, x: np.ndarray) -> np.ndarray:
    """``runner`` over ``x`` in batches (activations, not weights, dominate memory at 224 px)."""
    batch = batch_size_for(x.shape[-1])
    return np.concatenate([runner(x[i:i + batch]) for i in range(0, len(x), batch)])


def measure_ranges(folded, calibration_file: Path, calibrator: str, img_size: int, *, mse: bool):
    """(fx graph, fx node -> (min, max)) for the edgestar calibrator, measured on all cores
    but the converter's over the NHWC calibration file; None for TFLite's calibrator."""
    if calibrator != "edgestar":
        return None
    import torch

    from edgestar.quant.ranges import trace

    gm = trace(folded)

    def nchw():
        return (b.transpose(0, 3, 1, 2) for b in read_batches(calibration_file, batch_size_for(img_size)))

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    try:
        return gm, calibration_ranges(gm, nchw, mse=mse)
    finally:
        torch.set_num_threads(threads)


def qat_rank() -> int:
    """This process's rank when torchrun started several (QAT is data-parallel), else 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    from edgestar.quant.qat import distributed_context

    return distributed_context()[0]


def qat_follower(config: QuantizeConfig) -> None:
    """A torchrun process other than rank 0: the same model and data, its share of every QAT
    batch, nothing written. Rank 0 runs everything else."""
    model, ckpt = build_model(config.variant, config.weights, num_classes=config.num_classes,
                              allow_pickle=config.allow_pickle)
    pre = preprocessing_for(config, ckpt)
    calib, _ = calibration_set(model, pre, config, None)
    techniques = ptq_techniques(config)
    folded = fold_for_target(model, calib, pre, config.target, techniques, {})
    if "bias-correct" in techniques:
        folded, _ = correct_biases(folded, batches(calib, batch_size_for(pre.img_size)))
    state = Path(config.out) / STAGING / QAT_STATE if config.out else None  # rank 0 writes it
    qat_finetune(folded, calib, pre, config, techniques, None, None, state_path=state, save_state=False)


def calibration_set(model, pre, config: QuantizeConfig, progress_factory):
    """The calibration inputs (NCHW float32) and their manifest entry: images from
    ``config.calib``, or, for ``distilled``, inputs synthesized from the model's BatchNorm
    statistics (:mod:`edgestar.data.distill`)."""
    if config.calib != DISTILLED:
        return calibration_inputs(config.calib, pre, samples=config.calib_samples,
                                  seed=config.seed, progress_factory=progress_factory)
    from edgestar.data.distill import distilled_inputs

    bar = progress_factory(config.calib_samples, "distilled calibration images") if progress_factory else None
    try:
        return distilled_inputs(model, config.calib_samples, pre.img_size, pre.mean, pre.std,
                                seed=config.seed, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def fold_for_target(model, calib: np.ndarray, pre, target: str, techniques, rec: dict):
    """The model as it will be converted, exactly equal in float: BatchNorm folded, the exact
    rescalings of ``techniques`` applied, large depthwise convs split for ``target`` cpu.
    What was done goes into ``rec``."""
    folded = fold_batchnorms(model)
    if set(techniques) & set(EXACT_RESCALINGS):
        folded, rec["rescaled"] = rescale(folded, batches(calib, batch_size_for(pre.img_size)),
                                          techniques)
    if target == "cpu":
        folded, rec["split_depthwise_convs"] = split_large_depthwise(folded, pre.img_size)
    return folded


def qat_finetune(folded, calib: np.ndarray, pre, config: QuantizeConfig, techniques, progress_factory, log, *,
                 state_path=None, save_state: bool = True):
    """QAT of the folded model, its quantizers starting from the calibration ranges; resumed
    from (and saving) the training state at ``state_path`` when given."""
    from edgestar.data.images import qat_images
    from edgestar.quant.qat import finetune
    from edgestar.quant.ranges import trace

    images = qat_images(config.train or config.calib)
    start = calibration_ranges(trace(folded), lambda: batches(calib, batch_size_for(pre.img_size)),
                               mse="mse-ranges" in techniques)
    return finetune(folded, images, pre, start, config=qat_options(config), state_path=state_path,
                    save_state=save_state, progress_factory=progress_factory, log=log)
