"""Images decoded once to the model's size as uint8 (a torch Dataset), for training and QAT:
CIFAR-sized sets are held in memory, larger ones decoded on the fly."""
from __future__ import annotations

import numpy as np
import torch

from edgestar.data.images import ImageFolder, Preprocessing, load_rgb, preprocess_image

IN_MEMORY_LIMIT_BYTES = 2 << 30  # decoded uint8 pixels held in memory up to this size


class DecodedImages(torch.utils.data.Dataset):
    """Images resized/cropped to the model size, as uint8 HWC; decoded lazily or all at once."""

    def __init__(self, folder: ImageFolder, pre: Preprocessing, in_memory: bool):
        self.folder, self.pre = folder, pre
        self.labels = torch.tensor([label for _, label in folder.samples])
        self.cache = None
        if in_memory:
            self.cache = torch.from_numpy(np.stack([self._decode(i) for i in range(len(self))]))

    def _decode(self, i: int) -> np.ndarray:
        x = preprocess_image(load_rgb(self.folder.samples[i][0]), unnormalized(self.pre))
        return np.clip(x.transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, i):
        img = self.cache[i] if self.cache is not None else torch.from_numpy(self._decode(i))
        return img, self.labels[i]


def unnormalized(pre: Preprocessing) -> Preprocessing:
    """Same geometry, identity normalisation: yields pixels in [0, 1]."""
    return Preprocessing(pre.img_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), pre.crop_pct, pre.interpolation)


def normalize_uint8(batch_uint8_nhwc: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    x = batch_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x - mean) / std
