"""PWFR/AttdKD U-Net: our interpretation of Zhang et al., Pattern Recognition 2026.

Only the abstract is available.  It names two modules: a pointwise feature recalibration
(PWFR) that "emphasises competitive features and continuously suppresses redundant features",
and an attention-driven knowledge distillation (AttdKD) that "integrates the spatial and
channel knowledge at various stages".  Everything below beyond those two sentences is an
INTERPRETATION, chosen to stay close to the FR/AD U-Net (Qin 2020) that the abstract builds on:

- Backbone: the same five-scale U-Net as :class:`~.fr_unet.FRADUNet` (two 3^3 conv + IN +
  ReLU per scale), with PWFR instead of FR at the end of every scale, encoder and decoder
  ("continuously": every scale suppresses again).
- PWFR: at every voxel, the channel vector is excited by 1x1x1 conv C -> C/r, ReLU, 1x1x1 conv
  C/r -> C (no spatial pooling: "pointwise"); the excitation is centred on its mean over the
  channels before the sigmoid, so channels compete at each voxel: a channel above the
  voxel's average is kept (gate > 0.5), one below it is suppressed (gate < 0.5).
- AttdKD: distillation between consecutive decoder stages (later stage teaches, target
  detached, as in Qin 2020, eq. 6) of both the spatial attention (Qin's map) and a channel
  attention; see :class:`~AirwaySegmentationLib.losses.AttentionDistillationLoss` with
  ``channel=True``.  The network only exposes the decoder stage outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import RecalibratedUNet, channel_excitation, unet_widths


class PointwiseRecalibration(nn.Module):
    """Per-voxel competitive channel gate (interpretation of Zhang 2026's PWFR).

    ``u = sigmoid(z - mean_c z)`` with ``z = K_2 * ReLU(K_1 * A)`` computed at every voxel;
    the output is ``u * A``.  Centring on the channel mean makes the gate depend on how a
    channel ranks against the others at that voxel, not on the overall activation level.

    Parameters
    ----------
    channels : int
        Channels C of the feature.
    reduction : int
        Compression factor r of the 1x1x1 excitation (2, as in Qin 2020's FR).

    Shapes
    ------
    ``(N, C, D, H, W) -> (N, C, D, H, W)``
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.excitation = channel_excitation(channels, reduction)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        excitation = self.excitation(features)
        competition = excitation - excitation.mean(dim=1, keepdim=True)
        return features * torch.sigmoid(competition)


class PWFRUNet(RecalibratedUNet):
    """U-Net with pointwise feature recalibration, for attention-driven distillation.

    An interpretation of Zhang et al. 2026 (abstract only; see the module docstring):
    :class:`PointwiseRecalibration` at the end of every scale and the decoder stage outputs
    exposed for AttdKD (spatial and channel attention distillation).

    Examples
    --------
    >>> net = PWFRUNet(base_width=4)
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
        Channels at full resolution, doubled at each pooling up to ``max_width``.
    max_width : int
        Cap on the channels of the deeper scales.
    depth : int
        Number of poolings (4: five scales, as the FR/AD U-Net).
    reduction : int
        PWFR compression factor r.

    Shapes
    ------
    input ``(N, in_channels, D, H, W)``, D, H, W divisible by ``2 ** depth``;
    ``main`` ``(N, out_channels, D, H, W)`` logits; ``features``: the ``depth`` decoder
    scale outputs, coarse to fine.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 4,
        base_width: int = 16,
        max_width: int = 128,
        depth: int = 4,
        reduction: int = 2,
    ) -> None:
        widths = unet_widths(base_width, max_width, depth)
        super().__init__(
            in_channels,
            out_channels,
            widths,
            lambda channels, level: PointwiseRecalibration(channels, reduction),
        )
