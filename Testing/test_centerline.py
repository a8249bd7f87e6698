"""Tests of airway centerlines (AirwayRefineLib.centerline) on synthetic capsule trees with known geometry."""

from __future__ import annotations

import csv
import json
from xml.etree import ElementTree

import numpy as np
import pytest
from AirwayRefineLib import centerline
from AirwayRefineLib.centerline import (
    MARKUPS_SCHEMA,
    TABLE_COLUMNS,
    extract_centerlines,
    read_centerlines,
    route,
    write_branch_table,
    write_centerlines,
    write_markups,
    write_route,
    write_vtp,
)
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.orientation import Reorientation
from AirwaySegmentationLib.volume import Geometry
from synthetic_trees import TreeSegment, binary_tree, capsule_mask, place

SPACING_ZYX = (1.0, 1.0, 1.0)
# A 7-branch tree on a (58, 43, 25) grid; the trachea runs along +z index from p0 (its top).
TREE = dict(generations=3, trachea_radius_mm=3.0, trachea_length_mm=24.0, length_ratio=0.75)
# Index axis k points to the feet (physical -z), so the trachea's top p0 is superior.
FEET_FIRST = Geometry(SPACING_ZYX, (12.5, -40.0, 70.0), (1, 0, 0, 0, 1, 0, 0, 0, -1))


def _physical(geometry: Geometry, point_mm_zyx) -> np.ndarray:
    return geometry.index_zyx_to_physical(np.asarray(point_mm_zyx) / np.asarray(SPACING_ZYX))


def _axis_distance(points_xyz: np.ndarray, segment: TreeSegment, geometry: Geometry) -> np.ndarray:
    p0, p1 = _physical(geometry, segment.p0_mm), _physical(geometry, segment.p1_mm)
    axis = p1 - p0
    t = np.clip((points_xyz - p0) @ axis / (axis @ axis), 0.0, 1.0)
    return np.linalg.norm(points_xyz - p0 - t[:, None] * axis, axis=1)


def _segment_of(branch, segments, geometry) -> int:
    """The segment whose axis passes closest to the branch's middle point."""
    middle = branch.points_xyz[len(branch.points_xyz) // 2][None]
    return int(np.argmin([_axis_distance(middle, s, geometry)[0] for s in segments]))


@pytest.fixture(scope="module")
def y_tree():
    shape, segments = place(binary_tree(**TREE), SPACING_ZYX, 2.0)
    mask = capsule_mask(shape, SPACING_ZYX, segments)
    return extract_centerlines(mask, FEET_FIRST), segments, mask


def test_branches_generations_and_names(y_tree):
    tree, segments, _ = y_tree
    assert len(tree.branches) == 7
    assert [b.generation for b in tree.branches] == [0, 1, 1, 2, 2, 2, 2]
    assert [b.name for b in tree.branches] == ["B1", "B1.1", "B1.2", "B1.1.1", "B1.1.2", "B1.2.1", "B1.2.2"]
    match = [_segment_of(b, segments, FEET_FIRST) for b in tree.branches]
    assert sorted(match) == list(range(7)) and match[0] == 0
    for branch in tree.branches[1:]:
        assert segments[match[branch.id]].parent == match[branch.parent]
        assert branch.id in tree.branches[branch.parent].children
        # A child starts exactly on its parent's polyline.
        assert np.min(np.linalg.norm(tree.branches[branch.parent].points_xyz - branch.points_xyz[0], axis=1)) < 1e-9
    assert [b.airway_class for b in tree.branches[:3]] == [1, 1, 1]


def test_rooted_at_the_superior_end_of_the_trachea(y_tree):
    tree, segments, _ = y_tree
    trachea = tree.branches[0]
    top, bottom = _physical(FEET_FIRST, segments[0].p0_mm), _physical(FEET_FIRST, segments[0].p1_mm)
    assert trachea.points_xyz[0][2] > trachea.points_xyz[-1][2]  # LPS z is superior
    # Thinning stops short of the rounded top by up to about half a radius.
    assert np.linalg.norm(trachea.points_xyz[0] - top) < segments[0].radius_mm
    assert np.linalg.norm(trachea.points_xyz[-1] - bottom) < 2 * segments[0].radius_mm


def test_points_lie_on_the_axis_and_radii_match(y_tree):
    tree, segments, _ = y_tree
    errors = []
    for branch in tree.branches:
        segment = segments[_segment_of(branch, segments, FEET_FIRST)]
        distance = np.min([_axis_distance(branch.points_xyz, s, FEET_FIRST) for s in segments], axis=0)
        assert distance.max() < 1.0  # within a voxel of the true axes everywhere, junctions included
        # Away from the junction and the rounded tip, the radius is that of the capsule.
        along = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(branch.points_xyz, axis=0), axis=1))]
        core = (along > 2 * segment.radius_mm) & (along < along[-1] - 2 * segment.radius_mm)
        assert core.sum() >= 3
        assert np.abs(branch.radius_mm[core] - segment.radius_mm).max() < 0.5
        errors.append(branch.radius_mm[core] - segment.radius_mm)
        if branch.parent is not None:  # the lumen widens into the junction at the parent end
            assert branch.radius_mm[0] > np.median(branch.radius_mm[core])
        assert branch.length_mm == pytest.approx(segment.length_mm, abs=segment.radius_mm + 1.0)
    # The bias-corrected ridge radius is right on average to a small fraction of a voxel.
    assert abs(np.median(np.concatenate(errors))) < 0.1


