"""Plain 3D U-Net: the breakage connection network of DeepTree's stage 2.

DeepTree (implementation details) uses nnU-Net for both stages, "reduced to 3
downsamplings (four resolutions)" with wider deeper blocks, and Dice + CE for stage 2.  This
is that shape on the shared U-Net body (:class:`~AirwaySegmentationLib.networks.blocks.RecalibratedUNet`)
without recalibration: two 3^3 conv + instance norm + ReLU per scale, max-pooling, transposed
convolutions and skip concatenation.  nnU-Net's deep supervision is left out (the paper does
not say it kept it; one output keeps the network small for 2-core CPUs).
"""

from __future__ import annotations

from torch import nn

from .blocks import RecalibratedUNet, unet_widths


class UNet(RecalibratedUNet):
    """3D U-Net without recalibration (DeepTree's stage-2 backbone).

    Examples
    --------
    >>> import torch
    >>> net = UNet(base_width=4)
    >>> tuple(net(torch.zeros(1, 2, 16, 16, 16)).main.shape)
    (1, 2, 16, 16, 16)

    Parameters
    ----------
    in_channels : int
        Input channels (2 for stage 2: the CT and the breakage attention, early fusion).
    out_channels : int
        Output classes, background included (2 for stage 2: background and breakage Y_B).
    base_width : int
        Channels at full resolution; doubled at each pooling up to ``max_width``.
    max_width : int
        Cap on the channels of the deeper scales.
    depth : int
        Number of poolings (3 in DeepTree).

    Shapes
    ------
    input ``(N, in_channels, D, H, W)``, D, H, W divisible by ``2 ** depth``; ``main``
    ``(N, out_channels, D, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        base_width: int = 16,
        max_width: int = 128,
        depth: int = 3,
    ) -> None:
        super().__init__(in_channels, out_channels, unet_widths(base_width, max_width, depth), lambda channels, level: nn.Identity())
