"""Corrected results back into training: a CT and its labels added to a dataset folder.

The trainer reads a dataset folder in the ATM'22 layout (:func:`~AirwaySegmentationLib.data.find_cases`)::

    DATASET/imagesTr/NAME_0000.nii.gz     the CT (Hounsfield units)
    DATASET/labelsTr/NAME.nii.gz          its airway labels (uint8: three classes or 0/1)

:func:`add_training_pair` writes one such pair, both files or neither, after checking that
the CT is a CT, the labels lie on its grid and hold airway, and that the case name is one
the trainer reads back as the same case; it then checks that ``find_cases`` lists the pair.

Examples
--------
>>> name = training_case_name("Chest CT (corrected) #2")
>>> name
'Chest_CT_corrected_2'
>>> add_training_pair("my_dataset", name, ct, labels)  # doctest: +SKIP
(PosixPath('my_dataset/imagesTr/Chest_CT_corrected_2_0000.nii.gz'), PosixPath('my_dataset/labelsTr/Chest_CT_corrected_2.nii.gz'))
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from AirwaySegmentationLib.data import (
    CHANNEL_SUFFIX,
    IMAGE_ENDINGS,
    LABEL_ENDINGS,
    find_cases,
)
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.volume import (
    Volume,
    atomic_outputs,
    check_ct,
    check_same_grid,
    to_sitk,
)

IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
#: The ending of the files written (the trainer also reads .nii and .nrrd).
FILE_ENDING = ".nii.gz"
#: Longest case name: with the channel suffix and ending it stays well below file-name limits.
MAX_NAME_LENGTH = 120
# ASCII letters, digits, ".", "_" and "-", starting with a letter or digit (no hidden files).
_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9._-]+")


def training_case_name(text: str) -> str:
    """A valid case name made from free text, such as a node or file name.

    Runs of characters other than ASCII letters, digits, ``.``, ``_`` and ``-`` become one
    ``_``; leading and trailing ``.``, ``_`` and ``-`` are dropped, and so is a trailing
    channel suffix ``_0000``.

    Parameters
    ----------
    text : str
        The wanted name.

    Returns
    -------
    str
        A name :func:`add_training_pair` accepts.

    Raises
    ------
    AirwayInputError
        Nothing usable is left (no ASCII letter or digit).

    Examples
    --------
    >>> training_case_name(" CT 1 (2) ")
    'CT_1_2'
    >>> training_case_name("lung_0000")
    'lung'
    """
    name = _INVALID_RUN.sub("_", str(text)).strip("._-")
    while name.endswith(CHANNEL_SUFFIX):
        name = name.removesuffix(CHANNEL_SUFFIX).rstrip("._-")
    name = name[:MAX_NAME_LENGTH].rstrip("._-")
    check_case_name(name)
    return name


def check_case_name(name: str) -> None:
    """Raise :class:`AirwayInputError` unless ``name`` is a case name the trainer reads back unchanged.

    Valid: 1 to :data:`MAX_NAME_LENGTH` ASCII letters, digits, ``.``, ``_`` or ``-``, starting
    with a letter or digit and not ending in the channel suffix ``_0000`` (the trainer would
    read the label ``NAME_0000.nii.gz`` as the label of another case).
    """
    if not isinstance(name, str) or not _VALID_NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise AirwayInputError(
            f"{name!r} is not a usable case name; use 1 to {MAX_NAME_LENGTH} ASCII letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (training_case_name makes one from any text)."
        )
    if name.endswith(CHANNEL_SUFFIX):
        raise AirwayInputError(
            f"The case name {name!r} ends in {CHANNEL_SUFFIX}, the suffix of the image channel; "
            f"leave it out ({name.removesuffix(CHANNEL_SUFFIX)!r})."
        )


def training_pair_paths(dataset_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Where :func:`add_training_pair` writes case ``name``: ``imagesTr/NAME_0000.nii.gz``, ``labelsTr/NAME.nii.gz``."""
    check_case_name(name)
    root = Path(dataset_dir)
    return root / IMAGES_DIR / f"{name}{CHANNEL_SUFFIX}{FILE_ENDING}", root / LABELS_DIR / f"{name}{FILE_ENDING}"


