"""Tests of the synthetic chest CT phantom (small grids so the file runs in well under a minute).

The small phantom has a different spacing and size along each axis, so that a z/x mix-up
anywhere between the renderer, the written headers and tree.json shows.
"""

from __future__ import annotations

import json

import cc3d
import numpy as np
import pytest
from AirwaySegmentationLib.classes import branch_class
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.phantom import (
    _WALL_PER_DIAMETER,
    PHANTOM_VARIANTS,
    generate_phantom,
    write_phantom,
)
from AirwaySegmentationLib.tree import parse_airway_tree
from AirwaySegmentationLib.volume import read_volume
from scipy import ndimage
from scipy.spatial import cKDTree

SMALL = {"shape_zyx": (136, 112, 120), "spacing_zyx": (1.25, 1.8, 1.6)}


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(seed=3, **SMALL)


@pytest.fixture(scope="module")
def written(phantom, tmp_path_factory):
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"))


def test_same_seed_gives_identical_volumes(phantom):
    again = generate_phantom(seed=3, **SMALL)
    for name in ("ct", "airway", "airway3", "lungs"):
        assert np.array_equal(getattr(phantom, name).array_zyx, getattr(again, name).array_zyx), name
    assert len(again.branches) == len(phantom.branches)


def test_different_seed_gives_different_volumes(phantom):
    other = generate_phantom(seed=4, **SMALL)
    assert not np.array_equal(phantom.ct.array_zyx, other.ct.array_zyx)
    assert not np.array_equal(phantom.airway.array_zyx, other.airway.array_zyx)


def test_types_and_hu_range(phantom):
    ct = phantom.ct.array_zyx
    assert ct.dtype == np.int16 and ct.shape == SMALL["shape_zyx"]
    assert ct.min() >= -1024 and ct.max() <= 3071
    for name in ("airway", "airway3", "lungs"):
        assert getattr(phantom, name).array_zyx.dtype == np.uint8
    assert set(np.unique(phantom.airway3.array_zyx)) <= {0, 1, 2, 3}
    # Air outside the body, fat and soft tissue, bone: a chest CT's histogram.
    assert np.percentile(ct, 5) < -950 and np.percentile(ct, 99.9) > 150


def test_written_geometry_reads_back(phantom, written):
    assert set(written) == {"ct", "airway", "airway3", "lungs", "tree"}
    for name in ("ct", "airway", "airway3", "lungs"):
        volume = read_volume(written[name])
        assert np.array_equal(volume.array_zyx, getattr(phantom, name).array_zyx)
        assert np.allclose(volume.spacing_zyx, SMALL["spacing_zyx"])
        # Centred grid: the middle of the volume is the physical origin.
        centre = volume.geometry.index_zyx_to_physical((np.asarray(SMALL["shape_zyx"]) - 1) / 2.0)
        assert np.allclose(centre, 0.0, atol=1e-3)


def test_airway_truth_is_one_dark_component(phantom):
    airway = phantom.airway.array_zyx
    assert cc3d.connected_components(airway, connectivity=6, return_N=True)[1] == 1
    ct = phantom.ct.array_zyx
    assert ct[airway > 0].mean() < -600
    # Lumen well inside the big airways (class 1) is air.
    assert np.median(ct[phantom.airway3.array_zyx == 1]) < -800


def test_tree_json_is_consistent(written):
    # Everything is read back from the files: tree.json must place its points in the grid
    # its own header and the written volumes describe, not just in the in-memory one.
    tree = json.loads(written["tree"].read_text())
    airway_file = read_volume(written["airway"])
    geometry, airway = airway_file.geometry, airway_file.array_zyx
    assert tree["seed"] == 3 and tree["variant"] == "standard"
    assert tree["shape_zyx"] == list(SMALL["shape_zyx"]) == list(airway.shape)
    assert tree["spacing_zyx_mm"] == pytest.approx(geometry.spacing_zyx, abs=1e-5)
    assert tree["origin_xyz_mm"] == pytest.approx(geometry.origin_xyz, abs=1e-4)
    branches = {branch["id"]: branch for branch in tree["branches"]}
    assert branches[0]["parent"] is None and branches[0]["generation"] == 0
    for branch in branches.values():
        if branch["parent"] is None:
            assert branch["id"] == 0
            expected = branch_class(0, branch["median_diameter_mm"])
        else:
            parent = branches[branch["parent"]]
            assert branch["generation"] == parent["generation"] + 1
            assert branch["class"] >= parent["class"]
            expected = branch_class(branch["generation"], branch["median_diameter_mm"], parent["class"])
        assert branch["class"] == expected
        index = np.rint(geometry.physical_to_index_zyx(np.asarray(branch["points_mm"]))).astype(int)
        assert np.all(airway[tuple(index.T)] == 1), branch["id"]
        assert len(branch["radius_mm"]) == len(branch["points_mm"])


