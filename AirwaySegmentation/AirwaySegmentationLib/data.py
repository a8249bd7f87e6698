"""Training volumes: CT + three-class airway labels, cropped to the chest.

Two sources give the same :class:`TrainingVolume`:

- a folder in the ATM'22 (nnU-Net) layout, found by :func:`find_cases` and read by
  :func:`load_case`::

      root/imagesTr/NAME_0000.nii.gz     CT in HU (also .nii, .nrrd)
      root/labelsTr/NAME.nii.gz          airway labels (also .nii, .nrrd, or an annotator's
                                         Slicer NAME.seg.nrrd); the ATM'22 release names
                                         them like the images, NAME_0000.nii.gz

  The release's batches (``ATM22/TrainBatch1``, ``ATM22/TrainBatch2``) are read together
  by giving their parent folder, ``find_cases("ATM22")``.

- the synthetic phantom, generated on the fly by :func:`phantom_training_volume` with
  seeds from :func:`phantom_seeds`, whose train / validation / test seeds never overlap.

Binary labels (ATM'22) become the three anatomy-aware classes of METHODS.md section 1
(:func:`~AirwaySegmentationLib.tree.airway_class_labels`); labels that already hold classes
2 or 3 are kept as they are.  Every volume is cropped with
:func:`~AirwaySegmentationLib.preprocess.crop_to_body`, the same crop inference uses.

Examples
--------
>>> cases = find_cases("ATM22")  # doctest: +SKIP
>>> volume = load_case(cases[0])  # doctest: +SKIP
>>> volume.ct.array_zyx.shape == volume.labels3.shape  # doctest: +SKIP
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import Box, bounding_box
from .classes import as_class_map
from .errors import AirwayInputError
from .phantom import generate_phantom
from .orientation import canonical
from .preprocess import crop_to_body, crop_volume
from .tree import airway_class_labels
from .volume import Volume, read_ct, read_label

#: Suffix nnU-Net / ATM'22 give the single CT channel of a case.
CHANNEL_SUFFIX = "_0000"
#: File endings of CT images and label maps in an ATM'22 folder.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd")
LABEL_ENDINGS = (".seg.nrrd",) + IMAGE_ENDINGS
#: Phantom seeds of each split live in their own block of this many seeds.
SEEDS_PER_SPLIT = 1_000_000
PHANTOM_SPLITS = ("train", "validation", "test")

#: Crop margin (mm) around the lungs for training volumes.
DEFAULT_MARGIN_MM = 10.0


@dataclass(frozen=True)
class AirwayCase:
    """One CT and its label file in a dataset folder.

    Attributes
    ----------
    name : str
        Case name (``NAME`` in ``NAME_0000.nii.gz``).
    image_path : pathlib.Path
        The CT.
    label_path : pathlib.Path
        The airway labels (binary, three-class or ``.seg.nrrd``).
    """

    name: str
    image_path: Path
    label_path: Path


@dataclass
class TrainingVolume:
    """A CT and its three-class labels, cropped to the chest, ready for patch sampling.

    Attributes
    ----------
    name : str
        Case name, or ``phantom-VARIANT-SEED``.
    ct : Volume
        CT in HU, in the canonical order, cropped; its geometry places the crop where it lay
        in the scan.
    labels3 : numpy.ndarray
        uint8, shape of ``ct.array_zyx``: 0 background, 1-3 airway classes (METHODS section 1).
    crop_box : tuple of 3 slice
        Where the crop lies in the original grid, brought to the canonical order
        (:mod:`~AirwaySegmentationLib.orientation`; a case on disk stored otherwise is
        reoriented before cropping).
    """

    name: str
    ct: Volume
    labels3: np.ndarray
    crop_box: Box

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm, z, y, x."""
        return self.ct.spacing_zyx


def name_with_ending(path: Path, endings: tuple[str, ...]) -> str | None:
    """The file name without its ending if it has one of ``endings``, else None."""
    lower = path.name.lower()
    for ending in endings:
        if lower.endswith(ending):
            return path.name[: -len(ending)]
    return None


