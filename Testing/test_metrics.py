"""Tests of the airway metrics (ATM'22 TD/BD/DSC/precision, clDice, Betti-0, FPR, per class).

Every expected value is computed in the test by counting voxels with numpy on a small
synthetic tree and its parse, so a failure points at the metric, not at a stored number.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import skeletonize

from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.metrics import evaluate_airway
from AirwaySegmentationLib.tree import parse_airway_tree
from synthetic_trees import capsule_mask

SHAPE = (60, 64, 64)
#: Capsules (start, end, radius) in voxels on a 1 mm grid: trachea along z; main bronchi along
#: -x and +x at z = 30 (so a slab of x planes cuts the left one only); two leaves per main
#: bronchus running down and apart in y.  7 branches, generations 0-2.
SEGMENTS = (
    ((4, 32, 32), (30, 32, 32), 3.5),
    ((30, 32, 32), (30, 32, 14), 2.5),
    ((30, 32, 32), (30, 32, 50), 2.5),
    ((30, 32, 14), (52, 22, 14), 2.0),
    ((30, 32, 14), (52, 42, 14), 2.0),
    ((30, 32, 50), (52, 22, 50), 2.0),
    ((30, 32, 50), (52, 42, 50), 2.0),
)
#: The slab x in [22, 24) crosses only the left main bronchus (trachea x >= 28.5, leaves x <= 16).
LEFT_CUT_X = (22, 24)


@pytest.fixture(scope="module")
def gt() -> np.ndarray:
    return capsule_mask(SHAPE, (1.0, 1.0, 1.0), SEGMENTS)


@pytest.fixture(scope="module")
def tree(gt):
    return parse_airway_tree(gt)


def _subtree(tree, branch_id: int) -> list[int]:
    ids = [branch_id]
    for ident in ids:
        ids.extend(tree.branches[ident].children)
    return ids


def _left_main_bronchus(tree) -> int:
    """The generation-1 branch on the -x side."""
    return next(b.id for b in tree.branches if b.generation == 1 and b.skeleton_zyx[:, 2].mean() < 32)


def _a_leaf(tree) -> int:
    return next(b.id for b in tree.branches if not b.children)


def _cut_left_bronchus(gt: np.ndarray) -> np.ndarray:
    pred = gt.copy()
    pred[:, :, LEFT_CUT_X[0] : LEFT_CUT_X[1]] = False
    return pred


@pytest.mark.parametrize("mode", ["atm22", "atm26"])
def test_reference_against_itself_scores_100(gt, tree, mode):
    metrics = evaluate_airway(gt, gt, mode=mode)
    for value in (metrics.td, metrics.bd, metrics.dsc, metrics.precision, metrics.atm22_score, metrics.cldice):
        assert value == pytest.approx(100.0)
    assert (metrics.betti0_error, metrics.n_components, metrics.fpr) == (0, 1, 0.0)
    assert metrics.n_branches_gt == metrics.n_branches_detected == len(tree.branches) == 7
    assert all(v == pytest.approx(100.0) for v in [*metrics.td_per_class.values(), *metrics.bd_per_class.values()])


def test_removed_leaf_costs_one_branch_and_its_skeleton_share(gt, tree):
    leaf = _a_leaf(tree)
    leaf_voxels = tree.branch_labels_zyx == leaf + 1
    pred = gt & ~leaf_voxels
    n_branches = len(tree.branches)
    skeleton = tree.skeleton_zyx
    metrics = evaluate_airway(pred, gt)
    assert metrics.n_components == 1
    assert metrics.n_branches_detected == n_branches - 1
    assert metrics.bd == pytest.approx(100.0 * (n_branches - 1) / n_branches)
    lost = np.count_nonzero(skeleton & leaf_voxels)
    assert metrics.td == pytest.approx(100.0 * (1 - lost / np.count_nonzero(skeleton)))
    assert metrics.precision == pytest.approx(100.0)


def test_branch_is_detected_from_80_percent_of_its_skeleton(gt, tree):
    leaf = tree.branches[_a_leaf(tree)]
    n_skeleton = len(leaf.skeleton_zyx)
    removable = n_skeleton - int(np.ceil(0.8 * n_skeleton))
    for n_removed, detected in ((removable, True), (removable + 1, False)):
        # Single skeleton voxels taken out of a 4 mm wide tube leave the tube connected.
        pred = gt.copy()
        pred[tuple(leaf.skeleton_zyx[n_skeleton - n_removed :].T)] = False
        metrics = evaluate_airway(pred, gt)
        assert metrics.n_components == 1
        assert metrics.n_branches_detected == len(tree.branches) - (not detected)


def test_cut_main_bronchus_loses_its_subtree(gt, tree):
    pred = _cut_left_bronchus(gt)
    bronchus = _left_main_bronchus(tree)
    cut_off = _subtree(tree, bronchus)
    skeleton = tree.skeleton_zyx
    x = np.indices(SHAPE)[2]
    distal = x < LEFT_CUT_X[1]
    # The slab sits near the bronchus's start, so less than 80 % of its skeleton survives.
    bronchus_skeleton = skeleton & (tree.branch_labels_zyx == bronchus + 1)
    assert np.count_nonzero(bronchus_skeleton & ~distal) < 0.8 * np.count_nonzero(bronchus_skeleton)

    metrics = evaluate_airway(pred, gt)
    n_branches = len(tree.branches)
    assert metrics.bd == pytest.approx(100.0 * (n_branches - len(cut_off)) / n_branches)
    n_skeleton = np.count_nonzero(skeleton)
    assert metrics.td == pytest.approx(100.0 * (n_skeleton - np.count_nonzero(skeleton & distal)) / n_skeleton)
    assert (metrics.n_components, metrics.betti0_error) == (2, 1)
    assert metrics.precision == pytest.approx(100.0)
    n_pred, n_gt = np.count_nonzero(pred), np.count_nonzero(gt)
    assert metrics.dsc == pytest.approx(200.0 * n_pred / (n_pred + n_gt))  # P lies inside G


def test_shifted_copy_dice_matches_voxel_count(gt):
    pred = np.roll(gt, 1, axis=2)
    overlap = np.count_nonzero(pred & gt)
    metrics = evaluate_airway(pred, gt)
    assert metrics.dsc == pytest.approx(100.0 * 2 * overlap / (2 * np.count_nonzero(gt)))
    assert metrics.fpr == pytest.approx(100.0 * np.count_nonzero(pred & ~gt) / np.count_nonzero(~gt))


def test_attached_blob_lowers_precision_detached_blob_adds_a_component(gt):
    attached = np.zeros(SHAPE, dtype=bool)
    attached[10:14, 30:34, 34:40] = True  # touches the trachea wall (x <= 35) 6-connected
    attached &= ~gt
    pred = gt | attached
    metrics = evaluate_airway(pred, gt)
    assert metrics.precision == pytest.approx(100.0 * np.count_nonzero(gt) / np.count_nonzero(pred))
    assert (metrics.td, metrics.bd, metrics.n_components) == (pytest.approx(100.0), pytest.approx(100.0), 1)

    # A bar (not a cube: the Lee skeleton of a small cube is empty) far from the tree.
    detached = np.zeros(SHAPE, dtype=bool)
    detached[5:8, 5:8, 46:58] = True
    pred = gt | detached
    metrics = evaluate_airway(pred, gt)
    assert metrics.precision == pytest.approx(100.0)
    assert (metrics.n_components, metrics.betti0_error) == (2, 1)
    assert metrics.dsc == pytest.approx(100.0 * 2 * np.count_nonzero(gt) / (2 * np.count_nonzero(gt) + 108))
    assert metrics.fpr == pytest.approx(100.0 * 108 / np.count_nonzero(~gt))
    # clDice: all of skel(G) lies in P (Tsens = 1); the bar's skeleton lies outside G.
    tree_skeleton, bar_skeleton = np.count_nonzero(skeletonize(gt)), np.count_nonzero(skeletonize(detached))
    topology_precision = tree_skeleton / (tree_skeleton + bar_skeleton)
    assert metrics.cldice == pytest.approx(100.0 * 2 * topology_precision / (topology_precision + 1))


def test_diagonal_only_attachment_counts_in_atm26_not_atm22(gt, tree):
    pred = _cut_left_bronchus(gt)
    # Bridge the slab with two voxels that touch each other only along an edge (18-, hence
    # 26-connected, not 6-connected): A meets the proximal side, B the distal side.
    bridge_a, bridge_b = (30, 32, LEFT_CUT_X[1] - 1), (31, 32, LEFT_CUT_X[0])
    pred[bridge_a] = pred[bridge_b] = True
    skeleton = tree.skeleton_zyx
    x = np.indices(SHAPE)[2]
    proximal = pred & (x >= LEFT_CUT_X[1])
    proximal[bridge_a] = True
    n_skeleton = np.count_nonzero(skeleton)

    atm22 = evaluate_airway(pred, gt, mode="atm22")
    atm26 = evaluate_airway(pred, gt, mode="atm26")
    assert atm22.td == pytest.approx(100.0 * np.count_nonzero(skeleton & proximal) / n_skeleton)
    assert atm26.td == pytest.approx(100.0 * np.count_nonzero(skeleton & pred) / n_skeleton)
    assert atm26.td > atm22.td and atm26.bd > atm22.bd
    assert atm22.precision == pytest.approx(100.0 * np.count_nonzero(proximal & gt) / np.count_nonzero(proximal))
    assert atm22.n_components == atm26.n_components == 1
    assert (atm22.mode, atm26.mode) == ("atm22", "atm26")


def test_per_class_rates_follow_the_given_class_map(gt, tree):
    # Class 1 for generations 0-1, class 3 for the leaves: differs from the parse's own classes
    # (leaves thicker than 2 mm at generation 2 are class 2), so the map must win.
    generation = np.array([0] + [b.generation for b in tree.branches])
    classes = np.where(generation <= 1, 1, 3).astype(np.uint8)[tree.branch_labels_zyx]
    classes[tree.branch_labels_zyx == 0] = 0
    leaf = _a_leaf(tree)
    leaf_voxels = tree.branch_labels_zyx == leaf + 1
    pred = gt & ~leaf_voxels
    leaves = [b.id for b in tree.branches if b.generation > 1]
    leaf_skeleton = tree.skeleton_zyx & np.isin(tree.branch_labels_zyx, np.asarray(leaves) + 1)

    metrics = evaluate_airway(pred, gt, gt_classes_zyx=classes)
    assert sorted(metrics.td_per_class) == [1, 3]
    assert metrics.td_per_class[1] == metrics.bd_per_class[1] == pytest.approx(100.0)
    assert metrics.bd_per_class[3] == pytest.approx(100.0 * (len(leaves) - 1) / len(leaves))
    lost = np.count_nonzero(tree.skeleton_zyx & leaf_voxels)
    assert metrics.td_per_class[3] == pytest.approx(100.0 * (1 - lost / np.count_nonzero(leaf_skeleton)))

    parsed = evaluate_airway(pred, gt)
    assert sorted(parsed.bd_per_class) == sorted({b.airway_class for b in tree.branches})


def test_per_class_dice_of_a_three_class_prediction(gt, tree):
    reference = tree.class_labels_zyx()
    pred = reference.copy()
    # Relabel one class-2 branch as class 3: its voxels count against both classes.
    relabelled = next(b.id for b in tree.branches if b.airway_class == 2)
    moved = tree.branch_labels_zyx == relabelled + 1
    pred[moved] = 3
    n_moved = np.count_nonzero(moved)
    n2, n3 = np.count_nonzero(reference == 2), np.count_nonzero(reference == 3)

    metrics = evaluate_airway(pred > 0, gt, pred_classes_zyx=pred)
    assert metrics.dice_per_class[1] == pytest.approx(100.0)
    assert metrics.dice_per_class[2] == pytest.approx(100.0 * 2 * (n2 - n_moved) / (2 * n2 - n_moved))
    assert metrics.dice_per_class[3] == pytest.approx(100.0 * 2 * n3 / (2 * n3 + n_moved))
    # The given reference class map wins over the parse's classes.
    same = evaluate_airway(pred > 0, gt, gt_classes_zyx=pred, pred_classes_zyx=pred)
    assert all(value == pytest.approx(100.0) for value in same.dice_per_class.values())
    assert "Dice" in metrics.table()
    assert evaluate_airway(pred > 0, gt).dice_per_class == {}


def test_precomputed_tree_gives_the_same_metrics(gt, tree):
    pred = _cut_left_bronchus(gt)
    assert evaluate_airway(pred, gt, gt_tree=tree) == evaluate_airway(pred, gt)


def test_empty_prediction_scores_zero(gt):
    metrics = evaluate_airway(np.zeros(SHAPE, dtype=np.uint8), gt)
    rates = (metrics.td, metrics.bd, metrics.dsc, metrics.precision, metrics.atm22_score, metrics.cldice, metrics.fpr)
    assert rates == (0.0,) * 7
    assert (metrics.n_components, metrics.betti0_error, metrics.n_branches_detected) == (0, 1, 0)


def test_labels_are_read_as_nonzero_airway(gt):
    metrics = evaluate_airway(gt.astype(np.uint8) * 3, gt.astype(np.int16) * 2)
    assert metrics.atm22_score == pytest.approx(100.0)


def test_table_and_dict_hold_every_metric(gt):
    metrics = evaluate_airway(_cut_left_bronchus(gt), gt, mode="atm26")
    table = metrics.table()
    for name in ("TD", "BD", "DSC", "Precision", "ATM'22 score", "clDice", "Betti-0", "False-positive", "Class 1"):
        assert name in table
    values = metrics.as_dict()
    assert (values["mode"], values["td"], values["bd_per_class"]) == ("atm26", metrics.td, metrics.bd_per_class)


@pytest.mark.parametrize(
    "pred_shape, gt_value, kwargs, message",
    [
        ((60, 64, 63), 1, {}, "same shape"),
        (SHAPE, 0, {}, "no airway voxels"),
        (SHAPE, 1, {"mode": "exact09"}, "mode"),
        (SHAPE, 1, {"gt_classes_zyx": np.full(SHAPE, 4, dtype=np.uint8)}, "0-3"),
    ],
)
def test_bad_input_is_refused_in_one_sentence(pred_shape, gt_value, kwargs, message):
    gt = np.zeros(SHAPE, dtype=np.uint8)
    gt[10:20, 10:20, 10:20] = gt_value
    with pytest.raises(AirwayInputError, match=message):
        evaluate_airway(np.ones(pred_shape, dtype=bool), gt, **kwargs)
