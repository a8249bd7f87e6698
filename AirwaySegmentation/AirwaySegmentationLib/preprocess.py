"""The one CT preprocessing shared by training and inference (METHODS.md section 5).

Two steps, both plain functions on numpy arrays (z, y, x) and spacing in mm:

1. :func:`crop_to_body` finds the box that holds the lungs and the airway (Tang: "a
   circumscribed rectangle of the lung area") with classical image processing, so neither
   training nor inference spends time on the air around the patient.
2. :func:`network_input` turns Hounsfield units into the two input channels the networks
   expect: the clipped and normalised HU, and the W750/L-250 window of Tang.

:class:`InputSpec` records the numbers of step 2; a model card stores it as JSON
(:meth:`InputSpec.as_dict`, :meth:`InputSpec.from_dict`) so inference reproduces the input the
model was trained on.

Examples
--------
>>> hu = np.full((4, 5, 6), -1000.0); hu[2] = 40.0
>>> channels = network_input(hu)
>>> channels.shape, channels.dtype
((2, 4, 5, 6), dtype('float32'))
>>> round(float(channels[1, 0, 0, 0]), 3), round(float(channels[1, 2, 0, 0]), 3)  # air, tissue in W750/L-250
(0.0, 0.887)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from .arrays import Box, as_spacing_zyx, bounding_box, grow_box, largest_component_and_count
from .errors import AirwayInputError
from .volume import Geometry, Volume

#: HU below which a voxel counts as air (lung parenchyma is about -850, fat about -90).
AIR_THRESHOLD_HU = -400.0
#: Voxel size (mm) at which the body and lungs are found; boxes need no finer grid.
_COARSE_SPACING_MM = 3.0
#: Block size (mm) at which :func:`inside_body` finds the outline: fine enough to follow the
#: skin, coarse enough that a block mean washes out a sheet of cloth.
_BODY_SPACING_MM = 1.5
#: An air region inside the body is kept as lung when it holds at least this share of the
#: largest one: both lungs (one may be partly collapsed) stay, bowel gas mostly goes, and
#: any gas kept only makes the box larger, never cuts airway away.
_LUNG_SHARE_OF_LARGEST = 0.05
# In-plane 4-neighbourhood: holes are filled slice by slice, because in 3-D the lungs reach
# the outside through the trachea where it leaves the top slice.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class InputSpec:
    """How Hounsfield units become network input channels; serialised in the model card.

    Attributes
    ----------
    hu_clip : tuple of 2 float
        Channel 0: HU clipped to ``[low, high]`` and mapped linearly to ``[0, 1]``.  The
        default ``(-1200, 600)`` is the lung window of the WingsNet / ATM'22 baseline
        preprocessing; METHODS.md and Tang only say "HU clip".
    windows : tuple of (width, level) pairs
        One further channel per display window, ``[level - width/2, level + width/2]`` HU
        mapped to ``[0, 1]``.  Default: Tang's W750 / L-250, i.e. ``[-625, 125]`` HU.
    target_spacing_zyx : tuple of 3 float or None
        Grid the model was trained on; ``None`` (Tang) means the CT's own grid.
    """

    hu_clip: tuple[float, float] = (-1200.0, 600.0)
    windows: tuple[tuple[float, float], ...] = ((750.0, -250.0),)
    target_spacing_zyx: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        # The spec comes from a model card too, so a wrong shape is a user's input error.
        try:
            low, high = (float(v) for v in self.hu_clip)
        except (TypeError, ValueError):
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise AirwayInputError(
                f"The HU clip range {self.hu_clip} is not usable; expected (low, high) with low < high."
            )
        try:
            windows = tuple((float(width), float(level)) for width, level in self.windows)
        except (TypeError, ValueError):
            raise AirwayInputError(
                f"The windows {self.windows} are not usable; expected (width, level) pairs in HU."
            ) from None
        for width, level in windows:
            if not (math.isfinite(width) and math.isfinite(level) and width > 0):
                raise AirwayInputError(
                    f"The window (width {width}, level {level}) is not usable; expected a positive width in HU."
                )
        object.__setattr__(self, "hu_clip", (low, high))
        object.__setattr__(self, "windows", windows)
        if self.target_spacing_zyx is not None:
            object.__setattr__(self, "target_spacing_zyx", as_spacing_zyx(self.target_spacing_zyx))

    @property
    def n_channels(self) -> int:
        """Number of input channels: the clipped HU plus one per window."""
        return 1 + len(self.windows)

    def as_dict(self) -> dict:
        """JSON-ready dictionary (lists, floats, None)."""
        return {
            "hu_clip": list(self.hu_clip),
            "windows": [{"width": width, "level": level} for width, level in self.windows],
            "target_spacing_zyx": None if self.target_spacing_zyx is None else list(self.target_spacing_zyx),
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> InputSpec:
        """The spec stored by :meth:`as_dict`; raises :class:`AirwayInputError` for a malformed one."""
        try:
            spacing = values["target_spacing_zyx"]
            return cls(
                hu_clip=tuple(values["hu_clip"]),
                windows=tuple((window["width"], window["level"]) for window in values["windows"]),
                target_spacing_zyx=None if spacing is None else tuple(spacing),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, AirwayInputError):
                raise
            raise AirwayInputError(
                f"The model card's input spec is malformed ({type(error).__name__}: {error}); "
                "expected hu_clip, windows and target_spacing_zyx."
            ) from None


#: Tang's two channels: HU in the lung window and W750 / L-250.
DEFAULT_INPUT_SPEC = InputSpec()


def _normalise_into(channel: np.ndarray, hu: np.ndarray, low: float, high: float) -> None:
    """``channel[...] = (clip(hu, low, high) - low) / (high - low)``, without full-size temporaries."""
    np.clip(hu, low, high, out=channel, casting="unsafe")
    channel -= low
    channel *= 1.0 / (high - low)


def network_input(hu_zyx: np.ndarray, spec: InputSpec = DEFAULT_INPUT_SPEC) -> np.ndarray:
    """The network's input channels from a CT (or a crop of one) in Hounsfield units.

    Parameters
    ----------
    hu_zyx : numpy.ndarray
        CT in HU, shape (Z, Y, X), any real dtype.
    spec : InputSpec
        Clip range and windows; the default is Tang's two channels.

    Returns
    -------
    numpy.ndarray
        float32, shape (``spec.n_channels``, Z, Y, X), values in [0, 1]: channel 0 the HU
        clipped to ``spec.hu_clip`` and normalised, then one channel per window.
    """
    hu = np.asarray(hu_zyx)
    if hu.ndim != 3:
        raise AirwayInputError(f"Expected a 3-D CT but got an array with {hu.ndim} dimensions; give one 3-D volume.")
    if hu.dtype.kind not in "iuf":
        hu = hu.astype(np.float32)
    # Written channel by channel from the CT's own type (int16 for most scans): no float32
    # copy of the whole CT, which for a 512 x 512 x 600 scan would be 630 MB.
    channels = np.empty((spec.n_channels,) + hu.shape, dtype=np.float32)
    _normalise_into(channels[0], hu, *spec.hu_clip)
    for channel, (width, level) in enumerate(spec.windows, start=1):
        _normalise_into(channels[channel], hu, level - width / 2.0, level + width / 2.0)  # Tang 2.1
    return channels


def _as_ct(ct_zyx: np.ndarray) -> np.ndarray:
    ct = np.asarray(ct_zyx)
    if ct.ndim != 3:
        raise AirwayInputError(f"Expected a 3-D CT but got an array with {ct.ndim} dimensions; give one 3-D volume.")
    return ct


def crop_to_body(ct_zyx: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float = 10.0) -> Box:
    """Bounding box of the lungs and airway in a chest CT, grown by a margin.

    Classical and fast (well under a second for a 512 x 400 x 275 scan): on a grid subsampled to
    about 3 mm,

    1. the body is the largest 6-connected component of non-air voxels (> -400 HU), its
       holes filled slice by slice (the table and the air around the patient stay out);
    2. the lungs are the 6-connected air components inside the filled body holding at least
       5% of the largest one; the trachea and main bronchi are connected to them and come
       along (the trachea up to the top slice where it leaves the scan);
    3. the box of the lungs, mapped back to the full grid (conservatively: a coarse voxel
       stands for its whole stride), grown by ``margin_mm`` per side.

    When no lung-like air is found (not a chest, or lungs cut by the field of view) the box
    of the body is used.  A CT without a body (nothing denser than air) is refused: there is
    no airway to find in it.

    Parameters
    ----------
    ct_zyx : numpy.ndarray
        CT in HU, shape (Z, Y, X).
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    margin_mm : float
        Context kept around the lungs on every side (wall, pleura, the first patch rows).

    Returns
    -------
    tuple of 3 slice
        The box, ``ct_zyx[box]`` is the crop.
    """
    ct = _as_ct(ct_zyx)
    spacing = np.asarray(as_spacing_zyx(spacing_zyx))
    if not (isinstance(margin_mm, numbers.Real) and math.isfinite(margin_mm) and margin_mm >= 0):
        raise AirwayInputError(f"The crop margin {margin_mm} mm is not usable; expected a non-negative size.")
    stride = np.maximum(np.rint(_COARSE_SPACING_MM / spacing).astype(int), 1)
    air = ct[:: stride[0], :: stride[1], :: stride[2]] < AIR_THRESHOLD_HU

    body, n_body = largest_component_and_count(~air, 6)
    if n_body == 0:
        raise AirwayInputError(
            f"The CT holds no body: no voxel is denser than air ({AIR_THRESHOLD_HU:g} HU); give a chest CT."
        )
    body = ndimage.binary_fill_holes(body, structure=_IN_PLANE)

    inner_air = cc3d.connected_components(air & body, connectivity=6)
    air_sizes = np.bincount(inner_air.ravel())
    air_sizes[0] = 0
    lungs = air_sizes >= max(_LUNG_SHARE_OF_LARGEST * air_sizes.max(), 1)
    coarse_box = bounding_box(lungs[inner_air]) if lungs.any() else bounding_box(body)

    # Coarse voxel i samples full voxel i * stride; its neighbours' samples are a stride away,
    # so the structure it saw may reach up to stride - 1 voxels either side.
    full = [
        slice(box.start * step - (step - 1), (box.stop - 1) * step + step) for box, step in zip(coarse_box, stride)
    ]
    margin_voxels = np.ceil(margin_mm / spacing).astype(int)
    return grow_box(full, margin_voxels, ct.shape)


def inside_body(ct_zyx: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Voxels inside the patient's outline: everything except the air around the patient.

    Stage 1 removes airway predicted outside this mask.  Air pockets between the skin and a
    gown or blanket are walled like a lumen, and a network can take them for airway (on
    LIDC-IDRI-0314 the round-1 WingsNet's largest component was such a pocket round the neck);
    no airway lies outside the body.  On blocks of about 1.5 mm (:data:`_BODY_SPACING_MM`):

    1. the block mean of the HU, in which thin sheets of cloth average to air;
    2. the body is the largest 6-connected component of non-air blocks (> -400 HU);
    3. its holes are filled slice by slice, so the lungs, the airway (the trachea leaving
       the top slice is still ringed by the neck) and any other gas inside join it;
    4. a slice where the body touches the edge of the image (shoulders or a chest cut by the
       field of view) cannot tell a cut lung from the air outside by its fill; there, air is
       outside when it is 6-connected in 3-D to air found outside in the other slices (the
       air in front of the neck is the air in front of the chest), and everything else is
       inside.  When every slice is cut, nothing is outside.

    The blocks are mapped back to the full grid, so the outline is accurate to about a block.

    Parameters
    ----------
    ct_zyx : numpy.ndarray
        CT in HU, shape (Z, Y, X).
    spacing_zyx : sequence of 3 float
        Voxel size in mm.

    Returns
    -------
    numpy.ndarray
        Boolean mask of ``ct_zyx``'s shape; all true when no body is found.

    Examples
    --------
    >>> hu = np.full((3, 40, 40), -1000.0); hu[:, 5:35, 5:35] = 40.0; hu[:, 15:25, 15:25] = -1000.0
    >>> mask = inside_body(hu, (1.0, 1.0, 1.0))
    >>> bool(mask[1, 20, 20]), bool(mask[1, 2, 2])  # the lumen inside, the air around outside
    (True, False)
    """
    ct = _as_ct(ct_zyx)
    factor = np.maximum(np.rint(_BODY_SPACING_MM / np.asarray(as_spacing_zyx(spacing_zyx))).astype(int), 1)
    coarse_shape = -(-np.asarray(ct.shape) // factor)
    padded = np.pad(ct, [(0, int(c * f - n)) for c, f, n in zip(coarse_shape, factor, ct.shape)], mode="edge")
    block_sum = np.zeros(coarse_shape, dtype=np.float32)
    for offset in np.ndindex(*factor):
        block_sum += padded[offset[0]:: factor[0], offset[1]:: factor[1], offset[2]:: factor[2]]
    del padded
    tissue = block_sum > AIR_THRESHOLD_HU * float(np.prod(factor))
    body, count = largest_component_and_count(tissue, 6)
    if count == 0:
        return np.ones(ct.shape, dtype=bool)
    inside = ndimage.binary_fill_holes(body, structure=_IN_PLANE)
    cut = body[:, [0, -1], :].any(axis=(1, 2)) | body[:, :, [0, -1]].any(axis=(1, 2))
    if cut.any():
        outside_seen = ~inside
        outside_seen[cut] = False
        air = cc3d.connected_components(~tissue, connectivity=6)
        outside_air = np.setdiff1d(np.unique(air[outside_seen]), [0])
        inside[cut] = ~np.isin(air[cut], outside_air)
    for axis, f in enumerate(factor):
        inside = np.repeat(inside, f, axis=axis)
    return inside[: ct.shape[0], : ct.shape[1], : ct.shape[2]]


def crop_volume(volume: Volume, box: Box) -> Volume:
    """The part of ``volume`` inside ``box``, placed where it was (origin moved to the box corner)."""
    corner = np.array([s.start for s in box], dtype=float)
    origin = volume.geometry.index_zyx_to_physical(corner)
    geometry = Geometry(volume.geometry.spacing_xyz, tuple(origin), volume.geometry.direction)
    return Volume(np.ascontiguousarray(volume.array_zyx[box]), geometry)