def _files_by_name(folder: Path, endings: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = name_with_ending(path, endings)
        if name is None or not path.is_file():
            continue  # README, .DS_Store, dataset.json ...
        if name in files:
            raise AirwayInputError(
                f"{folder} holds two files for {name} ({files[name].name}, {path.name}); keep one."
            )
        files[name] = path
    return files


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _without_channel(names: dict[str, Path]) -> dict[str, Path]:
    """``names`` keyed without a trailing ``_0000``."""
    return {name.removesuffix(CHANNEL_SUFFIX): path for name, path in names.items()}


def _dataset_cases(root: Path) -> list[AirwayCase]:
    """The cases of one folder holding ``imagesTr`` and ``labelsTr``."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not labels_dir.is_dir():
        raise AirwayInputError(f"{labels_dir} is not a folder; put the airway labels of {images_dir} there.")
    images = _files_by_name(images_dir, IMAGE_ENDINGS)
    labels = _files_by_name(labels_dir, LABEL_ENDINGS)
    if not images:
        raise AirwayInputError(f"{images_dir} holds no CT images; expected files named NAME_0000.nii.gz.")
    other_channels = sorted(name for name in images if not name.endswith(CHANNEL_SUFFIX))
    if other_channels:
        raise AirwayInputError(
            f"{images_dir} holds images not named NAME_0000 ({_listed(other_channels)}); "
            "the CT is the only input channel, rename the files NAME_0000.nii.gz."
        )
    images = _without_channel(images)
    # nnU-Net names a label NAME, the ATM'22 release NAME_0000 like its image; both are read.
    doubled = sorted(
        name for name in labels if name.endswith(CHANNEL_SUFFIX) and name.removesuffix(CHANNEL_SUFFIX) in labels
    )
    if doubled:
        raise AirwayInputError(
            f"{labels_dir} holds labels both as NAME and NAME_0000 ({_listed(doubled)}); keep one of each pair."
        )
    labels = _without_channel(labels)
    without_label = sorted(set(images) - set(labels))
    if without_label:
        raise AirwayInputError(
            f"{len(without_label)} images have no label in {labels_dir} ({_listed(without_label)}); "
            "add labels named like the images (NAME_0000.nii.gz or NAME.nii.gz) or remove the images."
        )
    without_image = sorted(set(labels) - set(images))
    if without_image:
        raise AirwayInputError(
            f"{len(without_image)} labels have no image in {images_dir} ({_listed(without_image)}); "
            "add the images as NAME_0000.nii.gz or remove the labels."
        )
    return [AirwayCase(name, images[name], labels[name]) for name in sorted(images)]


def find_cases(root: str | os.PathLike) -> list[AirwayCase]:
    """The CT / label pairs of a dataset folder in the ATM'22 layout (see module docstring).

    Parameters
    ----------
    root : str or path-like
        Folder holding ``imagesTr`` and ``labelsTr``, or a folder whose immediate subfolders
        hold them (``ATM22`` with ``TrainBatch1`` and ``TrainBatch2``): their cases are
        combined.

    Returns
    -------
    list of AirwayCase
        Sorted by name.

    Raises
    ------
    AirwayInputError
        A missing folder, no images, an image not named ``NAME_0000``, two files for one
        name (also a label both as ``NAME`` and ``NAME_0000``, or one case in two batches),
        an image without a label or a label without an image (the names are listed).
    """
    if not isinstance(root, (str, os.PathLike)):
        raise AirwayInputError(f"The dataset folder must be a path, got {root!r}.")
    root = Path(root)
    if (root / "imagesTr").is_dir():
        return _dataset_cases(root)
    batches = sorted(folder for folder in root.glob("*/imagesTr") if folder.is_dir()) if root.is_dir() else []
    if not batches:
        raise AirwayInputError(
            f"{root} holds no imagesTr folder, directly or in a subfolder; expected "
            f"{root / 'imagesTr'}/NAME_0000.nii.gz and {root / 'labelsTr'}/NAME_0000.nii.gz (or NAME.nii.gz)."
        )
    cases: dict[str, AirwayCase] = {}
    for images_dir in batches:
        for case in _dataset_cases(images_dir.parent):
            if case.name in cases:
                raise AirwayInputError(
                    f"Case {case.name} is in both {cases[case.name].image_path.parent.parent} and "
                    f"{images_dir.parent}; keep it in one batch."
                )
            cases[case.name] = case
    return [cases[name] for name in sorted(cases)]


def three_class_labels(
    labels_zyx: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    superior_zyx: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Three-class labels from a binary or three-class label map.

    :func:`~AirwaySegmentationLib.classes.as_class_map` decides: a three-class map is kept
    (as uint8); anything else is a binary airway mask (nonzero = airway, so 0/255 masks work)
    and is classified by :func:`~AirwaySegmentationLib.tree.airway_class_labels`.

    Parameters
    ----------
    labels_zyx : numpy.ndarray
        Integer labels, shape (Z, Y, X).
    spacing_zyx : tuple of 3 float
        Voxel size in mm.
    superior_zyx : tuple of 3 float, optional
        Index-space direction towards the head (``Geometry.superior_zyx``), so a trachea cut
        by a wall bump is rooted at its top (see :func:`~AirwaySegmentationLib.tree.parse_airway_tree`).

    Returns
    -------
    numpy.ndarray
        uint8, same shape, values 0-3, nonzero exactly where ``labels_zyx`` is.
    """
    classes = as_class_map(labels_zyx)
    if classes is not None:
        return classes
    return airway_class_labels(labels_zyx != 0, spacing_zyx, superior_zyx=superior_zyx)


def _training_volume(name: str, ct: Volume, labels_zyx: np.ndarray, margin_mm: float) -> TrainingVolume:
    """Crop to the chest, widened if needed so that no labelled voxel is cut away."""
    box = crop_to_body(ct.array_zyx, ct.spacing_zyx, margin_mm)
    label_box = bounding_box(labels_zyx)
    if label_box is not None:
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, label_box))
    return TrainingVolume(name, crop_volume(ct, box), np.ascontiguousarray(labels_zyx[box]), box)


