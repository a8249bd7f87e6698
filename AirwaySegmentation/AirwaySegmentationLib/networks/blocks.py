"""Building blocks shared by the airway networks.

Tensors are ``(N, C, D, H, W)`` with D = z, H = y, W = x.  Every block keeps the spatial size
of its input (3^3 convolutions are padded by their dilation); down- and up-sampling are done
by the networks.

The recalibrated U-Net here is the common backbone of the FR/AD U-Net (Qin 2020) and of the
PWFR/AttdKD U-Net (Zhang 2026): the two differ only in the recalibration module applied at
the end of every resolution scale, which is passed in as a factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

#: Builds an activation module; called once per block so modules are never shared.
ActivationFactory = Callable[[], nn.Module]
#: Builds the recalibration module of one scale from (channels, level); level 0 is full size.
RecalibrationFactory = Callable[[int, int], nn.Module]


class SegmentationOutput(NamedTuple):
    """What every airway network returns, so a training loop needs to know no network.

    Attributes
    ----------
    main : torch.Tensor
        ``(N, out_channels, D, H, W)`` logits at the input resolution; the output used at
        inference.
    aux : tuple of torch.Tensor
        Further ``(N, out_channels, D, H, W)`` logits supervised with the same loss as
        ``main`` during training (WingsNet's encoder output 0); empty if none.
    features : tuple of torch.Tensor
        Decoder stage outputs ``(N, C_m, D_m, H_m, W_m)`` in forward order (coarse to fine),
        from which attention distillation computes its attention maps; empty if the network
        has no distillation.
    """

    main: torch.Tensor
    aux: tuple[torch.Tensor, ...] = ()
    features: tuple[torch.Tensor, ...] = ()


def check_positive(**values: float) -> None:
    """Raise ``ValueError`` naming the first argument that is not > 0."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_input(x: torch.Tensor, in_channels: int, divisor: int, network: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(N, in_channels, D, H, W)`` with D, H, W divisible."""
    if x.dim() != 5 or x.shape[1] != in_channels:
        raise ValueError(
            f"{network} expects input of shape (N, {in_channels}, D, H, W), got {tuple(x.shape)}"
        )
    if any(size % divisor for size in x.shape[2:]):
        raise ValueError(
            f"{network} needs D, H and W divisible by {divisor}, got {tuple(x.shape[2:])}; "
            "pad or crop the input"
        )


class ConvNormAct(nn.Sequential):
    """3^3 convolution, instance normalisation, activation; spatial size unchanged.

    The convolution has no bias because the affine instance normalisation that follows
    supplies one.  Instance normalisation is written as ``GroupNorm`` with one group per
    channel, which is the same operation (same parameters, statistics per sample and
    channel, none kept for eval) but, unlike ``InstanceNorm3d``, keeps channels-last
    tensors channels-last on the CPU: about 3x faster there and no layout copies around
    every convolution.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of input and output.
    dilation : int
        Dilation of the 3^3 kernel; the padding equals it so the size is kept.
    activation : callable
        Builds the activation module, e.g. ``nn.ReLU`` or ``nn.LeakyReLU``.

    Shapes
    ------
    ``(N, in_channels, D, H, W) -> (N, out_channels, D, H, W)``
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilation: int = 1,
        activation: ActivationFactory = nn.ReLU,
    ) -> None:
        check_positive(in_channels=in_channels, out_channels=out_channels, dilation=dilation)
        super().__init__(
            nn.Conv3d(
                in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False
            ),
            nn.GroupNorm(out_channels, out_channels),  # = InstanceNorm3d(affine=True)
            activation(),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` with ReLU: one U-Net scale (Qin 2020, "Model Design").

    Shapes
    ------
    ``(N, in_channels, D, H, W) -> (N, out_channels, D, H, W)``
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels),
            ConvNormAct(out_channels, out_channels),
        )


class SpatialSqueezeExcitation(nn.Module):
    """Spatial squeeze and channel excitation (sSE, Roy et al. 2018) as used in WingsNet.

    A 1x1x1 convolution squeezes the channels to one map, a sigmoid turns it into a
    per-voxel gate in (0, 1) that multiplies every channel.

    Shapes
    ------
    ``(N, C, D, H, W) -> (N, C, D, H, W)``
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive(channels=channels)
        self.squeeze = nn.Conv3d(channels, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * torch.sigmoid(self.squeeze(features))


def channel_excitation(channels: int, reduction: int) -> nn.Sequential:
    """1x1x1 conv C -> C/r, ReLU, 1x1x1 conv C/r -> C, without the final gate.

    The excitation of Qin 2020, eq. 5 (``K_2 * f_1(K_1 * .)``); the caller applies its own
    gate (a sigmoid in FR, a channel-centred sigmoid in PWFR).  C/r is rounded down and
    kept >= 1 so narrow test networks still build.

    Shapes
    ------
    ``(N, C, D, H, W) -> (N, C, D, H, W)``
    """
    check_positive(channels=channels, reduction=reduction)
    hidden = max(1, channels // reduction)
    return nn.Sequential(
        nn.Conv3d(channels, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Conv3d(hidden, channels, 1),
    )


def unet_widths(base_width: int, max_width: int, depth: int) -> tuple[int, ...]:
    """Channel widths of the ``depth + 1`` scales: doubling from ``base_width``, capped."""
    check_positive(base_width=base_width, max_width=max_width, depth=depth)
    return tuple(min(base_width * 2**level, max_width) for level in range(depth + 1))


class RecalibratedUNet(nn.Module):
    """3D U-Net whose every scale ends with a recalibration module (Qin 2020, "Model Design").

    Each encoder and decoder scale has two 3^3 conv + IN + ReLU (:class:`DoubleConv`) and
    then the recalibration module built by ``recalibration(channels, level)``.  Scales are
    joined by 2^3 max-pooling on the way down and by a 2^3 transposed convolution plus
    concatenation with the skip connection on the way up; a 1x1x1 convolution gives the
    logits.  The outputs of the ``depth`` decoder scales are returned for attention
    distillation.

    Parameters
    ----------
    in_channels, out_channels : int
        Input channels (CT windows) and output classes (background included).
    widths : sequence of int
        Channels of each scale, full resolution first; ``len(widths) - 1`` poolings.
    recalibration : callable
        ``(channels, level) -> nn.Module`` keeping the shape ``(N, channels, ...)``.

    Shapes
    ------
    input ``(N, in_channels, D, H, W)`` with D, H, W divisible by ``2 ** (len(widths) - 1)``;
    ``main`` ``(N, out_channels, D, H, W)``; ``features[m]`` ``(N, widths[depth - 1 - m],
    D / 2^(depth-1-m), ...)``, coarse to fine.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        recalibration: RecalibrationFactory,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, out_channels=out_channels)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least two scales, got {tuple(widths)}")
        self.in_channels = in_channels
        self.depth = len(widths) - 1
        self.encoder = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(widths):
            self.encoder.append(
                nn.Sequential(DoubleConv(previous, width), recalibration(width, level))
            )
            previous = width
        self.pool = nn.MaxPool3d(2)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(self.depth)):
            self.upsample.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2))
            self.decoder.append(
                nn.Sequential(
                    DoubleConv(2 * widths[level], widths[level]),
                    recalibration(widths[level], level),
                )
            )
        self.head = nn.Conv3d(widths[0], out_channels, 1)

    @property
    def input_divisor(self) -> int:
        """D, H and W of the input must be multiples of this: 2 to the number of poolings."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        check_input(x, self.in_channels, self.input_divisor, type(self).__name__)
        skips = []
        for level, scale in enumerate(self.encoder):
            x = scale(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        features = []
        for upsample, scale in zip(self.upsample, self.decoder):
            x = scale(torch.cat([upsample(x), skips.pop()], dim=1))
            features.append(x)
        return SegmentationOutput(main=self.head(x), features=tuple(features))
