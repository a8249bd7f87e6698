"""Stage 1 on a whole CT: ``segment_ct``, the files it writes, batch runs and ``airway segment``.

Two kinds of network keep the answers known and the run short:

- :class:`AirBelow` is a hand-made pointwise "network": a voxel is airway (class 1) when it
  is darker than about -475 HU, so the expected labels of a synthetic CT can be computed
  independently here (cc3d / scipy) and compared voxel for voxel;
- a WingsNet of base width 2 with random weights, exported as a real model file, for the
  geometry, file, CLI, resume and model-card tests.

The synthetic CT (40 x 56 x 56 voxels) is a 40 HU body in an air surround; inside it a
"lung" of -450 HU (air for the lung finder, which takes < -400 HU, but tissue for
:class:`AirBelow`, which takes < -475 HU), and in the lung a -1000 HU tube (the trachea)
with one enclosed tissue voxel, a small separate air blob, and an air cube that touches the
tube only along an edge (joined 26-connected, separate 6-connected).  One test adds a
walled pocket of air in front of the chest, which the body outline must keep out.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AirwaySegmentationLib.batch import MANIFEST_NAME
from AirwaySegmentationLib.cli import EXIT_BAD_INPUT, main
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.data import phantom_seeds
from AirwaySegmentationLib.catalogue import catalogue
from AirwaySegmentationLib.models import export_model
from AirwaySegmentationLib.networks import SegmentationOutput, build_network
from AirwaySegmentationLib.preprocess import DEFAULT_INPUT_SPEC, crop_to_body
from AirwaySegmentationLib.progress import Cancelled
from AirwaySegmentationLib.segment import (
    AIRWAY_FILE,
    LABELS_FILE,
    PROBABILITY_FILE,
    SegmentationModel,
    load_segmentation_model,
    segment_ct,
    segment_file,
    segment_files,
    write_result,
)
from AirwaySegmentationLib.volume import Geometry, Volume, write_volume
from conftest import tiny_card
from scipy import ndimage
from torch import nn

SHAPE_ZYX = (40, 56, 56)
SPACING_ZYX = (2.5, 2.0, 1.5)
#: HU below which :class:`AirBelow` calls a voxel airway: where W750/L-250 (channel 1) is 0.2.
AIRWAY_BELOW_HU = -625.0 + 0.2 * 750.0


def _oblique_direction(angle_deg: float = 20.0) -> tuple[float, ...]:
    """A rotation about an oblique axis, row-major (columns = physical directions of i, j, k)."""
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    a = math.radians(angle_deg)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) * math.cos(a) + math.sin(a) * cross + (1 - math.cos(a)) * np.outer(axis, axis)
    return tuple(rotation.ravel())


GEOMETRY = Geometry(spacing_xyz=SPACING_ZYX[::-1], origin_xyz=(-40.5, 12.25, -300.0), direction=_oblique_direction())

# Parts of the synthetic CT (z, y, x boxes).
BODY = (slice(None), slice(8, 48), slice(8, 48))
LUNG = (slice(10, 30), slice(18, 38), slice(16, 40))
TUBE = (slice(8, 32), slice(25, 31), slice(25, 31))
ENCLOSED_TISSUE = (20, 28, 28)
BLOB = (slice(14, 16), slice(19, 21), slice(18, 20))
EDGE_CUBE = (slice(20, 23), slice(31, 34), slice(31, 34))  # meets the tube at (z, 30, 30)-(z, 31, 31) only


def synthetic_ct() -> np.ndarray:
    ct = np.full(SHAPE_ZYX, -1000, dtype=np.int16)
    ct[BODY] = 40
    ct[LUNG] = -450
    ct[TUBE] = -1000
    ct[ENCLOSED_TISSUE] = 40
    ct[BLOB] = -1000
    ct[EDGE_CUBE] = -1000
    return ct


class AirBelow(nn.Module):
    """Pointwise logits: airway class 1 where channel 1 (W750/L-250) < 0.2, i.e. below about -475 HU.

    Classes 2 and 3 are always less likely than class 1, so every airway voxel, filled
    holes included, is class 1.  Counts its forward calls.
    """

    def __init__(self, sharpness: float = 200.0) -> None:
        super().__init__()
        self.sharpness = sharpness
        self.calls = 0

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        self.calls += 1
        darkness = -self.sharpness * (x[:, 1:2].float() - 0.2)
        return SegmentationOutput(main=torch.cat([-darkness, darkness, darkness - 1.0, darkness - 2.0], dim=1))


def pointwise_model() -> SegmentationModel:
    return SegmentationModel(
        network=AirBelow(), card={"architecture": {"name": "air-below"}}, source="test",
        spec=DEFAULT_INPUT_SPEC, patch_size_zyx=(16, 16, 16),
    )


def expected_airway(ct: np.ndarray, box, largest: bool = True, connectivity: int = 26, in_slices: bool = True) -> np.ndarray:
    """Independent reference: air below the threshold in the box, largest component, holes
    filled in 3-D, then in each z slice (``in_slices``)."""
    air = np.zeros(ct.shape, dtype=bool)
    air[box] = ct[box] < AIRWAY_BELOW_HU
    if largest:
        components = cc3d.connected_components(air, connectivity=connectivity)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        air = components == np.argmax(sizes)
    filled = ndimage.binary_fill_holes(air)
    if in_slices:
        filled = np.stack([ndimage.binary_fill_holes(section) for section in filled])
    return filled


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    return write_volume(Volume(synthetic_ct(), GEOMETRY), tmp_path_factory.mktemp("ct") / "chest.nii.gz")


@pytest.fixture(scope="module")
def pointwise_default():
    """segment_ct of the synthetic CT with the pointwise model and default settings (with probability)."""
    ct = synthetic_ct()
    return ct, segment_ct(ct, GEOMETRY, pointwise_model(), keep_probability=True)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# --- segment_ct ------------------------------------------------------------------------------


def test_segment_ct_keeps_the_input_geometry_and_leaves_the_input_alone(tiny_model) -> None:
    ct = synthetic_ct().astype(np.float32)
    before = ct.copy()
    result = segment_ct(ct, GEOMETRY, str(tiny_model), InferenceSettings(device="cpu"), keep_probability=True)
    np.testing.assert_array_equal(ct, before)
    for volume in (result.labels, result.probability, result.airway):
        assert volume.geometry == GEOMETRY
        assert volume.array_zyx.shape == SHAPE_ZYX
    labels = result.labels.array_zyx
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert result.probability.array_zyx.dtype == np.float16
    box = result.crop_box
    assert box == crop_to_body(ct, SPACING_ZYX)
    assert all(0 < s.stop - s.start < n for s, n in zip(box, SHAPE_ZYX)), "the crop should be a proper sub-box here"
    outside = np.ones(SHAPE_ZYX, dtype=bool)
    outside[box] = False
    assert not labels[outside].any()
    assert not result.probability.array_zyx[outside].any()
    np.testing.assert_array_equal(result.airway.array_zyx, (labels > 0).astype(np.uint8))
    assert result.info["airway_voxels"] == int(np.count_nonzero(labels))
    assert result.info["model"]["source"] == str(tiny_model)
    assert set(result.timings_s) == {"crop", "input", "network", "postprocess"}


def test_pointwise_labels_are_the_largest_air_component_with_holes_filled(pointwise_default) -> None:
    ct, result = pointwise_default
    labels = result.labels.array_zyx
    expected = expected_airway(ct, result.crop_box)
    # The reference itself must show what is tested: the hole is filled, the blob dropped, the
    # edge-touching cube kept (26-connected), the surround air (outside the crop) absent.
    assert expected[ENCLOSED_TISSUE] and not expected[BLOB].any() and expected[EDGE_CUBE].all()
    assert not expected[0:40, 0:8].any()
    np.testing.assert_array_equal(labels, expected.astype(np.uint8))  # every airway voxel is class 1
    assert labels[ENCLOSED_TISSUE] == 1
    assert result.info["class_voxels"] == {"1": int(expected.sum()), "2": 0, "3": 0}


def test_a_hollow_lumen_open_at_both_ends_is_filled_in_each_slice() -> None:
    """A tissue core along the whole tube (a lumen the network labels as a ring) touches the
    background at both ends, so only the slice-wise filling closes it."""
    ct = synthetic_ct()
    core = (TUBE[0], slice(27, 29), slice(27, 29))
    ct[core] = 40
    result = segment_ct(ct, GEOMETRY, pointwise_model())
    only_3d = expected_airway(ct, result.crop_box, in_slices=False)
    assert not only_3d[core].any() and only_3d[TUBE].any()
    assert (result.labels.array_zyx[core] == 1).all()
    np.testing.assert_array_equal(result.labels.array_zyx, expected_airway(ct, result.crop_box).astype(np.uint8))


def test_all_components_keeps_the_separate_blob() -> None:
    ct = synthetic_ct()
    result = segment_ct(ct, GEOMETRY, pointwise_model(), keep_largest_component=False)
    expected = expected_airway(ct, result.crop_box, largest=False)
    assert expected[BLOB].all()
    np.testing.assert_array_equal(result.labels.array_zyx, expected.astype(np.uint8))


def test_air_walled_outside_the_body_is_never_airway() -> None:
    """A fold of blanket in front of the chest walls a pocket of air inside the crop; it stays out."""
    ct = synthetic_ct()
    ct[:, 8:16] = -1000  # a thinner front wall, so the pocket lies in the crop
    pocket = (slice(None), slice(12, 14), slice(22, 34))
    ct[:, 11:15, 20:36] = 40
    ct[pocket] = -1000
    result = segment_ct(ct, GEOMETRY, pointwise_model(), keep_largest_component=False)
    in_crop = np.zeros(ct.shape, dtype=bool)
    in_crop[result.crop_box] = True
    assert in_crop[pocket].sum() > 100  # the network saw the pocket
    labels = result.labels.array_zyx
    assert not labels[pocket].any()
    np.testing.assert_array_equal(labels[TUBE], expected_airway(ct, result.crop_box, largest=False)[TUBE])


def test_connectivity_6_drops_the_edge_touching_cube(pointwise_default) -> None:
    ct, with_26 = pointwise_default
    with_6 = segment_ct(ct, GEOMETRY, pointwise_model(), connectivity=6)
    expected = expected_airway(ct, with_6.crop_box, connectivity=6)
    np.testing.assert_array_equal(with_6.labels.array_zyx, expected.astype(np.uint8))
    assert not with_6.labels.array_zyx[EDGE_CUBE].any() and with_26.labels.array_zyx[EDGE_CUBE].all()
    difference = with_26.labels.array_zyx != with_6.labels.array_zyx
    assert difference.sum() == 27 and difference[EDGE_CUBE].all()


def test_refuses_an_unknown_connectivity() -> None:
    with pytest.raises(AirwayInputError, match="Connectivity 5"):
        segment_ct(synthetic_ct(), GEOMETRY, pointwise_model(), connectivity=5)


def test_probability_is_float16_one_in_air_zero_in_tissue_and_outside_the_crop(pointwise_default) -> None:
    ct, result = pointwise_default
    probability = result.probability.array_zyx
    assert probability.dtype == np.float16
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    inside = np.zeros(SHAPE_ZYX, dtype=bool)
    inside[result.crop_box] = True
    air = ct < AIRWAY_BELOW_HU
    assert np.all(probability[inside & air] > 0.99)
    assert np.all(probability[inside & ~air] < 0.01)  # tissue, the -450 HU lung and the enclosed voxel
    assert probability[ENCLOSED_TISSUE] < 0.01  # filled in the labels, but not probable
    assert not probability[~inside].any()  # the surround air outside the crop is 0, not 1


@pytest.mark.parametrize(
    "settings",
    [
        InferenceSettings(max_window_zyx=None, overlap=0.5),
        InferenceSettings(mirror=True),
        InferenceSettings(accumulator="float32"),
        InferenceSettings(max_window_zyx=None, overlap=0.0, blending="mean", accumulator="float32"),
    ],
    ids=["patch-windows-overlap-0.5", "mirror", "float32-sums", "mean-no-overlap"],
)
def test_pointwise_result_does_not_depend_on_the_engine_settings(pointwise_default, settings) -> None:
    ct, reference = pointwise_default
    model = pointwise_model()
    result = segment_ct(ct, GEOMETRY, model, settings, keep_probability=True)
    if settings.max_window_zyx is None:
        assert result.info["windows"] > 1 and result.info["window_zyx"] == [16, 16, 16]
    else:
        assert reference.info["windows"] == result.info["windows"] == 1
    if settings.mirror:
        assert model.network.calls == 8 * result.info["windows"]
    np.testing.assert_array_equal(result.labels.array_zyx, reference.labels.array_zyx)
    np.testing.assert_allclose(
        result.probability.array_zyx.astype(np.float32), reference.probability.array_zyx.astype(np.float32), atol=2e-3
    )


# --- files -----------------------------------------------------------------------------------


def _same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("keep_probability", [False, True])
def test_segment_file_writes_labels_airway_and_probability_in_the_ct_geometry(
    ct_file, tmp_path, keep_probability
) -> None:
    model = pointwise_model()
    info = segment_file(ct_file, tmp_path / "out", model, keep_probability=keep_probability)
    expected_files = [LABELS_FILE, AIRWAY_FILE] + ([PROBABILITY_FILE] if keep_probability else [])
    assert info["outputs"] == expected_files
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected_files)
    assert info["shape_zyx"] == list(SHAPE_ZYX)
    reference = sitk.ReadImage(str(ct_file))
    images = {name: sitk.ReadImage(str(tmp_path / "out" / name)) for name in expected_files}
    for image in images.values():
        _same_geometry(image, reference)
    labels = sitk.GetArrayFromImage(images[LABELS_FILE])
    airway = sitk.GetArrayFromImage(images[AIRWAY_FILE])
    assert labels.dtype == np.uint8 and airway.dtype == np.uint8
    box = tuple(slice(a, b) for a, b in info["crop_box_zyx"])
    np.testing.assert_array_equal(labels, expected_airway(synthetic_ct(), box).astype(np.uint8))
    np.testing.assert_array_equal(airway, (labels > 0).astype(np.uint8))
    if keep_probability:
        probability = sitk.GetArrayFromImage(images[PROBABILITY_FILE])
        assert probability.dtype == np.float32
        assert probability.min() >= 0.0 and probability.max() <= 1.0
        assert np.all(probability[synthetic_ct() >= 40] < 0.01)
        assert probability[TUBE][synthetic_ct()[TUBE] == -1000].min() > 0.99  # the tube's air, not its tissue voxel


def test_write_into_a_file_is_refused_and_writes_nothing(pointwise_default, tmp_path) -> None:
    _, result = pointwise_default
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    with pytest.raises(AirwayInputError, match="is a file"):
        write_result(result, blocker)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and blocker.read_text() == "not a folder"


def test_write_is_all_or_none(pointwise_default, tmp_path) -> None:
    _, result = pointwise_default
    out = tmp_path / "out"
    (out / AIRWAY_FILE).mkdir(parents=True)  # the second output cannot be written
    with pytest.raises(AirwayInputError):
        write_result(result, out)
    assert [p.name for p in out.iterdir()] == [AIRWAY_FILE]  # no labels, no temporary files


def test_write_failing_midway_keeps_no_file(pointwise_default, tmp_path, monkeypatch) -> None:
    _, result = pointwise_default
    real_write = sitk.WriteImage
    calls = []

    def failing_second_write(image, path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_write(image, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", failing_second_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_result(result, tmp_path / "out")
    assert len(calls) == 2
    assert list((tmp_path / "out").iterdir()) == []


# --- batch and CLI ---------------------------------------------------------------------------


def test_cli_single_file_writes_a_manifest_skips_when_finished_and_redoes_on_new_settings(
    ct_file, tiny_model, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    command = ["segment", "--in", str(ct_file), "--out", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(command) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([LABELS_FILE, AIRWAY_FILE, MANIFEST_NAME])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["outputs"] == [LABELS_FILE, AIRWAY_FILE]
    assert manifest["settings"]["inference"]["overlap"] == 0.25
    assert manifest["info"]["shape_zyx"] == list(SHAPE_ZYX)
    labels = sitk.ReadImage(str(out / LABELS_FILE))
    _same_geometry(labels, sitk.ReadImage(str(ct_file)))
    before = _mtimes(out)

    assert main(command) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert _mtimes(out) == before
    assert main(command + ["--threads", "1", "--batch-size", "2"]) == 0  # speed settings change no output
    assert "0 done, 1 skipped" in capsys.readouterr().out
    if not torch.cuda.is_available():  # "auto" resolves to the CPU that did the run: nothing to redo
        assert main(command[:-2]) == 0
        assert "0 done, 1 skipped" in capsys.readouterr().out

    assert main(command + ["--overlap", "0.5"]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert json.loads((out / MANIFEST_NAME).read_text())["settings"]["inference"]["overlap"] == 0.5
    assert _mtimes(out)[MANIFEST_NAME] != before[MANIFEST_NAME]


def test_cli_folder_and_shards_partition_the_cases(ct_file, tiny_model, tmp_path, capsys) -> None:
    folder = tmp_path / "cts"
    folder.mkdir()
    for name in ("case_a", "case_b"):
        shutil.copy(ct_file, folder / f"{name}.nii.gz")
    out = tmp_path / "out"
    base = ["segment", "--in", str(folder), "--out", str(out), "--model", str(tiny_model), "--device", "cpu"]

    assert main(base + ["--shard", "1/2"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["case_a"]
    assert main(base + ["--shard", "2/2"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["case_a", "case_b"]
    for name in ("case_a", "case_b"):
        assert sorted(p.name for p in (out / name).iterdir()) == sorted([LABELS_FILE, AIRWAY_FILE, MANIFEST_NAME])
        assert json.loads((out / name / MANIFEST_NAME).read_text())["case"] == name

    # The two shards together are the whole collection: a full run finds nothing left to do.
    assert main(base) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out


def test_cli_missing_model_exits_2_with_one_sentence(ct_file, tmp_path, capsys) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    code = main(["segment", "--in", str(ct_file), "--out", str(tmp_path / "out"), "--model", str(missing)])
    assert code == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("airway segment: error:") and lines[0].endswith(".")
    assert "nowhere" in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize(
    "setting",
    [["--max-window", "8"], ["--threads", "0"], ["--precision", "float16", "--device", "cpu"]],
    ids=["window-below-patch", "zero-threads", "float16-on-cpu"],
)
def test_cli_unusable_engine_setting_exits_2_before_any_case(ct_file, tiny_model, tmp_path, capsys, setting) -> None:
    """A setting no case can run with is bad input (exit 2, one sentence), not one failure per case."""
    folder = tmp_path / "cts"
    folder.mkdir()
    for name in ("case_a", "case_b"):
        shutil.copy(ct_file, folder / f"{name}.nii.gz")
    out = tmp_path / "out"
    code = main(["segment", "--in", str(folder), "--out", str(out), "--model", str(tiny_model)] + setting)
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, captured.out + captured.err
    assert captured.err.strip().splitlines()[-1].startswith("airway segment: error:")
    assert not out.exists() or not any(out.iterdir())


def test_cli_a_non_ct_case_fails_and_the_other_is_done(ct_file, tiny_model, tmp_path, capsys) -> None:
    folder = tmp_path / "cts"
    folder.mkdir()
    shutil.copy(ct_file, folder / "good.nii.gz")
    grey = np.tile(np.arange(256, dtype=np.uint8)[:32], (8, 16, 1)).reshape(8, 16, 32)  # a 0-255 picture
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(folder / "photo.nii.gz"))
    out = tmp_path / "out"
    code = main(["segment", "--in", str(folder), "--out", str(out), "--model", str(tiny_model), "--device", "cpu"])
    assert code == 1
    captured = capsys.readouterr()
    assert "1 done, 0 skipped (already finished), 1 failed" in captured.out
    assert "failed: photo:" in captured.err and "air" in captured.err
    assert (out / "good" / MANIFEST_NAME).is_file() and (out / "good" / LABELS_FILE).is_file()
    assert not (out / "photo" / MANIFEST_NAME).exists() and not (out / "photo" / LABELS_FILE).exists()


def test_cli_a_single_non_ct_input_is_bad_input(tiny_model, tmp_path, capsys) -> None:
    """One CT given and it is not a CT: exit 2 with one sentence, and no output folder left."""
    grey = np.tile(np.arange(256, dtype=np.uint8)[:32], (8, 16, 1)).reshape(8, 16, 32)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "photo.nii.gz"))
    out = tmp_path / "out"
    code = main(["segment", "--in", str(tmp_path / "photo.nii.gz"), "--out", str(out), "--model", str(tiny_model)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and lines[-1].startswith("airway segment: error:") and "air" in lines[-1]
    assert not out.exists()


# --- loading models --------------------------------------------------------------------------


def test_load_segmentation_model_reads_the_card(tiny_model) -> None:
    loaded = load_segmentation_model(tiny_model)
    assert loaded.patch_size_zyx == (16, 16, 16) and loaded.spec == DEFAULT_INPUT_SPEC
    assert loaded.divisor == loaded.network.input_divisor and loaded.divisor > 1
    assert loaded.describe()["sha256"] == loaded.card["sha256"]
    assert not loaded.network.training


def test_a_card_without_patch_size_is_refused(tmp_path) -> None:
    card = tiny_card()
    del card["patch_size_zyx"]
    weights, _ = export_model(build_network("wingsnet", base_width=2), card, tmp_path / "no_patch")
    with pytest.raises(AirwayInputError, match="patch_size_zyx"):
        load_segmentation_model(weights)


def test_a_card_asking_for_resampling_is_refused(tmp_path) -> None:
    spec = DEFAULT_INPUT_SPEC.as_dict() | {"target_spacing_zyx": [1.0, 0.8, 0.8]}
    weights, _ = export_model(build_network("wingsnet", base_width=2), tiny_card(input_spec=spec), tmp_path / "resampled")
    with pytest.raises(AirwayInputError, match="resampled grid.*own grid"):
        load_segmentation_model(weights)


def test_changed_weights_are_refused(tmp_path) -> None:
    torch.manual_seed(1)
    weights, _ = export_model(build_network("wingsnet", base_width=2), tiny_card(), tmp_path / "a" / "tiny")
    torch.manual_seed(2)
    other, _ = export_model(build_network("wingsnet", base_width=2), tiny_card(), tmp_path / "b" / "tiny")
    shutil.copy(other, weights)  # same size and format, other numbers
    with pytest.raises(AirwayInputError, match="SHA-256"):
        load_segmentation_model(weights)


# --- cancellation ----------------------------------------------------------------------------


def _cancel_after_first_window(event: threading.Event):
    messages = []

    def progress(fraction: float, message: str) -> None:
        messages.append(message)
        if "Predicted window 1 of" in message:
            event.set()

    return progress, messages


def test_cancel_after_the_first_window_stops_segment_ct() -> None:
    event = threading.Event()
    progress, messages = _cancel_after_first_window(event)
    model = pointwise_model()
    settings = InferenceSettings(max_window_zyx=None, overlap=0.5)
    with pytest.raises(Cancelled):
        segment_ct(synthetic_ct(), GEOMETRY, model, settings, progress=progress, cancel=event)
    assert event.is_set() and model.network.calls == 1
    assert not any("Predicted window 2" in m for m in messages)


def test_cancelled_batch_case_writes_no_manifest(ct_file, tiny_model, tmp_path) -> None:
    out = tmp_path / "out"
    settings = InferenceSettings(max_window_zyx=None, overlap=0.5, device="cpu")
    # A finished run with other settings first: its manifest must not survive the cancelled redo.
    assert segment_files(ct_file, out, tiny_model, InferenceSettings(device="cpu")).done == 1
    assert (out / MANIFEST_NAME).is_file()
    event = threading.Event()
    progress, _ = _cancel_after_first_window(event)
    with pytest.raises(Cancelled):
        segment_files(ct_file, out, tiny_model, settings, progress=progress, cancel=event)
    assert event.is_set()
    assert not (out / MANIFEST_NAME).exists()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary files left


def test_a_rerun_without_probability_removes_the_old_probability_file(ct_file, tmp_path) -> None:
    model = pointwise_model()
    segment_file(ct_file, tmp_path / "out", model, keep_probability=True)
    assert (tmp_path / "out" / PROBABILITY_FILE).is_file()
    info = segment_file(ct_file, tmp_path / "out", model, keep_probability=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(info["outputs"]) == sorted([LABELS_FILE, AIRWAY_FILE])


def test_an_unusable_threshold_is_refused_before_the_network_runs() -> None:
    calls = []
    model = pointwise_model()
    model.network.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(AirwayInputError, match="threshold"):
        segment_ct(synthetic_ct(), Geometry((1.0, 1.0, 1.0)), model, threshold=1.5)
    assert calls == []


@pytest.mark.skipif(not catalogue(), reason="no bundled model in Resources/Models yet")
def test_bfloat16_fast_path_matches_float32_on_a_phantom() -> None:
    """Issue 8's check of the CPU fast path with the default bundled model: binary Dice >= 0.995."""
    from AirwaySegmentationLib.infer import cpu_has_native_bfloat16
    from AirwaySegmentationLib.phantom import generate_phantom

    if not cpu_has_native_bfloat16():
        pytest.skip("this CPU has no native bfloat16: the fast path is float32 already")
    phantom = generate_phantom(seed=phantom_seeds("test", 1)[0], shape_zyx=(112, 160, 160))
    model = load_segmentation_model()
    ct = phantom.ct
    fast = segment_ct(ct.array_zyx, ct.geometry, model, InferenceSettings(precision="bfloat16"))
    exact = segment_ct(ct.array_zyx, ct.geometry, model, InferenceSettings(precision="float32", accumulator="float32"))
    a, b = fast.labels.array_zyx > 0, exact.labels.array_zyx > 0
    assert b.sum() > 1000  # a real airway tree, not an empty prediction
    assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) >= 0.995