def test_coordinates_follow_the_geometry(y_tree):
    tree, _, mask = y_tree
    moved = Geometry(SPACING_ZYX, (-3.0, 8.0, -150.0), FEET_FIRST.direction)
    shifted = extract_centerlines(mask, moved)
    offset = np.asarray(moved.origin_xyz) - np.asarray(FEET_FIRST.origin_xyz)
    for a, b in zip(tree.branches, shifted.branches):
        np.testing.assert_allclose(a.points_xyz + offset, b.points_xyz, atol=1e-6)


@pytest.mark.parametrize("axes_zyx, flips_zyx", [((0, 1, 2), (True, False, True)), ((2, 0, 1), (False, True, False))])
def test_the_same_airway_stored_in_another_order_has_the_same_centerlines(y_tree, axes_zyx, flips_zyx):
    """Thinning depends on the storage order; the centerlines do not (orientation.py)."""
    tree, _, mask = y_tree
    order = Reorientation(axes_zyx, flips_zyx)
    stored = np.ascontiguousarray(order.to_canonical(mask))
    turned = extract_centerlines(stored, order.geometry(FEET_FIRST, mask.shape))
    assert [b.parent for b in turned.branches] == [b.parent for b in tree.branches]
    for a, b in zip(tree.branches, turned.branches):
        np.testing.assert_allclose(a.points_xyz, b.points_xyz, atol=1e-6)
        np.testing.assert_allclose(a.radius_mm, b.radius_mm)


def test_root_follows_the_superior_direction(y_tree):
    _, _, mask = y_tree
    head_first = Geometry(SPACING_ZYX)  # +k is superior: the root is the leaf tip deepest in the grid
    tree = extract_centerlines(mask, head_first)
    top_xyz = head_first.index_zyx_to_physical(np.argwhere(mask)[np.argmax(np.argwhere(mask)[:, 0])])
    assert np.linalg.norm(tree.branches[0].points_xyz[0] - top_xyz) < 3.0
    assert max(b.generation for b in tree.branches) == 3


def test_a_wall_bump_is_pruned(monkeypatch):
    segments = binary_tree(**TREE)
    # A stub off the trachea wall: 1.5 mm radius, reaching 2 mm beyond the 3 mm wall.
    segments.append(TreeSegment((10.0, 0.0, 0.0), (10.0, 5.0, 0.0), 1.5, 0, 1))
    shape, segments = place(segments, SPACING_ZYX, 2.0)
    mask = capsule_mask(shape, SPACING_ZYX, segments)
    assert len(extract_centerlines(mask, FEET_FIRST).branches) == 7
    monkeypatch.setattr(centerline, "MIN_PROTRUSION_RADII", 0.0)
    assert len(extract_centerlines(mask, FEET_FIRST).branches) > 7


def test_classes_from_labels(y_tree):
    tree, _, mask = y_tree
    labelled = extract_centerlines(mask, FEET_FIRST, labels_zyx=np.where(mask, 3, 0))
    assert [b.airway_class for b in labelled.branches] == [3] * 7
    assert tree.branches[0].airway_class == 1


