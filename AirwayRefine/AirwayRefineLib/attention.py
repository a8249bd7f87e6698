"""Breakage attention (DeepTree stage 2, METHODS.md section 2) and the blobs it forms.

DeepTree (section 2.2, eq. 2): label the connected components Y_k of the stage-1 mask, let
D_k be the Euclidean distance (mm) to Y_k and, at each voxel, H the distance to the
*second*-nearest component; the attention is ``sigmoid(alpha - H)`` with alpha = 5 mm.  It
is high where two components come close, i.e. at the breaks of a disconnected branch, and
forms a ball-like blob there.

Computation.  One full-volume distance transform per component would cost hundreds of
transforms.  Instead, H is truncated at ``cutoff_mm`` (alpha + 10 mm by default, METHODS.md
section 2): each component's distance is computed only in its bounding box grown by the
cutoff, and a running minimum and second minimum (float32) are kept over those boxes.  A voxel
outside a component's grown box is farther than the cutoff from it, so the truncated result is
exactly ``min(H, cutoff)``.  Where fewer than two components lie within the cutoff (H >=
cutoff) the attention is set to **exactly 0** instead of ``sigmoid(alpha - cutoff)``
(~4.5e-5 for the defaults): the map is then zero far from any break, consistent with the
one-component case, and differs from the untruncated map by at most
``sigmoid(alpha - cutoff)`` everywhere.

Speed (``benchmarks/bench_attention.py``, 2 CPU cores): a 512 x 512 x 400 mask at 0.8 x 0.7 x
0.7 mm (z, y, x) with 300 components (a 511-branch tree with every leaf cut, plus stray fragments) takes
~3.2-3.6 s and 1552 MiB peak RSS, the mask and the float32 result included.  The cost is one
distance transform of the mask's grown bounding box (the main tree, ~1.7 s) plus one of each
small component's grown box (~1 s for 299 of them); the float32 work arrays live on that box.

Examples
--------
>>> attention = breakage_attention(stage1_zyx, spacing_zyx=(0.8, 0.7, 0.7))  # doctest: +SKIP
>>> blobs = find_attention_blobs(attention)                                   # doctest: +SKIP
>>> patch_centres_zyx = [blob.centre_zyx for blob in blobs]                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import edt
import numpy as np
from scipy.special import expit

from AirwaySegmentationLib.arrays import as_airway_mask, as_spacing_zyx, bounding_box, check_connectivity, grow_box
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.progress import ProgressCallback, report

#: DeepTree's alpha: attention is 0.5 where the second-nearest component is this far (mm).
DEFAULT_ALPHA_MM = 5.0
#: Beyond alpha + this margin the attention is below sigmoid(-10) ~ 4.5e-5 (METHODS.md section 2).
CUTOFF_MARGIN_MM = 10.0


@dataclass(frozen=True)
class AttentionBlob:
    """One blob of high breakage attention, where the connection network crops its patch.

    Attributes
    ----------
    centre_zyx : tuple of 3 int
        Voxel index of the attention-weighted centroid, rounded (z, y, x).
    size_voxels : int
        Number of voxels above the threshold.
    peak : float
        Highest attention in the blob.
    label : int
        Its number in ``cc3d.connected_components(attention > threshold, connectivity)``
        (:func:`blob_labels`), to find its voxels.
    """

    centre_zyx: tuple[int, int, int]
    size_voxels: int
    peak: float
    label: int = 0


def second_nearest_component_distance(
    mask_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    cutoff_mm: float,
    connectivity: int = 26,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Distance (mm) from every voxel to its second-nearest connected component, truncated.

    This is DeepTree's raw attention H (eq. 2): with ``k_min`` the nearest component,
    ``H = min over k != k_min of D_k``.  See the module docstring for the truncation.

    Parameters
    ----------
    mask_zyx : numpy.ndarray
        Binary stage-1 result, shape (Z, Y, X); any nonzero voxel is airway.
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    cutoff_mm : float
        Distances are computed up to this value; ``min(H, cutoff_mm)`` is returned.
    connectivity : int
        Connectivity of the components: 6, 18 or 26.
    progress : callable, optional
        ``progress(fraction, message)``, called once per component.

    Returns
    -------
    numpy.ndarray
        float32, shape (Z, Y, X): ``min(H, cutoff_mm)``; ``cutoff_mm`` everywhere when the
        mask has fewer than two components.

    Raises
    ------
    AirwayInputError
        The mask is not 3-D, the spacing is not three positive sizes, the cutoff is not
        positive or the connectivity is not 6, 18 or 26.
    """
    mask = as_airway_mask(mask_zyx)
    distance = np.full(mask.shape, cutoff_mm, dtype=np.float32)
    region, _, second = _nearest_two_in_region(mask, spacing_zyx, cutoff_mm, connectivity, progress)
    if region is not None:
        distance[region] = second
    return distance