@pytest.mark.parametrize(
    "axes_zyx, flips_zyx",
    [((0, 1, 2), (False, True, True)), ((0, 1, 2), (True, False, False)), ((1, 0, 2), (False, False, True))],
    ids=["ras-nifti", "feet-first", "coronal"],
)
def test_the_network_sees_the_same_ct_however_it_is_stored(tiny_model, axes_zyx, flips_zyx) -> None:
    """A CT stored with its axes reversed or permuted (same physical image) gets the labels of the
    canonical storage, mapped back onto its own grid (a random network is not flip-invariant)."""
    from AirwaySegmentationLib.orientation import Reorientation

    ct = synthetic_ct().astype(np.float32)
    settings = InferenceSettings(device="cpu")
    canonical = segment_ct(ct, GEOMETRY, str(tiny_model), settings, keep_probability=True)
    # Store the same image otherwise: a reorientation whose inverse is the canonical order.
    stored_order = Reorientation(axes_zyx, flips_zyx)
    stored_ct = np.ascontiguousarray(stored_order.to_canonical(ct))
    stored_geometry = stored_order.geometry(GEOMETRY, ct.shape)
    back = Reorientation.of(stored_geometry)
    assert not back.is_identity
    np.testing.assert_array_equal(back.to_canonical(stored_ct), ct)
    result = segment_ct(stored_ct, stored_geometry, str(tiny_model), settings, keep_probability=True)
    assert result.labels.geometry == stored_geometry and result.labels.array_zyx.shape == stored_ct.shape
    np.testing.assert_array_equal(back.to_canonical(result.labels.array_zyx), canonical.labels.array_zyx)
    np.testing.assert_array_equal(back.to_canonical(result.probability.array_zyx), canonical.probability.array_zyx)
    assert result.info["canonical_order"] == {"axes_zyx": list(back.axes_zyx), "flips_zyx": list(back.flips_zyx)}
