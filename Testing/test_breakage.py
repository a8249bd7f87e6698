"""Tests of the breakage simulation and the harvest of real breaks (METHODS.md section 2).

The ground truth is a 4-generation synthetic capsule tree (8 leaves) on an anisotropic grid.
Every break keeps a skeleton voxel at each end of its leaf, so it cuts the leaf in two and
adds exactly one component.  (A run that reached the distal tip would remove the leaf's end
instead: the leaf gets shorter and the component count does not change; that is why
``simulate_breakage`` never places a run there.)
"""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from AirwayRefineLib.breakage import BreakageSimulation, harvest_real_breaks, simulate_breakage
from AirwaySegmentationLib.data import phantom_seeds
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.phantom import generate_phantom
from AirwaySegmentationLib.tree import parse_airway_tree
from synthetic_trees import binary_tree, capsule_mask, place

SPACING = (1.0, 0.8, 0.8)
SEEDS = range(12)


@pytest.fixture(scope="module")
def gt():
    shape, segments = place(binary_tree(generations=4, trachea_length_mm=30.0, trachea_radius_mm=5.0), SPACING)
    return capsule_mask(shape, SPACING, segments)


@pytest.fixture(scope="module")
def tree(gt):
    return parse_airway_tree(gt, SPACING, connectivity=26)


@pytest.fixture(scope="module")
def class_label(gt, tree):
    """A multi-class label (uint8, classes 1-3) of the ground truth."""
    label = tree.class_labels_zyx()
    label[~gt] = 0
    assert {0, 1, 2} <= set(np.unique(label).tolist())
    return label


def components(mask: np.ndarray) -> int:
    return cc3d.connected_components(mask, connectivity=26, return_N=True)[1]


@pytest.fixture(scope="module")
def simulations(class_label, tree) -> list[BreakageSimulation]:
    return [simulate_breakage(class_label, SPACING, np.random.default_rng(seed), tree=tree) for seed in SEEDS]


def test_broken_and_target_partition_the_label(class_label, simulations):
    for simulation in simulations:
        broken, target = simulation.broken_zyx, simulation.target_zyx
        assert broken.dtype == class_label.dtype and target.dtype == bool
        assert not (target & (broken > 0)).any()
        np.testing.assert_array_equal(target | (broken > 0), class_label > 0)
        np.testing.assert_array_equal(broken[~target], class_label[~target])
        assert target.any()


def test_each_break_cuts_a_leaf_into_one_more_component(gt, simulations):
    assert components(gt) == 1
    for simulation in simulations:
        assert components(simulation.broken_zyx > 0) == 1 + len(simulation.breaks)


def test_same_seed_same_breaks(class_label, tree, simulations):
    again = simulate_breakage(class_label, SPACING, np.random.default_rng(SEEDS[0]), tree=tree)
    np.testing.assert_array_equal(again.target_zyx, simulations[0].target_zyx)
    assert [b.branch_id for b in again.breaks] == [b.branch_id for b in simulations[0].breaks]
    assert len({simulation.target_zyx.tobytes() for simulation in simulations}) > 1


def test_half_of_the_leaves_break(tree, simulations):
    leaves = set(tree.end_branches())
    assert len(leaves) == 8
    chosen = np.zeros(len(tree.branches))
    for simulation in simulations:
        ids = [b.branch_id for b in simulation.breaks]
        assert len(ids) == 4 and len(set(ids)) == 4 and set(ids) <= leaves
        chosen[ids] += 1
    share = chosen[sorted(leaves)] / len(simulations)
    assert 0.15 <= share.min() and share.max() <= 0.85 and share.mean() == pytest.approx(0.5)


def test_break_is_a_contiguous_interior_run_of_10_to_30_percent(tree, simulations):
    for simulation in simulations:
        for simulated in simulation.breaks:
            skeleton = tree.branches[simulated.branch_id].skeleton_zyx
            n, count = len(skeleton), len(simulated.skeleton_zyx)
            start = int(np.flatnonzero((skeleton == simulated.skeleton_zyx[0]).all(axis=1))[0])
            np.testing.assert_array_equal(skeleton[start : start + count], simulated.skeleton_zyx)
            assert start >= 1 and start + count <= n - 1
            assert simulated.fraction == count / n
            assert 0.1 - 0.5 / n <= simulated.fraction <= 0.3 + 0.5 / n
            assert simulation.target_zyx[simulated.centre_zyx]
            assert 0 < simulated.length_mm < 0.5 * tree.branches[simulated.branch_id].length_mm


def test_fraction_zero_and_one(class_label, tree):
    none = simulate_breakage(class_label, SPACING, np.random.default_rng(0), peripheral_fraction=0.0, tree=tree)
    assert none.breaks == [] and not none.target_zyx.any()
    np.testing.assert_array_equal(none.broken_zyx, class_label)
    every = simulate_breakage(class_label > 0, SPACING, np.random.default_rng(0), peripheral_fraction=1.0)
    assert sorted(b.branch_id for b in every.breaks) == tree.end_branches()
    assert components(every.broken_zyx) == 1 + 8


