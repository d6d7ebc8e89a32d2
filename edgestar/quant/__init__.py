"""INT8: activation ranges (``ranges``), PTQ techniques (``ptq``), QAT (``qat``), the per-tensor
error table (``diagnose``) and the float fallback (``fallback``).

This file holds only the technique names, so that option parsing needs no PyTorch.
"""
from __future__ import annotations

from edgestar.errors import InputError

TECHNIQUES = {
    "scale-star": "move per-channel scale from the star product into g (exact)",
    "scale-dw": "move per-channel scale from the first depthwise conv into f1/f2 (exact)",
    "scale-g": "move per-channel scale from g into the second depthwise conv (exact)",
    "bias-correct": "remove the mean output shift of int8 weight rounding from each bias",
    "mse-ranges": "clip star-product and residual ranges to the int8 error minimum",
}
EXACT = ("scale-star", "scale-dw", "scale-g")

def parse_techniques(spec: str | tuple | list | None) -> tuple[str, ...]:
    """``"all"``, ``"none"``, or a comma list of :data:`TECHNIQUES` -> a tuple in canonical order."""
    if spec is None:
        return ()
    items = spec if isinstance(spec, (tuple, list)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    if list(items) == ["all"]:
        return tuple(TECHNIQUES)
    if list(items) in ([], ["none"]):
        return ()
    bad = [t for t in items if t not in TECHNIQUES]
    if bad:
        raise InputError(f"unknown --ptq technique {bad[0]!r}; choose from all, none, "
                         + ", ".join(TECHNIQUES))
    return tuple(t for t in TECHNIQUES if t in items)