def load_case(case: AirwayCase, margin_mm: float = DEFAULT_MARGIN_MM) -> TrainingVolume:
    """Read a case, check that its labels lie on the CT grid, crop it and give it three classes.

    Parameters
    ----------
    case : AirwayCase
        From :func:`find_cases`.
    margin_mm : float
        Crop margin around the lungs (:func:`~AirwaySegmentationLib.preprocess.crop_to_body`).

    Returns
    -------
    TrainingVolume

    Raises
    ------
    AirwayInputError
        Unreadable files, a CT not in HU, labels on another grid.  Label values are never
        refused: :func:`three_class_labels` (the rule of
        :func:`~AirwaySegmentationLib.classes.as_class_map`) reads a map of values 0-3 that
        holds 2 or 3 as three classes, and anything else as a binary mask (nonzero = airway).
    """
    stored = read_ct(case.image_path)
    labels = read_label(case.label_path, reference=stored)
    # Training sees the canonical order that inference gives the network (orientation.py).
    ct, orientation = canonical(stored)
    volume = _training_volume(case.name, ct, orientation.to_canonical(labels.array_zyx), margin_mm)
    # Classes are given after cropping: the tree parse works on the airway's own box anyway.
    volume.labels3 = three_class_labels(volume.labels3, volume.spacing_zyx, ct.geometry.superior_zyx)
    return volume


def phantom_seeds(split: str, n: int) -> list[int]:
    """``n`` phantom seeds of a split; the splits never share a seed.

    Split ``k`` of ``("train", "validation", "test")`` owns the block
    ``[k * SEEDS_PER_SPLIT, (k + 1) * SEEDS_PER_SPLIT)`` and gets its first ``n`` seeds, so
    growing a split never takes a seed from another, and held-out phantoms are never seen
    in training.

    Examples
    --------
    >>> phantom_seeds("validation", 3)
    [1000000, 1000001, 1000002]
    """
    if split not in PHANTOM_SPLITS:
        raise AirwayInputError(f"Unknown phantom split {split!r}; expected one of {', '.join(PHANTOM_SPLITS)}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= SEEDS_PER_SPLIT:
        raise AirwayInputError(f"Cannot give {n} seeds of a split; expected 0 to {SEEDS_PER_SPLIT}.")
    start = PHANTOM_SPLITS.index(split) * SEEDS_PER_SPLIT
    return list(range(start, start + n))


def phantom_training_volume(
    seed: int,
    variant: str = "standard",
    shape_zyx: tuple[int, int, int] = (256, 256, 256),
    spacing_zyx: tuple[float, float, float] | None = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
) -> TrainingVolume:
    """A synthetic chest CT and its exact three-class labels, cropped like a real case.

    Parameters
    ----------
    seed, variant, shape_zyx, spacing_zyx
        As for :func:`~AirwaySegmentationLib.phantom.generate_phantom`; take seeds from
        :func:`phantom_seeds`.
    margin_mm : float
        Crop margin around the lungs.

    Returns
    -------
    TrainingVolume
        Named ``phantom-VARIANT-SEED``.
    """
    phantom = generate_phantom(seed, shape_zyx, spacing_zyx, variant)
    return _training_volume(f"phantom-{variant}-{seed}", phantom.ct, phantom.airway3.array_zyx, margin_mm)