def test_route_to_a_target_beyond_a_leaf(y_tree):
    tree, segments, _ = y_tree
    leaf = next(i for i, s in enumerate(segments) if s.generation == 2 and s.parent == 2)
    p0, p1 = np.asarray(segments[leaf].p0_mm), np.asarray(segments[leaf].p1_mm)
    target = _physical(FEET_FIRST, p1 + 6.0 * (p1 - p0) / np.linalg.norm(p1 - p0))
    path = route(tree, target)
    expected = [0, 2, leaf]
    assert [
        segments_index
        for segments_index in (_segment_of(tree.branches[b], segments, FEET_FIRST) for b in path.branch_ids)
    ] == expected
    assert path.names[0] == "B1" and len(path.names) == 3
    steps = np.linalg.norm(np.diff(path.points_xyz, axis=0), axis=1)
    assert steps.max() < 1.5 and steps.min() > 0.1  # one continuous polyline, no repeated junction points
    true_length = sum(segments[i].length_mm for i in expected)
    assert path.length_mm == pytest.approx(true_length, abs=2 * segments[0].radius_mm)
    assert path.min_radius_mm == pytest.approx(segments[leaf].radius_mm, abs=0.5)
    assert path.distance_to_target_mm == pytest.approx(np.linalg.norm(path.points_xyz[-1] - target))
    assert 6.0 <= path.distance_to_target_mm < 6.0 + segments[leaf].radius_mm
    assert set(np.unique(path.branch_of_point)) == set(path.branch_ids)


def test_a_route_to_a_junction_ends_in_the_parent_and_names_only_branches_it_enters(y_tree):
    tree, _, _ = y_tree
    for child in tree.branches[1:]:
        path = route(tree, child.points_xyz[0])  # the child's first point: its parent's junction vertex
        assert path.branch_ids[-1] == child.parent
        assert set(np.unique(path.branch_of_point)) == set(path.branch_ids)
        assert path.distance_to_target_mm == pytest.approx(0.0, abs=1e-9)


def test_vtp_export(y_tree, tmp_path):
    tree, _, _ = y_tree
    path = write_vtp(tree, tmp_path / "centerlines.vtp")
    piece = ElementTree.parse(path).getroot().find("PolyData/Piece")
    total = sum(len(b.points_xyz) for b in tree.branches)
    assert piece.get("NumberOfPoints") == str(total) and piece.get("NumberOfLines") == "7"

    def values(section, name):
        return np.asarray(piece.find(f"{section}/DataArray[@Name='{name}']").text.split(), dtype=float)

    assert values("Points", "Points").size == 3 * total
    np.testing.assert_allclose(values("PointData", "Radius"), np.concatenate([b.radius_mm for b in tree.branches]))
    assert values("CellData", "Generation").tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert values("CellData", "BranchId").tolist() == list(range(7))
    assert values("Lines", "offsets")[-1] == total
    back = read_centerlines(path)
    assert [b.name for b in back.branches] == [b.name for b in tree.branches]
    for a, b in zip(tree.branches, back.branches):
        np.testing.assert_allclose(a.points_xyz, b.points_xyz)
        assert (a.parent, a.children, a.airway_class) == (b.parent, b.children, b.airway_class)


def test_vtp_reads_in_vtk(y_tree, tmp_path):
    vtk_xml = pytest.importorskip("vtkmodules.vtkIOXML")
    tree, _, _ = y_tree
    reader = vtk_xml.vtkXMLPolyDataReader()
    reader.SetFileName(str(write_vtp(tree, tmp_path / "centerlines.vtp")))
    reader.Update()
    polydata = reader.GetOutput()
    assert polydata.GetNumberOfLines() == 7
    assert polydata.GetNumberOfPoints() == sum(len(b.points_xyz) for b in tree.branches)
    assert polydata.GetPointData().GetArray("Radius").GetNumberOfTuples() == polydata.GetNumberOfPoints()
    assert polydata.GetCellData().GetArray("Class").GetValue(0) == 1
    assert polydata.GetFieldData().GetAbstractArray("SPACE").GetValue(0) == "LPS"


