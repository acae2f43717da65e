"""The 3D UNet of the pipeline: 128^3 scan in, 128^3 ink logits out.

Same parameter names and shapes as pytorch3dunet's `UNet3D(..., layer_order="gcr")`, so the
published 3D ink checkpoint (and the LSM pretraining checkpoint) load unchanged and weights
move both ways. Unlike pytorch3dunet, `forward` always returns logits.
"""

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetArgs:
    in_channels: int = 1
    out_channels: int = 1
    f_maps: int = 32  # feature maps of the first level; level i has f_maps * 2**i
    num_levels: int = 5
    num_groups: int = 4  # GroupNorm groups (1 where a layer has fewer channels)

    def to_dict(self) -> dict:
        return asdict(self)


def single_conv(in_channels: int, out_channels: int, num_groups: int) -> nn.Sequential:
    """GroupNorm -> 3x3x3 conv (no bias, the norm has one) -> ReLU."""
    groups = num_groups if in_channels >= num_groups else 1
    return nn.Sequential(OrderedDict(
        groupnorm=nn.GroupNorm(groups, in_channels),
        conv=nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        ReLU=nn.ReLU(inplace=True),
    ))


def double_conv(in_channels: int, middle_channels: int, out_channels: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        SingleConv1=single_conv(in_channels, middle_channels, num_groups),
        SingleConv2=single_conv(middle_channels, out_channels, num_groups),
    ))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int, pool: bool):
        super().__init__()
        self.pooling = nn.MaxPool3d(kernel_size=2) if pool else nn.Identity()
        middle = max(out_channels // 2, in_channels)
        self.basic_module = double_conv(in_channels, middle, out_channels, num_groups)

    def forward(self, x):
        return self.basic_module(self.pooling(x))


class Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.basic_module = double_conv(in_channels, out_channels, out_channels, num_groups)

    def forward(self, skips: list[torch.Tensor], x):
        """Takes its skip connection off the end of `skips`: the skip and the upsampled x are then freed once
        concatenated (at the first level they are the largest tensors alive besides the concatenation)."""
        size = skips[-1].shape[2:]
        return self.basic_module(torch.cat((skips.pop(), F.interpolate(x, size=size, mode="nearest")), dim=1))


class UNet3D(nn.Module):
    def __init__(self, in_channels=1, out_channels=1, f_maps=32, num_levels=5, num_groups=4):
        super().__init__()
        self.args = UNetArgs(in_channels, out_channels, f_maps, num_levels, num_groups)
        features = [f_maps * 2**level for level in range(num_levels)]
        self.encoders = nn.ModuleList(
            Encoder(in_channels if level == 0 else features[level - 1], features[level], num_groups, pool=level > 0)
            for level in range(num_levels)
        )
        self.decoders = nn.ModuleList(
            Decoder(features[level] + features[level + 1], features[level], num_groups)
            for level in reversed(range(num_levels - 1))
        )
        self.final_conv = nn.Conv3d(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, C, D, H, W)` -> logits of the same spatial size."""
        skips = []
        for encoder in self.encoders[:-1]:
            x = encoder(x)
            skips.append(x)
        x = self.encoders[-1](x)
        for decoder in self.decoders:  # each takes the deepest skip left
            x = decoder(skips, x)
        return self.final_conv(x)
