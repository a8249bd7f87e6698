"""Per-voxel loss weights computed on the fly from a label crop (METHODS.md section 3).

Plain numpy functions, z, y, x arrays, spacing in mm: the data pipeline calls them on each
training crop and hands the result to the loss as an ``(N, D, H, W)`` tensor.

- :func:`gul_distance_weight`: the ``dist`` of the General Union loss, inverse local lumen
  radius normalised to mean 1 over the airway.
- :func:`centerline_distance_weight`: Tang's ``w_d = (1 - d / d_max)^2`` (eq. 4).

Both rest on the centerline (3D skeleton, Lee's thinning) and the spacing-aware distance
transform.  The local-imbalance weight (Tang eqs. 1, 3) only needs a box mean of the label and
is computed by the loss itself, in torch:
:func:`AirwaySegmentationLib.losses.local_imbalance_weight`.

Examples
--------
>>> label = np.zeros((9, 9, 20), dtype=np.uint8)
>>> label[3:6, 3:6, 2:18] = 1                         # a 3-voxel-wide tube along x
>>> w_d = centerline_distance_weight(label, spacing_zyx=(1.0, 1.0, 1.0))
>>> float(w_d[4, 4, 10]), float(w_d[0, 0, 0])
(1.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import edt
import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from .arrays import as_airway_mask, as_spacing_zyx


class LumenGeometry(NamedTuple):
    """Distance of each airway voxel to the centerline and the lumen radius there.

    Attributes
    ----------
    centerline_distance_mm : numpy.ndarray
        float32, distance (mm) from each voxel to the nearest centerline voxel; 0 outside
        the airway.
    lumen_radius_mm : numpy.ndarray
        float32, the distance transform (mm) of the airway at that nearest centerline voxel:
        the local lumen radius (without the half-voxel bias correction, which weights do not
        need); 0 outside the airway.
    """

    centerline_distance_mm: np.ndarray
    lumen_radius_mm: np.ndarray


def lumen_geometry(
    label: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)
) -> LumenGeometry:
    """Centerline distance and local lumen radius of every airway voxel.

    Parameters
    ----------
    label : numpy.ndarray
        ``(D, H, W)`` airway label, any value > 0 is airway (all classes together).
    spacing_zyx : sequence of float
        Voxel spacing in mm, z, y, x.

    Returns
    -------
    LumenGeometry
    """
    airway = as_airway_mask(label)
    spacing_zyx = as_spacing_zyx(spacing_zyx)
    zeros = np.zeros(airway.shape, dtype=np.float32)
    if not airway.any():
        return LumenGeometry(zeros, zeros.copy())
    wall_distance = edt.edt(airway, anisotropy=spacing_zyx).astype(
        np.float32
    )
    centerline = skeletonize(airway).astype(bool)
    if not centerline.any():  # thinning can erase tiny blobs; keep their deepest voxels
        centerline = wall_distance == wall_distance.max()
    distance, nearest = ndimage.distance_transform_edt(
        ~centerline, sampling=spacing_zyx, return_indices=True
    )
    radius = wall_distance[tuple(nearest)]
    return LumenGeometry(
        np.where(airway, distance, 0.0).astype(np.float32),
        np.where(airway, radius, 0.0).astype(np.float32),
    )


def gul_distance_weight(
    label: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), geometry: LumenGeometry | None = None
) -> np.ndarray:
    """The ``dist`` weight of the General Union loss: inverse local lumen radius, mean 1.

    ``dist = (1 / r) / mean_airway(1 / r)`` on airway voxels, ``r`` the local lumen radius
    (:func:`lumen_geometry`); 0 outside (the loss uses ``w = dist * y + (1 - y)``).  Thin
    branches weigh more than thick ones, so the trachea does not dominate; normalising to
    mean 1 keeps the total airway weight equal to the airway voxel count, so the balance
    between airway and background set by the loss's ``alpha`` is unchanged (METHODS
    section 3 leaves the normalisation open).

    Parameters
    ----------
    label : numpy.ndarray
        ``(D, H, W)`` airway label of the crop, any value > 0 is airway.
    spacing_zyx : sequence of float
        Voxel spacing in mm, z, y, x.
    geometry : LumenGeometry, optional
        ``lumen_geometry(label, spacing_zyx)`` when the caller already has it (both weights
        of a crop need it; computing it once halves their cost).

    Returns
    -------
    numpy.ndarray
        float32 ``(D, H, W)``, mean 1 over the airway voxels, 0 elsewhere (all 0 if the crop
        has no airway).
    """
    if geometry is None:
        geometry = lumen_geometry(label, spacing_zyx)
    airway = geometry.lumen_radius_mm > 0
    weight = np.zeros(airway.shape, dtype=np.float32)
    radius = geometry.lumen_radius_mm[airway]
    if radius.size and np.isfinite(radius).all():
        inverse_radius = 1.0 / radius
        weight[airway] = inverse_radius / inverse_radius.mean()
    else:
        # A crop that is all airway (inside the trachea) has no wall to measure to: every
        # radius is infinite, so no branch can be favoured; weigh its voxels equally.
        weight[airway] = 1.0
    return weight


def centerline_distance_weight(
    label: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), geometry: LumenGeometry | None = None
) -> np.ndarray:
    """Tang's centerline-distance weight ``w_d = (1 - d / d_max)^2`` (eq. 4).

    ``d`` is the distance (mm) to the centerline inside the lumen; ``w_d`` is 1 on the
    centerline, falls towards the wall and is 0 outside the airway.  ``d_max`` is taken per
    voxel as the local lumen radius (the distance from its centerline point to the wall),
    so every branch, thin or thick, gets the full 1 -> 0 profile; a single ``d_max`` per crop
    (the paper does not say which) would leave thin branches almost flat at 1.  Voxels with
    ``d >= d_max`` get 0.

    Parameters
    ----------
    label : numpy.ndarray
        ``(D, H, W)`` airway label of the crop, any value > 0 is airway.
    spacing_zyx : sequence of float
        Voxel spacing in mm, z, y, x.
    geometry : LumenGeometry, optional
        ``lumen_geometry(label, spacing_zyx)`` when the caller already has it.

    Returns
    -------
    numpy.ndarray
        float32 ``(D, H, W)`` in [0, 1].
    """
    if geometry is None:
        geometry = lumen_geometry(label, spacing_zyx)
    airway = geometry.lumen_radius_mm > 0
    weight = np.zeros(airway.shape, dtype=np.float32)
    relative = geometry.centerline_distance_mm[airway] / geometry.lumen_radius_mm[airway]
    weight[airway] = (1.0 - np.minimum(relative, 1.0)) ** 2  # Tang, eq. 4
    return weight
