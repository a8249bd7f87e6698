"""Training patches: where to crop, how to augment, and a torch dataset that yields them.

Crop centres (METHODS.md section 5, Tang 2.1) are drawn from three sources, mixed in
proportions set by :class:`CropMix`:

- ``random``: anywhere, the patch inside the volume;
- ``hard_mining``: a voxel of a "miss" mask given by the training loop (e.g. label and not
  prediction), so the patch shows where the current model fails;
- ``small_airway``: a centerline voxel whose lumen radius is below 2 voxels (Tang 1.3), so
  the thin branches, rare in random crops, are seen often.

Augmentation (:class:`Augmentation`) keeps CT and labels aligned: one affine map (rotation
about z, isotropic scale) resamples both, the CT linearly and the labels by nearest
neighbour, on a crop just large enough for the map; flips are exact array flips; intensity
changes and noise touch the CT only.  :class:`PatchDataset` turns the patches into network
input (:func:`~AirwaySegmentationLib.preprocess.network_input`) and adds the loss weights of
:mod:`~AirwaySegmentationLib.loss_weights`, computed on each label crop.

Everything random takes a :class:`numpy.random.Generator`: the same seed gives the same
patches.

Examples
--------
>>> from AirwaySegmentationLib.data import phantom_training_volume
>>> volume = phantom_training_volume(1, shape_zyx=(64, 96, 96), spacing_zyx=(2.5, 2.0, 2.0))
>>> targets = sampling_targets(volume.labels3, volume.spacing_zyx)
>>> sampler = PatchSampler(patch_size_zyx=(32, 32, 32))
>>> rng = np.random.default_rng(0)
>>> patch = sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, targets, rng, Augmentation())
>>> patch.ct_zyx.shape, patch.labels_zyx.dtype
((32, 32, 32), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import IterableDataset, get_worker_info

from .arrays import as_airway_mask, bounding_box
from .data import TrainingVolume
from .errors import AirwayInputError
from .loss_weights import (
    centerline_distance_weight,
    gul_distance_weight,
    lumen_geometry,
)
from .preprocess import DEFAULT_INPUT_SPEC, InputSpec, network_input

#: HU given to the parts of a patch that lie outside the volume: the air that surrounds the
#: body at the crop's sides, and the value scanners give outside their field of view.
PAD_HU = -1024.0
#: Centerline voxels closer than this (in voxels) to the background are small airways (Tang 1.3).
SMALL_AIRWAY_RADIUS_VOXELS = 2.0
CROP_SOURCES = ("random", "hard_mining", "small_airway")


def _is_number_pair(values: object) -> bool:
    """Whether ``values`` is a sequence of two real numbers, so it unpacks and compares."""
    return (
        isinstance(values, Sequence)
        and len(values) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    )


@dataclass(frozen=True)
class CropMix:
    """Shares of the crop sources; they need not sum to 1 (they are normalised).

    The default is Tang's second and third training parts: 50% hard mining, 25% small
    airways, 25% random; ``CropMix(1, 0, 0)`` is his first part.  A source with nothing to
    draw from (no miss mask yet, no small airway in the volume) gives a random crop instead.
    """

    random: float = 0.25
    hard_mining: float = 0.5
    small_airway: float = 0.25

    def __post_init__(self) -> None:
        try:
            shares = np.array(dataclasses.astuple(self), dtype=float)
        except (TypeError, ValueError):  # a share that is no number
            shares = np.full(3, np.nan)
        if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
            raise AirwayInputError(
                f"The crop mix {dataclasses.astuple(self)} is not usable; expected non-negative shares, not all 0."
            )

    @property
    def probabilities(self) -> np.ndarray:
        """Shares of ``CROP_SOURCES``, summing to 1."""
        shares = np.array(dataclasses.astuple(self), dtype=float)
        return shares / shares.sum()


@dataclass
class SamplingTargets:
    """The voxels targeted crops are centred on, for one volume (computed once, then reused).

    Attributes
    ----------
    small_airway_zyx : numpy.ndarray
        int64 (N, 3): centerline voxels with lumen radius below 2 voxels.
    hard_mining_zyx : numpy.ndarray
        int64 (M, 3): voxels of the current miss mask (empty until the training loop sets one
        with :func:`with_miss_mask`).
    """

    small_airway_zyx: np.ndarray
    hard_mining_zyx: np.ndarray


def sampling_targets(
    labels_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    small_radius_voxels: float = SMALL_AIRWAY_RADIUS_VOXELS,
) -> SamplingTargets:
    """Small-airway centerline voxels of a label map (Tang 1.3), no hard-mining voxels yet.

    The centerline and the lumen radius come from
    :func:`~AirwaySegmentationLib.loss_weights.lumen_geometry` (Lee skeleton, distance to the
    background at each centerline voxel), computed on the airway's bounding box.  Tang counts
    the radius in pixels; with anisotropic voxels it is counted here in units of the in-plane
    pixel (the smaller of the y and x spacings, at which airway calibre is read on CT), not
    the slice spacing, which may be finer (thin slices) or coarser.

    Parameters
    ----------
    labels_zyx : numpy.ndarray
        Labels, shape (Z, Y, X); any nonzero voxel is airway.
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    small_radius_voxels : float
        Centerline voxels whose distance to the background is below this are small airways.

    Returns
    -------
    SamplingTargets
    """
    airway = as_airway_mask(labels_zyx)
    box = bounding_box(airway)
    if box is None:
        return SamplingTargets(np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64))
    geometry = lumen_geometry(airway[box], spacing_zyx)
    # On the centerline itself the distance to the centerline is 0 and the "radius at the
    # nearest centerline voxel" is the voxel's own distance to the background, Tang's d_center.
    centerline = (geometry.centerline_distance_mm == 0) & airway[box]
    small = centerline & (geometry.lumen_radius_mm < small_radius_voxels * min(spacing_zyx[1:]))
    points = np.argwhere(small) + [s.start for s in box]
    return SamplingTargets(points.astype(np.int64), np.zeros((0, 3), np.int64))


def with_miss_mask(targets: SamplingTargets, miss_zyx: np.ndarray | None) -> SamplingTargets:
    """``targets`` with hard-mining voxels from a miss mask on the volume's grid (None clears them)."""
    miss = np.zeros((0, 3), np.int64) if miss_zyx is None else np.argwhere(as_airway_mask(miss_zyx))
    return dataclasses.replace(targets, hard_mining_zyx=miss.astype(np.int64))


