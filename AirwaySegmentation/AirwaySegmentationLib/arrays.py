"""Checks and crops shared by the array functions (tree parsing, metrics, stage 2).

Public functions take numpy arrays in z, y, x order plus spacing in mm; these helpers turn
what a caller passed into the canonical form (bool mask, float spacing tuple) or raise
:class:`~AirwaySegmentationLib.errors.AirwayInputError` with one sentence, and compute the
bounding-box crops that keep the work proportional to the airway, not to the scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import fill_voids
import numpy as np

from .errors import AirwayInputError

#: Voxel connectivities the component and skeleton code accepts.
CONNECTIVITIES = (6, 18, 26)

Box = tuple[slice, slice, slice]


def as_airway_mask(mask_zyx: np.ndarray) -> np.ndarray:
    """The airway mask as bool (any nonzero voxel is airway); refuses arrays that are not 3-D."""
    mask = np.asarray(mask_zyx)
    if mask.ndim != 3:
        raise AirwayInputError(
            f"Expected a 3-D airway mask but got an array with {mask.ndim} dimensions; give one 3-D label volume."
        )
    return mask if mask.dtype == bool else mask != 0


def as_spacing_zyx(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    """Voxel spacing as three positive floats (mm, z, y, x); refuses anything else."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise AirwayInputError(
            f"Voxel spacing {tuple(np.ravel(spacing).tolist())} mm is not usable; expected three positive sizes (z, y, x)."
        )
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def check_connectivity(connectivity: int) -> int:
    """Return ``connectivity`` if it is 6, 18 or 26, else raise :class:`AirwayInputError`."""
    if connectivity not in CONNECTIVITIES:
        raise AirwayInputError(f"Connectivity {connectivity} is not supported; use 6 (ATM'22), 18 or 26 (ATM'26).")
    return connectivity


def grow_box(box: Sequence[slice], pad: int | Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``pad`` voxels (one number or one per axis) and clipped to ``shape``."""
    pads = np.broadcast_to(np.asarray(pad, dtype=int), (3,))
    return tuple(
        slice(max(int(s.start) - int(p), 0), min(int(s.stop) + int(p), int(n))) for s, p, n in zip(box, pads, shape)
    )


def bounding_box(mask: np.ndarray, pad: int | Sequence[int] = 0) -> Box | None:
    """Slices of the bounding box of the nonzero voxels grown by ``pad`` voxels; None when empty.

    Examples
    --------
    >>> mask = np.zeros((5, 6, 7), bool); mask[2, 3, 1:4] = True
    >>> bounding_box(mask, pad=1)
    (slice(1, 4, None), slice(2, 5, None), slice(0, 5, None))
    """
    box = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if along.size == 0:
            return None
        box.append(slice(int(along[0]), int(along[-1]) + 1))
    return grow_box(box, pad, mask.shape)


def largest_component(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """The largest ``connectivity``-connected component of a bool mask (all False when empty).

    Labels only the bounding box of the mask, so the cost follows the airway, not the scan.
    """
    return largest_component_and_count(mask, connectivity)[0]


def largest_component_and_count(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """:func:`largest_component` and the number of components, from one labelling."""
    check_connectivity(connectivity)
    result = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return result, 0
    components, count = cc3d.connected_components(mask[box], connectivity=connectivity, return_N=True)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    result[box] = components == int(np.argmax(sizes))
    return result, int(count)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """A bool mask with its enclosed cavities filled in 3-D (background 6-connected to the border stays).

    Works on the mask's bounding box grown by one voxel, so only what the image border closes
    off counts as enclosed, as on the full image.
    """
    result = np.array(mask, dtype=bool)
    box = bounding_box(result, pad=1)
    if box is not None:
        result[box] = fill_voids.fill(result[box])
    return result


def fill_holes_in_slices(mask_zyx: np.ndarray) -> np.ndarray:
    """A bool mask with the holes of each z slice filled (background 4-connected to the slice border stays).

    A lumen wider than any the network was trained on can come out hollow: a ring of airway
    round a core of probability under 0.5, open at both ends, which :func:`fill_holes` leaves
    (seen on the upper trachea of LIDC-IDRI-0314, wider than every phantom's).  Across the
    scan's slices (axial for a chest CT) that core is a closed hole.  A tree has no other
    closed curve in a slice unless two of its branches touch twice in that slice.
    """
    result = np.array(mask_zyx, dtype=bool)
    box = bounding_box(result, pad=1)
    if box is not None:
        inner = result[box]
        for z in range(inner.shape[0]):
            if inner[z].any():
                inner[z] = fill_voids.fill(inner[z])
    return result