def existing_case_files(dataset_dir: str | os.PathLike, name: str) -> list[Path]:
    """The files of case ``name`` already in the dataset folder, under any name the trainer reads.

    That is the image ``imagesTr/NAME_0000`` and the label ``labelsTr/NAME`` or
    ``labelsTr/NAME_0000``, with any ending :func:`~AirwaySegmentationLib.data.find_cases`
    accepts (``.nii.gz``, ``.nii``, ``.nrrd``, and ``.seg.nrrd`` for labels).
    """
    check_case_name(name)
    root = Path(dataset_dir)
    candidates = [root / IMAGES_DIR / f"{name}{CHANNEL_SUFFIX}{ending}" for ending in IMAGE_ENDINGS]
    candidates += [root / LABELS_DIR / f"{stem}{ending}" for stem in (name, name + CHANNEL_SUFFIX) for ending in LABEL_ENDINGS]
    return [path for path in candidates if path.is_file()]


def _check_dataset_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise AirwayInputError(f"The dataset folder {root} is a file; choose a folder.")
    if not (root / IMAGES_DIR).is_dir() and root.is_dir():
        batches = sorted(folder.parent.name for folder in root.glob(f"*/{IMAGES_DIR}") if folder.is_dir())
        if batches:
            # A new root/imagesTr would hide the batches from the trainer (find_cases reads it alone).
            raise AirwayInputError(
                f"{root} holds dataset batches ({', '.join(batches)}); choose one of them as the dataset folder."
            )


def _training_labels(labels: Volume) -> Volume:
    """The labels as uint8 airway labels (0 background), or an error saying what is wrong."""
    values = np.asarray(labels.array_zyx)
    if values.dtype.kind not in "biu":
        raise AirwayInputError(f"The labels hold {values.dtype} values; expected an integer label map (0 = background).")
    if not values.any():
        raise AirwayInputError("The labels hold no airway; a training case needs the airway segmented.")
    if values.max() > 255:
        raise AirwayInputError(f"The labels hold values up to {values.max()}; expected airway labels from 0 to 255.")
    return labels.with_array(values.astype(np.uint8, copy=False))


def add_training_pair(
    dataset_dir: str | os.PathLike,
    name: str,
    ct: Volume,
    labels: Volume,
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Add a CT and its airway labels to a dataset folder, in the layout the trainer reads.

    Writes ``imagesTr/NAME_0000.nii.gz`` (the CT, its voxel type kept) and
    ``labelsTr/NAME.nii.gz`` (uint8 labels), both or neither (written beside their targets,
    then renamed), then checks that :func:`~AirwaySegmentationLib.data.find_cases` lists
    exactly these two files as case ``name``.

    Parameters
    ----------
    dataset_dir : str or path-like
        Dataset folder (created if needed); it holds, or will hold, ``imagesTr`` and
        ``labelsTr``.  A folder of batches (subfolders with ``imagesTr``) is refused.
    name : str
        Case name (:func:`check_case_name`; :func:`training_case_name` makes one from any text).
    ct : Volume
        The CT in Hounsfield units.
    labels : Volume
        Its airway labels on the CT's grid: three classes (0-3) or a binary mask.
    overwrite : bool
        Replace a case of that name.  Its other files (another ending, or a label named
        ``NAME_0000``) are removed, so that the trainer sees one image and one label.

    Returns
    -------
    image_path, label_path : pathlib.Path

    Raises
    ------
    AirwayInputError
        A bad name, a CT that is not in Hounsfield units, labels on another grid or without
        airway, a case of that name without ``overwrite``, a folder of batches, or a dataset
        folder the trainer cannot read once the pair is added (the pair is then removed
        again, unless it replaced a case).
    """
    image_path, label_path = training_pair_paths(dataset_dir, name)
    root = Path(dataset_dir)
    _check_dataset_folder(root)
    check_ct(ct)
    check_same_grid(labels, ct, "The labels", "the CT")
    labels = _training_labels(labels)
    existing = existing_case_files(root, name)
    if existing and not overwrite:
        raise AirwayInputError(
            f"The dataset {root} already has a case {name} ({', '.join(p.name for p in existing)}); "
            "choose another name or replace the case."
        )
    with atomic_outputs([image_path, label_path]) as (image_tmp, label_tmp):
        sitk.WriteImage(to_sitk(ct), str(image_tmp), True)
        sitk.WriteImage(to_sitk(labels), str(label_tmp), True)
    for path in existing:
        if path not in (image_path, label_path):
            path.unlink()
    try:
        found = {case.name: case for case in find_cases(root)}.get(name)
    except AirwayInputError as error:
        if not existing:
            image_path.unlink()
            label_path.unlink()
        raise AirwayInputError(f"The trainer cannot read {root} with case {name} added: {error}") from None
    if found is None or (found.image_path, found.label_path) != (image_path, label_path):
        raise AirwayInputError(f"The trainer does not read {image_path} and {label_path} as case {name}; check {root}.")
    return image_path, label_path