def test_markups_export(y_tree, tmp_path):
    tree, _, _ = y_tree
    document = json.loads(write_markups(tree, tmp_path / "centerlines.mrk.json").read_text())
    assert document["@schema"] == MARKUPS_SCHEMA
    curves = document["markups"]
    assert len(curves) == 7
    for curve, branch in zip(curves, tree.branches):
        assert curve["type"] == "Curve" and curve["coordinateSystem"] == "LPS" and curve["coordinateUnits"] == "mm"
        assert curve["name"].startswith(branch.name + " ")
        positions = np.array([p["position"] for p in curve["controlPoints"]])
        np.testing.assert_allclose(positions, branch.points_xyz, atol=1e-4)
        assert len({p["id"] for p in curve["controlPoints"]}) == len(positions)
        (radius,) = curve["measurements"]
        assert radius["name"] == "Radius" and radius["units"] == "mm"
        np.testing.assert_allclose(radius["controlPointValues"], branch.radius_mm, atol=1e-4)


def test_branch_table(y_tree, tmp_path):
    tree, _, _ = y_tree
    csv_path, json_path = write_branch_table(tree, tmp_path / "branches.csv", tmp_path / "branches.json")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == TABLE_COLUMNS and len(rows) == 7
    assert rows[0]["parent"] == "" and [int(r["parent"]) for r in rows[1:]] == [b.parent for b in tree.branches[1:]]
    for row, branch in zip(rows, tree.branches):
        assert float(row["length_mm"]) == pytest.approx(branch.length_mm, abs=1e-3)
        assert float(row["min_radius_mm"]) == pytest.approx(branch.min_radius_mm, abs=1e-3)
        assert [float(row[c]) for c in TABLE_COLUMNS[11:14]] == pytest.approx(branch.points_xyz[-1], abs=1e-3)
    back = read_centerlines(json_path)
    for a, b in zip(tree.branches, back.branches):
        np.testing.assert_allclose(a.points_xyz, b.points_xyz, atol=1e-4)
        assert (a.name, a.parent, a.children, a.generation) == (b.name, b.parent, b.children, b.generation)


def test_route_export(y_tree, tmp_path):
    tree, _, _ = y_tree
    path = route(tree, tree.branches[-1].points_xyz[-1])
    mrk, vtp = write_route(path, tmp_path / "route.mrk.json", tmp_path / "route.vtp")
    (curve,) = json.loads(mrk.read_text())["markups"]
    assert len(curve["controlPoints"]) == len(path.points_xyz)
    assert curve["measurements"][0]["controlPointValues"] == pytest.approx(path.radius_mm.tolist(), abs=1e-4)
    piece = ElementTree.parse(vtp).getroot().find("PolyData/Piece")
    assert piece.get("NumberOfLines") == "1" and piece.get("NumberOfPoints") == str(len(path.points_xyz))
    branch_ids = piece.find("PointData/DataArray[@Name='BranchId']").text.split()
    assert [int(v) for v in branch_ids] == path.branch_of_point.tolist()


def test_bad_input(tmp_path):
    with pytest.raises(AirwayInputError, match="empty"):
        extract_centerlines(np.zeros((8, 8, 8), np.uint8), Geometry())
    mask = np.zeros((20, 8, 8), bool)
    mask[2:18, 2:6, 2:6] = True
    with pytest.raises(AirwayInputError, match="shape"):
        extract_centerlines(mask, Geometry(), labels_zyx=np.zeros((20, 8, 7)))
    with pytest.raises(AirwayInputError, match="segmental generation"):
        extract_centerlines(mask, Geometry(), segmental_generation=-5)
    speck = np.zeros((8, 8, 8), bool)
    speck[3:5, 3:5, 3:5] = True  # thins to one voxel: no polyline (Slicer's curves need two points)
    with pytest.raises(AirwayInputError, match="single voxel"):
        extract_centerlines(speck, Geometry())
    with pytest.raises(AirwayInputError, match="no such file"):
        read_centerlines(tmp_path / "missing.vtp")
    (tmp_path / "other.json").write_text('{"branches": [{"id": 3}]}')
    with pytest.raises(AirwayInputError, match="written by this tool"):
        read_centerlines(tmp_path / "other.json")
    with pytest.raises(AirwayInputError, match="three coordinates"):
        route(centerline.CenterlineTree(), (1.0, 2.0))


