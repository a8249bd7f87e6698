"""Airway segmentation metrics: ATM'22 (TD, BD, DSC, precision, score) plus topology measures.

The four ATM'22 metrics follow METHODS.md section 6 and the challenge's official code,
``evaluation/evaluation_atm_22.py`` and ``evaluation/tree_parse.py`` of
EndoluminalSurgicalVision-IMR/ATM-22-Related-Work (commit 522081149dfd):

* The reference G is parsed once (:func:`~AirwaySegmentationLib.tree.parse_airway_tree`).
  skel(G) is the whole Lee skeleton of the parsed mask (largest component, holes filled),
  junction voxels included: ``tree_parse.py`` l. 272-273 skeletonises the output of
  ``large_connected_domain`` (l. 69-79), not the raw label.
* TD = |LCC(P) n skel(G)| / |skel(G)| (``tree_length_calculation``, l. 40-44).
* BD = share of G's branches with >= 80 % of their skeleton voxels inside LCC(P)
  (``branch_detected_calculation``, l. 14-29).  A branch's skeleton voxels are skel(G) n the
  branch's voxels (``label_skeleton * label_parsing``), so junction voxels count for the branch
  they were assigned to, and every branch counts, the trachea included.
* DSC = 2|P n G| / (|P| + |G|) on the whole prediction (l. 32-37);
  precision = |LCC(P) n G| / |LCC(P)| (l. 73-78).
* ATM'22 score = mean of the four.

ATM's functions score whatever ``pred`` their caller passes; the challenge passed the largest
component of the prediction (its Q&A page: TD and BD "after the largest component
extraction").  Here, as METHODS.md section 6 says, TD, BD and precision use LCC(P) and DSC uses
the whole P.

Also reported: clDice (Shit et al., CVPR 2021), the Betti-0 error |#components(P) - 1| and the
raw component count (both 26-connected), the false-positive rate FP / background voxels of G
(``false_positive_rate_calculation``, l. 47-52), all three on the whole prediction, and TD and
BD per airway class.

Every rate is a percentage in [0, 100], as ATM'22 reports them.  Deliberate differences from
ATM's code: nothing is rounded (ATM rounds to 2 or 3 decimals; the table rounds for display),
and no smoothing constant 1e-5 is added, so an empty prediction scores exactly 0; an empty
reference is refused.

Modes: ``"atm22"`` takes the 6-connected largest component of P (``measure.label(...,
connectivity=1)`` in ``large_connected_domain``); ``"atm26"`` the 26-connected one.  The
reference is parsed with the same connectivity, so a reference scored against itself gets 100
in both modes, except that TD can fall a little short when the reference has enclosed holes:
its skeleton is taken after hole filling (as ATM'22 does), so skeleton voxels inside a hole are
not in the unfilled reference.

Examples
--------
>>> from AirwaySegmentationLib.metrics import evaluate_airway  # doctest: +SKIP
>>> metrics = evaluate_airway(pred_zyx, gt_zyx, spacing_zyx=(0.8, 0.7, 0.7))  # doctest: +SKIP
>>> print(metrics.table())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cc3d
import numpy as np
from skimage.morphology import skeletonize

from .arrays import bounding_box
from .classes import AIRWAY_CLASSES
from .errors import AirwayInputError
from .tree import AirwayTree, parse_airway_tree

#: Largest-component connectivity of the prediction in each evaluation mode.
MODE_CONNECTIVITY = {"atm22": 6, "atm26": 26}
#: A reference branch is detected when this share of its skeleton lies in LCC(P)
#: (ATM'22 ``branch_detected_calculation``, ``thresh=0.8``, compared with ``>=``).
BRANCH_DETECTED_SHARE = 0.8
#: Components are counted 26-connected for the Betti-0 error (METHODS.md section 6).
COMPONENT_CONNECTIVITY = 26


@dataclass
class AirwayMetrics:
    """Scores of one predicted airway against one reference.

    Rates are percentages in [0, 100].

    Attributes
    ----------
    td : float
        Tree length detected: share of the reference skeleton inside LCC(P).
    bd : float
        Branches detected: share of reference branches with >= 80 % of their skeleton in LCC(P).
    dsc : float
        Dice similarity coefficient of the whole prediction.
    precision : float
        Share of LCC(P) inside the reference.
    atm22_score : float
        Mean of ``td``, ``bd``, ``dsc`` and ``precision``.
    cldice : float
        Centerline Dice (Shit et al. 2021) of the whole prediction.
    betti0_error : int
        |number of 26-connected components of P - 1|.
    n_components : int
        Number of 26-connected components of P.
    fpr : float
        False-positive voxels of P / background voxels of the reference.
    td_per_class, bd_per_class : dict of int to float
        TD and BD restricted to reference branches of each airway class (1, 2, 3); classes
        with no reference branch are left out.
    dice_per_class : dict of int to float
        Voxel Dice of each airway class between a three-class prediction and the reference
        classes; empty when the prediction carries no classes.
    n_branches_gt : int
        Branches of the parsed reference, trachea included.
    n_branches_detected : int
        Of those, how many are detected.
    mode : str
        ``"atm22"`` or ``"atm26"``.
    """

    td: float
    bd: float
    dsc: float
    precision: float
    atm22_score: float
    cldice: float
    betti0_error: int
    n_components: int
    fpr: float
    td_per_class: dict[int, float] = field(default_factory=dict)
    bd_per_class: dict[int, float] = field(default_factory=dict)
    dice_per_class: dict[int, float] = field(default_factory=dict)
    n_branches_gt: int = 0
    n_branches_detected: int = 0
    mode: str = "atm22"

    def as_dict(self) -> dict:
        """All fields as plain Python values (per-class dicts keyed by class label)."""
        return asdict(self)

    def table(self) -> str:
        """A readable text table of the metrics (two decimals)."""
        connectivity = MODE_CONNECTIVITY[self.mode]
        rows = [
            ("Tree length detected (TD)", f"{self.td:.2f} %"),
            ("Branches detected (BD)", f"{self.bd:.2f} % ({self.n_branches_detected}/{self.n_branches_gt})"),
            ("Dice (DSC)", f"{self.dsc:.2f} %"),
            ("Precision", f"{self.precision:.2f} %"),
            ("ATM'22 score", f"{self.atm22_score:.2f} %"),
            ("clDice", f"{self.cldice:.2f} %"),
            ("Betti-0 error", f"{self.betti0_error}"),
            ("Components (26-connected)", f"{self.n_components}"),
            ("False-positive rate", f"{self.fpr:.4f} %"),
        ]
        names = {airway_class.label: airway_class.name for airway_class in AIRWAY_CLASSES}
        for label in sorted(self.td_per_class):
            rows.append(
                (
                    f"Class {label} ({names.get(label, '?')})",
                    f"TD {self.td_per_class[label]:.2f} %, BD {self.bd_per_class[label]:.2f} %"
                    + (f", Dice {self.dice_per_class[label]:.2f} %" if label in self.dice_per_class else ""),
                )
            )
        width = max(len(name) for name, _ in rows)
        header = f"Airway metrics, mode {self.mode} (largest component {connectivity}-connected)"
        return "\n".join([header] + [f"  {name:<{width}}  {value}" for name, value in rows])


def evaluate_airway(
    pred_zyx: np.ndarray,
    gt_zyx: np.ndarray,
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
    mode: str = "atm22",
    gt_classes_zyx: np.ndarray | None = None,
    gt_tree: AirwayTree | None = None,
    pred_classes_zyx: np.ndarray | None = None,
) -> AirwayMetrics:
    """Score a predicted airway against a reference with the ATM'22 metrics and more.

    Parameters
    ----------
    pred_zyx : numpy.ndarray
        Predicted airway, shape (Z, Y, X); nonzero = airway.
    gt_zyx : numpy.ndarray
        Reference airway on the same grid; nonzero = airway.
    spacing_zyx : tuple of 3 float
        Voxel size in mm (z, y, x); used by the tree parse (branch diameters and classes).
    mode : {"atm22", "atm26"}
        Largest component of the prediction (and of the parsed reference) 6- or 26-connected.
    gt_classes_zyx : numpy.ndarray, optional
        Reference class map (0 background, 1-3 airway classes), e.g. a phantom's
        ``airway3.nii.gz``.  Each reference branch takes the most frequent nonzero class of its
        voxels.  Without it the classes come from the parse (``Branch.airway_class``).
    gt_tree : AirwayTree, optional
        The reference already parsed with ``parse_airway_tree(gt_zyx, spacing_zyx, connectivity)``
        on the full grid, so that many predictions are scored against one parse.  It must come
        from this ``gt_zyx`` and, for the documented semantics, the mode's connectivity.
    pred_classes_zyx : numpy.ndarray, optional
        Predicted class map (0-3) on the same grid; when given, the per-class voxel Dice
        against ``gt_classes_zyx`` (or, without it, the classes of the reference parse) is
        reported in ``dice_per_class``.

    Returns
    -------
    AirwayMetrics
        Percentages in [0, 100].  An empty prediction scores 0 everywhere (Betti-0 error 1).

    Raises
    ------
    AirwayInputError
        Unknown mode, shapes that differ, a reference without airway voxels, a class map with
        values outside 0-3, or a ``gt_tree`` on another grid.

    Notes
    -----
    Both volumes are cropped to the bounding box of their union (plus one voxel) first, so
    the cost follows the size of the airway, not of the scan.
    """
    if mode not in MODE_CONNECTIVITY:
        raise AirwayInputError(f"Unknown evaluation mode {mode!r}; expected one of {', '.join(MODE_CONNECTIVITY)}.")
    pred = np.asarray(pred_zyx) != 0
    gt = np.asarray(gt_zyx) != 0
    if gt.ndim != 3 or pred.shape != gt.shape:
        raise AirwayInputError(
            f"The prediction (shape {pred.shape}) and the reference (shape {gt.shape}) must be 3-D "
            "arrays of the same shape; resample the prediction onto the reference grid."
        )
    if not gt.any():
        raise AirwayInputError("The reference has no airway voxels; give a non-empty reference label.")
    if gt_classes_zyx is not None:
        gt_classes_zyx = _checked_classes(gt_classes_zyx, gt.shape, "reference")
    if pred_classes_zyx is not None:
        pred_classes_zyx = _checked_classes(pred_classes_zyx, gt.shape, "predicted")
    if gt_tree is not None and gt_tree.branch_labels_zyx.shape != gt.shape:
        raise AirwayInputError(
            f"The given reference tree was parsed on a grid of shape {gt_tree.branch_labels_zyx.shape}, "
            f"not the reference's {gt.shape}; parse the reference itself."
        )

    # Background voxels of G over the whole grid, counted before the crop drops some of them.
    background = int(gt.size - np.count_nonzero(gt))
    box = bounding_box(pred | gt, pad=1)  # never None: the reference is not empty
    pred, gt = pred[box], gt[box]
    if gt_tree is None:
        gt_tree = parse_airway_tree(gt, spacing_zyx, connectivity=MODE_CONNECTIVITY[mode])
        tree_box = (slice(None),) * 3  # parsed on the cropped grid already
    else:
        tree_box = box
    skeleton, branch_labels = gt_tree.skeleton_zyx[tree_box], gt_tree.branch_labels_zyx[tree_box]
    dice_per_class = {}
    if pred_classes_zyx is not None:
        reference_classes = (
            gt_classes_zyx[box] if gt_classes_zyx is not None else gt_tree.class_labels_zyx()[tree_box]
        )
        dice_per_class = _dice_per_class(pred_classes_zyx[box], reference_classes)
    branch_classes = _branch_classes(gt_tree, branch_labels, None if gt_classes_zyx is None else gt_classes_zyx[box])

    n_components, pred_lcc = _count_and_largest(pred, MODE_CONNECTIVITY[mode])
    false_positives = int(np.count_nonzero(pred & ~gt))

    n_branches = len(gt_tree.branches)
    skeleton_per_branch = _voxels_per_branch(skeleton, branch_labels, n_branches)
    covered_per_branch = _voxels_per_branch(skeleton & pred_lcc, branch_labels, n_branches)
    # A branch without skeleton voxels is not detected, as in ATM (0/0 is not >= 0.8).
    detected = (covered_per_branch >= BRANCH_DETECTED_SHARE * skeleton_per_branch) & (skeleton_per_branch > 0)

    td = _percent(np.count_nonzero(skeleton & pred_lcc), np.count_nonzero(skeleton))
    bd = _percent(np.count_nonzero(detected), n_branches)
    dsc = _percent(2 * np.count_nonzero(pred & gt), np.count_nonzero(pred) + np.count_nonzero(gt))
    precision = _percent(np.count_nonzero(pred_lcc & gt), np.count_nonzero(pred_lcc))

    td_per_class, bd_per_class = {}, {}
    for label in np.unique(branch_classes):
        members = branch_classes == label
        td_per_class[int(label)] = _percent(covered_per_branch[members].sum(), skeleton_per_branch[members].sum())
        bd_per_class[int(label)] = _percent(np.count_nonzero(detected[members]), np.count_nonzero(members))

    return AirwayMetrics(
        td=td,
        bd=bd,
        dsc=dsc,
        precision=precision,
        atm22_score=(td + bd + dsc + precision) / 4.0,
        cldice=_cldice(pred, gt, skeleton),
        betti0_error=abs(n_components - 1),
        n_components=n_components,
        fpr=_percent(false_positives, background),
        td_per_class=td_per_class,
        bd_per_class=bd_per_class,
        dice_per_class=dice_per_class,
        n_branches_gt=n_branches,
        n_branches_detected=int(np.count_nonzero(detected)),
        mode=mode,
    )


def _checked_classes(classes_zyx: np.ndarray, shape: tuple[int, ...], role: str) -> np.ndarray:
    """A ``role`` ("reference" or "predicted") class map as uint8, refused unless it has ``shape`` and values 0-3."""
    classes = np.asarray(classes_zyx)
    if classes.shape != shape:
        raise AirwayInputError(
            f"The {role} class map (shape {classes.shape}) must have the reference's shape {shape}."
        )
    in_range = (classes >= 0) & (classes <= len(AIRWAY_CLASSES)) & (classes == np.round(classes))
    if not np.all(in_range):
        raise AirwayInputError(
            f"The {role} class map holds values outside 0-{len(AIRWAY_CLASSES)}; "
            "expected 0 for background and 1-3 for the airway classes."
        )
    return classes.astype(np.uint8)

def _count_and_largest(pred: np.ndarray, connectivity: int) -> tuple[int, np.ndarray]:
    """Number of 26-connected components of ``pred`` and its largest ``connectivity``-connected component."""
    labels, n_components = cc3d.connected_components(pred, connectivity=COMPONENT_CONNECTIVITY, return_N=True)
    if n_components == 0:
        return 0, np.zeros_like(pred)
    if connectivity != COMPONENT_CONNECTIVITY:
        labels, _ = cc3d.connected_components(pred, connectivity=connectivity, return_N=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return int(n_components), labels == int(np.argmax(sizes))


def _voxels_per_branch(voxels: np.ndarray, branch_labels: np.ndarray, n_branches: int) -> np.ndarray:
    """How many of ``voxels`` each branch holds (ATM's bincount of label_skeleton * label_parsing)."""
    labels = branch_labels[voxels]
    return np.bincount(labels[labels > 0].astype(np.int64) - 1, minlength=n_branches)


def _branch_classes(tree: AirwayTree, branch_labels: np.ndarray, classes_zyx: np.ndarray | None) -> np.ndarray:
    """Airway class of each reference branch: the class map's majority over the branch, else the parse's."""
    parsed = np.array([branch.airway_class for branch in tree.branches], dtype=np.int64)
    if classes_zyx is None:
        return parsed
    n_branches, n_classes = len(tree.branches), len(AIRWAY_CLASSES) + 1
    inside = (branch_labels > 0) & (classes_zyx > 0)
    votes = np.bincount(
        (branch_labels[inside].astype(np.int64) - 1) * n_classes + classes_zyx[inside],
        minlength=n_branches * n_classes,
    ).reshape(n_branches, n_classes)
    # A branch the class map does not cover keeps the class the parse gave it.
    return np.where(votes.any(axis=1), np.argmax(votes, axis=1), parsed)


def _dice_per_class(pred_classes: np.ndarray, gt_classes: np.ndarray) -> dict[int, float]:
    """Voxel Dice (percent) of every class present in either map."""
    present = (set(np.unique(pred_classes).tolist()) | set(np.unique(gt_classes).tolist())) - {0}
    return {
        int(label): _percent(
            2 * np.count_nonzero((pred_classes == label) & (gt_classes == label)),
            np.count_nonzero(pred_classes == label) + np.count_nonzero(gt_classes == label),
        )
        for label in sorted(present)
    }


def _cldice(pred: np.ndarray, gt: np.ndarray, gt_skeleton: np.ndarray) -> float:
    """clDice = 2 Tprec Tsens / (Tprec + Tsens) (Shit et al. 2021, eq. 1), in percent.

    Tprec = |skel(P) n G| / |skel(P)| with the Lee skeleton of the whole prediction;
    Tsens = |skel(G) n P| / |skel(G)| with the reference skeleton of the parse.
    """
    if not pred.any():
        return 0.0
    pred_skeleton = skeletonize(pred).astype(bool)
    topology_precision = _percent(np.count_nonzero(pred_skeleton & gt), np.count_nonzero(pred_skeleton))
    topology_sensitivity = _percent(np.count_nonzero(gt_skeleton & pred), np.count_nonzero(gt_skeleton))
    total = topology_precision + topology_sensitivity
    return 0.0 if total == 0 else 2.0 * topology_precision * topology_sensitivity / total


def _percent(part: int | float, whole: int | float) -> float:
    """100 * part / whole, and 0 for an empty whole (an empty prediction scores 0, not NaN)."""
    return 100.0 * float(part) / float(whole) if whole else 0.0
