"""Checks on ``.npy`` image arrays before they reach calibration.

An array with the right shape can still wreck an INT8 model without any error: an all-zero
array gives every tensor a zero range; raw 0..255 pixels stored as float give ranges 100
times too wide. The shape and dtype checks here refuse what cannot be right, and the value
checks refuse or note what is very likely wrong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgestar.errors import DataError

PIXELS = "uint8 pixels"            # N x S x S x 3 RGB, preprocessed by edgestar
INPUTS = "preprocessed inputs"     # N x 3 x S x S float32, used as they are


def read_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc).strip().splitlines()
        raise DataError(f"cannot read {what} {path}: {text[0] if text else type(exc).__name__}") from None
    if not isinstance(arr, np.ndarray):  # np.load opens an .npz archive whatever the suffix
        arr.close()
        raise DataError(f"{what} {path} is an .npz archive; save one array with np.save")
    return arr


def layout(arr: np.ndarray, size: int, path: Path, what: str) -> str:
    """PIXELS or INPUTS; anything else is refused, with a hint when the mistake is a common one.
    Floating-point inputs of any precision pass here; :func:`require_float32` decides."""
    if arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[3] == 3:
        if arr.shape[1:3] != (size, size):
            raise DataError(f"{what} {path} holds {arr.shape[1]}x{arr.shape[2]} images; "
                            f"the model takes {size}x{size}")
        return PIXELS
    if arr.ndim == 4 and arr.dtype.kind == "f" and arr.shape[1:] == (3, size, size):
        return INPUTS
    hint = ""
    if arr.ndim == 4 and arr.dtype.kind == "f" and arr.shape[3] == 3:
        hint = " (it looks channels-last: x.transpose(0, 3, 1, 2) gives N x 3 x H x W)"
    elif arr.ndim == 4 and arr.shape[3] == 3 and arr.dtype.kind in "iu":
        hint = " (pixels must be uint8 0..255: x.astype(np.uint8))"
    raise DataError(f"{what} {path} has shape {arr.shape} and dtype {arr.dtype}; expected uint8 "
                    f"Nx{size}x{size}x3 RGB images or float32 Nx3x{size}x{size} preprocessed "
                    f"inputs{hint}")


def check_values(arr: np.ndarray, path: Path, what: str) -> tuple[float, float]:
    """Refuse arrays that carry no usable ranges; return (min, max)."""
    if arr.shape[0] == 0:
        raise DataError(f"{what} {path} holds no images")
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise DataError(f"{what} {path} contains {bad} NaN or infinite value(s)")
    low, high = arr.min().item(), arr.max().item()
    if low == high:
        value = float(low) if arr.dtype.kind == "f" else low
        raise DataError(f"{what} {path} is constant (all {value}): it carries no ranges")
    return low, high


def require_float32(arr: np.ndarray, path: Path, what: str) -> None:
    """Preprocessed inputs must be float32. Converting float64 silently would hide how the
    array was made (np.zeros and friends default to float64); the fix is one line."""
    if arr.dtype != np.float32:
        raise DataError(f"{what} {path} is {arr.dtype}; preprocessed inputs must be float32: "
                        f"save it with np.save(path, x.astype(np.float32))")


def range_notes(kind: str, low: float, high: float, mean, std, path: Path, what: str) -> list[str]:
    """Warnings for values that this model's preprocessing cannot have produced."""
    if kind == PIXELS:
        if high <= 1:
            return [f"{what} {path} holds uint8 pixels of only {low}..{high}: expected 0..255 "
                    f"RGB (was a [0, 1] image stored as uint8?)"]
        return []
    # Normalized inputs lie in [(0 - mean) / std, (1 - mean) / std] per channel.
    floor = min((0.0 - m) / s for m, s in zip(mean, std))
    ceiling = max((1.0 - m) / s for m, s in zip(mean, std))
    span = f"values span [{low:.3g}, {high:.3g}]"
    expected = f"this model's preprocessing gives [{floor:.3g}, {ceiling:.3g}]"
    normalizes = any(m != 0 for m in mean) or any(s != 1 for s in std)
    if normalizes and 0.0 <= low and high <= 1.0:
        return [f"{what} {path}: {span}, {expected} (mean {list(mean)}, std {list(std)}): likely "
                f"pixels scaled to [0, 1] but not normalized; INT8 ranges from them will not fit"]
    margin = 0.05 * (ceiling - floor)
    if low < floor - margin or high > ceiling + margin:
        guess = ("likely raw 0..255 pixels stored as float (save them as uint8 N x H x W x 3)"
                 if low >= 0 and high > 2 * ceiling else "were these preprocessed differently?")
        return [f"{what} {path}: {span}, outside what {expected}: {guess}; "
                f"INT8 ranges from them will not fit"]
    return []