def breakage_attention(
    mask_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    alpha_mm: float = DEFAULT_ALPHA_MM,
    connectivity: int = 26,
    cutoff_mm: float | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """DeepTree breakage attention ``sigmoid(alpha - H)`` of a binary stage-1 result.

    Parameters
    ----------
    mask_zyx : numpy.ndarray
        Binary stage-1 result, shape (Z, Y, X); any nonzero voxel is airway.
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    alpha_mm : float
        Attention range: the attention is 0.5 where the second-nearest component is
        ``alpha_mm`` away (DeepTree: 5).
    connectivity : int
        Connectivity of the components: 6, 18 or 26.
    cutoff_mm : float, optional
        Truncation radius; default ``alpha_mm + 10``.  The attention is exactly 0 where the
        second-nearest component is farther (module docstring).
    progress : callable, optional
        ``progress(fraction, message)``, called once per component.

    Returns
    -------
    numpy.ndarray
        float32, shape (Z, Y, X), values in [0, 1); all zero for fewer than two components.

    Raises
    ------
    AirwayInputError
        Bad mask, spacing, alpha, cutoff or connectivity.

    Examples
    --------
    >>> mask = np.zeros((1, 1, 12), dtype=bool)
    >>> mask[0, 0, :4] = mask[0, 0, 8:] = True          # two pieces, a 3 mm gap at 1 mm spacing
    >>> attention = breakage_attention(mask, (1.0, 1.0, 1.0))
    >>> round(float(attention[0, 0, 5]), 3)             # H = 3 mm at the gap's voxel 5
    0.881
    """
    mask = as_airway_mask(mask_zyx)
    if not np.isfinite(alpha_mm):
        raise AirwayInputError(f"Attention range alpha {alpha_mm} mm is not a finite number; use e.g. 5.")
    cutoff = alpha_mm + CUTOFF_MARGIN_MM if cutoff_mm is None else cutoff_mm
    attention = np.zeros(mask.shape, dtype=np.float32)
    region, _, second = _nearest_two_in_region(mask, spacing_zyx, cutoff, connectivity, progress)
    if region is None:
        return attention
    far = second >= cutoff
    # DeepTree section 2.2: H-bar = sigmoid(alpha - H), in place to spare a region-sized copy.
    np.subtract(np.float32(alpha_mm), second, out=second)
    expit(second, out=second)
    second[far] = 0.0
    attention[region] = second
    return attention


def find_attention_blobs(
    attention_zyx: np.ndarray,
    threshold: float = 0.5,
    connectivity: int = 26,
    min_voxels: int = 1,
    labels: tuple[np.ndarray, int] | None = None,
) -> list[AttentionBlob]:
    """Blobs of ``attention > threshold`` and their attention-weighted centres.

    Each 26-connected (by default) component of ``attention > threshold`` is one blob; its
    centre is the attention-weighted centroid, rounded to the nearest voxel.  At 0.5 (the
    default) a blob is where the second-nearest component is closer than alpha.  Breaks less
    than about 2 alpha apart share a blob (a 64^3 patch at its centre holds both); the centroid
    of a strongly curved blob may fall just outside it.

    Parameters
    ----------
    attention_zyx : numpy.ndarray
        Attention map, shape (Z, Y, X), e.g. from :func:`breakage_attention`.
    threshold : float
        Voxels with attention strictly above it form the blobs.
    connectivity : int
        Connectivity of the blobs: 6, 18 or 26.
    min_voxels : int
        Smaller blobs are left out.
    labels : (numpy.ndarray, int), optional
        :func:`blob_labels` of the same map, threshold and connectivity, when the caller has
        them already (they are computed here otherwise).

    Returns
    -------
    list of AttentionBlob
        Sorted by peak attention, highest first (ties: larger first).
    """
    attention = np.asarray(attention_zyx)
    if attention.ndim != 3:
        raise AirwayInputError(
            f"Expected a 3-D attention map but got an array with {attention.ndim} dimensions; give one 3-D volume."
        )
    labels, count = blob_labels(attention, threshold, connectivity) if labels is None else labels
    if count == 0:
        return []
    flat = labels.ravel()
    inside = np.flatnonzero(flat)
    blob = flat[inside].astype(np.int64)
    weight = attention.ravel()[inside].astype(np.float64)
    total = np.bincount(blob, weights=weight, minlength=count + 1)
    index_zyx = np.unravel_index(inside, attention.shape)
    centres = np.stack(
        [np.bincount(blob, weights=weight * axis, minlength=count + 1) / np.maximum(total, 1e-30) for axis in index_zyx],
        axis=1,
    )
    sizes = np.bincount(blob, minlength=count + 1)
    peaks = np.zeros(count + 1)
    np.maximum.at(peaks, blob, weight)
    blobs = [
        AttentionBlob(tuple(int(v) for v in np.rint(centres[k])), int(sizes[k]), float(peaks[k]), k)
        for k in range(1, count + 1)
        if sizes[k] >= min_voxels
    ]
    return sorted(blobs, key=lambda b: (-b.peak, -b.size_voxels))


def blob_labels(attention_zyx: np.ndarray, threshold: float = 0.5, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """The blobs of ``attention > threshold`` as a label volume (``AttentionBlob.label``) and their count."""
    check_connectivity(connectivity)
    labels, count = cc3d.connected_components(np.asarray(attention_zyx) > threshold, connectivity=connectivity, return_N=True)
    return labels, int(count)


def _nearest_two_in_region(
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    cutoff_mm: float,
    connectivity: int = 26,
    progress: ProgressCallback | None = None,
) -> tuple[tuple[slice, ...] | None, np.ndarray | None, np.ndarray | None]:
    """Nearest and second-nearest component distances (float32, truncated at the cutoff).

    Returns ``(region, nearest, second)``: the mask's bounding box grown by the cutoff (as
    slices) and, on that region, ``min(D_kmin, cutoff)`` and ``min(H, cutoff)``; outside it
    every voxel is farther than the cutoff from all components.  ``(None, None, None)`` for
    fewer than two components.  ``mask`` is bool, shape (Z, Y, X).
    """
    spacing = as_spacing_zyx(spacing_zyx)
    if not (np.isfinite(cutoff_mm) and cutoff_mm > 0):
        raise AirwayInputError(f"Attention cutoff {cutoff_mm} mm is not usable; expected a positive distance.")
    check_connectivity(connectivity)
    # A voxel more than ceil(cutoff / spacing) voxels from a box along one axis is farther
    # than the cutoff from everything in the box.
    reach = np.ceil(cutoff_mm / np.asarray(spacing)).astype(int)
    region = bounding_box(mask, pad=reach)
    if region is None:
        return None, None, None
    labels, count = cc3d.connected_components(mask[region], connectivity=connectivity, return_N=True)
    if count < 2:
        report(progress, 1.0, "Breakage attention: fewer than two components")
        return None, None, None
    boxes = cc3d.statistics(labels)["bounding_boxes"]
    nearest = np.full(labels.shape, cutoff_mm, dtype=np.float32)
    second = np.full(labels.shape, cutoff_mm, dtype=np.float32)
    for k in range(1, count + 1):
        report(progress, (k - 1) / count, f"Breakage attention: component {k} of {count}")
        box = grow_box(boxes[k], reach, labels.shape)
        # D_k inside its grown box: the whole component lies in the box, and edt's default
        # (no black border) ignores the crop's edges, so the distances are exact there.
        distance = edt.edt(labels[box] != k, anisotropy=spacing, black_border=False, parallel=1)
        near, far = nearest[box], second[box]
        closer = np.minimum(near, distance)
        # Running second minimum: the larger of (old nearest, D_k) competes for second place.
        np.minimum(far, np.maximum(near, distance, out=distance), out=far)
        near[...] = closer
    report(progress, 1.0, "Breakage attention: done")
    return region, nearest, second