@dataclass(frozen=True)
class Augmentation:
    """Random changes that keep CT and labels aligned (the field's usual, small ranges).

    Attributes
    ----------
    flip_axes : tuple of int
        Axes (0 = z, 1 = y, 2 = x) each flipped with probability ``flip_probability``.  The
        default flips x only: left-right mirrors the anatomy's sides, but the three classes
        are side-free, so the labels stay valid; flipping z or y gives anatomy no scan shows.
    flip_probability : float
        Probability of each flip.
    max_rotation_deg : float
        Rotation about z (in the axial plane) drawn uniformly in +-this; patient roll.
    scale_range : tuple of 2 float
        Isotropic zoom factor drawn uniformly in this range (>1 magnifies); body size.
    hu_scale_range, max_hu_shift : tuple of 2 float, float
        CT only: ``hu * scale + shift``, shift uniform in +-``max_hu_shift``; calibration
        drift between scanners, small beside the ~1000 HU air-wall contrast.
    max_noise_sd_hu : float
        CT only: Gaussian noise whose SD is drawn uniformly in [0, this]; dose differences.
    """

    flip_axes: tuple[int, ...] = (2,)
    flip_probability: float = 0.5
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    hu_scale_range: tuple[float, float] = (0.95, 1.05)
    max_hu_shift: float = 20.0
    max_noise_sd_hu: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.flip_axes, Sequence) or any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise AirwayInputError(f"Flip axes {self.flip_axes} are not usable; expected 0 (z), 1 (y) or 2 (x).")
        for scale_range in (self.scale_range, self.hu_scale_range):
            if not (_is_number_pair(scale_range) and 0 < scale_range[0] <= scale_range[1]):
                raise AirwayInputError(
                    f"The scale range {scale_range} is not usable; expected (low, high) with 0 < low <= high."
                )
        if min(self.flip_probability, self.max_rotation_deg, self.max_hu_shift, self.max_noise_sd_hu) < 0:
            raise AirwayInputError("Augmentation probabilities, angles, shifts and noise levels must be non-negative.")


