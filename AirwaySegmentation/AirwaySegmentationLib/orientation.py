"""Canonical storage order: the index axes i, j, k of a volume along L, P and S.

A CT may be stored with its axes reversed or permuted: a NIfTI file written in RAS order reads
in ITK with x and y reversed, a coronal or sagittal acquisition has its axes permuted.  The
physical image is the same, but a convolutional network is not invariant to the storage
order (the bundled ones were trained on phantoms stored with the identity direction and flipped
left-right only), and neither is topological thinning.  So a network sees every volume in the
canonical order and its results are mapped back to the order of the input.

Bringing a volume to that order permutes and reverses array axes only, with no resampling:
each index axis goes to the LPS axis its direction is closest to, and an oblique direction
stays oblique (what nibabel's ``as_closest_canonical`` does for RAS, which TotalSegmentator
uses before its networks).  Outputs keep the input's grid: nothing is interpolated either way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .volume import Geometry, Volume


@dataclass(frozen=True)
class Reorientation:
    """The axis permutation and reversals between a stored volume and its canonical order.

    Attributes
    ----------
    axes_zyx : tuple of 3 int
        Canonical array axis ``c`` (z, y, x order) is stored axis ``axes_zyx[c]``.
    flips_zyx : tuple of 3 bool
        Canonical array axis ``c`` runs against its stored axis.
    """

    axes_zyx: tuple[int, int, int] = (0, 1, 2)
    flips_zyx: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def of(cls, geometry: Geometry) -> "Reorientation":
        """The reorientation that brings a volume of ``geometry`` to the canonical order.

        Each index axis is given the LPS axis its direction is closest to; the pairing of
        index and physical axes is the permutation with the largest sum of direction cosines,
        so that a direction near 45 degrees still maps every axis once.
        """
        direction = geometry.direction_matrix  # columns: physical directions of the i, j, k axes
        physical_of = max(itertools.permutations(range(3)),
                          key=lambda axes: sum(abs(direction[p, a]) for a, p in enumerate(axes)))
        index_of = {p: a for a, p in enumerate(physical_of)}  # stored xyz index axis of physical axis p
        axes, flips = [], []
        for c in range(3):  # canonical zyx axis c is physical axis 2 - c (z: S, y: P, x: L)
            a = index_of[2 - c]
            axes.append(2 - a)
            flips.append(bool(direction[2 - c, a] < 0))
        return cls(tuple(axes), tuple(flips))

    @property
    def is_identity(self) -> bool:
        """The volume is stored in the canonical order already."""
        return self.axes_zyx == (0, 1, 2) and not any(self.flips_zyx)

    def to_canonical(self, array_zyx: np.ndarray) -> np.ndarray:
        """``array_zyx`` (stored order) in the canonical order: a view, not a copy."""
        array = np.transpose(array_zyx, self.axes_zyx)
        return array[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips_zyx)]

    def from_canonical(self, array_zyx: np.ndarray) -> np.ndarray:
        """``array_zyx`` (canonical order) back in the stored order: a view, not a copy."""
        array = array_zyx[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips_zyx)]
        return np.transpose(array, np.argsort(self.axes_zyx))

    def geometry(self, geometry: Geometry, shape_zyx: tuple[int, ...]) -> Geometry:
        """The geometry of the canonical array of a stored volume of ``geometry`` and ``shape_zyx``:
        every canonical voxel keeps its physical position."""
        stored_direction = geometry.direction_matrix
        spacing_zyx = np.asarray(geometry.spacing_zyx)[list(self.axes_zyx)]
        corner_zyx = np.zeros(3)  # stored index of canonical voxel (0, 0, 0)
        columns = []
        for c in (2, 1, 0):  # canonical x, y, z: the columns of the direction matrix
            stored = self.axes_zyx[c]
            sign = -1.0 if self.flips_zyx[c] else 1.0
            if self.flips_zyx[c]:
                corner_zyx[stored] = shape_zyx[stored] - 1
            columns.append(sign * stored_direction[:, 2 - stored])
        origin = geometry.index_zyx_to_physical(corner_zyx)
        return Geometry(tuple(spacing_zyx[::-1]), tuple(origin), tuple(np.column_stack(columns).ravel()))


def canonical(volume: Volume) -> tuple[Volume, Reorientation]:
    """``volume`` in the canonical order (a view of its array, same physical placement) and the
    :class:`Reorientation` that maps results back."""
    reorientation = Reorientation.of(volume.geometry)
    if reorientation.is_identity:
        return volume, reorientation
    return (Volume(reorientation.to_canonical(volume.array_zyx),
                   reorientation.geometry(volume.geometry, volume.array_zyx.shape)), reorientation)
