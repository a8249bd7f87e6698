"""MRML nodes <-> our arrays + geometry, against Slicer's real MRML classes (PyPI ``slicer-core``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

# Skipped only where the wheel is absent (none is built for every Python); a broken install fails.
slicer_core = pytest.importorskip(
    "slicer_core", reason="the slicer-core wheel (Slicer's MRML libraries) is not installed for this Python"
)

from AirwaySegmentationLib import mrml
from AirwaySegmentationLib.classes import AIRWAY_CLASSES
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.segfile import read_segmentation, write_segmentation
from AirwaySegmentationLib.volume import Geometry, Volume
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkFiltersSources import vtkSphereSource

# Rotations about two axes, so that no direction column is axis-aligned.
_A, _B = 0.3, -0.45
_ROT_Y = np.array([[math.cos(_A), 0, math.sin(_A)], [0, 1, 0], [-math.sin(_A), 0, math.cos(_A)]])
_ROT_Z = np.array([[math.cos(_B), -math.sin(_B), 0], [math.sin(_B), math.cos(_B), 0], [0, 0, 1]])
OBLIQUE = Geometry(
    spacing_xyz=(0.6, 0.7, 1.1),
    origin_xyz=(12.25, -30.5, -250.125),
    direction=tuple((_ROT_Z @ _ROT_Y).ravel()),
)
TRACHEA_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^44567001^Trachea~^^~Anatomic codes - DICOM master list~^^~^^"
)


@pytest.fixture
def scene():
    return slicer_core.vtkMRMLScene()


def ct_values(shape=(7, 9, 11)) -> np.ndarray:
    """Distinct int16 values, so that any axis swap or flip shows."""
    return (np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 900).astype(np.int16)


def three_class_labels() -> np.ndarray:
    labels = np.zeros((9, 10, 11), np.uint8)
    labels[1:8, 4:6, 5] = 1
    labels[7, 6:9, 5:7] = 2
    labels[7, 8:10, 7:10] = 3
    return labels


def _matrix(node_method) -> np.ndarray:
    matrix = vtkMatrix4x4()
    node_method(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _assert_same_geometry(actual: Geometry, expected: Geometry) -> None:
    np.testing.assert_allclose(actual.spacing_xyz, expected.spacing_xyz, rtol=0, atol=1e-9)
    np.testing.assert_allclose(actual.origin_xyz, expected.origin_xyz, rtol=0, atol=1e-6)
    np.testing.assert_allclose(actual.direction, expected.direction, rtol=0, atol=1e-9)


# --- volumes -------------------------------------------------------------------------------


def test_volume_round_trip_keeps_voxels_and_oblique_geometry(scene) -> None:
    values = ct_values()
    node = mrml.node_from_volume(Volume(values, OBLIQUE), scene, "CT")
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert node.GetName() == "CT" and node.GetScene() is scene
    # The node's own view of the voxels: dimensions are (X, Y, Z) = (i, j, k).
    assert node.GetImageData().GetDimensions() == values.shape[::-1]
    back = mrml.volume_from_node(node)
    assert back.array_zyx.dtype == np.int16
    np.testing.assert_array_equal(back.array_zyx, values)
    _assert_same_geometry(back.geometry, OBLIQUE)


def test_node_places_voxels_where_our_geometry_does(scene) -> None:
    values = ct_values()
    node = mrml.node_from_volume(Volume(values, OBLIQUE), scene, "CT")
    ijk_to_ras = _matrix(node.GetIJKToRASMatrix)
    index_zyx = np.array([5.0, 2.0, 3.0])
    lps = OBLIQUE.index_zyx_to_physical(index_zyx)
    ras = ijk_to_ras @ np.r_[index_zyx[::-1], 1.0]
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    # The voxel at that index in the node's own scalars holds the value we put there.
    scalars = node.GetImageData().GetScalarComponentAsDouble(3, 2, 5, 0)
    assert scalars == values[5, 2, 3]
    # Spacing and origin as Slicer shows them: origin is the RAS position of voxel (0, 0, 0).
    np.testing.assert_allclose(node.GetSpacing(), OBLIQUE.spacing_xyz, atol=1e-9)
    np.testing.assert_allclose(node.GetOrigin(), [-12.25, 30.5, -250.125], atol=1e-9)


def test_label_map_node_and_dtype_conversions(scene) -> None:
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[1, 2, 3] = True
    node = mrml.node_from_volume(Volume(mask, OBLIQUE), scene, "mask", labelmap=True)
    assert node.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    back = mrml.volume_from_node(node)
    assert back.array_zyx.dtype == np.uint8
    np.testing.assert_array_equal(back.array_zyx, mask)
    wide = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    assert mrml.volume_from_node(mrml.node_from_volume(Volume(wide, OBLIQUE), scene, "w")).array_zyx.dtype == np.int32
    with pytest.raises(AirwayInputError, match="32-bit"):
        mrml.node_from_volume(Volume(wide * 2**40, OBLIQUE), scene, "too wide")


def test_existing_node_is_overwritten_in_place(scene) -> None:
    node = mrml.node_from_volume(Volume(ct_values(), OBLIQUE), scene, "first")
    smaller = Volume(np.ones((3, 4, 5), np.float32), Geometry((2.0, 2.0, 2.0), (1.0, 2.0, 3.0)))
    same = mrml.node_from_volume(smaller, scene, "second", node=node)
    assert same is node and node.GetName() == "second"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    back = mrml.volume_from_node(node)
    np.testing.assert_array_equal(back.array_zyx, smaller.array_zyx)
    _assert_same_geometry(back.geometry, smaller.geometry)


def test_linear_parent_transform_is_applied_both_ways(scene) -> None:
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift_ras = vtkMatrix4x4()
    shift_ras.SetElement(0, 3, 10.0)  # 10 mm to the patient's right: RAS +x, LPS -x
    shift_ras.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(shift_ras)
    node = mrml.node_from_volume(Volume(ct_values(), OBLIQUE), scene, "CT")
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.volume_from_node(node)
    np.testing.assert_allclose(
        moved.geometry.origin_xyz, np.add(OBLIQUE.origin_xyz, [-10.0, 0.0, -4.0]), atol=1e-9
    )
    # Writing into a transformed node keeps the voxels at the given physical place.
    mrml.node_from_volume(Volume(ct_values(), OBLIQUE), scene, "CT", node=node)
    _assert_same_geometry(mrml.volume_from_node(node).geometry, OBLIQUE)


def test_non_linear_transform_and_empty_node_are_refused(scene) -> None:
    with pytest.raises(AirwayInputError, match="no voxels"):
        mrml.volume_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))
    node = mrml.node_from_volume(Volume(ct_values(), OBLIQUE), scene, "CT")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(AirwayInputError, match="non-linear transform"):
        mrml.volume_from_node(node)


def test_image_extent_start_is_part_of_the_geometry(scene) -> None:
    # IJK counts from the extent's first corner: a node whose image data starts at (2, 0, 1).
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "offset")
    image = vtkImageData()
    image.SetExtent(2, 4, 0, 1, 1, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.arange(6, dtype=np.int16), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(2.0, 3.0, 4.0)
    volume = mrml.volume_from_node(node)
    assert volume.array_zyx.shape == (1, 2, 3)
    np.testing.assert_allclose(volume.geometry.origin_xyz, [-4.0, -0.0, 4.0], atol=1e-12)


# --- segmentations -------------------------------------------------------------------------


def _segments(node) -> dict:
    segmentation = node.GetSegmentation()
    return {
        segmentation.GetNthSegmentID(n): segmentation.GetNthSegment(n)
        for n in range(segmentation.GetNumberOfSegments())
    }


def test_a_given_segmentation_node_is_refilled_not_added(scene) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    mine.GetSegmentation().AddEmptySegment("old", "old painting")
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    node = mrml.segmentation_node_from_labels(labels, scene, "ignored", node=mine)
    assert node is mine and node.GetName() == "Mine"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert list(_segments(node)) == ["airway_class_1", "airway_class_2", "airway_class_3"]
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, labels).array_zyx, labels.array_zyx)


def test_segmentation_node_has_named_coloured_coded_segments(scene) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    node = mrml.segmentation_node_from_labels(labels, scene, "Airway")
    assert node.GetClassName() == "vtkMRMLSegmentationNode" and node.GetName() == "Airway"
    segments = _segments(node)
    assert list(segments) == ["airway_class_1", "airway_class_2", "airway_class_3"]
    for airway_class, segment in zip(AIRWAY_CLASSES, segments.values()):
        assert segment.GetName() == airway_class.name
        np.testing.assert_allclose(segment.GetColor(), airway_class.color_rgb, atol=1e-6)
        terminology = segment.GetTerminology().split("~")
        assert terminology[1] == "SCT^123037004^Anatomical Structure"
        assert terminology[2] == "SCT^{}^{}".format(*airway_class.snomed_type)
        assert segment.GetLabelValue() == airway_class.label
    assert segments["airway_class_1"].GetTerminology() == TRACHEA_TERMINOLOGY
    # One shared binary labelmap on the labels' grid (RAS), holding the label values.
    segmentation = node.GetSegmentation()
    assert segmentation.GetSourceRepresentationName() == "Binary labelmap"
    assert segmentation.GetNumberOfLayers() == 1
    layer = segmentation.GetLayerDataObject(0)
    stored = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(labels.array_zyx.shape)
    np.testing.assert_array_equal(stored, labels.array_zyx)
    expected_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ OBLIQUE.ijk_to_lps
    np.testing.assert_allclose(_matrix(layer.GetImageToWorldMatrix), expected_ras, atol=1e-9)
    assert node.GetDisplayNode() is not None
    with pytest.raises(AirwayInputError, match=r"\[4, 255\] that are not airway classes"):
        mrml.segmentation_node_from_labels(Volume(np.array([[[0, 4, 255]]], np.uint8), OBLIQUE), scene, "bad")


def test_labels_round_trip_through_segmentation_node(scene) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    node = mrml.segmentation_node_from_labels(labels, scene, "Airway")
    back = mrml.labels_from_segmentation_node(node, labels)
    assert back.array_zyx.dtype == np.uint8
    np.testing.assert_array_equal(back.array_zyx, labels.array_zyx)
    _assert_same_geometry(back.geometry, OBLIQUE)


def test_labels_written_into_a_transformed_segmentation_node_stay_in_place(scene) -> None:
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift_ras = vtkMatrix4x4()
    shift_ras.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(shift_ras)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Airway")
    node.SetAndObserveTransformNodeID(transform.GetID())
    labels = Volume(three_class_labels(), OBLIQUE)
    mrml.segmentation_node_from_labels(labels, scene, "Airway", node=node)
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, labels).array_zyx, labels.array_zyx)


def test_reference_volume_sets_the_segmentation_geometry(scene) -> None:
    ct = mrml.node_from_volume(Volume(ct_values((9, 10, 11)), OBLIQUE), scene, "CT")
    node = mrml.segmentation_node_from_labels(Volume(three_class_labels(), OBLIQUE), scene, "Airway", ct)
    role = slicer_core.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert node.GetNodeReference(role) is ct
    geometry = node.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry.endswith(";0;10;0;9;0;8;")  # the CT's extent, i, j, k


def test_export_resamples_onto_a_coarser_or_shifted_reference(scene) -> None:
    labels = three_class_labels()
    node = mrml.segmentation_node_from_labels(Volume(labels, OBLIQUE), scene, "Airway")
    # Every other voxel along i, starting one voxel in along j and k: each reference voxel
    # centre sits exactly on a source voxel centre.
    sx, sy, sz = OBLIQUE.spacing_xyz
    origin = OBLIQUE.index_zyx_to_physical(np.array([1.0, 1.0, 0.0]))
    coarse_geometry = Geometry((2 * sx, sy, sz), tuple(origin), OBLIQUE.direction)
    coarse = mrml.labels_from_segmentation_node(node, Volume(np.zeros((8, 9, 6), np.int16), coarse_geometry))
    np.testing.assert_array_equal(coarse.array_zyx, labels[1:, 1:, ::2])
    # Shifted by whole voxels and larger: the overlap is copied, the rest is background.
    shifted_origin = OBLIQUE.index_zyx_to_physical(np.array([-2.0, 3.0, 1.0]))
    shifted_geometry = Geometry(OBLIQUE.spacing_xyz, tuple(shifted_origin), OBLIQUE.direction)
    shifted = mrml.labels_from_segmentation_node(node, Volume(np.zeros((12, 8, 13), np.int16), shifted_geometry))
    expected = np.zeros((12, 8, 13), np.uint8)
    expected[2:11, 0:7, 0:10] = labels[:, 3:10, 1:11]
    np.testing.assert_array_equal(shifted.array_zyx, expected)


def test_segments_map_by_name_or_terminology_else_binary(scene) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    node = mrml.segmentation_node_from_labels(labels, scene, "Airway")
    segments = _segments(node)
    # Renamed but still coded as trachea: class 1 is recognised by its SNOMED CT code.
    segments["airway_class_1"].SetName("Central airways")
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, labels).array_zyx, labels.array_zyx)
    # A segment that is airway but no class of ours: all airway merges into a binary mask.
    segments["airway_class_2"].SetName("Airway")
    segments["airway_class_2"].SetTerminology("")
    binary = mrml.labels_from_segmentation_node(node, labels).array_zyx
    np.testing.assert_array_equal(binary, (labels.array_zyx > 0).astype(np.uint8))
    for segment in segments.values():
        segment.SetName("Lung")
        segment.SetTerminology("not a terminology entry")
    with pytest.raises(AirwayInputError, match="no airway segment"):
        mrml.labels_from_segmentation_node(node, labels)
    # A lone segment is the airway whatever its name.
    node.GetSegmentation().RemoveSegment("airway_class_2")
    node.GetSegmentation().RemoveSegment("airway_class_3")
    lone = mrml.labels_from_segmentation_node(node, labels).array_zyx
    np.testing.assert_array_equal(lone, (labels.array_zyx == 1).astype(np.uint8))


def test_a_correction_painted_into_a_new_segment_is_refused_where_asked_not_dropped(scene) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    node = mrml.segmentation_node_from_labels(labels, scene, "Airway")
    # The Segment Editor's "Add" gives "Segment_4"; the user moves class 3 into it.
    _segments(node)["airway_class_3"].SetName("Segment_4")
    _segments(node)["airway_class_3"].SetTerminology("")
    dropped = mrml.labels_from_segmentation_node(node, labels).array_zyx
    assert not (dropped == 3).any() and (labels.array_zyx == 3).any()  # left out, as for files
    with pytest.raises(AirwayInputError, match="'Segment_4' of 'Airway' holds voxels but is not an airway segment"):
        mrml.labels_from_segmentation_node(node, labels, refuse_others=True)
    _segments(node)["airway_class_3"].SetName("airway")
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, labels, refuse_others=True).array_zyx,
                                  (labels.array_zyx > 0).astype(np.uint8))


def test_empty_segment_adds_nothing(scene) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    node = mrml.segmentation_node_from_labels(labels, scene, "Airway")
    # A segment added empty in Slicer has a labelmap with no voxels (an empty extent), in its own layer.
    empty = slicer_core.vtkSegment()
    empty.SetName("Small bronchi")
    empty.AddRepresentation("Binary labelmap", slicer_core.vtkOrientedImageData())
    node.GetSegmentation().RemoveSegment("airway_class_3")
    node.GetSegmentation().AddSegment(empty, "empty")
    assert node.GetSegmentation().GetNumberOfLayers() == 2
    expected = np.where(labels.array_zyx == 3, 0, labels.array_zyx)
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, labels).array_zyx, expected)


def test_seg_nrrd_written_by_segfile_loads_into_a_segmentation_node(scene, tmp_path: Path) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    path = write_segmentation(labels, tmp_path / "airway.seg.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segments = _segments(node)
    assert [s.GetName() for s in segments.values()] == [c.name for c in AIRWAY_CLASSES]
    for airway_class, segment in zip(AIRWAY_CLASSES, segments.values()):
        np.testing.assert_allclose(segment.GetColor(), airway_class.color_rgb, atol=1e-5)
        assert segment.GetTerminology().split("~")[2] == "SCT^{}^{}".format(*airway_class.snomed_type)
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, labels).array_zyx, labels.array_zyx)


def test_segmentation_node_saved_by_slicer_reads_back_with_segfile(scene, tmp_path: Path) -> None:
    labels = Volume(three_class_labels(), OBLIQUE)
    node = mrml.segmentation_node_from_labels(labels, scene, "Airway")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "saved.seg.nrrd"))
    assert storage.WriteData(node) == 1
    back = read_segmentation(tmp_path / "saved.seg.nrrd")
    np.testing.assert_array_equal(back.array_zyx, labels.array_zyx)
    _assert_same_geometry(back.geometry, OBLIQUE)


def test_closed_surface_segment_is_converted_and_classified(scene, converter_rules) -> None:
    sphere = vtkSphereSource()
    sphere.SetRadius(4.0)
    sphere.SetThetaResolution(24)
    sphere.SetPhiResolution(24)
    sphere.Update()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    node.GetSegmentation().SetSourceRepresentationName("Closed surface")
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Trachea and main bronchi", [1.0, 0.0, 0.0])
    reference = Volume(np.zeros((11, 11, 11), np.int16), Geometry(origin_xyz=(-5.0, -5.0, -5.0)))
    parameter = "Reference image geometry"
    before = node.GetSegmentation().GetConversionParameter(parameter)
    labels = mrml.labels_from_segmentation_node(node, reference).array_zyx
    # Converted straight onto the reference grid, and the node's own setting is left as it was.
    layer = node.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")
    expected_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ reference.geometry.ijk_to_lps
    np.testing.assert_allclose(_matrix(layer.GetImageToWorldMatrix), expected_ras, atol=1e-9)
    assert node.GetSegmentation().GetConversionParameter(parameter) == before
    assert labels[5, 5, 5] == 1 and labels[5, 5, 7] == 1  # centre and 2 mm off it
    assert labels[0, 0, 0] == 0 and labels[5, 5, 10] == 0  # corner and 5 mm off the centre
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert abs(labels.sum() - 4 / 3 * math.pi * 4.0**3) < 0.2 * 4 / 3 * math.pi * 4.0**3


# --- centerlines ---------------------------------------------------------------------------


def test_curves_carry_points_in_ras_and_a_radius_per_point(scene) -> None:
    trachea = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, -10.0], [2.5, -3.0, -20.0]])
    branch = np.array([[2.5, -3.0, -20.0], [12.0, -4.0, -28.0]])
    nodes = mrml.curve_nodes_from_centerlines(
        [("trachea", trachea, np.array([8.0, 7.5, 7.0])), ("left main", branch, [5.0, 4.0])], scene
    )
    assert [n.GetName() for n in nodes] == ["trachea", "left main"]
    assert all(n.GetClassName() == "vtkMRMLMarkupsCurveNode" for n in nodes)
    assert all(n.GetCurveTypeAsString(n.GetCurveType()) == "linear" for n in nodes)
    for node, points, radius in zip(nodes, (trachea, branch), ([8.0, 7.5, 7.0], [5.0, 4.0])):
        assert node.GetNumberOfControlPoints() == len(points)
        positions = np.array([node.GetNthControlPointPositionWorld(i) for i in range(len(points))])
        np.testing.assert_allclose(positions, points * [-1.0, -1.0, 1.0], atol=1e-12)
        measurement = node.GetMeasurement("Radius")
        assert measurement.GetUnits() == "mm"
        np.testing.assert_array_equal(numpy_support.vtk_to_numpy(measurement.GetControlPointValues()), radius)
        # The curve is the polyline itself, and the radius is a point-data array along it.
        curve = node.GetCurveWorld()
        np.testing.assert_allclose(numpy_support.vtk_to_numpy(curve.GetPoints().GetData()), positions, atol=1e-9)
        np.testing.assert_allclose(numpy_support.vtk_to_numpy(curve.GetPointData().GetArray("Radius")), radius)


def test_bad_centerlines_are_refused_before_any_node_is_added(scene) -> None:
    good = ("ok", np.zeros((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="N >= 2"):
        mrml.curve_nodes_from_centerlines([good, ("one point", np.zeros((1, 3)), np.ones(1))], scene)
    with pytest.raises(ValueError, match="non-negative radii"):
        mrml.curve_nodes_from_centerlines([good, ("short", np.zeros((3, 3)), np.ones(2))], scene)
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsCurveNode") == 0


def test_centerline_model_holds_polylines_in_ras_with_radius_and_cell_arrays(scene) -> None:
    trachea = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, -10.0], [2.5, -3.0, -20.0]])
    branch = np.array([[2.5, -3.0, -20.0], [12.0, -4.0, -28.0]])
    node = mrml.centerline_model_node(
        [("trachea", trachea, [8.0, 7.5, 7.0]), ("left main", branch, [5.0, 4.0])], scene, "Airway centerlines",
        cell_values={"BranchId": [0, 1], "ParentId": [-1, 0]},
    )
    assert node.GetClassName() == "vtkMRMLModelNode" and node.GetName() == "Airway centerlines"
    assert node.GetDisplayNode() is not None
    polydata = node.GetPolyData()
    assert (polydata.GetNumberOfLines(), polydata.GetNumberOfPoints()) == (2, 5)
    points = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData())
    for cell, expected in enumerate((trachea, branch)):
        ids = polydata.GetCell(cell).GetPointIds()
        cell_points = points[[ids.GetId(i) for i in range(ids.GetNumberOfIds())]]
        np.testing.assert_allclose(cell_points, expected * [-1.0, -1.0, 1.0], atol=1e-12)
    np.testing.assert_array_equal(numpy_support.vtk_to_numpy(polydata.GetPointData().GetArray("Radius")), [8.0, 7.5, 7.0, 5.0, 4.0])
    np.testing.assert_array_equal(numpy_support.vtk_to_numpy(polydata.GetCellData().GetArray("ParentId")), [-1, 0])
    with pytest.raises(ValueError, match="one per centerline"):
        mrml.centerline_model_node([("trachea", trachea, [8.0, 7.5, 7.0])], scene, "bad", {"BranchId": [0, 1]})
    with pytest.raises(ValueError, match="N >= 2"):
        mrml.centerline_model_node([("one point", np.zeros((1, 3)), [1.0])], scene, "bad")
    assert scene.GetNumberOfNodesByClass("vtkMRMLModelNode") == 1


# --- display -----------------------------------------------------------------------------------


def _inferno_colors(scene) -> None:
    """Slicer's Inferno table, as the application loads it at start-up (the node ID comes from its singleton tag)."""
    colors = slicer_core.vtkMRMLColorTableNode()
    colors.SetTypeToFile()
    colors.SetSingletonTag("FileInferno.txt")
    scene.AddNode(colors)
    assert colors.GetID() == mrml.INFERNO_COLOR_NODE_ID


