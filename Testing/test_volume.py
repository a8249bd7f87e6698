"""CT and label I/O: geometry round trips, DICOM series, atomic writes, and one-sentence errors."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.volume import (
    Geometry,
    Volume,
    atomic_output,
    atomic_outputs,
    check_ct,
    read_ct,
    read_label,
    read_volume,
    refuse_overwriting_inputs,
    write_volume,
)

OBLIQUE = Geometry(
    spacing_xyz=(0.7, 0.8, 1.25),
    origin_xyz=(-120.5, 33.0, -610.25),
    direction=(math.cos(0.4), -math.sin(0.4), 0.0, math.sin(0.4), math.cos(0.4), 0.0, 0.0, 0.0, 1.0),
)


def chest_like_ct(shape_zyx=(12, 20, 24), seed=0) -> np.ndarray:
    """int16 HU: air outside, soft tissue body, dark lungs, a little noise."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape_zyx, -1000, dtype=np.int16)
    z, y, x = np.indices(shape_zyx)
    body = ((y - shape_zyx[1] / 2) / (shape_zyx[1] * 0.45)) ** 2 + ((x - shape_zyx[2] / 2) / (shape_zyx[2] * 0.45)) ** 2 < 1
    ct[body] = 40
    lungs = body & (np.abs(x - shape_zyx[2] / 2) > 2) & (np.abs(x - shape_zyx[2] / 2) < shape_zyx[2] * 0.3)
    ct[lungs] = -850
    return (ct + rng.normal(0, 20, shape_zyx)).clip(-1024, 3071).astype(np.int16)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_geometry_round_trip_every_format(tmp_path: Path, suffix: str) -> None:
    ct = Volume(chest_like_ct(), OBLIQUE)
    path = write_volume(ct, tmp_path / f"ct{suffix}")
    back = read_ct(path)
    assert back.array_zyx.dtype == np.int16
    np.testing.assert_array_equal(back.array_zyx, ct.array_zyx)
    np.testing.assert_allclose(back.geometry.spacing_xyz, OBLIQUE.spacing_xyz, atol=1e-5)
    np.testing.assert_allclose(back.geometry.origin_xyz, OBLIQUE.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(back.geometry.direction, OBLIQUE.direction, atol=1e-5)
    assert back.spacing_zyx == pytest.approx(OBLIQUE.spacing_xyz[::-1], abs=1e-5)


def test_index_physical_mapping_matches_simpleitk() -> None:
    image = sitk.Image(24, 20, 12, sitk.sitkInt16)
    image.SetSpacing(OBLIQUE.spacing_xyz)
    image.SetOrigin(OBLIQUE.origin_xyz)
    image.SetDirection(OBLIQUE.direction)
    index_zyx = np.array([[3.0, 7.0, 11.0], [0.5, 1.25, 20.0]])
    physical = OBLIQUE.index_zyx_to_physical(index_zyx)
    for idx, point in zip(index_zyx, physical):
        expected = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx[::-1]))
        np.testing.assert_allclose(point, expected, atol=1e-9)
    np.testing.assert_allclose(OBLIQUE.physical_to_index_zyx(physical), index_zyx, atol=1e-9)