def test_ground_truth_lies_inside_the_tree_json_lumen(written):
    """Labels checked against the analytic tubes of tree.json, on the written files' grid."""
    tree = json.loads(written["tree"].read_text())
    classes = read_volume(written["airway3"])
    index = np.argwhere(classes.array_zyx > 0)
    voxels_mm = classes.geometry.index_zyx_to_physical(index.astype(float))
    # A voxel is labelled when its centre is in some lumen (a wide trachea's lumen reaches
    # nearer to a main bronchus's axis than to its own); the half diagonal also covers the
    # gap between centreline samples (well under a voxel apart).
    slack = 0.5 * np.linalg.norm(classes.spacing_zyx)
    inside = np.zeros(len(index), dtype=bool)
    for branch in tree["branches"]:
        points, radii = np.asarray(branch["points_mm"]), np.asarray(branch["radius_mm"])
        reach = radii.max() + slack
        near = np.flatnonzero(np.all((voxels_mm >= points.min(0) - reach) & (voxels_mm <= points.max(0) + reach), axis=1))
        distance, nearest = cKDTree(points).query(voxels_mm[near])
        inside[near[distance <= radii[nearest] + slack]] = True
    airway_class = classes.array_zyx[tuple(index.T)]
    assert np.count_nonzero(airway_class == 3) > 100
    assert np.all(inside[airway_class <= 2])
    # The thinnest class 3 tips are widened to stay face-connected at this grid.
    assert inside[airway_class == 3].mean() >= 0.97


def test_lungs_hold_the_tree_below_the_main_bronchi(phantom):
    lungs = phantom.lungs.array_zyx
    geometry = phantom.lungs.geometry
    inside = [
        lungs[tuple(np.rint(geometry.physical_to_index_zyx(branch.points_xyz_mm[1:])).astype(int).T)].mean()
        for branch in phantom.branches
        if branch.generation >= 2
    ]
    assert len(inside) > 20
    assert np.mean(inside) > 0.97
    # Two lungs; at 1.6-1.8 mm in plane a thin tip may break off, but it holds next to nothing.
    sizes = np.sort(np.bincount(cc3d.connected_components(lungs, connectivity=6).ravel())[1:])[::-1]
    assert sizes[:2].sum() > 0.99 * sizes.sum() and sizes[1] > 0.5 * sizes[0]


def test_main_bronchi_are_anatomical(phantom):
    trachea, first, second = phantom.branches[:3]
    right, left = (first, second) if first.points_xyz_mm[-1, 0] < 0 else (second, first)
    assert right.points_xyz_mm[-1, 0] < 0 < left.points_xyz_mm[-1, 0]  # LPS: +x is the patient's left

    def steepness(branch):
        axis = branch.points_xyz_mm[-1] - branch.points_xyz_mm[0]
        return -axis[2] / np.linalg.norm(axis)

    assert right.length_mm < left.length_mm
    assert steepness(right) > steepness(left)
    assert right.median_diameter_mm > left.median_diameter_mm
    assert trachea.airway_class == right.airway_class == left.airway_class == 1


def test_progress_is_reported():
    calls = []
    generate_phantom(seed=0, shape_zyx=(64, 80, 80), spacing_zyx=(2.0, 2.0, 2.0),
                     progress=lambda fraction, message: calls.append((fraction, message)))
    fractions = [fraction for fraction, _ in calls]
    assert len(calls) >= 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(isinstance(message, str) and message for _, message in calls)


@pytest.mark.parametrize("variant", sorted(PHANTOM_VARIANTS))
def test_every_variant_renders(variant):
    phantom = generate_phantom(seed=1, shape_zyx=(64, 80, 80), spacing_zyx=(2.0, 2.0, 2.0), variant=variant)
    assert phantom.variant == variant and phantom.ct.array_zyx.dtype == np.int16


@pytest.mark.parametrize(
    "variant, slice_mm",
    [("standard", 0.8), ("sharp", 0.8), ("smooth", 0.8), ("low-dose", 0.8), ("thin-slice", 0.5), ("thick-slice", 1.25)],
)
def test_variant_sets_slice_spacing_unless_spacing_given(variant, slice_mm):
    # 160 slices of the thinnest variant still give the 80 mm a chest needs.
    phantom = generate_phantom(seed=0, shape_zyx=(160, 152, 152), variant=variant)
    assert phantom.ct.spacing_zyx == pytest.approx((slice_mm, 0.8, 0.8))
    given = generate_phantom(seed=0, shape_zyx=(64, 80, 80), spacing_zyx=(2.0, 2.0, 2.0), variant=variant)
    assert given.ct.spacing_zyx == pytest.approx((2.0, 2.0, 2.0))


