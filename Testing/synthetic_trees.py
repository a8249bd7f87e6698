"""Synthetic airway trees made of capsules, with known geometry, for tests.

A capsule is the set of points within ``radius_mm`` of the segment ``p0_mm``-``p1_mm``: a
cylinder with hemispherical caps.  Chains of capsules that share end points make a tree whose
centreline lengths, radii, generations and parents are known exactly.

Coordinates are in mm, in z, y, x order, with voxel ``(k, j, i)`` centred at
``(k, j, i) * spacing_zyx`` (origin 0, identity direction), matching ``Volume`` arrays.

Examples
--------
>>> segments = binary_tree(generations=3)              # trachea + 2 + 4 = 7 branches
>>> shape, segments = place(segments, (1.0, 1.0, 1.0))
>>> mask = capsule_mask(shape, (1.0, 1.0, 1.0), segments)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

PointMM = tuple[float, float, float]


class TreeSegment(NamedTuple):
    """One branch of a synthetic tree: a capsule from ``p0_mm`` to ``p1_mm`` (z, y, x, mm).

    ``p0_mm`` is the parent end (the bifurcation with the parent, or the top of the trachea),
    ``p1_mm`` the distal end; ``parent`` is an index into the segment list (``None`` for the
    trachea) and ``generation`` is 0 for the trachea.
    """

    p0_mm: PointMM
    p1_mm: PointMM
    radius_mm: float
    parent: int | None = None
    generation: int = 0

    @property
    def length_mm(self) -> float:
        """Centreline length, from the parent end to the distal end."""
        return float(np.linalg.norm(np.subtract(self.p1_mm, self.p0_mm)))


def capsule_mask(
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    segments: Sequence[Sequence],
) -> np.ndarray:
    """Rasterise capsules: voxels whose centre lies within a segment's radius of its axis.

    Parameters
    ----------
    shape_zyx : sequence of 3 int
        Shape (Z, Y, X) of the output.
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    segments : sequence
        Items whose first three entries are ``p0_mm``, ``p1_mm`` (z, y, x, mm) and
        ``radius_mm`` (plain tuples or :class:`TreeSegment`).

    Returns
    -------
    numpy.ndarray
        bool, shape ``shape_zyx``.
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    mask = np.zeros(tuple(shape_zyx), dtype=bool)
    for p0, p1, radius, *_ in segments:
        p0, p1 = np.asarray(p0, dtype=float), np.asarray(p1, dtype=float)
        # Only the capsule's bounding box needs testing.
        low = np.maximum(np.floor((np.minimum(p0, p1) - radius) / spacing).astype(int), 0)
        high = np.minimum(np.ceil((np.maximum(p0, p1) + radius) / spacing).astype(int) + 1, mask.shape)
        if np.any(high <= low):
            continue
        grid = np.meshgrid(*(np.arange(a, b) * s for a, b, s in zip(low, high, spacing)), indexing="ij")
        points = np.stack(grid, axis=-1) - p0
        axis = p1 - p0
        squared_length = float(axis @ axis)
        t = np.clip(points @ axis / squared_length, 0.0, 1.0) if squared_length > 0 else 0.0
        offset = points - np.multiply.outer(t, axis)
        inside = np.einsum("...i,...i->...", offset, offset) <= radius**2
        mask[tuple(slice(a, b) for a, b in zip(low, high))] |= inside
    return mask


def binary_tree(
    generations: int = 3,
    trachea_length_mm: float = 40.0,
    trachea_radius_mm: float = 8.0,
    length_ratio: float = 0.8,
    radius_ratio: float = 0.79,
    branch_angle_deg: float = 35.0,
) -> list[TreeSegment]:
    """A symmetric dichotomous tree: the trachea along +z, each branch splitting in two.

    Parameters
    ----------
    generations : int
        Number of generations, trachea included: 3 gives 1 + 2 + 4 = 7 branches.
    trachea_length_mm, trachea_radius_mm : float
        Size of generation 0.
    length_ratio, radius_ratio : float
        Child / parent length and radius (0.79 ~ Murray's law, 2 ** (-1/3)).
    branch_angle_deg : float
        Angle between a child and its parent's direction; the branching plane turns by
        90 degrees at every generation so that sub-trees do not collide.

    Returns
    -------
    list of TreeSegment
        Parents before children (breadth-first); the trachea starts at the origin.
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    trachea = TreeSegment((0.0, 0.0, 0.0), (trachea_length_mm, 0.0, 0.0), trachea_radius_mm, None, 0)
    segments = [trachea]
    # (segment index, unit direction, unit normal of the previous branching plane)
    frontier = [(0, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))]
    angle = np.deg2rad(branch_angle_deg)
    for generation in range(1, generations):
        next_frontier = []
        for index, direction, normal in frontier:
            parent = segments[index]
            # Split in the plane spanned by the direction and the previous plane's normal.
            side = normal - (normal @ direction) * direction
            side /= np.linalg.norm(side)
            new_normal = np.cross(direction, side)
            length = parent.length_mm * length_ratio
            for sign in (1.0, -1.0):
                child_direction = np.cos(angle) * direction + sign * np.sin(angle) * side
                p1 = np.asarray(parent.p1_mm) + length * child_direction
                segments.append(
                    TreeSegment(parent.p1_mm, tuple(p1.tolist()), parent.radius_mm * radius_ratio, index, generation)
                )
                next_frontier.append((len(segments) - 1, child_direction, new_normal))
        frontier = next_frontier
    return segments


def place(
    segments: Sequence[TreeSegment],
    spacing_zyx: Sequence[float],
    margin_mm: float = 3.0,
) -> tuple[tuple[int, int, int], list[TreeSegment]]:
    """Translate segments into positive coordinates and return a grid shape that holds them.

    Parameters
    ----------
    segments : sequence of TreeSegment
        Segments anywhere in space.
    spacing_zyx : sequence of 3 float
        Voxel size in mm of the grid to rasterise on.
    margin_mm : float
        Free space kept around every capsule.

    Returns
    -------
    shape_zyx : tuple of 3 int
        Grid shape.
    segments : list of TreeSegment
        The same segments, translated.
    """
    ends = np.array([[*s.p0_mm, *s.p1_mm] for s in segments]).reshape(-1, 3)
    radii = np.repeat([s.radius_mm for s in segments], 2)[:, None]
    low = (ends - radii).min(axis=0) - margin_mm
    high = (ends + radii).max(axis=0) + margin_mm
    shape = tuple(int(v) for v in np.ceil((high - low) / np.asarray(spacing_zyx)) + 1)
    moved = [
        s._replace(
            p0_mm=tuple((np.asarray(s.p0_mm) - low).tolist()),
            p1_mm=tuple((np.asarray(s.p1_mm) - low).tolist()),
        )
        for s in segments
    ]
    return shape, moved
