"""File-level jobs: read inputs, call the array core, write outputs atomically.

Each function here is what one ``airway`` subcommand does, callable from a batch script
without the CLI.  Inputs are never modified; outputs land in the input's physical space.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.spatial import cKDTree

from .classes import DEFAULT_SEGMENTAL_GENERATION, as_class_map
from .errors import AirwayInputError
from .metrics import AirwayMetrics, evaluate_airway
from .progress import ProgressCallback, report, sub_progress
from .segfile import check_label_path, write_labels
from .tree import AirwayTree, covering_class_labels, parse_airway_tree
from .volume import Volume, atomic_outputs, check_same_grid, read_label, refuse_overwriting_inputs, write_json


def branch_table(tree: AirwayTree) -> list[dict]:
    """One JSON-ready row per branch: id, parent, children, generation, class, length and diameter (mm)."""
    return [
        {
            "id": branch.id,
            "parent": branch.parent,
            "children": list(branch.children),
            "generation": branch.generation,
            "class": branch.airway_class,
            "length_mm": round(float(branch.length_mm), 3),
            "median_diameter_mm": round(float(branch.diameter_mm), 3),
        }
        for branch in tree.branches
    ]


def label_airway_file(
    mask_path: str | os.PathLike,
    out_path: str | os.PathLike,
    connectivity: int = 26,
    segmental_generation: int = DEFAULT_SEGMENTAL_GENERATION,
    branches_path: str | os.PathLike | None = None,
    progress: Optional[ProgressCallback] = None,
) -> AirwayTree:
    """Turn a binary airway mask file into a three-class label file (``airway labels``).

    Parameters
    ----------
    mask_path : str or path-like
        Binary airway mask (any nonzero voxel is airway): image file or ``.seg.nrrd``.
    out_path : str or path-like
        ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.seg.nrrd`` (named, coloured, SNOMED-coded segments).
    connectivity : {6, 26}
        Connectivity of the largest component that is parsed.
    segmental_generation : int
        Deepest generation that is still class 2.
    branches_path : str or path-like, optional
        Where to write the branch table as JSON.
    progress : callable, optional
        ``progress(fraction, message)``.

    Returns
    -------
    AirwayTree
        The parsed tree behind the labels.
    """
    check_label_path(out_path)
    outputs = [out_path] if branches_path is None else [out_path, branches_path]
    refuse_overwriting_inputs([mask_path], outputs)
    mask = read_label(mask_path)
    report(progress, 0.0, "parsing the airway tree")
    tree = parse_airway_tree(
        mask.array_zyx > 0,
        mask.spacing_zyx,
        connectivity=connectivity,
        segmental_generation=segmental_generation,
        progress=sub_progress(progress, 0.05, 0.9),
        superior_zyx=mask.geometry.superior_zyx,
    )
    labels = covering_class_labels(tree, mask.array_zyx, connectivity=connectivity)
    # Labels and branch table are kept together or not at all.
    with atomic_outputs(outputs) as temporary:
        write_labels(mask.with_array(labels), temporary[0])
        if branches_path is not None:
            write_json({"spacing_zyx_mm": list(mask.spacing_zyx), "branches": branch_table(tree)}, temporary[1])
    report(progress, 1.0, "labels written")
    return tree


def read_tree_json_classes(tree_json_path: str | os.PathLike, reference: Volume) -> np.ndarray:
    """Class map of a ground-truth airway from a phantom's ``tree.json``.

    Each airway voxel of ``reference`` gets the class of the branch whose centreline point
    (physical mm) is nearest to it.

    Parameters
    ----------
    tree_json_path : str or path-like
        ``tree.json`` written by ``airway phantom`` (branches with ``class``, ``points_mm``).
    reference : Volume
        The ground-truth airway (nonzero = airway) on whose grid the classes are wanted.

    Returns
    -------
    numpy.ndarray
        uint8 (Z, Y, X) with values 0-3.
    """
    path = Path(tree_json_path)
    try:
        tree = json.loads(path.read_text())
        points = [np.asarray(b["points_mm"], dtype=float).reshape(-1, 3) for b in tree["branches"]]
        classes = [int(b["class"]) for b in tree["branches"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AirwayInputError(f"{path} is not a readable tree.json ({error}); expected the file `airway phantom` writes.") from None
    if not points or not any(len(p) for p in points):
        raise AirwayInputError(f"{path} holds no branch centreline points.")
    if any(c not in (1, 2, 3) for c in classes) or not all(np.all(np.isfinite(p)) for p in points):
        raise AirwayInputError(f"{path} holds a class outside 1-3 or a non-finite centreline point; regenerate it.")
    point_classes = np.concatenate([np.full(len(p), c, dtype=np.uint8) for p, c in zip(points, classes)])
    points_index_zyx = reference.geometry.physical_to_index_zyx(np.concatenate(points))
    spacing = np.asarray(reference.spacing_zyx)
    airway_index = np.argwhere(reference.array_zyx > 0)
    _, nearest = cKDTree(points_index_zyx * spacing).query(airway_index * spacing)
    classes_zyx = np.zeros(reference.array_zyx.shape, dtype=np.uint8)
    classes_zyx[tuple(airway_index.T)] = point_classes[nearest]
    return classes_zyx


def evaluate_airway_files(
    pred_path: str | os.PathLike,
    gt_path: str | os.PathLike,
    tree_json_path: str | os.PathLike | None = None,
    mode: str = "atm22",
) -> AirwayMetrics:
    """Compare a predicted airway file with a reference file (``airway evaluate``).

    Parameters
    ----------
    pred_path, gt_path : str or path-like
        Label files on the same grid; nonzero = airway.  A three-class reference supplies the
        classes for per-class TD/BD; a three-class prediction adds the per-class Dice.
    tree_json_path : str or path-like, optional
        A phantom's ``tree.json``: classes of the reference branches when ``gt_path`` is binary.
    mode : {"atm22", "atm26"}
        6- or 26-connected largest component of the prediction.

    Returns
    -------
    AirwayMetrics
    """
    gt = read_label(gt_path)
    pred = read_label(pred_path)
    check_same_grid(pred, gt, str(pred_path), f"the reference {gt_path}")
    gt_classes = as_class_map(gt.array_zyx)
    if gt_classes is None and tree_json_path is not None:
        gt_classes = read_tree_json_classes(tree_json_path, gt)
    return evaluate_airway(
        pred.array_zyx > 0,
        gt.array_zyx > 0,
        gt.spacing_zyx,
        mode=mode,
        gt_classes_zyx=gt_classes,
        pred_classes_zyx=as_class_map(pred.array_zyx),
    )

