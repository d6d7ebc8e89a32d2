"""The StarNet variants: architecture arguments and official weights, without importing torch.

The CLI reads this table to validate ``--variant`` and ``--img-size`` at parse time;
:mod:`edgestar.models` builds the networks from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgestar.errors import InputError


@dataclass(frozen=True)
class VariantSpec:
    name: str
    base_dim: int
    depths: tuple[int, ...]
    mlp_ratio: int
    official_url: str | None = None


_RELEASE = "https://github.com/ma-xu/Rewrite-the-Stars/releases/download/checkpoints_v1"

VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec("s050", 16, (1, 1, 3, 1), 3),
        VariantSpec("s100", 20, (1, 2, 4, 1), 4),
        VariantSpec("s150", 24, (1, 2, 4, 2), 3),
        VariantSpec("s1", 24, (2, 2, 8, 3), 4, f"{_RELEASE}/starnet_s1.pth.tar"),
        VariantSpec("s2", 32, (1, 2, 6, 2), 4, f"{_RELEASE}/starnet_s2.pth.tar"),
        VariantSpec("s3", 32, (2, 2, 8, 4), 4, f"{_RELEASE}/starnet_s3.pth.tar"),
        VariantSpec("s4", 32, (3, 3, 12, 5), 4, f"{_RELEASE}/starnet_s4.pth.tar"),
    )
}

STEM_CHANNELS = 32
DOWNSAMPLE_FACTOR = 32  # stem + four stride-2 downsamplers


def get_variant(name: str) -> VariantSpec:
    try:
        return VARIANTS[name]
    except KeyError:
        raise InputError(
            f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}"
        ) from None


def check_img_size(img_size: int) -> int:
    if img_size < DOWNSAMPLE_FACTOR or img_size % DOWNSAMPLE_FACTOR:
        raise InputError(
            f"image size {img_size} is not a positive multiple of {DOWNSAMPLE_FACTOR} "
            "(StarNet downsamples by 32)"
        )
    return img_size