@dataclass(frozen=True)
class AugmentationDraw:
    """One random draw of an :class:`Augmentation`.

    Attributes
    ----------
    matrix_zyx : numpy.ndarray
        (3, 3) map from patch offsets (voxels, about the patch centre) to source offsets.
    scale : float
        The zoom factor (the patch's voxels are ``spacing / scale`` mm).
    flips : tuple of int
        Axes to flip.
    hu_scale, hu_shift, noise_sd_hu : float
        Intensity change and noise level.
    """

    matrix_zyx: np.ndarray
    scale: float
    flips: tuple[int, ...]
    hu_scale: float
    hu_shift: float
    noise_sd_hu: float

    @property
    def resamples(self) -> bool:
        """False when the map is the identity, so the crop is taken as it is."""
        return not np.allclose(self.matrix_zyx, np.eye(3))

    def source_margin(self, patch_size_zyx: Sequence[int]) -> np.ndarray:
        """Voxels the source crop needs on each side of the patch so the map stays inside it."""
        if not self.resamples:
            return np.zeros(3, dtype=int)
        half = (np.asarray(patch_size_zyx, dtype=float) - 1.0) / 2.0
        corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
        reach = np.abs(self.matrix_zyx @ corners).max(axis=1)
        # One more voxel for the linear interpolation's second neighbour.
        return np.maximum(np.ceil(reach - half).astype(int) + 1, 0)


def draw_augmentation(augmentation: Augmentation, rng: np.random.Generator) -> AugmentationDraw:
    """One random draw of ``augmentation``."""
    angle = math.radians(rng.uniform(-augmentation.max_rotation_deg, augmentation.max_rotation_deg))
    scale = float(rng.uniform(*augmentation.scale_range))
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])  # about z, in the (y, x) plane
    flips = tuple(axis for axis in augmentation.flip_axes if rng.random() < augmentation.flip_probability)
    return AugmentationDraw(
        matrix_zyx=rotation / scale,
        scale=scale,
        flips=flips,
        hu_scale=float(rng.uniform(*augmentation.hu_scale_range)),
        hu_shift=float(rng.uniform(-augmentation.max_hu_shift, augmentation.max_hu_shift)),
        noise_sd_hu=float(rng.uniform(0.0, augmentation.max_noise_sd_hu)),
    )


