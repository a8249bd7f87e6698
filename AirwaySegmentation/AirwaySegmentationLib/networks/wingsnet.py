"""WingsNet with group supervision (Zheng et al., IEEE TMI 2021).

Only the abstract is in ``papers/``; the architecture follows METHODS.md section 4: 12 encoder
and 6 decoder conv blocks (3^3 conv, instance norm, LeakyReLU, spatial squeeze-excitation),
three max-poolings, dilated convolutions in the deeper encoder blocks.  Every block has a
1x1x1 side output upsampled to the input size; the encoder side outputs are fused into
output 0, the decoder side outputs into output 1 (channel dropout 0.3 before each fusion).
Group supervision applies the loss to both outputs; inference uses output 1.

Where our material is silent we chose: 3 encoder blocks per scale (scales of
``base_width * (1, 2, 4, 4)`` channels), 2 decoder blocks per scale after trilinear
upsampling and concatenation of the encoder skip, dilations as in
:data:`DEFAULT_ENCODER_DILATIONS`, LeakyReLU slope 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    ConvNormAct,
    SegmentationOutput,
    SpatialSqueezeExcitation,
    check_input,
    check_positive,
)

#: Dilation of the three encoder blocks at each of the four scales.  The paper's exact
#: pattern is not in our material; dilating the deeper blocks grows the receptive field at
#: 1/4 and 1/8 resolution, where the trachea and main bronchi need context, while keeping
#: the full-resolution blocks undilated for thin bronchi.
DEFAULT_ENCODER_DILATIONS = ((1, 1, 1), (1, 1, 1), (1, 2, 2), (1, 2, 4))


class WingsBlock(nn.Module):
    """Conv + IN + LeakyReLU + spatial SE, with a 1x1x1 side output.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of input and output features.
    side_channels : int
        Channels of the side output (the network's output classes).
    dilation : int
        Dilation of the 3^3 convolution.

    Shapes
    ------
    ``(N, in_channels, D, H, W) -> (features (N, out_channels, D, H, W),
    side (N, side_channels, D, H, W))``; the network upsamples ``side``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, side_channels: int, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(
            in_channels,
            out_channels,
            dilation,
            activation=partial(nn.LeakyReLU, 0.01, inplace=True),
        )
        self.attention = SpatialSqueezeExcitation(out_channels)
        self.side = nn.Conv3d(out_channels, side_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.attention(self.conv(x))
        return features, self.side(features)


class SideOutputFusion(nn.Module):
    """Fuse the side outputs of several scales into one full-resolution output.

    Defined as WingsNet's: upsample every side output to the input size, concatenate,
    channel dropout, 1x1x1 conv.  Trilinear upsampling, per-channel dropout and the 1x1x1
    conv are linear and commute, so the conv's weights for each scale are applied at that
    scale's resolution and only the ``out_channels`` sum of each scale is upsampled: the
    same output (the same distribution in training), with one upsampling per scale instead
    of one per block and no full-size stack of all side outputs (0.6 GB at 128^3).

    Parameters
    ----------
    side_channels : int
        Channels of all side outputs together.
    out_channels : int
        Channels of the fused output.
    dropout : float
        Probability of ``Dropout3d`` on the side-output channels.

    Shapes
    ------
    ``forward(sides, size)``: ``sides[s]`` is the list of ``(N, c, D_s, H_s, W_s)`` side
    outputs of scale ``s`` (channels summing to ``side_channels`` over all scales);
    returns ``(N, out_channels, *size)``.
    """

    def __init__(self, side_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout3d(dropout)
        self.conv = nn.Conv3d(side_channels, out_channels, 1)

    def forward(self, sides: Sequence[Sequence[torch.Tensor]], size: Sequence[int]) -> torch.Tensor:
        parts = []
        start = 0
        for scale_sides in sides:
            stacked = self.dropout(torch.cat(list(scale_sides), dim=1))
            stop = start + stacked.shape[1]
            # The bias goes in once, with the first scale (upsampling keeps constants).
            bias = self.conv.bias if start == 0 else None
            part = F.conv3d(stacked, self.conv.weight[:, start:stop], bias)
            if part.shape[2:] != tuple(size):
                part = F.interpolate(part, size=tuple(size), mode="trilinear", align_corners=False)
            parts.append(part)
            start = stop
        if start != self.conv.in_channels:
            raise ValueError(f"expected {self.conv.in_channels} side-output channels, got {start}")
        return sum(parts[1:], parts[0])


class WingsNet(nn.Module):
    """WingsNet: a U-shaped net whose every block feeds a side output (group supervision).

    ``forward`` returns a :class:`~.blocks.SegmentationOutput` with ``main`` = output 1
    (decoder side outputs fused; used at inference) and, in training mode, ``aux = (output
    0,)`` (encoder side outputs fused); a training loop applies the same loss to both.  In
    eval mode ``aux`` is empty.

    Examples
    --------
    >>> net = WingsNet(base_width=4)
    >>> out = net(torch.zeros(1, 2, 32, 32, 32))
    >>> tuple(out.main.shape), tuple(out.aux[0].shape)
    ((1, 4, 32, 32, 32), (1, 4, 32, 32, 32))
    >>> net.eval()(torch.zeros(1, 2, 32, 32, 32)).aux
    ()

    Parameters
    ----------
    in_channels : int
        Input channels (2: the two CT windows).
    out_channels : int
        Output classes, background included (4: background + 3 airway classes).
    base_width : int
        Channels of the full-resolution blocks; the four scales have
        ``base_width * (1, 2, 4, 4)`` channels (the deepest scale relies on dilation rather
        than width, keeping the model small).
    encoder_dilations : sequence of 4 sequences of 3 int
        Dilation of each encoder block, per scale.
    dropout : float
        Channel (``Dropout3d``) dropout before each fusion, 0.3 in WingsNet.

    Shapes
    ------
    input ``(N, in_channels, D, H, W)``, D, H, W divisible by 8; ``main`` and ``aux[0]``
    ``(N, out_channels, D, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 4,
        base_width: int = 16,
        encoder_dilations: Sequence[Sequence[int]] = DEFAULT_ENCODER_DILATIONS,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, out_channels=out_channels, base_width=base_width)
        if len(encoder_dilations) != 4 or any(len(level) != 3 for level in encoder_dilations):
            raise ValueError(
                f"encoder_dilations must be 4 scales x 3 blocks, got {encoder_dilations!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        widths = [base_width * factor for factor in (1, 2, 4, 4)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for width, dilations in zip(widths, encoder_dilations):
            blocks = []
            for dilation in dilations:
                blocks.append(WingsBlock(previous, width, out_channels, dilation))
                previous = width
            self.encoder.append(nn.ModuleList(blocks))
        self.decoder = nn.ModuleList()
        for level in (2, 1, 0):
            self.decoder.append(
                nn.ModuleList(
                    [
                        WingsBlock(previous + widths[level], widths[level], out_channels),
                        WingsBlock(widths[level], widths[level], out_channels),
                    ]
                )
            )
            previous = widths[level]
        self.encoder_fusion = SideOutputFusion(12 * out_channels, out_channels, dropout)
        self.decoder_fusion = SideOutputFusion(6 * out_channels, out_channels, dropout)

    @staticmethod
    def _run_scale(
        blocks: nn.ModuleList, x: torch.Tensor, sides: list[list[torch.Tensor]]
    ) -> torch.Tensor:
        """Run one scale's blocks, appending the list of their side outputs to ``sides``."""
        scale_sides = []
        for block in blocks:
            x, side = block(x)
            scale_sides.append(side)
        sides.append(scale_sides)
        return x

    @property
    def input_divisor(self) -> int:
        """D, H and W of the input must be multiples of this: 2 to the number of poolings."""
        return 2 ** (len(self.encoder) - 1)

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        check_input(x, self.in_channels, self.input_divisor, "WingsNet")
        size = x.shape[2:]
        encoder_sides: list[list[torch.Tensor]] = []
        skips = []
        for level, blocks in enumerate(self.encoder):
            x = self._run_scale(blocks, x if level == 0 else F.max_pool3d(x, 2), encoder_sides)
            skips.append(x)
        skips.pop()
        decoder_sides: list[list[torch.Tensor]] = []
        for blocks in self.decoder:
            skip = skips.pop()
            upsampled = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = self._run_scale(blocks, torch.cat([upsampled, skip], dim=1), decoder_sides)
        # Output 0 only feeds the loss: in eval mode its fusion (upsampling every encoder
        # scale to full size, a fifth of the forward time) is skipped.
        aux = (self.encoder_fusion(encoder_sides, size),) if self.training else ()
        return SegmentationOutput(main=self.decoder_fusion(decoder_sides, size), aux=aux)