def test_other_components_are_never_targets(gt, tree):
    corner = (slice(0, 3), slice(0, 3), slice(0, 3))
    assert not gt[corner].any()
    label = gt.copy()
    label[corner] = True
    simulation = simulate_breakage(label, SPACING, np.random.default_rng(0), peripheral_fraction=1.0, tree=tree)
    assert simulation.broken_zyx[corner].all() and not simulation.target_zyx[corner].any()


def test_simulation_rejects_bad_input(gt, tree):
    rng = np.random.default_rng(0)
    with pytest.raises(AirwayInputError):
        simulate_breakage(gt[:, :, :-1], SPACING, rng, tree=tree)
    with pytest.raises(AirwayInputError):
        simulate_breakage(gt[0], SPACING, rng)
    with pytest.raises(AirwayInputError):
        simulate_breakage(gt, SPACING, rng, break_fraction=(0.3, 0.1))
    with pytest.raises(AirwayInputError):
        simulate_breakage(gt, SPACING, rng, peripheral_fraction=1.5)


def test_harvest_recovers_simulated_breaks(gt, simulations):
    for simulation in simulations[:4]:
        harvested = harvest_real_breaks(simulation.broken_zyx, gt, SPACING)
        np.testing.assert_array_equal(harvested.target_zyx, simulation.target_zyx)
        assert len(harvested.breaks) == len(simulation.breaks)
        assert all(len(b.joined_components) == 2 for b in harvested.breaks)


@pytest.fixture(scope="module")
def tube():
    """A straight tube along x (0.5 mm steps) on an anisotropic grid."""
    spacing = (1.25, 0.8, 0.5)
    shape = (17, 25, 140)
    mask = capsule_mask(shape, spacing, [((10.0, 9.6, 4.0), (10.0, 9.6, 64.0), 2.0)])
    return mask, spacing


def test_harvest_finds_a_cut_gap(tube):
    gt, spacing = tube
    pred = gt.copy()
    pred[:, :, 60:66] = False  # 6 voxels: the pieces' facing voxels are 7 steps = 3.5 mm apart
    harvested = harvest_real_breaks(pred, gt, spacing)
    assert len(harvested.breaks) == 1
    found = harvested.breaks[0]
    np.testing.assert_array_equal(harvested.target_zyx, gt & ~pred)
    assert found.size_voxels == (gt & ~pred).sum()
    assert found.length_mm == pytest.approx(7 * 0.5, abs=1e-3)
    assert 60 <= found.centre_zyx[2] < 66


def test_harvest_keeps_only_the_gap_of_a_thinner_prediction(tube):
    gt, spacing = tube
    pred = ndimage.binary_erosion(gt)  # misses the whole rim, as a thin prediction does
    pred[:, :, 60:66] = False
    harvested = harvest_real_breaks(pred, gt, spacing)
    assert len(harvested.breaks) == 1
    target = harvested.target_zyx
    assert (gt[:, :, 60:66] <= target[:, :, 60:66]).all()
    # The missed rim farther than 10 mm (20 steps) from the cut is not part of the gap.
    assert not target[:, :, :40].any() and not target[:, :, 87:].any()


def test_harvest_ignores_ends_false_positives_and_long_gaps(tube):
    gt, spacing = tube
    shortened = gt.copy()
    shortened[:, :, 100:] = False  # a missed branch end: one piece only
    fragment = np.zeros_like(gt)
    fragment[2:5, 2:5, 120:125] = True  # a false positive away from the ground truth
    assert harvest_real_breaks(shortened | fragment, gt, spacing).breaks == []
    long_gap = gt.copy()
    long_gap[:, :, 40:70] = False  # 15.5 mm > max_gap_mm
    assert harvest_real_breaks(long_gap, gt, spacing).breaks == []
    assert len(harvest_real_breaks(long_gap, gt, spacing, max_gap_mm=20.0).breaks) == 1
    with pytest.raises(AirwayInputError):
        harvest_real_breaks(gt, gt[:, :, :10], spacing)


def test_cuts_that_would_isolate_fragments_are_not_made():
    """On a phantom where touching branches let cuts isolate pieces beyond the broken leaves'
    distal parts (before the "Clean cuts" rule: 44 components for 38 breaks), every break
    still adds exactly one component and the broken label plus the target is the label."""
    seed = phantom_seeds("test", 3)[2]
    phantom = generate_phantom(seed, (160, 192, 192), variant="smooth")
    label, spacing = phantom.airway3.array_zyx, phantom.ct.spacing_zyx
    tree = parse_airway_tree(label > 0, spacing, connectivity=26)
    simulation = simulate_breakage(label, spacing, np.random.default_rng(seed), tree=tree)
    leaves = [b for b in tree.branches if not b.children and b.parent is not None]
    assert 20 < len(simulation.breaks) < round(0.5 * len(leaves))  # some breaks were not made
    assert components(simulation.broken_zyx > 0) == 1 + len(simulation.breaks)
    np.testing.assert_array_equal(simulation.target_zyx | (simulation.broken_zyx > 0), label > 0)
    # Y_B lies in the broken leaves, but for seam voxels touching their distal parts.
    owner = tree.branch_labels_zyx[simulation.target_zyx] - 1
    assert np.isin(owner, [b.branch_id for b in simulation.breaks]).mean() > 0.99
