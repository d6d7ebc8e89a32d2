"""StarNet ("Rewrite the Stars", CVPR 2024): the variants, a registry and exact BN folding.

Module names follow the official implementation exactly (``stem.0.conv``, ``stages.i.j.f1.conv``,
``norm``, ``head`` ...) so the release checkpoints load with strict key matching.
The variant table lives in :mod:`edgestar.registry` (no torch import, so the CLI starts fast);
checkpoint reading in :mod:`edgestar.checkpoints`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgestar.errors import InputError
from edgestar.models.registry import STEM_CHANNELS, get_variant


class ConvBN(nn.Sequential):
    """Conv2d optionally followed by BatchNorm2d, named ``conv`` / ``bn`` as upstream."""

    def __init__(self, cin, cout, kernel_size=1, stride=1, padding=0, groups=1, with_bn=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups))
        if with_bn:
            bn = nn.BatchNorm2d(cout)
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
            self.add_module("bn", bn)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """dwconv7x7+BN -> (ReLU6(f1) * f2) -> g(+BN) -> dwconv7x7 -> residual add."""

    def __init__(self, dim: int, mlp_ratio: int, drop_path_rate: float = 0.0):
        super().__init__()
        hidden = mlp_ratio * dim
        self.dwconv = ConvBN(dim, dim, 7, 1, 3, groups=dim, with_bn=True)
        self.f1 = ConvBN(dim, hidden, 1, with_bn=False)
        self.f2 = ConvBN(dim, hidden, 1, with_bn=False)
        self.g = ConvBN(hidden, dim, 1, with_bn=True)
        self.dwconv2 = ConvBN(dim, dim, 7, 1, 3, groups=dim, with_bn=False)
        self.act = nn.ReLU6()
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        y = self.dwconv(x)
        y = self.act(self.f1(y)) * self.f2(y)  # the "star" operation
        y = self.dwconv2(self.g(y))
        return x + drop_path(y, self.drop_path_rate, self.training)


class StarNet(nn.Module):
    def __init__(self, base_dim, depths, mlp_ratio, num_classes=1000, drop_path_rate=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(ConvBN(3, STEM_CHANNELS, 3, 2, 1), nn.ReLU6())
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        cin = STEM_CHANNELS
        for i, depth in enumerate(depths):
            dim = base_dim * 2**i
            blocks = [Block(dim, mlp_ratio, rates.pop(0)) for _ in range(depth)]
            self.stages.append(nn.Sequential(ConvBN(cin, dim, 3, 2, 1), *blocks))
            cin = dim
        self.norm = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)
        self.apply(_init_weights)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def forward_features(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x):
        x = self.norm(self.forward_features(x))
        # Global average pool written as a mean: it exports as one ReduceMean.
        return self.head(x.mean(dim=(2, 3)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_model(variant: str, *, num_classes: int = 1000, drop_path_rate: float = 0.0) -> StarNet:
    spec = get_variant(variant)
    if num_classes < 1:
        raise InputError(f"num-classes must be at least 1, got {num_classes}")
    return StarNet(spec.base_dim, spec.depths, spec.mlp_ratio, num_classes, drop_path_rate)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- BN folding

def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        conv.padding, conv.dilation, conv.groups, bias=True,
    )
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def fold_batchnorms(model: StarNet) -> StarNet:
    """Return an eval-mode copy with every BatchNorm folded away (outputs unchanged).

    Conv+BN pairs become one conv with bias. The head BatchNorm sits before a global average
    pool and a Linear; all three are affine, so it folds into the classifier:
    ``W @ mean(s*x + t) + c == (W*s) @ mean(x) + (W @ t + c)``.
    """
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        if isinstance(module, ConvBN) and hasattr(module, "bn"):
            fused = _fold_conv_bn(module.conv, module.bn)
            del module.bn
            module.conv = fused
    bn = model.norm
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        head = model.head
        new_head = nn.Linear(head.in_features, head.out_features)
        new_head.weight.copy_(head.weight * scale)
        new_head.bias.copy_(head.bias + head.weight @ shift)
        model.head = new_head
        model.norm = nn.Identity()
    return model


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------- large depthwise kernels

XNNPACK_MAX_UNIPASS_TAPS = 25  # XNNPACK's largest single-pass depthwise kernel (5x5)
SPLIT_MIN_SIDE = 14  # split only convs on feature maps at least this wide (see split_large_depthwise)


class DilatedSplitConv(nn.Module):
    """A stride-1 depthwise KxK conv (K odd) computed as three smaller depthwise convs.

    Tap offsets run from -K//2 to K//2. The taps at even row offsets form a (K//2) x K kernel
    with row dilation 2; the taps at odd row offsets split by column parity into two kernels
    with dilation 2. Every part's taps are centred on the output pixel, so each part is a
    symmetric-padded ("SAME") conv: no PAD or SLICE is needed. For 7x7 the parts are 3x7, 4x3
    and 4x4, 49 taps in all, none wasted, each at most 25 taps. The parts' sum equals the
    original conv up to float rounding.

    Why: XNNPACK (LiteRT's CPU delegate) runs depthwise kernels of up to 25 taps in one pass
    and larger ones through a multipass kernel that measured 25x slower than 5x5 on this
    machine's x86 CPU (bench/RESULTS.md). The cost: two more INT8 tensors to quantize per
    conv, and slower reference kernels (TFLite Micro), hence ``--target micro`` keeps 7x7.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_splittable_depthwise(conv):
            raise ValueError("not a stride-1, symmetric-padded, odd-sized depthwise conv")
        c = conv.out_channels
        kh, kw = conv.kernel_size
        even_rows = slice((kh // 2) % 2, kh, 2)  # row offsets -K//2 + r that are even
        odd_rows = slice(1 - (kh // 2) % 2, kh, 2)
        even_cols, odd_cols = slice((kw // 2) % 2, kw, 2), slice(1 - (kw // 2) % 2, kw, 2)
        self.parts = nn.ModuleList()
        for rows, cols in ((even_rows, slice(0, kw, 1)), (odd_rows, even_cols), (odd_rows, odd_cols)):
            w = conv.weight[:, :, rows, cols]
            dilation = (rows.step, cols.step)
            # a centred kernel of n taps with dilation d spans d*(n-1)+1 pixels: SAME pads d*(n-1)/2
            padding = tuple(d * (n - 1) // 2 for d, n in zip(dilation, w.shape[2:]))
            part = nn.Conv2d(c, c, tuple(w.shape[2:]), padding=padding, dilation=dilation, groups=c,
                             bias=not self.parts and conv.bias is not None)
            with torch.no_grad():
                part.weight.copy_(w)
                if part.bias is not None:
                    part.bias.copy_(conv.bias)
            self.parts.append(part)

    def forward(self, x):
        y = self.parts[0](x)
        for part in self.parts[1:]:
            y = y + part(x)
        return y


def is_splittable_depthwise(conv: nn.Module) -> bool:
    if not isinstance(conv, nn.Conv2d):
        return False
    kh, kw = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and kh % 2 == 1 and kw % 2 == 1
            and conv.padding == (kh // 2, kw // 2) and conv.padding_mode == "zeros"
            and kh * kw > XNNPACK_MAX_UNIPASS_TAPS)


@torch.no_grad()
def split_large_depthwise(model: nn.Module, img_size: int) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every depthwise conv of more than 25 taps on a feature map at
    least ``SPLIT_MIN_SIDE`` pixels wide replaced by a :class:`DilatedSplitConv`; returns it and
    how many convs were split. ``img_size`` gives the feature map sizes.

    Small maps keep the whole conv: the split's gain scales with the pixel count (4.5 ms at
    56x56x96, 0.13 ms at 7x7x192 on this machine) while its cost, two more INT8 roundings per
    conv, does not; on the 32 px demo model splitting every conv cost 1.4 points of INT8/FP32
    agreement. On a 1-pixel map the odd-offset parts would read only padding, an all-zero
    tensor an INT8 graph cannot even scale (XNNPACK refuses the add).
    """
    model = copy.deepcopy(model).eval()
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[2:])))
             for m in model.modules() if is_splittable_depthwise(m)]
    model(torch.zeros(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_splittable_depthwise(child) and min(sizes.get(child, (0, 0))) >= SPLIT_MIN_SIDE:
                setattr(parent, name, DilatedSplitConv(child))
                count += 1
    return model, count