def augment_patch(
    ct_zyx: np.ndarray,
    labels_zyx: np.ndarray,
    draw: AugmentationDraw,
    patch_size_zyx: Sequence[int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a drawn augmentation to a source crop centred on the patch.

    Parameters
    ----------
    ct_zyx : numpy.ndarray
        CT source crop in HU, shape ``patch_size + 2 * draw.source_margin(patch_size)``.
    labels_zyx : numpy.ndarray
        Labels on the same crop.
    draw : AugmentationDraw
        From :func:`draw_augmentation`.
    patch_size_zyx : sequence of 3 int
        Output shape (D, H, W).
    rng : numpy.random.Generator
        For the noise.

    Returns
    -------
    ct : numpy.ndarray
        float32 (D, H, W) HU.
    labels : numpy.ndarray
        uint8 (D, H, W), the same map applied by nearest neighbour.
    """
    size = np.asarray(patch_size_zyx)
    if draw.resamples:
        # Patch voxel o reads source point M (o - c_patch) + c_source: rotation and zoom about the centre.
        offset = (np.asarray(ct_zyx.shape) - 1.0) / 2.0 - draw.matrix_zyx @ ((size - 1.0) / 2.0)
        ct = ndimage.affine_transform(
            ct_zyx.astype(np.float32, copy=False), draw.matrix_zyx, offset, tuple(size), order=1, mode="nearest"
        )
        labels = ndimage.affine_transform(labels_zyx, draw.matrix_zyx, offset, tuple(size), order=0, mode="nearest")
    else:
        margin = (np.asarray(ct_zyx.shape) - size) // 2
        centre = tuple(slice(m, m + n) for m, n in zip(margin, size))
        ct, labels = ct_zyx[centre].astype(np.float32), labels_zyx[centre].copy()
    if draw.flips:
        ct, labels = np.flip(ct, draw.flips), np.flip(labels, draw.flips)
    ct = ct * np.float32(draw.hu_scale) + np.float32(draw.hu_shift)
    if draw.noise_sd_hu > 0:
        ct += rng.normal(0.0, draw.noise_sd_hu, ct.shape).astype(np.float32)
    return np.ascontiguousarray(ct), np.ascontiguousarray(labels)


@dataclass
class Patch:
    """One training patch.

    Attributes
    ----------
    ct_zyx : numpy.ndarray
        float32 (D, H, W) HU.
    labels_zyx : numpy.ndarray
        uint8 (D, H, W) classes 0-3.
    spacing_zyx : tuple of 3 float
        Voxel size of the patch in mm (the volume's, divided by the augmentation's zoom).
    source : str
        Which of ``CROP_SOURCES`` chose the target.
    target_zyx : numpy.ndarray
        int64 (3,): the voxel of the volume the crop was aimed at (a miss or small-airway
        voxel for targeted crops); the patch covers it, before augmentation moves it.
    corner_zyx : numpy.ndarray
        int64 (3,): volume index of the patch's first voxel before augmentation (may be
        negative or reach past the volume when it is smaller than the patch: padding).
    """

    ct_zyx: np.ndarray
    labels_zyx: np.ndarray
    spacing_zyx: tuple[float, float, float]
    source: str
    target_zyx: np.ndarray
    corner_zyx: np.ndarray


def _padded_crop(array: np.ndarray, corner: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """``array[corner : corner + size]`` with ``fill`` where the box leaves the array."""
    low = np.maximum(corner, 0)
    high = np.minimum(corner + size, array.shape)
    inside = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    if np.all(low == corner) and np.all(high == corner + size):
        return array[inside]
    crop = np.full(tuple(int(n) for n in size), fill, dtype=array.dtype)
    crop[tuple(slice(int(a), int(b)) for a, b in zip(low - corner, high - corner))] = array[inside]
    return crop


@dataclass(frozen=True)
class PatchSampler:
    """Draws training patches from a volume (METHODS.md section 5, Tang 2.1).

    Attributes
    ----------
    patch_size_zyx : tuple of 3 int
        Patch shape (128^3 in Tang).
    mix : CropMix
        Shares of random, hard-mining and small-airway crops.
    max_shift_fraction : float
        A targeted crop puts its target at a random offset of up to this share of the patch
        from the centre, so the network does not learn that airway sits in the middle.

    Placement: the patch is moved to lie inside the volume along every axis where the
    volume is large enough (the target stays inside the patch); along a shorter axis the
    volume is centred in the patch and the rest is padded with air (``PAD_HU``, label 0).
    """

    patch_size_zyx: tuple[int, int, int] = (128, 128, 128)
    mix: CropMix = CropMix()
    max_shift_fraction: float = 0.25

    def __post_init__(self) -> None:
        try:
            size = tuple(int(n) for n in self.patch_size_zyx)
        except (TypeError, ValueError):  # a bare 128, or "abc"
            size = ()
        if len(size) != 3 or min(size) < 1:
            raise AirwayInputError(
                f"The patch size {self.patch_size_zyx} is not usable; expected three positive sizes."
            )
        if not 0 <= self.max_shift_fraction <= 0.5:
            raise AirwayInputError(f"The crop shift {self.max_shift_fraction} must lie in [0, 0.5] of the patch.")
        object.__setattr__(self, "patch_size_zyx", size)

    def choose_target(
        self, shape_zyx: Sequence[int], targets: SamplingTargets, rng: np.random.Generator
    ) -> tuple[str, np.ndarray]:
        """The crop source and the voxel the crop is aimed at."""
        source = CROP_SOURCES[rng.choice(len(CROP_SOURCES), p=self.mix.probabilities)]
        points = {"hard_mining": targets.hard_mining_zyx, "small_airway": targets.small_airway_zyx}.get(source)
        if points is not None and len(points) > 0:
            return source, points[rng.integers(len(points))].astype(np.int64)
        # Random: the patch's corner is uniform over the positions that keep it inside the volume.
        size, shape = np.asarray(self.patch_size_zyx), np.asarray(shape_zyx)
        free = np.maximum(shape - size, 0)
        corner = np.array([rng.integers(0, n + 1) for n in free], dtype=np.int64)
        return "random", corner + np.minimum(size, shape) // 2

    def place(
        self, shape_zyx: Sequence[int], source: str, target_zyx: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Corner of the patch for a target (see the class docstring)."""
        size, shape = np.asarray(self.patch_size_zyx), np.asarray(shape_zyx)
        if source == "random":
            corner = target_zyx - size // 2
        else:
            reach = np.floor(self.max_shift_fraction * size).astype(int)
            corner = target_zyx - size // 2 + np.array([rng.integers(-r, r + 1) for r in reach])
        fits = shape >= size
        return np.where(fits, np.clip(corner, 0, shape - size), -((size - shape) // 2)).astype(np.int64)

    def sample(
        self,
        ct_zyx: np.ndarray,
        labels_zyx: np.ndarray,
        spacing_zyx: Sequence[float],
        targets: SamplingTargets,
        rng: np.random.Generator,
        augmentation: Augmentation | None = None,
    ) -> Patch:
        """One patch, augmented when ``augmentation`` is given.

        Parameters
        ----------
        ct_zyx, labels_zyx : numpy.ndarray
            CT (HU) and labels of the volume, shape (Z, Y, X).
        spacing_zyx : sequence of 3 float
            Voxel size in mm.
        targets : SamplingTargets
            From :func:`sampling_targets` (and :func:`with_miss_mask`) for this volume.
        rng : numpy.random.Generator
            The only source of randomness.
        augmentation : Augmentation, optional
            Random geometric and intensity changes.

        Returns
        -------
        Patch
        """
        if ct_zyx.shape != labels_zyx.shape:
            raise AirwayInputError(f"CT {ct_zyx.shape} and labels {labels_zyx.shape} differ in shape; give one grid.")
        source, target = self.choose_target(ct_zyx.shape, targets, rng)
        corner = self.place(ct_zyx.shape, source, target, rng)
        size = np.asarray(self.patch_size_zyx)
        if augmentation is None:
            ct = _padded_crop(ct_zyx, corner, size, PAD_HU).astype(np.float32)
            labels = _padded_crop(labels_zyx, corner, size, 0).copy()
            return Patch(ct, labels, tuple(float(s) for s in spacing_zyx), source, target, corner)
        draw = draw_augmentation(augmentation, rng)
        margin = draw.source_margin(size)
        source_ct = _padded_crop(ct_zyx, corner - margin, size + 2 * margin, PAD_HU)
        source_labels = _padded_crop(labels_zyx, corner - margin, size + 2 * margin, 0)
        ct, labels = augment_patch(source_ct, source_labels, draw, size, rng)
        spacing = tuple(float(s) / draw.scale for s in spacing_zyx)
        return Patch(ct, labels, spacing, source, target, corner)


class PatchDataset(IterableDataset):
    """Endless (or ``n_patches`` long) stream of training patches for a torch DataLoader.

    Each item is a dict of tensors (the DataLoader's default collation stacks them into a
    batch with a leading N):

    - ``"image"``: float32 (C, D, H, W), :func:`~AirwaySegmentationLib.preprocess.network_input`;
    - ``"labels"``: int64 (D, H, W), classes 0-3;
    - ``"gul_weight"``: float32 (D, H, W), :func:`~AirwaySegmentationLib.loss_weights.gul_distance_weight`;
    - ``"centerline_weight"``: float32 (D, H, W),
      :func:`~AirwaySegmentationLib.loss_weights.centerline_distance_weight`.

    The volume of each patch is drawn uniformly.  Workers: each DataLoader worker draws from
    its own generator, seeded with ``(seed, worker id)``, and yields its share of
    ``n_patches``; with ``num_workers=0`` the main process is worker 0, so the patches
    differ with the number of workers but not from run to run.

    Epochs: call :meth:`set_epoch` before each pass; the generators are seeded with
    ``(seed, epoch, worker id)``, so every epoch draws new patches and a rerun the same ones.
    Hard mining: call :meth:`set_miss_masks` between epochs.  Both take effect in workers
    started afterwards (the default, non-persistent DataLoader workers).

    Parameters
    ----------
    volumes : sequence of TrainingVolume
        The training volumes (their small-airway targets are computed here, once).
    sampler : PatchSampler
        Patch size and crop mix.
    augmentation : Augmentation or None
        None for validation patches.
    input_spec : InputSpec
        Network input channels.
    seed : int
        Seed of the patch stream.
    n_patches : int or None
        Patches per pass over the dataset (an "epoch"); None: endless.
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        sampler: PatchSampler,
        augmentation: Augmentation | None = Augmentation(),
        input_spec: InputSpec = DEFAULT_INPUT_SPEC,
        seed: int = 0,
        n_patches: int | None = None,
    ) -> None:
        if not volumes:
            raise AirwayInputError("The patch dataset has no volumes; give at least one training volume.")
        self.volumes = list(volumes)
        self.sampler = sampler
        self.augmentation = augmentation
        self.input_spec = input_spec
        self.seed = int(seed)
        self.n_patches = n_patches
        self.epoch = 0
        self.targets = [sampling_targets(v.labels3, v.spacing_zyx) for v in self.volumes]

    def set_epoch(self, epoch: int) -> None:
        """Number of the coming pass; it enters the seed, so each epoch gets new patches."""
        self.epoch = int(epoch)

    def set_miss_masks(self, miss_masks: Sequence[np.ndarray | None]) -> None:
        """Hard-mining masks, one per volume on its (cropped) grid; None leaves a volume without."""
        if len(miss_masks) != len(self.volumes):
            raise AirwayInputError(
                f"Got {len(miss_masks)} miss masks for {len(self.volumes)} volumes; give one per volume."
            )
        for index, (volume, miss) in enumerate(zip(self.volumes, miss_masks)):
            if miss is not None and miss.shape != volume.labels3.shape:
                raise AirwayInputError(
                    f"The miss mask of {volume.name} has shape {miss.shape}, its volume {volume.labels3.shape}; "
                    "give masks on the training volume's grid."
                )
            self.targets[index] = with_miss_mask(self.targets[index], miss)

    def item(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One patch as the dict of tensors described in the class docstring."""
        index = int(rng.integers(len(self.volumes)))
        volume = self.volumes[index]
        patch = self.sampler.sample(
            volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, self.targets[index], rng, self.augmentation
        )
        geometry = lumen_geometry(patch.labels_zyx, patch.spacing_zyx)
        return {
            "image": torch.from_numpy(network_input(patch.ct_zyx, self.input_spec)),
            "labels": torch.from_numpy(patch.labels_zyx.astype(np.int64)),
            "gul_weight": torch.from_numpy(gul_distance_weight(patch.labels_zyx, patch.spacing_zyx, geometry)),
            "centerline_weight": torch.from_numpy(
                centerline_distance_weight(patch.labels_zyx, patch.spacing_zyx, geometry)
            ),
        }

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        count = 0
        # Worker w yields patches w, w + n_workers, ... of the epoch: the shares add up to n_patches.
        while self.n_patches is None or worker + count * n_workers < self.n_patches:
            yield self.item(rng)
            count += 1
