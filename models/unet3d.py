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


STATISTICS_SLAB = 1 << 14  # voxels of a channel whose squares group_norm_ forms at a time (kept in the CPU's cache)


def lean(x: torch.Tensor) -> bool:
    """Whether a forward pass may overwrite its own intermediate tensors: float32 inference on the CPU, where the
    activations' memory is the process's own and nothing is kept for a backward pass."""
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32


def _channels(x: torch.Tensor) -> torch.Tensor | None:
    """A view (N, C, voxels) of a contiguous or channels-last x without a copy; None for any other layout."""
    if x.is_contiguous():
        return x.reshape(x.shape[0], x.shape[1], -1)
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1, x.shape[1]).transpose(1, 2)
    return None


def group_norm_(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm(x)` written over x (no second tensor of its size), or a new tensor where x's layout allows no view.

    Each channel's sum and sum of squares, summed in float32 over slabs of `STATISTICS_SLAB` voxels and the slabs in
    float64, make each group's mean and variance: within 1e-6 of a float64 group norm, where the CPU's own kernel on
    channels-last input strays further (~1e-2 on 10^7 voxels a group)."""
    rows = _channels(x)
    if rows is None:
        return norm(x)
    n, c, voxels = rows.shape
    sums, squares = torch.zeros(n, c, dtype=torch.float64), torch.zeros(n, c, dtype=torch.float64)
    for item in range(n):
        for start in range(0, voxels, STATISTICS_SLAB):
            slab = rows[item, :, start:start + STATISTICS_SLAB]
            sums[item] += slab.sum(dim=1)
            squares[item] += slab.square().sum(dim=1)
    groups = norm.num_groups
    count = voxels * (c // groups)
    mean = sums.view(n, groups, -1).sum(-1) / count
    variance = (squares.view(n, groups, -1).sum(-1) / count - mean.square()).clamp_min(0)
    scale = torch.rsqrt(variance + norm.eps).repeat_interleave(c // groups, dim=1) * norm.weight.double()
    shift = norm.bias.double() - mean.repeat_interleave(c // groups, dim=1) * scale
    per_channel = (n, c, 1, 1, 1)
    return torch.addcmul(shift.float().view(per_channel), x, scale.float().view(per_channel), out=x)


class SingleConv(nn.Sequential):
    """GroupNorm -> 3x3x3 conv (no bias, the norm has one) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        groups = num_groups if in_channels >= num_groups else 1
        super().__init__(OrderedDict(
            groupnorm=nn.GroupNorm(groups, in_channels),
            conv=nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            ReLU=nn.ReLU(inplace=True),
        ))

    def forward(self, x, scratch: bool = False):
        """`scratch`: x is this layer's alone, so that inference may normalize it in place."""
        normalized = group_norm_(x, self.groupnorm) if scratch and lean(x) else self.groupnorm(x)
        return self.ReLU(self.conv(normalized))


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, middle_channels: int, out_channels: int, num_groups: int):
        super().__init__(OrderedDict(
            SingleConv1=SingleConv(in_channels, middle_channels, num_groups),
            SingleConv2=SingleConv(middle_channels, out_channels, num_groups),
        ))

    def forward(self, x, scratch: bool = False):
        return self.SingleConv2(self.SingleConv1(x, scratch), scratch=True)  # the first's output is the second's alone


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int, pool: bool):
        super().__init__()
        self.pooling = nn.MaxPool3d(kernel_size=2) if pool else nn.Identity()
        middle = max(out_channels // 2, in_channels)
        self.basic_module = DoubleConv(in_channels, middle, out_channels, num_groups)

    def forward(self, x):
        """The first level's input is the caller's; a deeper level's is its own pooled copy."""
        return self.basic_module(self.pooling(x), scratch=isinstance(self.pooling, nn.MaxPool3d))


class Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.basic_module = DoubleConv(in_channels, out_channels, out_channels, num_groups)

    def forward(self, skips: list[torch.Tensor], x):
        """Joins its skip connection, taken off the end of `skips`, with x upsampled to its size (nearest), and
        convolves them. The skip is freed once joined (at the first level it is, with the upsampled x, the largest
        tensor alive besides the join); in inference x is upsampled straight into the join."""
        skip = skips.pop()
        if lean(x) and lean(skip):
            joined = _join_upsampled(skip, x)
        else:
            joined = torch.cat((skip, F.interpolate(x, size=skip.shape[2:], mode="nearest")), dim=1)
        del skip, x
        features = self.basic_module.SingleConv1(joined, scratch=True)
        del joined  # before the second convolution
        return self.basic_module.SingleConv2(features, scratch=True)


def _join_upsampled(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.cat((skip, F.interpolate(x, size=skip's, mode="nearest")), dim=1), in skip's memory format, with x
    written into it without an upsampled copy where each side doubles."""
    layout = torch.contiguous_format if skip.is_contiguous() else torch.channels_last_3d
    n, skip_channels, *size = skip.shape
    joined = torch.empty((n, skip_channels + x.shape[1], *size), dtype=x.dtype, device=x.device, memory_format=layout)
    joined[:, :skip_channels] = skip
    upsampled = joined[:, skip_channels:]
    if all(s == 2 * t for s, t in zip(size, x.shape[2:])):  # voxel i of x fills 2i and 2i + 1 on each axis
        pairs = upsampled.unflatten(2, (size[0] // 2, 2)).unflatten(4, (size[1] // 2, 2)).unflatten(6, (size[2] // 2, 2))
        pairs.copy_(x[:, :, :, None, :, None, :, None].expand(pairs.shape))
    else:
        upsampled.copy_(F.interpolate(x, size=size, mode="nearest"))
    return joined


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
