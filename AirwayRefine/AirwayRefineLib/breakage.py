"""Training data for the breakage connection network (DeepTree stage 2, METHODS.md section 2).

Two sources of breaks, both giving a broken input and the voxels that repair it (Y_B):

* :func:`simulate_breakage` cuts simulated breaks into a ground-truth label (DeepTree section
  2.3): skeleton, 50 % of the peripheral branches, a contiguous 10-30 % of each one's skeleton
  voxels become breakage, and skeleton-to-volume propagation turns them into Y_B.
* :func:`harvest_real_breaks` finds the real breaks of a stage-1 output on a training volume
  (the hard examples of METHODS.md section 2): ground-truth voxels the prediction missed that
  would join two of its pieces.

Choices where the paper is silent (each is also said where it is made):

* Skeleton and branches come from :func:`~AirwaySegmentationLib.tree.parse_airway_tree` (Lee
  thinning, ATM'22 parsing) instead of the paper's minimum-cost-path skeleton [4].
* Peripheral branches are the leaves of the parsed tree (branches without children; the
  trachea of a tree without branches is not one).  The number broken is
  ``peripheral_fraction`` of the leaves, rounded half up, drawn without replacement among the
  leaves whose skeleton has at least 3 voxels.
* "Contiguous" is in the order of ``Branch.skeleton_zyx`` (distance along the skeleton from
  the parent end), so side spurs go with the part of the centreline they leave from.
* A break keeps at least one skeleton voxel at each end of the branch, so every break is a
  gap between two pieces: a cut leaf gains exactly one component.  (A run that reached the
  distal tip would only shorten the branch, add no component, and give the attention map
  nothing to show; a run from the parent end would cut at the junction, not within the branch.)
* Skeleton-to-volume propagation: every voxel of the parsed tree takes the label of its
  nearest skeleton voxel (Euclidean, in mm).  Rather than a feature transform (three int64
  index volumes), Y_B is where the breakage skeleton is strictly nearer than both the
  skeleton after the break and the rest of the skeleton (three float32 distance
  transforms); equidistant voxels stay in the input.
* Seam: where a short, oblique run has thin cells, the parts before and after it can still
  touch through an edge or a corner.  Voxels that touch (at ``connectivity``) a branch part
  after a break are added to Y_B, so every break separates.  On the test trees this adds 0-25
  voxels to targets of ~300.
* Own branch: only voxels the parse assigns to a broken branch can become Y_B.  Where a
  break starts at its junction, the parent's lumen beside it can be nearer to the breakage
  skeleton than to the parent's own; cutting it would break the parent, not the leaf.
* Clean cuts: after the cuts, what is left of the tree must be the trachea's piece plus one
  piece per break (the one holding the branch's distal tip).  Where branches touch (a leaf
  lying against a neighbour) or a skeleton spur leaves the run, a cut can also isolate a
  fragment; the breaks whose cut borders a fragment (else the one nearest to it) are then
  not made, and the propagation is redone with the others.  On the six held-out test
  phantoms this drops 0-8 of 15-50 breaks (8 of 38 on the "smooth" one).
* Only voxels of the parsed tree (the largest component) can become Y_B; voxels of other
  components of the label stay in the input.

Speed (2 CPU cores, a 255-capsule synthetic tree in a 294 x 408 x 305 box at 0.8 x 0.7 x 0.7
mm): the parse takes ~3.5 s (pass ``tree=`` to reuse it across simulations), the simulation
itself 3-4.5 s (three distance transforms of the tree's bounding box), the harvest 3-5 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cc3d
import edt
import numpy as np
from scipy import ndimage

from AirwaySegmentationLib.arrays import as_airway_mask, as_spacing_zyx, bounding_box, check_connectivity
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.tree import AirwayTree, Branch, parse_airway_tree

from .attention import _nearest_two_in_region

#: Shortest breakable skeleton: one voxel kept at each end plus at least one broken.
MIN_BREAKABLE_SKELETON_VOXELS = 3
#: Neighbourhoods of the 6-, 18- and 26-connectivities.
_STRUCTURE = {c: ndimage.generate_binary_structure(3, rank) for c, rank in ((6, 1), (18, 2), (26, 3))}


@dataclass
class SimulatedBreak:
    """One simulated break.

    Attributes
    ----------
    branch_id : int
        Id of the broken branch in the parsed tree.
    skeleton_zyx : numpy.ndarray
        (M, 3) int indices of the branch's skeleton voxels marked as breakage, in the
        branch's order (parent end first).
    fraction : float
        M / number of skeleton voxels of the branch (in [0.1, 0.3] up to rounding).
    centre_zyx : tuple of 3 int
        The middle breakage skeleton voxel: on the centreline, inside the gap.
    length_mm : float
        Gap length along the branch: the distance between the kept skeleton voxels on either
        side of the break (a chord, which unlike the voxel path's polyline does not count
        its zigzag).  Near a junction the pieces can come closer than that beside the axis.
    """

    branch_id: int
    skeleton_zyx: np.ndarray
    fraction: float
    centre_zyx: tuple[int, int, int]
    length_mm: float


@dataclass
class BreakageSimulation:
    """A ground-truth label with simulated breaks.

    Attributes
    ----------
    broken_zyx : numpy.ndarray
        The input label (same dtype and values, e.g. the 3 classes) with ``target_zyx`` set to 0.
    target_zyx : numpy.ndarray
        bool, the breakage target Y_B; ``broken_zyx > 0`` and Y_B partition the label's voxels.
    breaks : list of SimulatedBreak
        One per broken branch.
    """

    broken_zyx: np.ndarray = field(repr=False)
    target_zyx: np.ndarray = field(repr=False)
    breaks: list[SimulatedBreak] = field(default_factory=list)


@dataclass
class RealBreak:
    """One gap of a stage-1 prediction found against the ground truth.

    Attributes
    ----------
    joined_components : tuple of int
        Labels of the predicted components the gap joins, as numbered by
        ``cc3d.connected_components(pred_zyx > 0, connectivity)``.
    size_voxels : int
        Number of ground-truth voxels in the gap.
    centre_zyx : tuple of 3 int
        The gap voxel where the second-nearest predicted piece is nearest: the narrowest
        point, the middle of a straight gap.
    length_mm : float
        Distance to the nearest plus distance to the second-nearest piece at ``centre_zyx``:
        a path between two pieces through the gap's narrowest point, the distance between
        the facing voxel centres across a flat cut.
    """

    joined_components: tuple[int, ...]
    size_voxels: int
    centre_zyx: tuple[int, int, int]
    length_mm: float


@dataclass
class HarvestedBreaks:
    """The real breaks of a prediction: the voxels that repair them and one record per gap.

    Attributes
    ----------
    target_zyx : numpy.ndarray
        bool, the union of the gaps (ground-truth voxels, none of them predicted).
    breaks : list of RealBreak
        Largest gap first.
    """

    target_zyx: np.ndarray = field(repr=False)
    breaks: list[RealBreak] = field(default_factory=list)


def simulate_breakage(
    label_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    rng: np.random.Generator,
    peripheral_fraction: float = 0.5,
    break_fraction: tuple[float, float] = (0.1, 0.3),
    connectivity: int = 26,
    tree: AirwayTree | None = None,
) -> BreakageSimulation:
    """Cut simulated breaks into peripheral branches of a ground-truth airway label.

    DeepTree section 2.3 / METHODS.md section 2; the choices the paper leaves open are listed
    in the module docstring.

    Parameters
    ----------
    label_zyx : numpy.ndarray
        Ground truth, shape (Z, Y, X): binary or the 3 classes; any nonzero voxel is airway.
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    rng : numpy.random.Generator
        Source of every random choice: the same seed gives the same breaks.
    peripheral_fraction : float
        Share of the peripheral branches (leaves) to break, in [0, 1]; breaks whose cut
        would isolate a fragment are then left out (module docstring, "Clean cuts").
    break_fraction : (float, float)
        Range of the share of a branch's skeleton voxels that a break removes, drawn uniformly.
    connectivity : int
        Connectivity (6, 18 or 26) of the largest component that is parsed and at which every
        break separates its two parts.
    tree : AirwayTree, optional
        The parse of ``label_zyx`` (same spacing and connectivity), to reuse it across many
        simulations; parsed here when omitted.

    Returns
    -------
    BreakageSimulation
        Voxels of ``label_zyx`` outside the parsed tree (other components) are never targets.

    Raises
    ------
    AirwayInputError
        Bad label, spacing, fractions or connectivity, or a tree of another shape.

    Examples
    --------
    >>> simulation = simulate_breakage(gt_zyx, (0.8, 0.7, 0.7), np.random.default_rng(0))  # doctest: +SKIP
    >>> simulation.broken_zyx, simulation.target_zyx, len(simulation.breaks)                # doctest: +SKIP
    """
    label = np.asarray(label_zyx)
    mask = as_airway_mask(label)
    spacing = as_spacing_zyx(spacing_zyx)
    check_connectivity(connectivity)
    low, high = break_fraction
    if not (0.0 <= peripheral_fraction <= 1.0 and 0.0 < low <= high < 1.0):
        raise AirwayInputError(
            f"Breakage fractions {peripheral_fraction} and {break_fraction} are not usable; expected a share of "
            "branches in [0, 1] and a range 0 < low <= high < 1 of skeleton shares."
        )
    if tree is None:
        tree = parse_airway_tree(mask, spacing, connectivity=connectivity)
    elif tree.mask_zyx.shape != mask.shape:
        raise AirwayInputError(
            f"The parsed tree has shape {tree.mask_zyx.shape} but the label has {mask.shape}; parse this label."
        )

    leaves = [branch for branch in tree.branches if not branch.children and branch.parent is not None]
    n_leaves = len(leaves)
    leaves = [branch for branch in leaves if len(branch.skeleton_zyx) >= MIN_BREAKABLE_SKELETON_VOXELS]
    n_broken = min(int(np.floor(peripheral_fraction * n_leaves + 0.5)), len(leaves))
    chosen = sorted(rng.choice(len(leaves), size=n_broken, replace=False).tolist())
    runs = [_break_branch(leaves[i], spacing, rng, low, high) for i in chosen]

    target = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(tree.mask_zyx, pad=1)
    # A break that would isolate more than its distal part is not made (module docstring,
    # "Clean cuts"); each round that finds one drops at least one break, so this ends.
    while runs:
        cut, blamed = _propagate(tree, mask, box, runs, spacing, connectivity)
        if not blamed:
            target[box] = cut
            break
        runs = [run for index, run in enumerate(runs) if index not in blamed]
    breaks = [simulated for simulated, _ in runs]
    broken = label.copy()
    broken[target] = 0
    return BreakageSimulation(broken_zyx=broken, target_zyx=target, breaks=breaks)


def _propagate(
    tree: AirwayTree,
    mask: np.ndarray,
    box: tuple[slice, ...],
    runs: list[tuple[SimulatedBreak, np.ndarray]],
    spacing: tuple[float, float, float],
    connectivity: int,
) -> tuple[np.ndarray, set[int]]:
    """Skeleton-to-volume propagation of the breaks ``runs`` inside ``box``.

    Returns the breakage voxels Y_B (bool, the box's shape) and the indices into ``runs`` of
    the breaks to blame for fragments: pieces the cuts isolate from both the trachea and
    every distal tip (empty when there are none).
    """
    offset = np.array([s.start for s in box])
    breakage = np.zeros(tree.mask_zyx[box].shape, dtype=bool)
    distal = np.zeros_like(breakage)
    for simulated, distal_skeleton in runs:
        breakage[tuple((simulated.skeleton_zyx - offset).T)] = True
        distal[tuple((distal_skeleton - offset).T)] = True
    rest = tree.skeleton_zyx[box] & ~breakage & ~distal
    to_breakage, to_distal, to_rest = (
        edt.edt(~seeds, anisotropy=spacing, black_border=False, parallel=1) for seeds in (breakage, distal, rest)
    )
    airway = tree.mask_zyx[box] & mask[box]
    # Skeleton-to-volume propagation (DeepTree [4]): a voxel follows its nearest skeleton
    # voxel, so it is breakage when the breakage skeleton is strictly nearer than the rest;
    # only voxels of the broken branches themselves (module docstring, "Own branch").
    own = np.isin(tree.branch_labels_zyx[box], [simulated.branch_id + 1 for simulated, _ in runs])
    cut = airway & own & (to_breakage < np.minimum(to_distal, to_rest))
    distal_part = airway & ~cut & (to_distal < to_rest)
    # Seam (module docstring): voxels still touching a part after a break are cut too.
    # The distal parts hold their own skeleton voxels, so their box is never empty.
    near = bounding_box(distal_part, pad=1)
    touching = np.zeros_like(distal_part)
    touching[near] = ndimage.binary_dilation(distal_part[near], structure=_STRUCTURE[connectivity])
    cut |= airway & ~distal_part & touching

    # What is left must be the trachea's piece plus one piece per break: the one holding the
    # distal tip.  Each is found from the skeleton voxel nearest the trachea's top, or the
    # branch's tip, that lies in what is left (the skeleton of the filled mask may cross a
    # filled hole, outside the airway).
    pieces = cc3d.connected_components(airway & ~cut, connectivity=connectivity)
    ends_last = [tree.branches[0].skeleton_zyx[::-1]] + [distal_skeleton for _, distal_skeleton in runs]
    anchored = {0}
    for skeleton in ends_last:
        labels = pieces[tuple((skeleton - offset).T)]
        labels = labels[labels > 0]
        anchored.add(int(labels[-1]) if len(labels) else 0)
    fragments = (pieces > 0) & ~np.isin(pieces, list(anchored))
    if not fragments.any():
        return cut, set()
    # Blame the breaks whose cut (a connected piece of Y_B holding their breakage skeleton)
    # touches a fragment; failing that, the break whose gap is nearest to one.
    cut_pieces = cc3d.connected_components(cut, connectivity=connectivity)
    beside = np.unique(cut_pieces[ndimage.binary_dilation(fragments, structure=_STRUCTURE[connectivity]) & cut])
    blamed = {
        index for index, (simulated, _) in enumerate(runs)
        if np.isin(cut_pieces[tuple((simulated.skeleton_zyx - offset).T)], beside[beside > 0]).any()
    }
    if not blamed:
        fragment_zyx = np.argwhere(fragments) + offset
        gaps = [np.min(np.sum(((fragment_zyx - simulated.centre_zyx) * spacing) ** 2, axis=1)) for simulated, _ in runs]
        blamed = {int(np.argmin(gaps))}
    return cut, blamed


def harvest_real_breaks(
    pred_zyx: np.ndarray,
    gt_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    max_gap_mm: float = 10.0,
    connectivity: int = 26,
) -> HarvestedBreaks:
    """Real breaks of a stage-1 prediction: missed ground truth that would join two predicted pieces.

    METHODS.md section 2 asks to train also on the real breaks of stage-1 outputs (hard
    examples); the paper does not define them.  Here:

    1. the *pieces* are the connected components of the prediction that overlap the ground
       truth (false-positive components are no reason to connect anything);
    2. the *missed* voxels are ground truth not in the prediction;
    3. a *gap* is a connected component of the missed voxels that are closer than
       ``max_gap_mm`` to two different pieces (second-nearest-piece distance H < ``max_gap_mm``,
       the raw breakage attention), and that touches at least two pieces.

    Filling a gap joins the pieces it touches: it is a break that splits the prediction.
    Every voxel of a straight gap of length g lies within g of both sides, so gaps up to
    ``max_gap_mm`` are harvested whole; longer ones lose their middle, touch one piece per
    end and are left out, as are missed branch ends (they touch one piece only).  A gap also
    takes the missed rim of the ground truth around its two ends where that rim is within
    ``max_gap_mm`` of both pieces.

    Parameters
    ----------
    pred_zyx : numpy.ndarray
        Stage-1 output, shape (Z, Y, X); any nonzero voxel is airway.
    gt_zyx : numpy.ndarray
        Ground truth, same shape; any nonzero voxel is airway.
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    max_gap_mm : float
        Longest gap harvested (default 10 mm, where the attention at the gap's middle is
        ``sigmoid(5 - 5) = 0.5``).
    connectivity : int
        Connectivity of pieces and gaps: 6, 18 or 26.

    Returns
    -------
    HarvestedBreaks
        The target is empty when the prediction has fewer than two pieces.
    """
    pred, gt = as_airway_mask(pred_zyx), as_airway_mask(gt_zyx)
    spacing = as_spacing_zyx(spacing_zyx)
    if pred.shape != gt.shape:
        raise AirwayInputError(
            f"The prediction has shape {pred.shape} but the ground truth has {gt.shape}; give volumes on the same grid."
        )
    if not (np.isfinite(max_gap_mm) and max_gap_mm > 0):
        raise AirwayInputError(f"Largest gap {max_gap_mm} mm is not usable; expected a positive distance.")
    check_connectivity(connectivity)
    pieces = cc3d.connected_components(pred, connectivity=connectivity)
    true_pieces = np.isin(pieces, np.unique(pieces[gt & pred]))
    # Distances to the nearest and second-nearest true piece (H: the raw breakage attention,
    # DeepTree eq. 2); a gap lies where H < max_gap_mm, inside this region.
    region, nearest_mm, second_mm = _nearest_two_in_region(true_pieces, spacing, max_gap_mm, connectivity)
    target = np.zeros(pred.shape, dtype=bool)
    if region is None:
        return HarvestedBreaks(target_zyx=target, breaks=[])
    gaps, n_gaps = cc3d.connected_components(
        gt[region] & ~pred[region] & (second_mm < max_gap_mm), connectivity=connectivity, return_N=True
    )
    if n_gaps == 0:
        return HarvestedBreaks(target_zyx=target, breaks=[])

    # Which pieces each gap touches: the adjacency graph of the pieces and the gaps in one
    # label map (the region holds every voxel next to a gap: gaps are within max_gap_mm of
    # two pieces, the region reaches max_gap_mm beyond every piece).
    offset = int(pieces.max())
    pieces_region = np.where(true_pieces[region], pieces[region], 0).astype(np.int64)
    combined = np.where(gaps > 0, gaps.astype(np.int64) + offset, pieces_region)
    touched: dict[int, set[int]] = {}
    for a, b in cc3d.region_graph(combined, connectivity=connectivity):
        gap, piece = (a, b) if a > offset else (b, a)
        if gap > offset and 0 < piece <= offset:
            touched.setdefault(int(gap - offset), set()).add(int(piece))

    voxels = np.argwhere(gaps)
    voxel_gap = gaps[tuple(voxels.T)]
    origin = np.array([s.start for s in region])
    breaks = []
    for gap_label, joined in touched.items():
        if len(joined) < 2:
            continue
        members = voxels[voxel_gap == gap_label]
        second = second_mm[tuple(members.T)]
        narrowest = int(np.argmin(second))
        target[tuple((members + origin).T)] = True
        breaks.append(
            RealBreak(
                joined_components=tuple(sorted(joined)),
                size_voxels=len(members),
                centre_zyx=tuple(int(v) for v in members[narrowest] + origin),
                length_mm=float(second[narrowest] + nearest_mm[tuple(members[narrowest])]),
            )
        )
    breaks.sort(key=lambda b: -b.size_voxels)
    return HarvestedBreaks(target_zyx=target, breaks=breaks)


def _break_branch(
    branch: Branch, spacing: tuple[float, float, float], rng: np.random.Generator, low: float, high: float
) -> tuple[SimulatedBreak, np.ndarray]:
    """Mark a contiguous run of the branch's skeleton (parent end first) as breakage.

    The run covers a share drawn from U[low, high] of the skeleton voxels (rounded, at least
    one) and keeps at least one voxel at each end (module docstring).  Returns the break and
    the (K, 3) skeleton voxels after it (the distal remainder's skeleton).
    """
    skeleton = np.asarray(branch.skeleton_zyx)
    n = len(skeleton)
    count = int(np.clip(np.rint(rng.uniform(low, high) * n), 1, n - 2))
    start = int(rng.integers(1, n - count))  # first broken index; start + count <= n - 1
    stop = start + count
    simulated = SimulatedBreak(
        branch_id=branch.id,
        skeleton_zyx=skeleton[start:stop].copy(),
        fraction=count / n,
        centre_zyx=tuple(int(v) for v in skeleton[start + count // 2]),
        length_mm=float(np.linalg.norm((skeleton[stop] - skeleton[start - 1]) * np.asarray(spacing))),
    )
    return simulated, skeleton[stop:]
