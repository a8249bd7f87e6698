"""The three anatomy-aware airway classes (DeepTree "AMC") and the rule that assigns them.

Class 1 = trachea + left and right main bronchi; class 2 = lobar down to segmental bronchi;
class 3 = every smaller bronchus, and any branch whose median lumen diameter is <= 2 mm
whatever its level (METHODS.md section 1).  Classes never decrease down the tree.

The names, colours and SNOMED CT codes here are the single source used by the ``.seg.nrrd``
writer, the CLI and the Slicer modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import AirwayInputError

#: Generations 0 (trachea) and 1 (main bronchi) are class 1.
MAIN_BRONCHUS_GENERATION = 1
#: Deepest generation that is still class 2 (segmental bronchi sit at generations 3-5).
DEFAULT_SEGMENTAL_GENERATION = 4
#: A branch this thin or thinner (median lumen diameter, mm) is class 3 at any level.
SMALL_BRONCHUS_DIAMETER_MM = 2.0


@dataclass(frozen=True)
class AirwayClass:
    """One of the three labels written to label maps and segmentations.

    Attributes
    ----------
    label : int
        Voxel value in a three-class label map.
    name : str
        Segment name shown to the user.
    color_rgb : tuple of float
        Display colour, each component in [0, 1].
    snomed_type : tuple of str
        (code value, code meaning) of the SNOMED CT anatomical structure.
    """

    label: int
    name: str
    color_rgb: tuple[float, float, float]
    snomed_type: tuple[str, str]


#: SNOMED CT category of every airway segment: "Anatomical Structure".
SNOMED_CATEGORY = ("123037004", "Anatomical Structure")

# DICOM CID 7155 offers "Trachea" (44567001) and "Bronchus" (955009) for thoracic segments;
# class 1 is coded as trachea because the trachea dominates it, classes 2 and 3 as bronchus
# and are told apart by name.
AIRWAY_CLASSES: tuple[AirwayClass, ...] = (
    AirwayClass(1, "Trachea and main bronchi", (0.90, 0.30, 0.25), ("44567001", "Trachea")),
    AirwayClass(2, "Lobar to segmental bronchi", (0.25, 0.65, 0.90), ("955009", "Bronchus")),
    AirwayClass(3, "Small bronchi", (0.95, 0.80, 0.25), ("955009", "Bronchus")),
)


def check_segmental_generation(segmental_generation: int) -> None:
    """Raise :class:`AirwayInputError` unless ``segmental_generation`` is an integer of at least 2
    (class 2 begins below the main bronchi, generation 1)."""
    if isinstance(segmental_generation, bool) or not isinstance(segmental_generation, (int, np.integer)) or (
        segmental_generation <= MAIN_BRONCHUS_GENERATION
    ):
        raise AirwayInputError(
            f"The segmental generation {segmental_generation!r} is not usable; expected a whole number of at least "
            f"{MAIN_BRONCHUS_GENERATION + 1} (the trachea is generation 0, the main bronchi {MAIN_BRONCHUS_GENERATION})."
        )


def branch_class(
    generation: int,
    diameter_mm: float,
    parent_class: int | None = None,
    segmental_generation: int = DEFAULT_SEGMENTAL_GENERATION,
) -> int:
    """Return the airway class (1, 2 or 3) of one branch.

    Parameters
    ----------
    generation : int
        Branch generation, 0 for the trachea, 1 for the main bronchi.
    diameter_mm : float
        Median lumen diameter of the branch in mm.
    parent_class : int or None
        Class of the parent branch; the result is never lower (classes are monotone
        down the tree).  ``None`` for the trachea.
    segmental_generation : int
        Deepest generation that is still class 2.

    Returns
    -------
    int
        1, 2 or 3.

    Examples
    --------
    >>> branch_class(1, 12.0)
    1
    >>> branch_class(3, 1.8, parent_class=2)
    3
    >>> branch_class(6, 4.0, parent_class=2)
    3
    """
    if generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")
    if generation <= MAIN_BRONCHUS_GENERATION:
        own = 1
    elif generation <= segmental_generation and diameter_mm > SMALL_BRONCHUS_DIAMETER_MM:
        own = 2
    else:
        own = 3
    return own if parent_class is None else max(own, parent_class)


def as_class_map(labels_zyx: np.ndarray) -> np.ndarray | None:
    """The labels as a three-class map (uint8) if they are one, else None (a binary airway mask).

    A label map is three-class when its values lie in 0-3 and include 2 or 3.  Anything else
    (0/1, 0/255, other label values) is read as a binary airway mask, nonzero = airway; this
    one rule serves evaluation, training data and the CLI alike.

    Examples
    --------
    >>> as_class_map(np.array([0, 1, 3], np.uint8)).tolist()
    [0, 1, 3]
    >>> as_class_map(np.array([0, 255], np.uint8)) is None
    True
    """
    values = set(np.unique(labels_zyx).tolist())
    if values <= {0, 1, 2, 3} and values & {2, 3}:
        return np.asarray(labels_zyx).astype(np.uint8, copy=False)
    return None
