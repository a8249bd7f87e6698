"""Slicer .seg.nrrd files: named, coloured, SNOMED-coded airway segments that survive a round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import slicerio
import SimpleITK as sitk

from AirwaySegmentationLib.classes import AIRWAY_CLASSES
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.segfile import read_segmentation, write_labels, write_segmentation
from AirwaySegmentationLib.volume import Geometry, Volume, read_label

GEOMETRY = Geometry(
    spacing_xyz=(0.6, 0.7, 1.1),
    origin_xyz=(12.0, -30.5, -250.0),
    direction=(math.cos(0.3), 0.0, math.sin(0.3), 0.0, 1.0, 0.0, -math.sin(0.3), 0.0, math.cos(0.3)),
)


def three_class_labels() -> np.ndarray:
    labels = np.zeros((9, 10, 11), np.uint8)
    labels[1:8, 4:6, 5] = 1
    labels[7, 6:9, 5:7] = 2
    labels[7, 8:10, 7:10] = 3
    return labels


def test_written_segments_are_named_coloured_and_coded(tmp_path: Path) -> None:
    path = write_segmentation(Volume(three_class_labels(), GEOMETRY), tmp_path / "airway.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    segments = {s["labelValue"]: s for s in segmentation["segments"]}
    assert sorted(segments) == [1, 2, 3]
    for airway_class in AIRWAY_CLASSES:
        segment = segments[airway_class.label]
        assert segment["name"] == airway_class.name
        np.testing.assert_allclose(segment["color"], airway_class.color_rgb, atol=1e-5)
        assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert segment["terminology"]["type"] == ["SCT", *airway_class.snomed_type]
    assert segments[1]["terminology"]["type"][2] == "Trachea"


def test_round_trip_keeps_voxels_and_oblique_geometry(tmp_path: Path) -> None:
    labels = three_class_labels()
    path = write_labels(Volume(labels, GEOMETRY), tmp_path / "airway.seg.nrrd")
    back = read_segmentation(path)
    np.testing.assert_array_equal(back.array_zyx, labels)
    np.testing.assert_allclose(back.geometry.spacing_xyz, GEOMETRY.spacing_xyz, atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin_xyz, GEOMETRY.origin_xyz, atol=1e-6)
    np.testing.assert_allclose(back.geometry.direction, GEOMETRY.direction, atol=1e-6)
    # SimpleITK (what Slicer uses underneath) places the voxels at the same physical points.
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetDirection(), GEOMETRY.direction, atol=1e-6)
    np.testing.assert_allclose(read_label(path).array_zyx, labels)


def test_plain_image_suffixes_write_label_images(tmp_path: Path) -> None:
    labels = three_class_labels()
    path = write_labels(Volume(labels, GEOMETRY), tmp_path / "airway3.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), labels)


def test_values_outside_the_classes_are_refused(tmp_path: Path) -> None:
    labels = three_class_labels()
    labels[0, 0, 0] = 7
    with pytest.raises(AirwayInputError, match="not airway classes"):
        write_segmentation(Volume(labels, GEOMETRY), tmp_path / "bad.seg.nrrd")
    assert not any(tmp_path.iterdir())


def _annotator_file(path: Path, segments: list[tuple[str, np.ndarray, str | None]]) -> Path:
    """A segmentation as an annotator's Slicer would save it: any names, overlapping segments allowed."""
    shape_ijk = segments[0][1].shape[::-1]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.diag(GEOMETRY.spacing_xyz)
    segmentation = slicerio.create_segmentation(shape_ijk, ijk_to_lps)
    for name, mask_zyx, code in segments:
        segment = {"name": name}
        if code:
            segment["terminology"] = {
                "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
                "category": ["SCT", "123037004", "Anatomical Structure"],
                "type": ["SCT", code, name],
            }
        slicerio.add_segment(segmentation, mask_zyx.transpose(2, 1, 0), segment)
    slicerio.write_segmentation(str(path), segmentation)
    return path


def test_annotator_segments_map_to_classes_by_name(tmp_path: Path) -> None:
    labels = three_class_labels()
    path = _annotator_file(
        tmp_path / "corrected.seg.nrrd",
        [(c.name, labels == c.label, None) for c in AIRWAY_CLASSES] + [("Left lung", labels == 0, "44029006")],
    )
    np.testing.assert_array_equal(read_segmentation(path).array_zyx, labels)


def test_generic_airway_segments_become_a_binary_mask(tmp_path: Path) -> None:
    labels = three_class_labels()
    overlapping = labels > 0
    overlapping[0, 0, 0] = True
    path = _annotator_file(
        tmp_path / "airway.seg.nrrd",
        [("airway", labels > 0, None), ("bronchus fix", overlapping, "955009"), ("Lungs", labels == 0, "39607008")],
    )
    read = read_segmentation(path).array_zyx
    np.testing.assert_array_equal(read, overlapping.astype(np.uint8))


def test_single_segment_is_the_airway_whatever_its_name(tmp_path: Path) -> None:
    mask = three_class_labels() > 0
    path = _annotator_file(tmp_path / "one.seg.nrrd", [("Segment_1", mask, None)])
    np.testing.assert_array_equal(read_segmentation(path).array_zyx, mask.astype(np.uint8))


def test_no_airway_segment_is_a_clear_error(tmp_path: Path) -> None:
    mask = three_class_labels() > 0
    path = _annotator_file(tmp_path / "lungs.seg.nrrd", [("Left lung", mask, None), ("Right lung", ~mask, None)])
    with pytest.raises(AirwayInputError, match="no airway segment.*'Left lung'"):
        read_segmentation(path)


def test_single_slice_segmentation_is_refused(tmp_path: Path) -> None:
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 2:4, 2:4] = True
    path = _annotator_file(tmp_path / "slice.seg.nrrd", [("airway", mask, None)])
    with pytest.raises(AirwayInputError, match="single-slice"):
        read_segmentation(path)


def test_segment_pointing_at_a_missing_layer_is_refused(tmp_path: Path) -> None:
    path = _annotator_file(tmp_path / "layer.seg.nrrd", [("airway", three_class_labels() > 0, None)])
    text = path.read_bytes().replace(b"Segment0_Layer:=0", b"Segment0_Layer:=1")
    path.write_bytes(text)
    with pytest.raises(AirwayInputError, match="names layer 1"):
        read_segmentation(path)
