"""Accuracy and parity of every artifact against the PyTorch reference, with one validator.

The evaluation set is streamed in chunks: each chunk is decoded once and run through every
runner, so memory stays flat however large the set is. Raising on a bad number is the
caller's policy (see ``pipeline``); this module only measures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgestar.data.images import ImageFolder, Preprocessing, load_batch


@dataclass
class EngineStats:
    correct1: int = 0
    correct5: int = 0
    agree: int = 0
    max_abs_diff: float = 0.0
    signal: float = 0.0  # sum of squared reference logits
    noise: float = 0.0  # sum of squared logit differences
    lost: int = 0  # images the reference classifies right and this engine wrong
    gained: int = 0  # and the other way round
    count: int = 0

    def update(self, logits: np.ndarray, labels: np.ndarray, ref: np.ndarray, k: int) -> None:
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        self.correct1 += int((top[:, 0] == labels).sum())
        self.correct5 += int((top == labels[:, None]).any(axis=1).sum())
        self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())
        right, ref_right = top[:, 0] == labels, ref.argmax(1) == labels
        self.lost += int((ref_right & ~right).sum())
        self.gained += int((right & ~ref_right).sum())
        diff = logits.astype(np.float64) - ref.astype(np.float64)
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(diff).max()))
        self.signal += float(np.square(ref.astype(np.float64)).sum())
        self.noise += float(np.square(diff).sum())
        self.count += len(labels)

    def summary(self) -> dict:
        n = max(self.count, 1)
        # With fewer than 5 classes "top5" is top-k over all classes (always 1.0).
        return {"top1": self.correct1 / n, "top5": self.correct5 / n,
                "agreement_top1": self.agree / n, "max_abs_logit_diff": self.max_abs_diff,
                # the INT8 models' most sensitive quality number: it moves before top-1 does
                "logit_sqnr_db": sqnr_db(self.signal, self.noise, 3),
                "lost_top1": self.lost, "gained_top1": self.gained, "images": self.count,
                # what this many images can resolve (fractions, not percent)
                "agreement_ci95": proportion_interval(self.agree, self.count),
                "top1_drop_ci95": drop_interval(self.lost, self.gained, self.count)}


Z95 = 1.959964  # two-sided 95 % normal quantile


def proportion_interval(k: int, n: int) -> tuple[float, float]:
    """95 % interval of a proportion ``k / n`` (Wilson score; sound near 0 and 1, where
    agreement rates live)."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def drop_interval(lost: int, gained: int, n: int) -> tuple[float, float]:
    """95 % interval of a top-1 drop ``(lost - gained) / n`` measured on the same ``n`` images
    (paired: only the images on which the two models differ carry information)."""
    if n <= 0:
        return -1.0, 1.0
    d = (lost - gained) / n
    var = max((lost + gained) / n - d * d, 0.0) / n
    # With no disagreement at all the spread is not zero; use one flip as its floor.
    half = Z95 * math.sqrt(max(var, 1.0 / (n * n)))
    return d - half, d + half


def sqnr_db(signal: float, noise: float, digits: int = 2) -> float | None:
    """Signal-to-quantization-noise ratio ``10 log10(signal / noise)`` of two sums of squares,
    rounded; None when there is no noise at all."""
    if noise == 0.0:
        return None
    return round(10.0 * math.log10(max(signal, 1e-30) / noise), digits)


@dataclass
class EvaluationResult:
    engines: dict[str, dict] = field(default_factory=dict)
    images: int = 0
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # the runners named in keep_logits


def predict(runners: dict, folder: ImageFolder, pre: Preprocessing, *, chunk: int = 128,
            progress=None) -> dict[str, np.ndarray]:
    """Logits of each runner (name -> runner) over the whole folder, decoding each image once."""
    outputs: dict[str, list] = {name: [] for name in runners}
    for start in range(0, len(folder.samples), chunk):
        batch = folder.samples[start:start + chunk]
        x = load_batch([p for p, _ in batch], pre)
        for name, run in runners.items():
            outputs[name].append(run(x))
        if progress is not None:
            progress.update(len(batch))
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def evaluate(runners: dict, folder: ImageFolder, pre: Preprocessing, *, reference: np.ndarray,
             reference_name: str = "reference", others: dict | None = None, chunk: int = 128,
             progress=None, keep_logits: tuple[str, ...] = ()) -> EvaluationResult:
    """Run every runner over ``folder`` and compare it with the ``reference`` logits.

    Returns top-1 / top-5 accuracy, top-1 agreement with the reference and the max absolute
    logit difference from it, per runner, and the reference's own accuracy. ``others`` are
    further precomputed logits (name -> array, e.g. a QAT model's): they are scored like the
    reference, and every runner is also compared with each of them (``vs`` in its stats).
    ``keep_logits`` names runners whose logits the result keeps (``logits``), e.g. the INT8
    model's for :func:`edgestar.evaluate.micro.evaluate_on_micro`; others are dropped per chunk.
    """
    others = others or {}
    labels_all = np.array([label for _, label in folder.samples])
    k = min(5, reference.shape[1])
    stats = {reference_name: EngineStats(), **{name: EngineStats() for name in [*others, *runners]}}
    stats[reference_name].update(reference, labels_all, reference, k)
    for name, logits in others.items():
        stats[name].update(logits, labels_all, reference, k)
    versus = {(run, other): EngineStats() for run in runners for other in others}
    kept: dict[str, list] = {name: [] for name in keep_logits}
    for start in range(0, len(folder.samples), chunk):
        batch = folder.samples[start:start + chunk]
        x = load_batch([p for p, _ in batch], pre)
        rows = slice(start, start + len(batch))
        labels = labels_all[rows]
        for name, run in runners.items():
            logits = run(x)
            stats[name].update(logits, labels, reference[rows], k)
            if name in kept:
                kept[name].append(logits)
            for other, other_logits in others.items():
                versus[name, other].update(logits, labels, other_logits[rows], k)
        if progress is not None:
            progress.update(len(batch))
    engines = {name: s.summary() for name, s in stats.items()}
    for (name, other), s in versus.items():
        summary = s.summary()
        engines[name].setdefault("vs", {})[other] = {
            "agreement_top1": summary["agreement_top1"], "max_abs_logit_diff": summary["max_abs_logit_diff"],
            "logit_sqnr_db": summary["logit_sqnr_db"]}
    return EvaluationResult(engines, len(folder.samples),
                            {name: np.concatenate(parts) for name, parts in kept.items() if parts})
