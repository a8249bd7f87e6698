"""Synthetic chest CT with an exact airway ground truth.

The phantom is built from analytic geometry and then imaged like a CT scanner would:

1. **Anatomy** (mm, LPS, volume centred on the origin; x = patient left, y = posterior,
   z = superior).  A body outline with subcutaneous fat, a muscle layer, the rib cage
   (ribs and sternum), the spine (vertebral bodies, discs, posterior arches, spinal
   canal), the mediastinum, the heart with epicardial fat, the aorta and the superior vena
   cava, the oesophagus (with some swallowed air), the liver under the diaphragm, two lungs
   with a parenchymal texture, and the patient table.  Drawn from a random stream of their
   own (so the chest's layout does not depend on them): the lungs' density (-905 to -850
   HU) and its front-to-back gradient (25-70 HU), centrilobular emphysema in about half of
   the phantoms, a gown or blanket of 0-3 folded sheets outside the skin, and the
   trachea's own calibre (below; every branch keeps its clearance from the trachea too,
   so the tree of a seed changed with it).  The anatomy is scaled to the field
   of view (an adult chest at about 400 mm in plane), so a small grid holds a small chest
   rather than a cut-off one; airway calibres (and the main bronchi's lengths) scale with
   the square root of that factor (a child's airways are relatively wide), which keeps 10
   resolvable generations at 256^3 / 0.8 mm (larger or smaller powers give fewer: wider
   airways need longer branches and run out of room sooner).  The trachea alone is drawn
   1-1.8 times wider than that (at most 22 mm), leaning forwards at its top: a real
   trachea's lumen is the widest air in the chest, and its calibre sets nothing below it.
2. **Airway tree.**  Trachea, carina and asymmetric main bronchi (the right one shorter,
   steeper and wider), then a space-filling tree grown after Kitaoka et al. (J Appl
   Physiol 1999): the territory of each branch (points on a lattice inside its lung) is
   cut by a plane through its centroid that contains the branch axis and is parallel to
   the parent's branching plane, so branching planes turn by 90 degrees each generation;
   the flow (volume) ratio r sets the child diameters, d = D r^(1/n) with n = 2.8, and
   the branching angles (Kitaoka's eq. from minimum power), capped at 80 degrees; each
   child is 3 diameters long.  Where the lung's edge or another branch leaves no room for
   both daughters the plane is turned (45 or 90 degrees) before the branch is declared
   terminal.  Walls are 17% of the lumen diameter thick.
3. **Resolvability.**  The ground truth holds only airways that a CT of this voxel size
   shows and that a tree parser can take apart, as real references do: ATM'22 and
   EXACT'09 are annotated down to lumina of about 1-2 mm, because smaller airways are not
   visible.  Calibrated with :func:`~AirwaySegmentationLib.tree.parse_airway_tree` (ATM'22
   semantics) on the phantom's own mask at 256^3 / 0.8 mm, growth obeys three limits:

   - no child thinner than 1.5 in-plane voxels (1.2 mm at 0.8 mm); thinner lumina are
     left out entirely, so the periphery shows no sub-resolution airway texture either;
   - no child shorter than 10 voxels of the coarsest axis (8 mm at 0.8 mm) plus the radii
     of its parent and itself: thinning merges the skeleton over about a radius around each
     junction and the parser drops skeleton pieces under 5 voxels, so a shorter branch
     would vanish into its neighbours.  Children are made 3 diameters long as in Kitaoka's
     model, but never shorter than this, so the thinnest ones are relatively long; one that
     does not fit at this length is not created;
   - clearance: the lumen plus wall of a new branch keeps at least 1.5 voxels of the
     coarsest axis from every branch except its parent and its sibling (tested on its
     axis sampled every half voxel, against a k-d tree of the axes placed so far).  A
     child's first parent radius lies in the parent's lumen and is not tested.  A child
     turned back by more than 80 degrees from its parent's axis folds onto its own family,
     so its heading is limited to 80 degrees.

   With these limits the parse of ``airway`` recovers most of tree.json: at 256^3 / 0.8 mm
   (seeds 0-3) tree.json holds 10-11 generations and 170-190 end branches, the parse
   10-11 generations and 153-172 end branches, 73-90% of tree.json's branch count, the
   same with 6- and 26-connectivity, and class Dice between the parse and ``airway3`` of
   >= 0.99 (class 1) and >= 0.76 (classes 2 and 3).  What the parse misses comes from a
   few deep junctions where a branch's region touches one two generations up; the parser
   then fuses parents up that lineage, which shifts the generations (and so the classes)
   below.  See ``benchmarks/phantom_realism.py``.  The limits count in voxels, so a
   coarser grid holds fewer generations (1.25 mm slices at 256^3: 68-102 parsed end
   branches, seeds 0-3).  The vessel trees are image content only: they may cross each
   other and the bronchi (the airway's lumen and wall are rendered over them) and grow
   down to about one voxel.
4. **Vessels.**  A pulmonary artery beside every bronchus (the classic distractor), a
   separate pulmonary vein tree grown into the same lungs from the left atrium, and a few
   solid nodules.
5. **Imaging.**  Every structure is rendered with an analytic partial-volume fraction
   (signed distance to its surface over one voxel), tubes only inside their bounding box;
   then a Gaussian point-spread function (kernel FWHM in plane, the slice profile along z)
   and correlated noise (white noise blurred by the kernel's correlation length and
   rescaled to the variant's SD) are applied, and the result is clipped to int16 HU.

Ground truth
------------
``airway`` is the exact lumen: a voxel is airway when its centre lies inside a lumen
(partial-volume fraction >= 0.5), plus the voxels the centrelines pass through (joined face
to face), so that a thin branch stays connected where its sampled lumen misses a voxel;
the tree is one 6-connected component.
``airway3`` gives every airway voxel the class of the branch whose centreline is nearest
to the voxel centre, whether or not the voxel lies in that branch's own lumen (so a
parent's rounded end past a junction goes to the child beside it); on a tie the lower
generation wins.  Classes never decrease down the tree, so classes 1 + 2 form one
connected tree.  Classes come from
:func:`~AirwaySegmentationLib.classes.branch_class` (generation, 2 x median radius, parent
class).  ``lungs`` is the analytic lung region (airways and vessels inside it included).

Slice spacing
-------------
Each variant names a slice spacing.  When ``spacing_zyx`` is left as ``None`` the grid is
(variant slice spacing, 0.8, 0.8) mm; an explicit ``spacing_zyx`` always wins, and the
variant then only sets the kernel and the noise.  The slice profile (FWHM = slice spacing)
is part of the z blur either way.

Examples
--------
>>> phantom = generate_phantom(seed=1, shape_zyx=(96, 96, 96), spacing_zyx=(2.0, 2.0, 2.0))  # doctest: +SKIP
>>> write_phantom(phantom, "out/phantom")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .classes import branch_class
from .errors import AirwayInputError
from .volume import Geometry, Volume, atomic_outputs, write_volume

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class PhantomVariant:
    """How the phantom is imaged: reconstruction kernel, dose and slices.

    Attributes
    ----------
    kernel_fwhm_mm : float
        Full width at half maximum of the in-plane Gaussian point-spread function.
    noise_sd_hu : float
        Standard deviation of the (correlated) noise field added to the image.
    noise_correlation_mm : float
        Gaussian sigma used to correlate the white noise; sharp kernels give finer grain.
    slice_spacing_mm : float
        Slice spacing (and slice thickness) used when the caller gives no spacing.
    description : str
        One line for help texts.
    """

    kernel_fwhm_mm: float
    noise_sd_hu: float
    noise_correlation_mm: float
    slice_spacing_mm: float
    description: str


# The "standard" noise SD is calibrated so that the median 7x7x3 local SD in soft tissue
# matches LIDC-IDRI-0314 (kernel D, 1 mm) measured by the same code in
# benchmarks/phantom_realism.py (27.3 HU there; the other variants scale from it).
PHANTOM_VARIANTS: dict[str, PhantomVariant] = {
    "standard": PhantomVariant(0.9, 28.0, 0.40, 0.8, "medium kernel, routine dose, 0.8 mm slices"),
    "sharp": PhantomVariant(0.6, 55.0, 0.30, 0.8, "sharp (lung) kernel: crisper edges, more and finer noise"),
    "smooth": PhantomVariant(1.2, 22.0, 0.60, 0.8, "smooth (soft-tissue) kernel: blurred edges, less and coarser noise"),
    "low-dose": PhantomVariant(0.9, 75.0, 0.40, 0.8, "medium kernel at about a quarter of the dose"),
    "thin-slice": PhantomVariant(0.9, 45.0, 0.40, 0.5, "0.5 mm slices: sharper along z, noisier"),
    "thick-slice": PhantomVariant(1.0, 28.0, 0.45, 1.25, "1.25 mm slices: blurred along z, less noise"),
}

# Attenuation of the tissues (HU).  Fat and soft tissue follow the histogram peaks of
# LIDC-IDRI-0314 (-88 and +52); lung parenchyma is set so that, with the vessels, its
# median lands near the real scan's -854.
_AIR_HU = -1000.0
_FAT_HU = -90.0
_MUSCLE_HU = 50.0
_BLOOD_HU = 40.0
_LIVER_HU = 58.0
_AIRWAY_WALL_HU = 30.0
_LUNG_HU = -860.0
_CORTICAL_BONE_HU = 750.0
_CANCELLOUS_BONE_HU = 230.0
_DISC_HU = 85.0
_CSF_HU = 15.0
_NODULE_HU = 35.0
_TABLE_HU = 250.0
_HU_MIN, _HU_MAX = -1024.0, 3071.0

# Kitaoka 1999: flow ~ d^n with n = 2.8; a branch is 3 diameters long.
_FLOW_EXPONENT = 2.8
_LENGTH_PER_DIAMETER = 3.0
_WALL_PER_DIAMETER = 0.17
# Relative narrowing of a lumen from its start to its end.
_TAPER = 0.08
_MAX_GENERATION = 28
_ADULT_TRACHEA_MM = 17.0
# A child turning back towards its parent's start folds onto its own family; real
# branching angles stay well under 90 degrees.
_MIN_BRANCHING_COSINE = math.cos(math.radians(80.0))
# Airway calibres scale with this power of the chest's scale factor (see the module docstring).
_CALIBRE_EXPONENT = 0.5
# Resolvability of the airway ground truth (see the module docstring): thinnest lumen in
# in-plane voxels, shortest branch and surface-to-surface gap between unrelated branches
# in voxels of the coarsest axis.
_RESOLVABLE_DIAMETER_VOXELS = 1.5
_RESOLVABLE_LENGTH_VOXELS = 10.0
_CLEARANCE_VOXELS = 1.5
_TERRITORY_POINTS = 120_000
_MIN_SHAPE = 48
_MAX_SHAPE = 1024


@dataclass
class PhantomBranch:
    """One airway branch of the phantom.

    Attributes
    ----------
    id : int
        Index of the branch in :attr:`Phantom.branches`.
    parent : int or None
        ``id`` of the parent branch, ``None`` for the trachea.
    generation : int
        0 for the trachea, 1 for the main bronchi.
    airway_class : int
        1, 2 or 3 from :func:`~AirwaySegmentationLib.classes.branch_class`.
    points_xyz_mm : numpy.ndarray
        (N, 3) centreline points, physical LPS mm, from the branch start to its end.
    radius_mm : numpy.ndarray
        (N,) lumen radius at each point.
    """

    id: int
    parent: int | None
    generation: int
    airway_class: int
    points_xyz_mm: np.ndarray
    radius_mm: np.ndarray

    @property
    def length_mm(self) -> float:
        """Centreline length."""
        return float(np.linalg.norm(np.diff(self.points_xyz_mm, axis=0), axis=1).sum())

    @property
    def median_diameter_mm(self) -> float:
        """Twice the median lumen radius."""
        return float(2.0 * np.median(self.radius_mm))


@dataclass
class Phantom:
    """A synthetic chest CT and its exact labels, all on one grid.

    Attributes
    ----------
    ct : Volume
        int16 Hounsfield units.
    airway : Volume
        uint8, 1 = airway lumen.
    airway3 : Volume
        uint8, 0 = background, 1..3 = airway class.
    lungs : Volume
        uint8, 1 = lung.
    branches : list of PhantomBranch
        The airway tree, parents before children.
    seed : int
        Seed of the random generator.
    variant : str
        Key of :data:`PHANTOM_VARIANTS`.
    """

    ct: Volume
    airway: Volume
    airway3: Volume
    lungs: Volume
    branches: list[PhantomBranch]
    seed: int
    variant: str


# ----------------------------------------------------------------------------- grid helpers


@dataclass(frozen=True)
class _Grid:
    """Voxel grid with identity direction: index (k, j, i) sits at origin + index * spacing."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: np.ndarray
    origin_zyx: np.ndarray

    @property
    def edge_mm(self) -> float:
        """Width of the partial-volume ramp: the mean voxel edge."""
        return float(np.mean(self.spacing_zyx))

    def axis_mm(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.shape_zyx[axis] if stop is None else stop
        return (self.origin_zyx[axis] + self.spacing_zyx[axis] * np.arange(start, stop)).astype(np.float32)

    def box(self, low_xyz: np.ndarray, high_xyz: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices covering the physical box, clipped to the grid; None when empty."""
        low = np.floor((np.asarray(low_xyz)[::-1] - self.origin_zyx) / self.spacing_zyx).astype(int)
        high = np.ceil((np.asarray(high_xyz)[::-1] - self.origin_zyx) / self.spacing_zyx).astype(int) + 1
        low = np.maximum(low, 0)
        high = np.minimum(high, self.shape_zyx)
        if np.any(high <= low):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(low, high))  # type: ignore[return-value]

    def coordinates(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x, y, z coordinate arrays (mm) of the voxel centres in ``box``."""
        z = self.axis_mm(0, box[0].start, box[0].stop)[:, None, None]
        y = self.axis_mm(1, box[1].start, box[1].stop)[None, :, None]
        x = self.axis_mm(2, box[2].start, box[2].stop)[None, None, :]
        return x, y, z

    def to_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """Nearest voxel index (..., 3) in z, y, x order for physical points."""
        return np.rint((np.asarray(points_xyz)[..., ::-1] - self.origin_zyx) / self.spacing_zyx).astype(int)


def _fraction(signed_distance: np.ndarray, edge_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is ``signed_distance`` mm inside (<0) a surface."""
    return np.clip(0.5 - signed_distance / edge_mm, 0.0, 1.0)


def _blend(target: np.ndarray, value: float | np.ndarray, fraction: np.ndarray) -> None:
    """Replace ``fraction`` of each voxel's content with a material of attenuation ``value`` (in place)."""
    target += (value - target) * fraction


def _ellipse_sd(dx, dy, a, b):
    """Approximate signed distance to an axis-aligned ellipse (exact on the axes, fine for PV ramps)."""
    return (np.sqrt((dx / a) ** 2 + (dy / b) ** 2) - 1.0) * np.minimum(a, b)


def _tube_distance(grid: _Grid, start_xyz, end_xyz, radius_start, radius_end, pad_mm):
    """Distance of voxel centres to a segment's axis, and the tube radius at the nearest axis point.

    Only the segment's bounding box (grown by the largest radius + ``pad_mm``) is evaluated.

    Returns
    -------
    tuple or None
        (box, distance_mm, radius_mm) with float32 arrays of the box's shape; None when the
        box misses the grid.
    """
    start_xyz = np.asarray(start_xyz, dtype=float)
    end_xyz = np.asarray(end_xyz, dtype=float)
    reach = max(radius_start, radius_end) + pad_mm
    box = grid.box(np.minimum(start_xyz, end_xyz) - reach, np.maximum(start_xyz, end_xyz) + reach)
    if box is None:
        return None
    x, y, z = grid.coordinates(box)
    axis = end_xyz - start_xyz
    length_sq = float(axis @ axis)
    dx, dy, dz = x - np.float32(start_xyz[0]), y - np.float32(start_xyz[1]), z - np.float32(start_xyz[2])
    if length_sq > 1e-12:
        t = (dx * np.float32(axis[0] / length_sq) + dy * np.float32(axis[1] / length_sq)) + dz * np.float32(
            axis[2] / length_sq
        )
        np.clip(t, 0.0, 1.0, out=t)
    else:
        t = np.zeros(np.broadcast_shapes(dx.shape, dy.shape, dz.shape), dtype=np.float32)
    distance = np.sqrt(
        (dx - t * np.float32(axis[0])) ** 2 + (dy - t * np.float32(axis[1])) ** 2 + (dz - t * np.float32(axis[2])) ** 2
    )
    radius = np.float32(radius_start) + t * np.float32(radius_end - radius_start)
    return box, distance, radius


def _blend_tube(hu: np.ndarray, grid: _Grid, start, end, radius_start, radius_end, value: float) -> None:
    found = _tube_distance(grid, start, end, radius_start, radius_end, grid.edge_mm)
    if found is not None:
        box, distance, radius = found
        _blend(hu[box], value, _fraction(distance - radius, grid.edge_mm))


def _blend_polyline(hu: np.ndarray, grid: _Grid, points_xyz: np.ndarray, radius: float, value: float) -> None:
    """Render a tube along a polyline; the max of the segment fractions avoids double blending at joints."""
    pieces = [_tube_distance(grid, a, b, radius, radius, grid.edge_mm) for a, b in zip(points_xyz[:-1], points_xyz[1:])]
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        return
    low = [min(p[0][axis].start for p in pieces) for axis in range(3)]
    high = [max(p[0][axis].stop for p in pieces) for axis in range(3)]
    union = tuple(slice(a, b) for a, b in zip(low, high))
    fraction = np.zeros([b - a for a, b in zip(low, high)], dtype=np.float32)
    for box, distance, radius_here in pieces:
        local = tuple(slice(s.start - u.start, s.stop - u.start) for s, u in zip(box, union))
        np.maximum(fraction[local], _fraction(distance - radius_here, grid.edge_mm), out=fraction[local])
    _blend(hu[union], value, fraction)


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Chest:
    """Analytic chest anatomy in mm (x left, y posterior, z superior), scaled to the field of view."""

    scale: float
    outline: tuple[tuple[float, float], ...]  # (amplitude, phase) of the body outline's harmonics 2, 3, ...
    body_a: float
    body_b: float
    body_y: float
    fat_mm: float
    cavity_a: float
    cavity_b: float
    cavity_y: float
    spine_y: float
    vertebra_r: float
    lung_base_z: float
    lung_height: float
    lung_cx: float
    lung_y: float
    lung_a: float
    lung_b: float
    medial_mm: float
    dome_height: float
    right_dome_lift: float
    heart_c: tuple[float, float, float]
    heart_r: tuple[float, float, float]
    aorta_x: float
    aorta_y: float
    arch_z: float
    carina_xyz: tuple[float, float, float]
    trachea_d: float
    trachea_lumen_d: float

    @staticmethod
    def layout(extent_xyz: np.ndarray, rng: np.random.Generator, habitus: np.random.Generator) -> "_Chest":
        # Reference adult chest (s = 1) is about 340 x 250 mm in plane; scale it to the field of view.
        s = float(min(1.0, extent_xyz[0] / 380.0, extent_xyz[1] / 300.0))

        def jitter() -> float:
            """Per-seed anatomical variation of +-5%."""
            return float(rng.uniform(0.95, 1.05))

        height = float(np.clip(0.72 * extent_xyz[2], 170.0 * s, 280.0 * s)) * jitter()
        height = min(height, 0.8 * extent_xyz[2])
        base = -0.5 * extent_xyz[2] + 0.45 * (extent_xyz[2] - height)
        cavity_y = 5.0 * s
        cavity_b = 86.0 * s * jitter()
        spine_y = cavity_y + cavity_b - 18.0 * s
        vertebra_r = 16.0 * s
        lung_a = 82.0 * s * jitter()
        carina_z = base + 0.64 * height
        return _Chest(
            scale=s,
            outline=tuple((float(rng.uniform(0.0, 0.025)), float(rng.uniform(0.0, 2.0 * np.pi))) for _ in range(4)),
            body_a=168.0 * s * jitter(),
            body_b=122.0 * s,
            body_y=4.0 * s,
            fat_mm=14.0 * s * jitter(),
            cavity_a=130.0 * s * jitter(),
            cavity_b=cavity_b,
            cavity_y=cavity_y,
            spine_y=spine_y,
            vertebra_r=vertebra_r,
            lung_base_z=base,
            lung_height=height,
            lung_cx=64.0 * s,
            lung_y=cavity_y + 12.0 * s,
            lung_a=lung_a,
            lung_b=105.0 * s,
            medial_mm=26.0 * s,
            dome_height=0.26 * height,
            right_dome_lift=0.04 * height,
            heart_c=(22.0 * s, cavity_y - 26.0 * s, base + 0.24 * height),
            heart_r=(68.0 * s * jitter(), 52.0 * s, 58.0 * s),
            aorta_x=18.0 * s,
            aorta_y=spine_y - 24.0 * s,
            arch_z=carina_z + 22.0 * s,
            carina_xyz=(0.0, spine_y - 42.0 * s, carina_z),
            # Airways shrink less than the body on a small grid (as in a child), which
            # keeps enough generations above the voxel size.
            trachea_d=(trachea_d := _ADULT_TRACHEA_MM * s**_CALIBRE_EXPONENT * jitter()),
            # The trachea itself keeps close to its adult calibre: a real scan shows a lumen of
            # 15-25 mm (LIDC-IDRI-0314: about 24 x 18 mm), wider than anything else in the
            # chest, and a network that never saw one leaves its centre out.
            trachea_lumen_d=min(trachea_d * float(habitus.uniform(1.0, 1.8)), 1.3 * _ADULT_TRACHEA_MM),
        )

    # Surfaces as approximate signed distances (negative inside); arguments broadcast.

    def body_sd(self, x, y):
        p = 2.6  # superellipse: a flatter back and sides than an ellipse
        a, b = self.body_a, self.body_b
        r = (np.abs(x / a) ** p + np.abs((y - self.body_y) / b) ** p) ** (1.0 / p)
        # A few low harmonics make the outline individual; the dip in front is the sternal groove.
        angle = np.arctan2(y - self.body_y, x)
        bulge = sum(amplitude * np.cos(k * angle + phase) for k, (amplitude, phase) in enumerate(self.outline, start=2))
        groove = 0.035 * np.exp(-((x / (30.0 * self.scale)) ** 2)) * (y < self.body_y)
        return (r / (1.0 + bulge - groove) - 1.0) * min(a, b)

    def muscle_sd(self, x, y):
        # Subcutaneous fat is thicker at the sides than in front.
        fat = self.fat_mm * (1.0 + 0.5 * np.abs(x) / self.body_a)
        return self.body_sd(x, y) + fat

    def cavity_sd(self, x, y, z):
        # The rib cage narrows towards the neck.
        t = (z - self.lung_base_z) / self.lung_height
        narrowing = 1.0 - 0.3 * np.clip(t - 0.3, 0.0, 1.0)
        return _ellipse_sd(x, y - self.cavity_y, self.cavity_a * narrowing, self.cavity_b * narrowing)

    def dome_z(self, x, y):
        """Height of the diaphragm under each lung (the right hemidiaphragm sits higher)."""
        right = x < 0
        cx = np.where(right, -self.lung_cx, self.lung_cx)
        q = ((x - cx) / (1.15 * self.lung_a)) ** 2 + ((y - self.lung_y) / (1.0 * self.lung_b)) ** 2
        lift = np.where(right, self.right_dome_lift, 0.0)
        return self.lung_base_z + (self.dome_height + lift) * np.clip(1.0 - q, 0.0, 1.0)

    def heart_sd(self, x, y, z):
        (cx, cy, cz), (ax, ay, az) = self.heart_c, self.heart_r
        q = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2
        return (np.sqrt(q) - 1.0) * min(ax, ay, az)

    def medial_mm_at(self, x, y, z):
        """Half-width of the mediastinum: wider around the spine, and on the left around the descending aorta."""
        s = self.scale
        # The lungs reach in towards the main bronchi at the hila.
        hilum = 14.0 * s * np.exp(-(((z - self.carina_xyz[2] + 18.0 * s) / (28.0 * s)) ** 2))
        width = self.medial_mm - hilum + 24.0 * s * np.exp(-(((y - self.spine_y) / (22.0 * s)) ** 2))
        aorta = 18.0 * s * np.exp(-(((y - self.aorta_y) / (16.0 * s)) ** 2)) * (z < self.arch_z)
        return width + np.where(x > 0, aorta, 0.0)

    def lung_sd(self, x, y, z) -> tuple[np.ndarray, np.ndarray]:
        """Signed distances to the right and the left lung."""
        t = (z - self.lung_base_z) / self.lung_height
        # The lungs narrow upwards and end in rounded apices (a paraboloid cap over each lung).
        apex = np.sqrt(np.clip(1.0 - (np.maximum(t - 0.45, 0.0) / 0.55) ** 2, 0.01, 1.0))
        shared = np.maximum(self.cavity_sd(x, y, z) + 2.0 * self.scale, self.dome_z(x, y) - z)
        shared = np.maximum(shared, 4.0 * self.scale - self.heart_sd(x, y, z))
        medial = self.medial_mm_at(x, y, z)
        result = []
        for side in (-1.0, 1.0):
            dx, dy = x - side * self.lung_cx, y - self.lung_y
            lobe = _ellipse_sd(dx, dy, self.lung_a * apex, self.lung_b * apex)
            cap = z - self.lung_base_z - self.lung_height * (1.0 - 0.35 * ((dx / self.lung_a) ** 2 + (dy / self.lung_b) ** 2))
            result.append(np.maximum(np.maximum(np.maximum(shared, lobe), cap), medial - side * x))
        return result[0], result[1]


def _render_anatomy(grid: _Grid, chest: _Chest, rng: np.random.Generator,
                    habitus: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background anatomy in HU (float32) and the lung mask, slab by slab to keep temporaries small."""
    hu = np.empty(grid.shape_zyx, dtype=np.float32)
    lungs = np.zeros(grid.shape_zyx, dtype=np.uint8)
    edge = grid.edge_mm
    s = chest.scale
    texture = _lung_texture(grid, rng)
    x = grid.axis_mm(2)[None, None, :]
    y = grid.axis_mm(1)[None, :, None]
    # In-plane layers that do not change along z are rendered once: table, fat, muscle, spine.
    wall = np.full((1, grid.shape_zyx[1], grid.shape_zyx[2]), _AIR_HU, dtype=np.float32)
    for plate_y in (chest.body_y + chest.body_b + 6.0 * s, chest.body_y + chest.body_b + 26.0 * s):
        # Patient table: two curved carbon-fibre plates under the back, open at the sides.
        plate = np.maximum(np.abs(y - plate_y + 4e-4 * x**2 / s) - 1.2 * s, np.abs(x) - 0.8 * chest.body_a)
        _blend(wall, _TABLE_HU, _fraction(plate, edge))
    _blend(wall, _FAT_HU, _fraction(chest.body_sd(x, y), edge))
    _blend(wall, _MUSCLE_HU, _fraction(chest.muscle_sd(x, y), edge))
    vertebra_sd = _ellipse_sd(x, y - chest.spine_y, chest.vertebra_r * 1.1, chest.vertebra_r)
    vertebra, cancellous = _fraction(vertebra_sd, edge), _fraction(vertebra_sd + 2.0 * s, edge)
    canal_sd = _ellipse_sd(x, y - (chest.spine_y + chest.vertebra_r + 10.0 * s), 8.0 * s, 7.0 * s)
    arch, canal = _fraction(canal_sd - 4.0 * s, edge), _fraction(canal_sd, edge)
    scapulae = _scapulae(x, y, chest, edge)
    clothing = _Clothing.draw(chest, habitus)
    outline_sd = chest.body_sd(x, y)
    outline_angle = np.arctan2(y - chest.body_y, x)
    clothing_cover = _Clothing.coverage(outline_sd, outline_angle)
    # Lung density differs between patients and inspirations, and the dependent (posterior)
    # lung is denser in a supine patient: LIDC-IDRI-0314 has a median of -896 HU in its front
    # third and -834 HU in its back third.
    lung_level = _LUNG_HU + float(habitus.uniform(-45.0, 10.0))
    gravity_hu = float(habitus.uniform(25.0, 70.0))
    shoulder_z = chest.lung_base_z + 0.55 * chest.lung_height
    depth = chest.cavity_b * 2.0
    slab = 16
    vertebra_pitch = 27.0 * s
    for z0 in range(0, grid.shape_zyx[0], slab):
        z1 = min(z0 + slab, grid.shape_zyx[0])
        z = grid.axis_mm(0, z0, z1)[:, None, None]
        out = hu[z0:z1]
        out[:] = wall
        clothing.render(out, outline_sd, outline_angle, clothing_cover, z, edge)
        cavity = chest.cavity_sd(x, y, z)
        _blend(out, _FAT_HU + 10.0, _fraction(cavity, edge))
        # Liver and upper abdomen below the diaphragm, the neck's soft tissue above the lungs.
        abdomen = np.maximum(cavity, z - chest.dome_z(x, y) + 6.0 * s)
        _blend(out, _LIVER_HU, _fraction(abdomen, edge))
        neck = np.maximum(cavity, chest.lung_base_z + 1.02 * chest.lung_height - z)
        _blend(out, _MUSCLE_HU - 10.0, _fraction(neck, edge) * 0.8)
        heart = chest.heart_sd(x, y, z)
        _blend(out, _FAT_HU, _fraction(heart - 3.0 * s, edge))
        _blend(out, _BLOOD_HU, _fraction(heart, edge))
        # Spine: vertebral bodies with cortical shell, discs between them, posterior arch and canal.
        phase = np.mod(z - chest.lung_base_z, vertebra_pitch) / vertebra_pitch
        disc = np.abs(phase - 0.5) < 0.1
        _blend(out, np.where(disc, _DISC_HU, _CORTICAL_BONE_HU), vertebra)
        _blend(out, np.where(disc, _DISC_HU, _CANCELLOUS_BONE_HU), cancellous)
        _blend(out, _CORTICAL_BONE_HU * 0.8, arch)
        _blend(out, _CSF_HU, canal)
        _blend(out, _CORTICAL_BONE_HU * 0.8, scapulae * (z > shoulder_z))
        right, left = chest.lung_sd(x, y, z)
        lung_sd = np.minimum(right, left)
        lungs[z0:z1] = lung_sd < 0
        gravity = gravity_hu * (np.clip((y - chest.cavity_y + chest.cavity_b) / depth, 0.0, 1.0) - 0.5)
        _blend(out, lung_level + gravity + texture[z0:z1], _fraction(lung_sd, edge))
    return hu, lungs


@dataclass(frozen=True)
class _Clothing:
    """Gown and blanket: thin folded sheets over the front and sides of the body.

    Real scans show them as bright lines a few millimetres outside the skin, enclosing air
    pockets that look like a lumen in its wall (LIDC-IDRI-0314 has several); a phantom
    without them teaches a network that every walled pocket of air is airway.
    """

    offsets_mm: tuple[float, ...]  # mean distance of each sheet from the skin
    thickness_mm: tuple[float, ...]
    fold_mm: tuple[float, ...]  # amplitude of the folds
    folds: tuple[int, ...]  # folds round the body
    phase: tuple[float, ...]
    twist_per_mm: tuple[float, ...]  # how fast the folds turn along z
    hu: tuple[float, ...]

    @staticmethod
    def draw(chest: _Chest, habitus: np.random.Generator) -> "_Clothing":
        layers = int(habitus.integers(0, 4))
        s = max(chest.scale, 0.5)

        def draw(low: float, high: float) -> tuple[float, ...]:
            return tuple(float(v) for v in habitus.uniform(low, high, layers))

        return _Clothing(
            offsets_mm=draw(2.0 * s, 24.0 * s),
            thickness_mm=draw(0.4, 1.4),
            fold_mm=draw(1.0 * s, 8.0 * s),
            folds=tuple(int(v) for v in habitus.integers(3, 12, layers)),
            phase=draw(0.0, 2.0 * np.pi),
            twist_per_mm=draw(-0.03, 0.03),
            hu=draw(-350.0, -50.0),
        )

    @staticmethod
    def coverage(outline_sd: np.ndarray, angle: np.ndarray) -> np.ndarray:
        """Where sheets may lie (in plane): outside the skin, over the front, the sides and a little behind them."""
        return (np.sin(angle) < 0.7) & (outline_sd > 0)  # y is posterior: sin(angle) < 0 in front

    def render(self, out: np.ndarray, outline_sd: np.ndarray, angle: np.ndarray, cover: np.ndarray, z: np.ndarray,
               edge: float) -> None:
        """Blend the sheets into a slab, inside ``cover`` (:meth:`coverage`)."""
        for offset, thickness, fold, folds, phase, twist, hu in zip(
            self.offsets_mm, self.thickness_mm, self.fold_mm, self.folds, self.phase, self.twist_per_mm, self.hu
        ):
            distance = offset + fold * np.sin(folds * angle + phase + twist * z)
            sheet = np.abs(outline_sd - distance) - thickness / 2.0
            _blend(out, hu, _fraction(sheet, edge) * cover)


def _render_emphysema(hu: np.ndarray, grid: _Grid, chest: _Chest, habitus: np.random.Generator,
                      extent_xyz: np.ndarray) -> None:
    """Centrilobular emphysema in about half of the phantoms: small wall-less holes in the lungs.

    Holes of 2-8 mm in an adult chest (scaled with a smaller one, to no less than 0.6 times)
    at -990 to -940 HU have an airway's calibre and darkness but no wall;
    they teach the network that darkness alone is not airway (dark, hyperinflated lungs are
    where a phantom-trained network first fails on real scans).
    """
    if habitus.uniform() < 0.5:
        return
    wanted = int(habitus.integers(20, 150))
    scale = max(chest.scale, 0.6)
    placed = 0
    for _ in range(20 * wanted):
        if placed == wanted:
            break
        radius = float(habitus.uniform(1.0, 4.0)) * scale
        centre = habitus.uniform(-extent_xyz / 2.0, extent_xyz / 2.0)
        right, left = chest.lung_sd(*centre)
        if min(float(right), float(left)) > -(radius + 2.0):
            continue
        _blend_tube(hu, grid, centre, centre + 1e-3, radius, radius, float(habitus.uniform(-990.0, -940.0)))
        placed += 1


def _scapulae(x: np.ndarray, y: np.ndarray, chest: _Chest, edge: float) -> np.ndarray:
    """In-plane fraction of the two shoulder blades: thin plates behind the ribs."""
    s = chest.scale
    fraction = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=np.float32)
    for side in (-1.0, 1.0):
        start = np.array([side * 0.45 * chest.cavity_a, chest.cavity_y + chest.cavity_b + 16.0 * s])
        end = np.array([side * 0.95 * chest.cavity_a, chest.cavity_y + 0.55 * chest.cavity_b + 16.0 * s])
        axis = end - start
        t = np.clip(((x - start[0]) * axis[0] + (y - start[1]) * axis[1]) / (axis @ axis), 0.0, 1.0)
        distance = np.hypot(x - start[0] - t * axis[0], y - start[1] - t * axis[1])
        np.maximum(fraction, _fraction(distance - 1.6 * s, edge), out=fraction)
    return fraction


def _lung_texture(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Soft mottling of the parenchyma: white noise smoothed over ~1.5 mm, SD about 14 HU."""
    field = rng.standard_normal(grid.shape_zyx, dtype=np.float32)
    ndimage.gaussian_filter(field, 1.5 / grid.spacing_zyx, output=field, truncate=2.5)
    field *= np.float32(14.0 / max(float(field[:: max(1, field.shape[0] // 16)].std()), 1e-6))
    return field


# ----------------------------------------------------------------------------- trees


@dataclass
class _Tube:
    """A straight branch while the tree is grown."""

    start: np.ndarray
    end: np.ndarray
    diameter: float
    generation: int
    parent: int | None
    normal: np.ndarray  # normal of the plane holding this branch and its parent

    @property
    def direction(self) -> np.ndarray:
        axis = self.end - self.start
        return axis / np.linalg.norm(axis)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


def _perpendicular(normal: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``normal`` made perpendicular to ``direction`` (any perpendicular when they are parallel)."""
    result = normal - (normal @ direction) * direction
    if np.linalg.norm(result) < 1e-6:
        result = np.cross(direction, [1.0, 0.0, 0.0] if abs(direction[0]) < 0.9 else [0.0, 1.0, 0.0])
    return _unit(result)


def _rotate(vector: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``vector`` about the unit ``axis``."""
    return (
        vector * math.cos(angle)
        + np.cross(axis, vector) * math.sin(angle)
        + axis * (axis @ vector) * (1.0 - math.cos(angle))
    )


def _branching_angle(ratio: float) -> float:
    """Angle between parent and a child carrying ``ratio`` of the flow (Kitaoka 1999, eq. 4, n = 2.8)."""
    n = _FLOW_EXPONENT
    cosine = (1.0 + ratio ** (4.0 / n) - (1.0 - ratio) ** (4.0 / n)) / (2.0 * ratio ** (2.0 / n))
    return math.acos(float(np.clip(cosine, -1.0, 1.0)))


class _Clearance:
    """Sampled axes of the airway branches placed so far, with their outer (lumen + wall) radii.

    Both daughters of a split are tested before either is added, so siblings never see
    each other; the parent is excluded by its id.  Samples added since the last k-d tree
    are checked by brute force until they are worth re-indexing (half the indexed count),
    so the tree is rebuilt only a logarithmic number of times while the airway grows.

    Parameters
    ----------
    gap_mm : float
        Smallest surface-to-surface distance between unrelated branches.
    step_mm : float
        Largest distance between axis samples.
    """

    def __init__(self, gap_mm: float, step_mm: float) -> None:
        self.gap_mm = gap_mm
        self.step_mm = step_mm
        self._points = np.empty((0, 3))
        self._radius = np.empty(0)
        self._owner = np.empty(0, dtype=int)
        self._indexed = 0
        self._index: cKDTree | None = None
        self._indexed_max_radius = 0.0

    def _samples(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        count = max(2, math.ceil(float(np.linalg.norm(end - start)) / self.step_mm) + 1)
        return start + np.outer(np.linspace(0.0, 1.0, count), end - start)

    def add(self, owner: int, tube: _Tube) -> None:
        """Record the axis of airway branch number ``owner``."""
        points = self._samples(tube.start, tube.end)
        self._points = np.concatenate([self._points, points])
        self._radius = np.concatenate([self._radius, np.full(len(points), _outer_radius_mm(tube.diameter))])
        self._owner = np.concatenate([self._owner, np.full(len(points), owner)])
        if len(self._points) - self._indexed > max(2048, self._indexed // 2):
            self._index = cKDTree(self._points)
            self._indexed = len(self._points)
            self._indexed_max_radius = float(self._radius.max())

    def is_clear(self, start: np.ndarray, end: np.ndarray, diameter: float, parent: int) -> bool:
        """Whether a branch of ``diameter`` along ``start``-``end`` keeps the gap from all but ``parent``."""
        probes = self._samples(start, end)
        needed = _outer_radius_mm(diameter) + self.gap_mm
        candidates = np.arange(self._indexed, len(self._points))
        if self._index is not None:
            near = self._index.query_ball_point(probes, needed + self._indexed_max_radius)
            candidates = np.concatenate([np.unique(np.concatenate(near)).astype(int), candidates])
        candidates = candidates[self._owner[candidates] != parent]
        if len(candidates) == 0:
            return True
        distance = np.linalg.norm(probes[:, None, :] - self._points[candidates][None], axis=2)
        return bool(np.all(distance >= self._radius[candidates][None] + needed))


@dataclass(frozen=True)
class _GrowthLimits:
    """When a tree stops growing.

    Attributes
    ----------
    min_diameter_mm : float
        Thinner children are not created.
    min_length_mm : float
        Shortest length of a child beyond the radii of its parent and itself; one that does
        not fit at that length is not created.
    clearance : _Clearance or None
        Keeps unrelated branches apart (the airway); ``None`` lets branches cross (vessels).
    """

    min_diameter_mm: float
    min_length_mm: float
    clearance: _Clearance | None


def _grow_tree(
    tubes: list[_Tube],
    buds: list[tuple[int, np.ndarray]],
    points: np.ndarray,
    inside: Callable[[np.ndarray, float], np.ndarray],
    limits: _GrowthLimits,
    rng: np.random.Generator,
) -> None:
    """Grow a space-filling tree (Kitaoka 1999) from ``buds`` = (tube index, territory point indices).

    New tubes are appended to ``tubes`` breadth-first, so generations never decrease along the list.
    ``inside(points, margin)`` tells whether points lie at least ``margin`` mm inside the lungs.
    """
    queue = deque(buds)
    while queue:
        index, territory = queue.popleft()
        parent = tubes[index]
        if parent.generation >= _MAX_GENERATION or len(territory) < 4:
            continue
        # Dividing plane: through the centroid, containing the branch axis, parallel to the
        # parent's branching plane, so the daughters branch in a plane turned by 90 degrees.
        # Where the lung's edge or a neighbouring branch leaves no room for both daughters,
        # try turned planes before making the branch a terminal one.
        normal = _rotate(_perpendicular(parent.normal, parent.direction), parent.direction, float(rng.normal(0.0, 0.25)))
        for turn in (0.0, math.pi / 4.0, -math.pi / 4.0, math.pi / 2.0):
            children = _split(tubes, index, points, territory, _rotate(normal, parent.direction, turn), inside,
                              limits, rng)
            if children is not None:
                break
        else:
            continue
        for tube, child_territory in children:
            tubes.append(tube)
            queue.append((len(tubes) - 1, child_territory))
            if limits.clearance is not None:
                limits.clearance.add(len(tubes) - 1, tube)


def _split(tubes: list[_Tube], index: int, points: np.ndarray, territory: np.ndarray, normal: np.ndarray,
           inside: Callable[[np.ndarray, float], np.ndarray], limits: _GrowthLimits,
           rng: np.random.Generator) -> list[tuple[_Tube, np.ndarray]] | None:
    """The two daughters of ``tubes[index]`` for one dividing plane, or None when either cannot be placed."""
    parent = tubes[index]
    direction = parent.direction
    cloud = points[territory]
    side = (cloud - cloud.mean(axis=0)) @ normal > 0.0
    ratio = float(side.mean())
    if ratio <= 0.0 or ratio >= 1.0:
        return None
    children = []
    for selected, share, sign in ((side, ratio, 1.0), (~side, 1.0 - ratio, -1.0)):
        # Flow (territory volume) share sets the diameter and the branching angle (Kitaoka 1999).
        diameter = parent.diameter * share ** (1.0 / _FLOW_EXPONENT)
        if diameter < limits.min_diameter_mm:
            return None
        angle = _branching_angle(share)
        planned = math.cos(angle) * direction + math.sin(angle) * sign * normal
        towards = cloud[selected].mean(axis=0) - parent.end
        length = min(_LENGTH_PER_DIAMETER * diameter, max(float(np.linalg.norm(towards)), 1.5 * diameter))
        # Thinning merges the skeleton over about a radius around each junction: a child's
        # first parent radius lies in its parent's lumen and its last own radius in its
        # children's junction, so the resolvable length is counted between the two.
        shortest = limits.min_length_mm + 0.5 * (parent.diameter + diameter)
        length = max(length * float(rng.uniform(0.85, 1.15)), shortest)
        # Half the planned angle, half towards the territory's centroid keeps the tree space
        # filling; near the lung's edge or another branch fall back to heading straight for
        # the centroid, then to the planned angle alone.
        headings = (_unit(planned + _unit(towards)), _unit(towards), planned)
        placed = _place_child(parent, index, headings, length, shortest, diameter, inside, limits.clearance)
        if placed is None:
            return None
        heading, length = placed
        branching_normal = _perpendicular(np.cross(direction, heading), heading)
        child = _Tube(parent.end.copy(), parent.end + heading * length, diameter, parent.generation + 1, index,
                      branching_normal)
        children.append((child, territory[selected]))
    return children


def _place_child(parent: _Tube, index: int, headings, length: float, shortest: float, diameter: float,
                 inside: Callable[[np.ndarray, float], np.ndarray],
                 clearance: _Clearance | None) -> tuple[np.ndarray, float] | None:
    """First (heading, length) whose far half keeps the lumen inside the lung and clear of other branches.

    Headings more than 80 degrees from the parent's axis are turned back to 80 degrees; a
    child that does not fit is shortened, but never below ``shortest``.
    """
    start = parent.end
    for heading in headings:
        if heading @ parent.direction < _MIN_BRANCHING_COSINE:
            # Turned back towards the parent's start: keep the side, limit the angle.
            sine = math.sqrt(1.0 - _MIN_BRANCHING_COSINE**2)
            heading = _MIN_BRANCHING_COSINE * parent.direction + sine * _perpendicular(heading, parent.direction)
        trial = length
        while True:
            probe = start + np.outer((0.5, 0.75, 1.0), heading * trial)
            # The child's first parent radius lies inside the parent's lumen: what touches it
            # there touches the parent, which was tested when the parent was placed.
            if np.all(inside(probe, 0.5 * diameter)) and (
                clearance is None
                or clearance.is_clear(start + heading * 0.5 * parent.diameter, start + heading * trial, diameter, index)
            ):
                return heading, trial
            if trial <= shortest:
                break
            trial = max(0.75 * trial, shortest)
    return None


def _growth_limits(spacing_zyx: np.ndarray) -> tuple[_GrowthLimits, _GrowthLimits]:
    """Limits of the airway tree (resolvable and clear of each other) and of the vessel trees."""
    in_plane = float(spacing_zyx[1:].min())
    coarsest = float(spacing_zyx.max())
    airway = _GrowthLimits(
        min_diameter_mm=_RESOLVABLE_DIAMETER_VOXELS * in_plane,
        min_length_mm=_RESOLVABLE_LENGTH_VOXELS * coarsest,
        clearance=_Clearance(gap_mm=_CLEARANCE_VOXELS * coarsest, step_mm=0.5 * float(spacing_zyx.min())),
    )
    # Vessels are image content only: they may cross, run down to what can be rendered, and
    # be as short as their junctions.
    vessels = _GrowthLimits(min_diameter_mm=max(0.6, float(np.mean(spacing_zyx))), min_length_mm=0.0, clearance=None)
    return airway, vessels


def _territory_points(chest: _Chest, extent_xyz: np.ndarray, rng: np.random.Generator):
    """Jittered lattice points filling each lung: (right points, left points)."""
    half = extent_xyz / 2.0
    volume_guess = 0.5 * float(np.prod(extent_xyz))
    step = (volume_guess / (_TERRITORY_POINTS * 2.5)) ** (1.0 / 3.0)
    axes = [np.arange(-h + step / 2, h, step) for h in half]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    lattice = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    lattice += rng.uniform(-0.4 * step, 0.4 * step, lattice.shape)
    right, left = chest.lung_sd(lattice[:, 0], lattice[:, 1], lattice[:, 2])
    return lattice[right < 0], lattice[left < 0]


@dataclass
class _Trees:
    airway: list[_Tube]
    arteries: list[_Tube]
    veins: list[_Tube]


def _build_trees(chest: _Chest, extent_xyz: np.ndarray, airway_limits: _GrowthLimits, vessel_limits: _GrowthLimits,
                 rng: np.random.Generator) -> _Trees:
    s = chest.scale
    right_points, left_points = _territory_points(chest, extent_xyz, rng)

    def inside(points: np.ndarray, margin: float) -> np.ndarray:
        right, left = chest.lung_sd(points[:, 0], points[:, 1], points[:, 2])
        return np.minimum(right, left) < -margin

    carina = np.asarray(chest.carina_xyz)
    # A wide trachea leans forwards at its top, as real ones do, to clear the oesophagus.
    widening = (chest.trachea_lumen_d - chest.trachea_d) / 2.0
    top = np.array([carina[0], carina[1] + 6.0 * s - widening, extent_xyz[2] / 2.0 - 0.5])
    coronal = np.array([0.0, 1.0, 0.0])
    tubes = [_Tube(top, carina.copy(), chest.trachea_lumen_d, 0, None, coronal)]
    # Main bronchi: the right one shorter, steeper and wider (it carries the larger lung).
    # Their lengths keep the adult proportion to the trachea's calibre (which shrinks less
    # than the chest), so that each stays longer than the junctions at its two ends.
    calibre = chest.trachea_d / _ADULT_TRACHEA_MM
    ratio_right = len(right_points) / (len(right_points) + len(left_points))
    buds = []
    for side, points, angle_deg, length, ratio in (
        (-1.0, right_points, 30.0, 28.0 * calibre, ratio_right),
        (1.0, left_points, 48.0, 46.0 * calibre, 1.0 - ratio_right),
    ):
        angle = math.radians(angle_deg + float(rng.normal(0.0, 2.0)))
        heading = _unit(np.array([side * math.sin(angle), 0.12, -math.cos(angle)]))
        diameter = chest.trachea_d * ratio ** (1.0 / _FLOW_EXPONENT)
        end = carina + heading * length
        while not inside(end[None], 0.0)[0] and length < 90.0 * s:
            length += 2.0 * s
            end = carina + heading * length
        # First division of each lung is cranio-caudal (upper lobe against the rest).
        normal = _perpendicular(np.array([0.0, 0.0, 1.0]), heading)
        tubes.append(_Tube(carina.copy(), end, diameter, 1, 0, normal))
        buds.append((len(tubes) - 1, np.arange(len(points)) + (0 if side < 0 else len(right_points))))
    all_points = np.concatenate([right_points, left_points])
    if airway_limits.clearance is not None:
        for index, tube in enumerate(tubes):
            airway_limits.clearance.add(index, tube)
    _grow_tree(tubes, buds, all_points, inside, airway_limits, rng)

    arteries = _accompanying_arteries(tubes, chest)

    # Pulmonary veins: a separate tree from the left atrium (behind the heart) into the same lungs.
    atrium = np.array([chest.heart_c[0] - 10.0 * s, chest.heart_c[1] + 0.8 * chest.heart_r[1], chest.heart_c[2] + 25.0 * s])
    veins: list[_Tube] = []
    vein_buds = []
    for tube, offset in ((tubes[1], 0), (tubes[2], len(right_points))):
        count = len(right_points) if offset == 0 else len(left_points)
        hilum = tube.end + np.array([0.0, 8.0 * s, -22.0 * s])
        for _ in range(3):
            if inside(hilum[None], 2.0 * s)[0]:
                break
            hilum = hilum + np.array([np.sign(tube.end[0]) * 6.0 * s, 0.0, 0.0])
        veins.append(_Tube(atrium.copy(), hilum, 0.8 * tube.diameter, 1, None, np.array([0.0, 0.0, 1.0])))
        vein_buds.append((len(veins) - 1, np.arange(count) + offset))
    _grow_tree(veins, vein_buds, all_points, inside, vessel_limits, rng)
    return _Trees(tubes, arteries, veins)


def _wall_mm(diameter: float) -> float:
    return _WALL_PER_DIAMETER * diameter


def _outer_radius_mm(diameter: float) -> float:
    """Largest radius of a branch's lumen plus wall (at its start, where the taper is widest)."""
    return diameter / 2.0 * (1.0 + _TAPER / 2.0) + _wall_mm(diameter)


def _accompanying_arteries(airway: list[_Tube], chest: _Chest) -> list[_Tube]:
    """A pulmonary artery beside every bronchus from the main bronchi on, as thick as the bronchus with its wall."""
    s = chest.scale
    arteries: list[_Tube] = []
    artery_end: dict[int, np.ndarray] = {}
    trunk = np.array([chest.heart_c[0] - 5.0 * s, chest.heart_c[1] - 0.2 * chest.heart_r[1], chest.heart_c[2] + 0.9 * chest.heart_r[2]])
    for index, tube in enumerate(airway):
        if tube.generation == 0:
            continue
        outer = tube.diameter + 2.0 * _wall_mm(tube.diameter)
        radius = 0.45 * outer
        gap = outer / 2.0 + radius + 0.3 * s + 0.1 * tube.diameter
        offset_direction = tube.normal if tube.generation > 1 else _perpendicular(np.array([0.0, -1.0, 0.3]), tube.direction)
        end = tube.end + gap * offset_direction
        start = artery_end.get(tube.parent, trunk) if tube.parent is not None else trunk
        arteries.append(_Tube(start.copy(), end, 2.0 * radius, tube.generation, None, tube.normal))
        artery_end[index] = end
    return arteries


# ----------------------------------------------------------------------------- rendering


def _render_vessels(hu: np.ndarray, grid: _Grid, chest: _Chest, trees: _Trees, extent_xyz: np.ndarray) -> None:
    s = chest.scale
    for tube in trees.arteries + trees.veins:
        _blend_tube(hu, grid, tube.start, tube.end, tube.diameter / 2.0, tube.diameter / 2.0, _BLOOD_HU)
    top, bottom = extent_xyz[2] / 2.0, -extent_xyz[2] / 2.0
    heart_top = np.array([chest.heart_c[0] - 14.0 * s, chest.heart_c[1] + 10.0 * s, chest.heart_c[2] + 0.6 * chest.heart_r[2]])
    descending = np.array([chest.aorta_x, chest.aorta_y, chest.arch_z])
    arch_front = np.array([0.0, chest.carina_xyz[1] - 30.0 * s, chest.arch_z + 8.0 * s])
    aorta = np.array([heart_top, [heart_top[0], heart_top[1] - 4.0 * s, chest.arch_z - 10.0 * s], arch_front, descending,
                      [chest.aorta_x, chest.aorta_y, bottom - 1.0]])
    _blend_polyline(hu, grid, aorta, 13.0 * s, _BLOOD_HU)
    vena_cava = np.array([[-26.0 * s, chest.carina_xyz[1] - 22.0 * s, top + 1.0], [-24.0 * s, chest.heart_c[1], chest.heart_c[2] + 20.0 * s]])
    _blend_polyline(hu, grid, vena_cava, 9.0 * s, _BLOOD_HU)


def _render_oesophagus(hu: np.ndarray, grid: _Grid, chest: _Chest, extent_xyz: np.ndarray) -> None:
    """Oesophagus in front of the spine, with a thread of swallowed air in its upper part (a classic false airway)."""
    s = chest.scale
    x, y = -6.0 * s, chest.spine_y - chest.vertebra_r - 9.0 * s
    course = np.array([[x, y, extent_xyz[2] / 2.0 + 1.0], [x, y, chest.lung_base_z + 0.1 * chest.lung_height]])
    _blend_polyline(hu, grid, course, 8.0 * s, _MUSCLE_HU - 10.0)
    air = np.array([[x, y, chest.lung_base_z + 0.95 * chest.lung_height], [x, y, chest.carina_xyz[2] - 10.0 * s]])
    _blend_polyline(hu, grid, air, 2.2 * s, _AIR_HU)


def _render_ribs(hu: np.ndarray, grid: _Grid, chest: _Chest) -> None:
    """Twelve pairs of ribs curving round the cavity and dropping towards the front, plus the sternum."""
    s = chest.scale
    angles = np.linspace(0.15, 2.45, 14)  # from the spine (0) round to the front (pi)
    for level in np.linspace(1.05, 0.02, 11):
        z_back = chest.lung_base_z + level * chest.lung_height
        for side in (-1.0, 1.0):
            a, b = chest.cavity_a + 6.0 * s, chest.cavity_b + 6.0 * s
            points = np.stack(
                [side * a * np.sin(angles), chest.cavity_y + b * np.cos(angles), z_back - 30.0 * s * (angles / np.pi) ** 1.5],
                axis=1,
            )
            _blend_polyline(hu, grid, points, 3.6 * s, _CORTICAL_BONE_HU * 0.7)
    sternum_y = chest.cavity_y - chest.cavity_b - 5.0 * s
    sternum = np.array([[0.0, sternum_y, chest.lung_base_z + 0.2 * chest.lung_height],
                        [0.0, sternum_y, chest.lung_base_z + 0.95 * chest.lung_height]])
    _blend_polyline(hu, grid, sternum, 6.0 * s, _CANCELLOUS_BONE_HU + 100.0)


def _render_nodules(hu: np.ndarray, grid: _Grid, chest: _Chest, airway: list[_Tube], rng: np.random.Generator,
                    extent_xyz: np.ndarray) -> None:
    """Three to five solid nodules in the lungs, clear of the bronchi."""
    scale = max(chest.scale, 0.6)
    axis_points = np.concatenate([np.linspace(t.start, t.end, 4) for t in airway])
    bronchi = cKDTree(axis_points)
    placed = 0
    wanted = int(rng.integers(3, 6))
    for _ in range(400):
        if placed == wanted:
            break
        radius = float(rng.uniform(2.5, 6.5)) * scale
        centre = rng.uniform(-extent_xyz / 2.0, extent_xyz / 2.0)
        right, left = chest.lung_sd(*centre)
        if min(float(right), float(left)) > -(radius + 4.0) or bronchi.query(centre)[0] < radius + 6.0:
            continue
        _blend_tube(hu, grid, centre, centre + 1e-3, radius, radius, _NODULE_HU)
        placed += 1


@dataclass
class _AirwayRaster:
    outer: np.ndarray  # partial-volume fraction of lumen + wall
    lumen: np.ndarray  # partial-volume fraction of lumen
    classes: np.ndarray  # uint8 class of the nearest centreline, 0 outside the lumen


def _sample_centreline(tube: _Tube, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Centreline points no further apart than half the smallest voxel edge, with a gentle taper."""
    length = float(np.linalg.norm(tube.end - tube.start))
    count = max(2, int(math.ceil(length / (0.5 * float(grid.spacing_zyx.min())))) + 1)
    t = np.linspace(0.0, 1.0, count)
    points = tube.start + np.outer(t, tube.end - tube.start)
    radius = tube.diameter / 2.0 * (1.0 + _TAPER / 2.0 - _TAPER * t)
    return points, radius


def _rasterise_airway(grid: _Grid, branches: list[PhantomBranch]) -> _AirwayRaster:
    outer = np.zeros(grid.shape_zyx, dtype=np.float32)
    lumen = np.zeros(grid.shape_zyx, dtype=np.float32)
    inside = np.zeros(grid.shape_zyx, dtype=bool)
    nearest_class = np.zeros(grid.shape_zyx, dtype=np.uint8)
    nearest = np.full(grid.shape_zyx, np.inf, dtype=np.float32)
    edge = grid.edge_mm
    for branch in branches:  # parents first: on a distance tie the lower generation keeps the voxel
        points, radius = branch.points_xyz_mm, branch.radius_mm
        wall = _wall_mm(2.0 * float(radius[0]))
        found = _tube_distance(grid, points[0], points[-1], radius[0], radius[-1], wall + edge)
        if found is None:
            continue
        box, distance, lumen_radius = found
        np.maximum(outer[box], _fraction(distance - lumen_radius - wall, edge), out=outer[box])
        np.maximum(lumen[box], _fraction(distance - lumen_radius, edge), out=lumen[box])
        inside[box] |= distance <= lumen_radius
        # The nearest axis is tracked outside this branch's own lumen too: the rounded end of
        # a parent reaching past the junction then goes to the child whose axis is nearer,
        # instead of leaving an island of the parent's class among the child's voxels.
        closer = distance < nearest[box]
        nearest[box][closer] = distance[closer]
        nearest_class[box][closer] = branch.airway_class
        # Voxels the axis passes through belong to the lumen even where the rendered lumen
        # misses them; joined face to face, they keep every branch 6-connected to its parent.
        index = _face_connected(grid.to_index(points))
        keep = np.all((index >= 0) & (index < grid.shape_zyx), axis=1)
        inside[tuple(index[keep].T)] = True
    del nearest
    nearest_class[~inside] = 0
    return _AirwayRaster(outer, lumen, nearest_class)


def _face_connected(index: np.ndarray) -> np.ndarray:
    """Voxel path (N, 3) whose consecutive voxels differ by at most 1 per axis, made face-connected.

    Between two voxels the path steps along z first, then y, then x.
    """
    along_z = index[:-1].copy()
    along_z[:, 0] = index[1:, 0]
    along_y = along_z.copy()
    along_y[:, 1] = index[1:, 1]
    return np.concatenate([index, along_z, along_y])


def _to_branches(tubes: list[_Tube], grid: _Grid) -> list[PhantomBranch]:
    branches: list[PhantomBranch] = []
    for index, tube in enumerate(tubes):
        points, radius = _sample_centreline(tube, grid)
        parent_class = None if tube.parent is None else branches[tube.parent].airway_class
        airway_class = branch_class(tube.generation, 2.0 * float(np.median(radius)), parent_class)
        branches.append(PhantomBranch(index, tube.parent, tube.generation, airway_class, points, radius))
    return branches


def _image(hu: np.ndarray, grid: _Grid, variant: PhantomVariant, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur (kernel in plane, kernel and slice profile along z), correlated noise, int16."""
    sigma_plane = variant.kernel_fwhm_mm / 2.3548
    sigma_z = math.hypot(sigma_plane, float(grid.spacing_zyx[0]) / 2.3548)
    blurred = ndimage.gaussian_filter(hu, np.array([sigma_z, sigma_plane, sigma_plane]) / grid.spacing_zyx, truncate=3.0)
    noise = rng.standard_normal(grid.shape_zyx, dtype=np.float32)
    ndimage.gaussian_filter(noise, variant.noise_correlation_mm / grid.spacing_zyx, output=noise, truncate=3.0)
    noise *= np.float32(variant.noise_sd_hu / max(float(noise[:: max(1, noise.shape[0] // 16)].std()), 1e-6))
    blurred += noise
    np.clip(blurred, _HU_MIN, _HU_MAX, out=blurred)
    return np.rint(blurred).astype(np.int16)


# ----------------------------------------------------------------------------- public API


def _check_arguments(
    seed, shape_zyx, spacing_zyx, variant, progress
) -> tuple[tuple[int, int, int], np.ndarray, PhantomVariant]:
    # A list or dict variant is unhashable: test the type first so it gets the same sentence.
    if not isinstance(variant, str) or variant not in PHANTOM_VARIANTS:
        raise AirwayInputError(
            f"Unknown phantom variant {variant!r}; choose one of {', '.join(sorted(PHANTOM_VARIANTS))}."
        )
    chosen = PHANTOM_VARIANTS[variant]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AirwayInputError(f"The phantom seed must be a non-negative integer, got {seed!r}.")
    try:
        shape = tuple(int(v) for v in shape_zyx)
        if len(shape) != 3 or any(int(v) != v for v in shape_zyx):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise AirwayInputError(f"The phantom shape must be three integers (z, y, x), got {shape_zyx!r}.") from None
    if min(shape) < _MIN_SHAPE or max(shape) > _MAX_SHAPE:
        raise AirwayInputError(
            f"The phantom shape {shape} is out of range; give {_MIN_SHAPE} to {_MAX_SHAPE} voxels along each axis."
        )
    if spacing_zyx is None:
        spacing = np.array([chosen.slice_spacing_mm, 0.8, 0.8])
    else:
        try:
            spacing = np.asarray(spacing_zyx, dtype=float)
        except (TypeError, ValueError):
            raise AirwayInputError(f"The phantom spacing must be three numbers in mm, got {spacing_zyx!r}.") from None
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing < 0.2) or np.any(spacing > 5.0):
            raise AirwayInputError(
                f"The phantom spacing {spacing_zyx!r} is not usable; give three voxel sizes between 0.2 and 5 mm (z, y, x)."
            )
    if progress is not None and not callable(progress):
        raise AirwayInputError(f"The phantom progress callback must be callable, got {progress!r}.")
    extent = np.asarray(shape, dtype=float) * spacing
    if min(extent[1], extent[2]) < 120.0 or extent[0] < 80.0:
        raise AirwayInputError(
            f"The phantom field of view {extent[2]:.0f} x {extent[1]:.0f} x {extent[0]:.0f} mm (x, y, z) is too small "
            "for a chest; give at least 120 mm in plane and 80 mm along z."
        )
    return shape, spacing, chosen  # type: ignore[return-value]


def generate_phantom(
    seed: int = 0,
    shape_zyx: tuple[int, int, int] = (256, 256, 256),
    spacing_zyx: tuple[float, float, float] | None = None,
    variant: str = "standard",
    progress: ProgressCallback | None = None,
) -> Phantom:
    """Generate a synthetic chest CT with its exact airway, class and lung labels.

    Parameters
    ----------
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed, shape, spacing and variant
        always give identical volumes.
    shape_zyx : tuple of 3 int
        Grid size, 48 to 1024 voxels per axis.
    spacing_zyx : tuple of 3 float or None
        Voxel size in mm (0.2 to 5).  ``None``: (variant slice spacing, 0.8, 0.8).  The field
        of view must be at least 120 mm in plane and 80 mm along z; the anatomy is scaled to it.
    variant : str
        Key of :data:`PHANTOM_VARIANTS` (kernel, noise, slice spacing).
    progress : callable, optional
        Called as ``progress(fraction, message)`` at the main steps.

    Returns
    -------
    Phantom
        CT (int16 HU), airway, airway3 and lung masks on one centred grid (identity
        direction), and the airway tree.

    Raises
    ------
    AirwayInputError
        Unknown variant, bad seed, shape, spacing or progress callback, or a field of view too
        small for a chest.
    """
    shape, spacing, chosen = _check_arguments(seed, shape_zyx, spacing_zyx, variant, progress)

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    rng = np.random.default_rng(int(seed))
    # Patient habitus and surroundings (trachea width, lung density, emphysema, clothing) draw
    # from a stream of their own, so they leave the chest's layout as it was.
    habitus = np.random.default_rng([int(seed), 1])
    extent = np.asarray(shape[::-1], dtype=float) * spacing[::-1]  # x, y, z
    origin_zyx = -(np.asarray(shape, dtype=float) - 1.0) / 2.0 * spacing
    grid = _Grid(shape, spacing, origin_zyx)
    geometry = Geometry(tuple(spacing[::-1]), tuple(origin_zyx[::-1]))

    report(0.0, "laying out the chest")
    chest = _Chest.layout(extent, rng, habitus)
    report(0.05, "growing the airway and vessel trees")
    trees = _build_trees(chest, extent, *_growth_limits(spacing), rng)
    branches = _to_branches(trees.airway, grid)
    report(0.2, "rendering the body, lungs, heart and spine")
    hu, lungs = _render_anatomy(grid, chest, rng, habitus)
    _render_emphysema(hu, grid, chest, habitus, extent)
    report(0.45, "rendering vessels, ribs and nodules")
    _render_vessels(hu, grid, chest, trees, extent)
    _render_oesophagus(hu, grid, chest, extent)
    _render_ribs(hu, grid, chest)
    _render_nodules(hu, grid, chest, trees.airway, rng, extent)
    report(0.6, "rendering the airway walls and lumen")
    raster = _rasterise_airway(grid, branches)
    # Lumen over wall over whatever lies beneath (vessels crossing a bronchus never fill it).
    hu += (_AIRWAY_WALL_HU - hu) * raster.outer
    hu += (_AIR_HU - _AIRWAY_WALL_HU) * raster.lumen
    del raster.outer, raster.lumen
    report(0.7, "simulating scanner blur and noise")
    ct = _image(hu, grid, chosen, rng)
    del hu
    report(1.0, "phantom ready")
    return Phantom(
        ct=Volume(ct, geometry),
        airway=Volume((raster.classes > 0).astype(np.uint8), geometry),
        airway3=Volume(raster.classes, geometry),
        lungs=Volume(lungs, geometry),
        branches=branches,
        seed=int(seed),
        variant=variant,
    )


def tree_description(phantom: Phantom) -> dict:
    """The content of ``tree.json``: grid, seed, variant and every branch (points in LPS mm)."""
    return {
        "seed": phantom.seed,
        "variant": phantom.variant,
        "spacing_zyx_mm": list(phantom.ct.spacing_zyx),
        "origin_xyz_mm": list(phantom.ct.geometry.origin_xyz),
        "shape_zyx": list(phantom.ct.array_zyx.shape),
        "branches": [
            {
                "id": branch.id,
                "parent": branch.parent,
                "generation": branch.generation,
                "class": branch.airway_class,
                "length_mm": round(branch.length_mm, 4),
                "median_diameter_mm": round(branch.median_diameter_mm, 4),
                "points_mm": np.round(branch.points_xyz_mm, 4).tolist(),
                "radius_mm": np.round(branch.radius_mm, 4).tolist(),
            }
            for branch in phantom.branches
        ],
    }


def write_phantom(phantom: Phantom, out_dir: str | Path) -> dict[str, Path]:
    """Write the phantom's volumes (NIfTI) and ``tree.json`` into ``out_dir``.

    The files are written together (:func:`~AirwaySegmentationLib.volume.atomic_outputs`): if
    any of them fails, none replaces what ``out_dir`` held, so a CT is never left beside the
    ground truth of another phantom.

    Returns
    -------
    dict of str to pathlib.Path
        Keys ``ct``, ``airway``, ``airway3``, ``lungs``, ``tree``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AirwayInputError(f"{out_dir} exists and is not a folder; give a folder for the phantom files.")
    volumes = {"ct": phantom.ct, "airway": phantom.airway, "airway3": phantom.airway3, "lungs": phantom.lungs}
    paths = {name: out_dir / f"{name}.nii.gz" for name in volumes} | {"tree": out_dir / "tree.json"}
    with atomic_outputs(list(paths.values())) as temporary:
        for volume, tmp in zip(volumes.values(), temporary):
            write_volume(volume, tmp)
        temporary[-1].write_text(json.dumps(tree_description(phantom)))
    return paths