@pytest.mark.parametrize("stagger_mm", [1.5, 3.0])
def test_splits_within_one_junction_are_one_split(stagger_mm):
    # Two of three children leave the 3 mm trachea ``stagger_mm`` below the first: thinning
    # splits twice, but a stretch shorter than the lumen radius is no branch of its own.
    segments = [TreeSegment((0.0, 0.0, 0.0), (20.0, 0.0, 0.0), 3.0)]
    for index, angle in enumerate(np.radians([0.0, 120.0, 240.0])):
        start = np.array([20.0 + (stagger_mm if index else 0.0), 0.0, 0.0])
        direction = np.array([1.0, np.cos(angle), np.sin(angle)]) / np.sqrt(2.0)
        segments.append(TreeSegment(tuple(start), tuple(start + 16.0 * direction), 2.2, 0, 1))
    shape, segments = place(segments, SPACING_ZYX, 2.0)
    tree = extract_centerlines(capsule_mask(shape, SPACING_ZYX, segments), FEET_FIRST)
    assert [(b.generation, b.parent) for b in tree.branches] == [(0, None), (1, 0), (1, 0), (1, 0)]


def test_smoothing_keeps_the_ends_of_short_paths():
    for count in (3, 4, 6, 12):
        points = np.c_[np.arange(count), np.arange(count) % 2, np.zeros(count)].astype(float)
        smoothed = centerline._smooth_keeping_ends(points)
        np.testing.assert_array_equal(smoothed[[0, -1]], points[[0, -1]])
        assert np.abs(smoothed[1:-1, 1] - 0.5).max() < 0.5  # the zig-zag is flattened


def test_cli_centerline_then_route(y_tree, tmp_path, capsys):
    from AirwaySegmentationLib.cli import EXIT_BAD_INPUT, main
    from AirwaySegmentationLib.volume import Volume, write_volume

    tree, segments, mask = y_tree
    write_volume(Volume(mask.astype(np.uint8), FEET_FIRST), tmp_path / "airway.nii.gz")
    assert main(["centerline", "--labels", str(tmp_path / "airway.nii.gz"), "--out", str(tmp_path / "cl")]) == 0
    assert f"{len(tree.branches)} branches over 3 generations" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cl").iterdir()) == sorted(centerline.CENTERLINE_FILES)
    written = read_centerlines(tmp_path / "cl" / "branches.json")
    assert [b.name for b in written.branches] == [b.name for b in tree.branches]

    leaf = tree.branches[-1]
    target = " ".join(str(v) for v in leaf.points_xyz[-1])
    for source in ("branches.json", "centerlines.vtp"):
        code = main(["route", "--centerlines", str(tmp_path / "cl" / source), "--target", *target.split(), "--out", str(tmp_path / "r")])
        assert code == 0
        assert capsys.readouterr().out.startswith(" > ".join(route(tree, leaf.points_xyz[-1]).names) + ":")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(centerline.ROUTE_FILES)
    assert main(["route", "--centerlines", str(tmp_path / "none.json"), "--target", "0", "0", "0", "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT


def test_an_airway_cut_by_the_image_border_has_its_centerline_run_to_the_border():
    """Thinning sees background beyond the image; the trachea of a scan that starts below the
    larynx must still begin at the top slice, not a radius below it."""
    z, y, x = np.mgrid[:40, :25, :25]
    tube = (y - 12) ** 2 + (x - 12) ** 2 <= 5**2  # radius 5 mm, cut by both z faces
    tree = extract_centerlines(tube, Geometry((1.0, 1.0, 1.0)))
    assert len(tree.branches) == 1
    heights = tree.branches[0].points_xyz[:, 2]
    assert heights.max() == pytest.approx(39.0) and heights.min() == pytest.approx(0.0)
    assert tree.branches[0].length_mm == pytest.approx(39.0, abs=0.5)


def test_the_centerline_files_are_written_all_or_none(y_tree, tmp_path, monkeypatch):
    tree, _, _ = y_tree
    paths = write_centerlines(tree, tmp_path)
    before = {path.name: path.read_bytes() for path in paths}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(centerline, "write_branch_table", full_disk)  # the last of the four files fails
    with pytest.raises(OSError):
        write_centerlines(centerline.CenterlineTree(tree.branches[:1]), tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