def test_overlay_is_the_foreground_of_every_slice_view_in_inferno(scene) -> None:
    _inferno_colors(scene)
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    attention = mrml.node_from_volume(Volume(np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5), OBLIQUE), scene, "attention")
    assert mrml.show_as_overlay(attention)
    display = attention.GetDisplayNode()
    assert display.GetColorNodeID() == mrml.INFERNO_COLOR_NODE_ID
    assert (display.GetAutoWindowLevel(), display.GetWindow(), display.GetLevel()) == (0, 1.0, 0.5)
    # Low attention is transparent, so that the CT is not darkened away from the breaks.
    assert (display.GetApplyThreshold(), display.GetLowerThreshold(), display.GetUpperThreshold()) == (1, 0.05, 1.0)
    assert all((v.GetForegroundVolumeID(), v.GetForegroundOpacity()) == (attention.GetID(), 0.4) for v in views)


def test_overlay_without_slicers_colour_files_keeps_the_default_colours(scene) -> None:
    attention = mrml.node_from_volume(Volume(np.zeros((3, 4, 5), np.float32), OBLIQUE), scene, "attention")
    default = attention.GetDisplayNode().GetColorNodeID()
    assert not mrml.show_as_overlay(attention, opacity=0.25)
    assert attention.GetDisplayNode().GetColorNodeID() == default
    with pytest.raises(ValueError, match="opacity"):
        mrml.show_as_overlay(attention, opacity=1.5)


def test_slice_views_jump_to_an_lps_point(scene) -> None:
    slicer_core.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # as the Slicer application does
    views = []
    for orientation in ("Axial", "Sagittal", "Coronal"):
        view = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        view.SetDimensions(256, 256, 1)
        view.SetFieldOfView(250.0, 250.0, 1.0)
        assert view.SetOrientation(orientation)
        views.append(view)
    mrml.jump_slices_to(scene, (12.5, -30.0, -210.0))
    for view in views:
        slice_to_ras = _matrix(lambda m, v=view: m.DeepCopy(v.GetSliceToRAS()))
        np.testing.assert_allclose(slice_to_ras[:3, 3], [-12.5, 30.0, -210.0], atol=1e-9)
    with pytest.raises(ValueError, match="3 finite LPS"):
        mrml.jump_slices_to(scene, (1.0, 2.0))
