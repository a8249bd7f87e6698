"""Airway networks (stage 1, and stage 2's U-Net) and a registry to build them by name.

Every network takes ``(N, in_channels, D, H, W)`` (D = z, H = y, W = x) and returns a
:class:`SegmentationOutput` whose ``main`` holds ``(N, out_channels, D, H, W)`` logits, so a
training loop or a sliding-window predictor needs to know no particular network.

Examples
--------
>>> net = build_network("wingsnet", base_width=4)
>>> sorted(NETWORKS)
['fr_unet', 'pwfr_unet', 'unet', 'wingsnet']
"""

from __future__ import annotations

from torch import nn

from .blocks import SegmentationOutput
from .fr_unet import FRADUNet
from .pwfr_unet import PWFRUNet
from .unet import UNet
from .wingsnet import WingsNet

#: Network classes by the name used in configurations, model cards and the CLI.
NETWORKS: dict[str, type[nn.Module]] = {
    "wingsnet": WingsNet,
    "fr_unet": FRADUNet,
    "pwfr_unet": PWFRUNet,
    "unet": UNet,
}


def build_network(name: str, **kwargs: object) -> nn.Module:
    """Build the network registered as ``name`` with the given constructor arguments.

    Parameters
    ----------
    name : str
        A key of :data:`NETWORKS`.
    **kwargs
        Passed to the network's constructor (e.g. ``in_channels``, ``out_channels``,
        ``base_width``).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    """
    if name not in NETWORKS:
        raise ValueError(
            f"Unknown network {name!r}; expected one of {', '.join(sorted(NETWORKS))}."
        )
    return NETWORKS[name](**kwargs)


__all__ = ["NETWORKS", "FRADUNet", "PWFRUNet", "SegmentationOutput", "UNet", "WingsNet", "build_network"]