def _soft_tissue_noise_hu(variant: str) -> float:
    """SD of the CT minus a smoothed copy in soft tissue: the fine noise a radiologist sees."""
    phantom = generate_phantom(seed=0, shape_zyx=(64, 80, 80), spacing_zyx=(2.0, 2.0, 2.0), variant=variant)
    ct = phantom.ct.array_zyx.astype(np.float32)
    smoothed = ndimage.gaussian_filter(ct, 1.0)
    # Well inside muscle and mediastinum (0-100 HU, no edge within 2 voxels) the residual is noise.
    tissue = ndimage.binary_erosion((smoothed >= 0) & (smoothed <= 100), iterations=2)
    assert np.count_nonzero(tissue) > 10_000, variant
    return float((ct - smoothed)[tissue].std())


def test_variants_order_the_image_noise():
    # About 71, 27 and 22 HU: a quarter of the dose doubles the noise, a smooth kernel lowers it.
    low_dose, standard, smooth = (_soft_tissue_noise_hu(v) for v in ("low-dose", "standard", "smooth"))
    assert low_dose > 2.0 * standard and standard > 1.15 * smooth, (low_dose, standard, smooth)


@pytest.mark.parametrize(
    "arguments",
    [
        {"shape_zyx": (16, 96, 96)},
        {"shape_zyx": (96, 96)},
        {"shape_zyx": (96, 96, 96), "spacing_zyx": (0.0, 1.0, 1.0)},
        {"shape_zyx": (96, 96, 96), "spacing_zyx": (1.0, float("nan"), 1.0)},
        {"shape_zyx": (64, 64, 64), "spacing_zyx": (1.0, 1.0, 1.0)},
        {"shape_zyx": (96, 96, float("inf"))},
        {"variant": "ultra"},
        {"variant": ["standard"]},
        {"seed": -1},
        {"progress": 5},
    ],
)
def test_bad_arguments_raise_input_errors(arguments):
    with pytest.raises(AirwayInputError):
        generate_phantom(**arguments)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(AirwayInputError, match="standard"):
        generate_phantom(variant="ultra")


def test_unrelated_branches_keep_clear_and_stay_resolvable(phantom):
    branches = phantom.branches
    spacing = np.asarray(SMALL["spacing_zyx"])
    outer = [float(b.radius_mm.max()) * (1.0 + 2.0 * _WALL_PER_DIAMETER) for b in branches]
    family = {(b.id, b.parent) for b in branches if b.parent is not None}
    family |= {(a.id, b.id) for a in branches for b in branches if a.parent is not None and a.parent == b.parent}
    family |= {(b, a) for a, b in family}
    points = np.concatenate([b.points_xyz_mm for b in branches])
    owner = np.concatenate([np.full(len(b.points_xyz_mm), b.id) for b in branches])
    for a, b in cKDTree(points).query_pairs(2.0 * max(outer) + 2.0 * spacing.max(), output_type="ndarray"):
        i, j = int(owner[a]), int(owner[b])
        if i != j and (i, j) not in family:
            gap = np.linalg.norm(points[a] - points[b]) - outer[i] - outer[j]
            assert gap >= 1.5 * spacing.max() - 1e-6, (i, j, gap)
    # Below the main bronchi: resolvable calibre (the taper keeps the median at the nominal
    # diameter; 5% covers rounding) and length (10 voxels of the coarsest axis at least).
    for branch in branches[3:]:
        assert branch.median_diameter_mm >= 1.5 * spacing[1:].min() * 0.95
        assert branch.length_mm >= 10.0 * spacing.max()


def test_full_size_tree_is_resolvable_by_the_parser():
    """At 256^3 / 0.8 mm the tree parser sees the tree that tree.json describes.

    Generation speed is measured by benchmarks/phantom_realism.py, not asserted here.
    """
    phantom = generate_phantom(seed=0, shape_zyx=(256, 256, 256), spacing_zyx=(0.8, 0.8, 0.8))
    airway, airway3 = phantom.airway.array_zyx, phantom.airway3.array_zyx
    parsed = parse_airway_tree(airway, phantom.airway.spacing_zyx, connectivity=26)
    assert parsed.n_generations >= 10
    assert len(parsed.end_branches()) >= 150
    assert len(parsed.branches) >= 0.75 * len(phantom.branches)
    six = parse_airway_tree(airway, phantom.airway.spacing_zyx, connectivity=6)
    assert abs(len(six.branches) - len(parsed.branches)) <= 0.03 * len(parsed.branches)
    # Classes are monotone down the tree: without class 3 the rest is one tree.
    upper = ((airway3 == 1) | (airway3 == 2)).astype(np.uint8)
    assert cc3d.connected_components(upper, connectivity=26, return_N=True)[1] == 1
    labels = parsed.class_labels_zyx()
    for airway_class, minimum in ((1, 0.90), (2, 0.80), (3, 0.80)):
        a, b = labels == airway_class, airway3 == airway_class
        assert 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) >= minimum, airway_class


def test_a_failed_write_keeps_none_of_the_files(phantom, tmp_path):
    (tmp_path / "tree.json").mkdir()  # the last file cannot be written
    with pytest.raises(AirwayInputError, match="it is a folder"):
        write_phantom(phantom, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tree.json"]
