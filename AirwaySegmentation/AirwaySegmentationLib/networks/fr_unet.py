"""FR/AD U-Net: feature recalibration and attention distillation (Qin et al., MICCAI 2020).

A 3D U-Net with four poolings (five scales), two 3^3 conv + IN + ReLU per scale and a
feature recalibration (FR) module at the end of every scale.  The decoder scale outputs are
returned in ``SegmentationOutput.features`` for the attention distillation loss
(:class:`AirwaySegmentationLib.losses.AttentionDistillationLoss`, Qin 2020, eq. 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import RecalibratedUNet, channel_excitation, check_positive, unet_widths


class FeatureRecalibration(nn.Module):
    """Spatially weighted channel recalibration (Qin 2020, eqs. 1-5).

    The feature ``A`` is compressed to a depth, a height and a width profile with learnable
    per-slice weights ``d_i``, ``h_j``, ``w_k`` (eqs. 2-4); the profiles are summed by
    broadcasting (eq. 1), excited by 1x1x1 conv C -> C/r, ReLU, 1x1x1 conv C/r -> C, sigmoid
    (eq. 5) and the result multiplies ``A``.

    The paper sizes the slice weights to its fixed training crop.  Here they are sized for
    ``slice_counts`` (the training patch at this scale) and initialised to ``1 / count``, so
    the module starts as an average pooling.  For another input size the weights are
    linearly interpolated to it and rescaled by ``count / size`` so the profiles stay
    weighted means (our choice: sliding-window inference uses the training window, so the
    learnt weights are used as they are there).

    Parameters
    ----------
    channels : int
        Channels C of the feature.
    slice_counts : tuple of int
        (D, H, W) for which the slice weights are learnt.
    reduction : int
        Compression factor r of the excitation (r = 2 in the paper).

    Shapes
    ------
    ``(N, C, D, H, W) -> (N, C, D, H, W)`` for any D, H, W >= 1.
    """

    def __init__(self, channels: int, slice_counts: Sequence[int], reduction: int = 2) -> None:
        super().__init__()
        if len(slice_counts) != 3:
            raise ValueError(f"slice_counts must be (D, H, W), got {tuple(slice_counts)}")
        check_positive(channels=channels, reduction=reduction, **dict(zip("DHW", slice_counts)))
        self.depth_weight = nn.Parameter(torch.full((slice_counts[0],), 1.0 / slice_counts[0]))
        self.height_weight = nn.Parameter(torch.full((slice_counts[1],), 1.0 / slice_counts[1]))
        self.width_weight = nn.Parameter(torch.full((slice_counts[2],), 1.0 / slice_counts[2]))
        self.excitation = channel_excitation(channels, reduction)

    @staticmethod
    def _fit(weight: torch.Tensor, size: int) -> torch.Tensor:
        """Slice weights for ``size`` slices: as learnt, or interpolated and rescaled."""
        count = weight.shape[0]
        if size == count:
            return weight
        resized = F.interpolate(weight[None, None], size=size, mode="linear", align_corners=True)
        return resized[0, 0] * (count / size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = self._fit(self.depth_weight, features.shape[2]).to(features.dtype)
        h = self._fit(self.height_weight, features.shape[3]).to(features.dtype)
        w = self._fit(self.width_weight, features.shape[4]).to(features.dtype)
        # Two weighted passes over A (the width sum is shared by eqs. 2 and 3); plain
        # multiply-and-sum keeps any memory format (einsum would copy channels-last input).
        width_summed = (features * w).sum(dim=4)  # sum_k w_k A[:, :, :, :, k]
        depth_profile = (width_summed * h).sum(dim=3)  # Qin 2020, eq. 2
        height_profile = (width_summed * d[:, None]).sum(dim=2)  # Qin 2020, eq. 3
        width_profile = (features * (d[:, None] * h)[:, :, None]).sum(dim=(2, 3))  # Qin 2020, eq. 4
        spatial = (
            depth_profile[:, :, :, None, None]
            + height_profile[:, :, None, :, None]
            + width_profile[:, :, None, None, :]
        )  # Qin 2020, eq. 1 (broadcast sum)
        return features * torch.sigmoid(self.excitation(spatial))  # Qin 2020, eq. 5


class FRADUNet(RecalibratedUNet):
    """U-Net with feature recalibration and attention distillation (Qin 2020).

    Examples
    --------
    >>> net = FRADUNet(base_width=4, patch_size=(32, 32, 32))
    >>> out = net(torch.zeros(1, 2, 32, 32, 32))
    >>> tuple(out.main.shape), len(out.features)
    ((1, 4, 32, 32, 32), 4)

    Parameters
    ----------
    in_channels : int
        Input channels (2: the two CT windows).
    out_channels : int
        Output classes, background included (4: background + 3 airway classes).
    base_width : int
        Channels at full resolution; doubled at each pooling up to ``max_width``.  Qin
        keeps the widths small on purpose (fewer channels, recalibrated).
    max_width : int
        Cap on the channels of the deeper scales (keeps the default under 5M parameters).
    depth : int
        Number of poolings (4 in the paper: five scales).
    patch_size : tuple of int
        (D, H, W) of the training patch, which sizes the FR slice weights of every scale;
        must be divisible by ``2 ** depth``.
    reduction : int
        FR compression factor r (2 in the paper).

    Shapes
    ------
    input ``(N, in_channels, D, H, W)``, D, H, W divisible by ``2 ** depth``;
    ``main`` ``(N, out_channels, D, H, W)`` logits; ``features``: the ``depth`` decoder
    scale outputs, coarse to fine, for
    :class:`~AirwaySegmentationLib.losses.AttentionDistillationLoss`.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 4,
        base_width: int = 16,
        max_width: int = 128,
        depth: int = 4,
        patch_size: Sequence[int] = (128, 128, 128),
        reduction: int = 2,
    ) -> None:
        if len(patch_size) != 3 or any(size % 2**depth for size in patch_size):
            raise ValueError(
                f"patch_size must be (D, H, W) divisible by {2**depth}, got {tuple(patch_size)}"
            )
        widths = unet_widths(base_width, max_width, depth)

        def recalibration(channels: int, level: int) -> nn.Module:
            return FeatureRecalibration(
                channels, [size // 2**level for size in patch_size], reduction
            )

        super().__init__(in_channels, out_channels, widths, recalibration)