def test_dicom_series_folder_is_read_with_geometry(tmp_path: Path) -> None:
    ct = chest_like_ct((6, 16, 18))
    spacing_xyz = (0.75, 0.75, 1.5)
    origin_xyz = (-50.0, -40.0, -300.0)
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    for k in range(ct.shape[0]):
        slice_image = sitk.GetImageFromArray(ct[k : k + 1])
        slice_image.SetSpacing(spacing_xyz)
        slice_image.SetOrigin((origin_xyz[0], origin_xyz[1], origin_xyz[2] + k * spacing_xyz[2]))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in (origin_xyz[0], origin_xyz[1], origin_xyz[2] + k * spacing_xyz[2])),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing_xyz[2]),
        }.items():
            slice_image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    volume = read_ct(tmp_path)
    np.testing.assert_array_equal(volume.array_zyx, ct)
    np.testing.assert_allclose(volume.spacing_zyx, spacing_xyz[::-1], atol=1e-4)
    np.testing.assert_allclose(volume.geometry.origin_xyz, origin_xyz, atol=1e-4)


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_write_refuses_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(AirwayInputError, match="expected a file name ending"):
        write_volume(Volume(np.zeros((3, 3, 3), np.uint8), Geometry()), tmp_path / "labels.png")
    assert not any(tmp_path.iterdir())


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_nrrd(path: Path, space_directions: str) -> Path:
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\n"
        f"space directions: {space_directions}\nkinds: domain domain domain\nendian: little\n"
        "encoding: raw\nspace origin: (0,0,0)\n\n"
    )
    path.write_bytes(header.encode() + np.full(64, -1000, np.int16).tobytes())
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.nii.gz", "does not exist"),
        (lambda d: _write_text(d / "text.nii.gz", "not an image"), "not a readable image"),
        (lambda d: d, "no DICOM series"),
        (lambda d: _write_nrrd(d / "zero.nrrd", "(0,0,0) (0,1,0) (0,0,1)"), "zero or negative voxel spacing"),
        (lambda d: _write_nrrd(d / "flat.nrrd", "(1,0,0) (1,0,0) (0,0,1)"), "degenerate direction"),
        (lambda d: _write_nrrd(d / "skew.nrrd", "(1,0.5,0) (0,1,0) (0,0,1)"), "degenerate"),
    ],
    ids=["missing", "not-an-image", "empty-folder", "zero-spacing", "singular-direction", "skewed-direction"],
)
def test_bad_files_raise_one_sentence(tmp_path: Path, make, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(AirwayInputError, match=expected) as info:
        read_volume(path)
    assert "\n" not in str(info.value)


def test_2d_and_4d_images_are_refused(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image(10, 10, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.Image([5, 5, 5, 3], sitk.sitkInt16), str(tmp_path / "series.nii.gz"))
    with pytest.raises(AirwayInputError, match="2-D image"):
        read_volume(tmp_path / "slice.nii.gz")
    with pytest.raises(AirwayInputError, match="4-D image"):
        read_volume(tmp_path / "series.nii.gz")


def test_rgb_image_is_refused(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([6, 6, 6], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(AirwayInputError, match="scalar"):
        read_volume(tmp_path / "rgb.nrrd")


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.random.default_rng(1).integers(0, 256, (8, 10, 10)).astype(np.uint8), "no air-like values"),
        (np.random.default_rng(2).normal(400, 150, (8, 10, 10)).astype(np.float32), "no air-like values"),
        (np.where(np.arange(800).reshape(8, 10, 10) % 7, -1000.0, np.nan).astype(np.float32), "NaN or infinite"),
        (np.full((8, 10, 10), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.full((8, 10, 10), -1000, dtype=np.int16), "constant"),
        (np.random.default_rng(3).integers(-3024, -2000, (8, 10, 10)).astype(np.int16), "below"),
        (np.zeros((8, 10, 10), dtype=bool), "binary mask"),
    ],
    ids=["0-255", "mr-like", "nan", "inf", "constant", "no-rescale", "mask"],
)
def test_non_hu_intensities_are_refused(array: np.ndarray, expected: str) -> None:
    with pytest.raises(AirwayInputError, match=expected):
        check_ct(Volume(array, Geometry()), source="scan.nii.gz")


def test_real_ct_intensities_pass() -> None:
    ct = chest_like_ct()
    assert check_ct(Volume(ct, Geometry())).array_zyx is ct


@pytest.mark.parametrize(
    "geometry",
    [
        dict(spacing_xyz=(0.0, 1.0, 1.0)),
        dict(spacing_xyz=(-0.8, 0.8, 1.0)),
        dict(spacing_xyz=(np.nan, 1.0, 1.0)),
        dict(direction=(1, 0, 0, 1, 0, 0, 0, 0, 1)),
        dict(origin_xyz=(0.0, np.inf, 0.0)),
    ],
    ids=["zero-spacing", "negative-spacing", "nan-spacing", "degenerate-direction", "inf-origin"],
)
def test_geometry_validation(geometry: dict) -> None:
    with pytest.raises(AirwayInputError):
        Geometry(**geometry)


def test_label_on_another_grid_is_refused(tmp_path: Path) -> None:
    ct = Volume(chest_like_ct(), OBLIQUE)
    labels = np.zeros(ct.array_zyx.shape, np.uint8)
    shifted = Geometry(OBLIQUE.spacing_xyz, (OBLIQUE.origin_xyz[0] + 5.0, *OBLIQUE.origin_xyz[1:]), OBLIQUE.direction)
    write_volume(Volume(labels, shifted), tmp_path / "shifted.nii.gz")
    write_volume(Volume(labels[:-1], OBLIQUE), tmp_path / "cropped.nii.gz")
    write_volume(Volume(labels, OBLIQUE), tmp_path / "ok.nii.gz")
    for name in ("shifted.nii.gz", "cropped.nii.gz"):
        with pytest.raises(AirwayInputError, match="does not lie on the grid"):
            read_label(tmp_path / name, reference=ct)
    assert read_label(tmp_path / "ok.nii.gz", reference=ct).array_zyx.dtype == np.uint8


def test_label_with_fractions_or_negatives_is_refused(tmp_path: Path) -> None:
    write_volume(Volume(np.full((4, 4, 4), 0.5, np.float32), Geometry()), tmp_path / "prob.nii.gz")
    write_volume(Volume(np.full((4, 4, 4), -1, np.int16), Geometry()), tmp_path / "neg.nii.gz")
    with pytest.raises(AirwayInputError, match="non-integer"):
        read_label(tmp_path / "prob.nii.gz")
    with pytest.raises(AirwayInputError, match="negative"):
        read_label(tmp_path / "neg.nii.gz")


def test_reading_never_modifies_the_input(tmp_path: Path) -> None:
    path = write_volume(Volume(chest_like_ct(), OBLIQUE), tmp_path / "ct.nrrd")
    before = path.read_bytes()
    volume = read_ct(path)
    volume.array_zyx[:] = 0
    assert path.read_bytes() == before


def _write_dicom_series(folder: Path, ct: np.ndarray, z_positions: list[float]) -> None:
    for k, z in enumerate(z_positions):
        slice_image = sitk.GetImageFromArray(ct[k : k + 1])
        slice_image.SetSpacing((0.75, 0.75, 1.0))
        slice_image.SetOrigin((0.0, 0.0, z))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path) -> None:
    ct = chest_like_ct((6, 16, 18))
    _write_dicom_series(tmp_path, ct, [0.0, 1.0, 2.0, 4.0, 5.0, 6.0])  # the slice at 3 mm is missing
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with pytest.raises(AirwayInputError, match="uneven slice positions"):
            read_ct(tmp_path)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def test_padding_outside_the_field_of_view_is_not_taken_for_attenuation() -> None:
    ct = chest_like_ct((12, 40, 40))
    y, x = np.indices(ct.shape[1:])
    outside_fov = (y - 19.5) ** 2 + (x - 19.5) ** 2 > 19.5**2
    for padding in (-2048, -3024):
        padded = ct.copy()
        padded[:, outside_fov] = padding
        assert check_ct(Volume(padded, Geometry())).array_zyx is padded


@pytest.mark.parametrize("dtype", [bool, np.float16, ">i2"])
def test_write_volume_converts_types_images_cannot_hold(tmp_path: Path, dtype) -> None:
    values = (np.arange(60).reshape(3, 4, 5) % 2).astype(dtype)
    back = read_volume(write_volume(Volume(values, OBLIQUE), tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(back.array_zyx, values.astype(float))


def test_outputs_get_ordinary_file_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_volume(Volume(np.zeros((3, 3, 3), np.uint8), Geometry()), tmp_path / "labels.nii.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_writing_onto_a_folder_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(AirwayInputError, match="it is a folder"):
        write_volume(Volume(np.zeros((3, 3, 3), np.uint8), Geometry()), tmp_path / "out.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_atomic_outputs_keep_all_files_or_none(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(RuntimeError):
        with atomic_outputs([first, second]) as (tmp_first, tmp_second):
            tmp_first.write_text("{}")
            raise RuntimeError("the second file could not be made")
    assert not any(tmp_path.iterdir())
    with atomic_outputs([first, second]) as (tmp_first, tmp_second):
        tmp_first.write_text("1")
        tmp_second.write_text("2")
    assert first.read_text() == "1" and second.read_text() == "2" and len(list(tmp_path.iterdir())) == 2


def test_complex_labels_are_refused(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.ones((3, 3, 3), np.complex64))
    sitk.WriteImage(image, str(tmp_path / "complex.nrrd"))
    with pytest.raises(AirwayInputError):
        read_label(tmp_path / "complex.nrrd")


def test_an_output_that_names_an_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "case" / "labels.nii.gz"
    source.parent.mkdir()
    source.write_bytes(b"labels")
    (tmp_path / "link.nii.gz").symlink_to(source)
    for output in (source, tmp_path / "case" / ".." / "case" / "labels.nii.gz", tmp_path / "link.nii.gz"):
        with pytest.raises(AirwayInputError, match="is an input of this command"):
            refuse_overwriting_inputs([tmp_path / "ct.nii.gz", source], [tmp_path / "out.nii.gz", output])
    refuse_overwriting_inputs([source], [tmp_path / "case" / "airway.nii.gz", tmp_path / "other" / "labels.nii.gz"])
    assert source.read_bytes() == b"labels"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_nifti_file_cut_short_is_refused(tmp_path: Path, suffix: str) -> None:
    """ITK reads the voxels missing from a truncated NIfTI file as zeros without a word."""
    array = np.random.default_rng(0).integers(-1000, 1000, (20, 30, 40)).astype(np.int16)
    path = tmp_path / f"ct{suffix}"
    write_volume(Volume(array, OBLIQUE), path)
    np.testing.assert_array_equal(read_volume(path).array_zyx, array)
    whole = path.read_bytes()
    for share in (0.9, 0.3):
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole[: int(len(whole) * share)])
        with pytest.raises(AirwayInputError, match="truncated"):
            read_volume(cut)
