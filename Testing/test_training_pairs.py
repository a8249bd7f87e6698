"""Training pairs written into a dataset folder: the layout the trainer reads, names, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from AirwayRefineLib import training_pairs
from AirwayRefineLib.training_pairs import (
    add_training_pair,
    existing_case_files,
    training_case_name,
    training_pair_paths,
)
from AirwaySegmentationLib.data import find_cases, load_case
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.volume import Geometry, Volume, read_volume

GEOMETRY = Geometry(spacing_xyz=(0.8, 0.7, 1.2), origin_xyz=(-40.0, 12.5, -210.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))


def chest_case(shape=(24, 40, 40)) -> tuple[Volume, Volume]:
    """A CT (air around a body, lungs, a trachea-like tube) and its three-class labels."""
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[:, 4:36, 4:36] = 40
    ct[3:21, 8:32, 8:32] = -850
    ct[:, 18:22, 18:22] = -1000
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:12, 18:22, 18:22] = 1
    labels[12:, 18:22, 18:20] = 2
    labels[12:, 18:22, 20:22] = 3
    return Volume(ct, GEOMETRY), Volume(labels, GEOMETRY)


def test_the_pair_is_written_where_the_trainer_reads_it(tmp_path: Path) -> None:
    ct, labels = chest_case()
    image_path, label_path = add_training_pair(tmp_path / "dataset", "case_01", ct, labels)
    assert image_path == tmp_path / "dataset" / "imagesTr" / "case_01_0000.nii.gz"
    assert label_path == tmp_path / "dataset" / "labelsTr" / "case_01.nii.gz"
    assert [(c.name, c.image_path, c.label_path) for c in find_cases(tmp_path / "dataset")] == [
        ("case_01", image_path, label_path)
    ]
    written_ct, written_labels = read_volume(image_path), read_volume(label_path)
    assert written_ct.array_zyx.dtype == np.int16 and written_labels.array_zyx.dtype == np.uint8
    np.testing.assert_array_equal(written_ct.array_zyx, ct.array_zyx)
    np.testing.assert_array_equal(written_labels.array_zyx, labels.array_zyx)
    np.testing.assert_allclose(written_ct.geometry.ijk_to_lps, GEOMETRY.ijk_to_lps, atol=1e-6)
    np.testing.assert_allclose(written_labels.geometry.ijk_to_lps, GEOMETRY.ijk_to_lps, atol=1e-6)
    # The trainer's loader reads it as a three-class case.
    assert set(np.unique(load_case(find_cases(tmp_path / "dataset")[0]).labels3).tolist()) == {0, 1, 2, 3}
    # No temporary file is left behind.
    assert sorted(p.name for p in (tmp_path / "dataset").rglob("*") if p.is_file()) == ["case_01.nii.gz", "case_01_0000.nii.gz"]


def test_pairs_join_an_existing_dataset_and_binary_labels_are_kept(tmp_path: Path) -> None:
    ct, labels = chest_case()
    add_training_pair(tmp_path, "a", ct, labels)
    binary = labels.with_array((labels.array_zyx > 0).astype(np.int32))
    add_training_pair(tmp_path, "b", ct, binary)
    assert [case.name for case in find_cases(tmp_path)] == ["a", "b"]
    np.testing.assert_array_equal(read_volume(tmp_path / "labelsTr" / "b.nii.gz").array_zyx, labels.array_zyx > 0)


def test_an_existing_case_is_kept_unless_overwrite(tmp_path: Path) -> None:
    ct, labels = chest_case()
    _, label_path = add_training_pair(tmp_path, "case", ct, labels)
    before = label_path.read_bytes()
    corrected = labels.with_array(np.where(labels.array_zyx == 3, 2, labels.array_zyx).astype(np.uint8))
    with pytest.raises(AirwayInputError, match="already has a case case .*replace the case"):
        add_training_pair(tmp_path, "case", ct, corrected)
    assert label_path.read_bytes() == before
    add_training_pair(tmp_path, "case", ct, corrected, overwrite=True)
    np.testing.assert_array_equal(read_volume(label_path).array_zyx, corrected.array_zyx)
    assert [case.name for case in find_cases(tmp_path)] == ["case"]


def test_overwrite_replaces_a_case_stored_under_other_names(tmp_path: Path) -> None:
    """An ATM'22 release names the label like the image; replacing the case removes that file."""
    ct, labels = chest_case()
    image_path, label_path = add_training_pair(tmp_path, "atm_001", ct, labels)
    release_label = label_path.with_name("atm_001_0000.nii.gz")
    label_path.rename(release_label)
    assert existing_case_files(tmp_path, "atm_001") == [image_path, release_label]
    with pytest.raises(AirwayInputError, match="atm_001_0000.nii.gz"):
        add_training_pair(tmp_path, "atm_001", ct, labels)
    add_training_pair(tmp_path, "atm_001", ct, labels, overwrite=True)
    assert not release_label.exists()
    assert [(c.image_path, c.label_path) for c in find_cases(tmp_path)] == [(image_path, label_path)]


@pytest.mark.parametrize(
    ("text", "name"),
    [("Chest CT (corrected) #2", "Chest_CT_corrected_2"), ("  lung_0000_0000 ", "lung"), ("1.2.840.113619", "1.2.840.113619"),
     ("-._x-._", "x"), ("Ümlaut-Fall", "mlaut-Fall")],
)
def test_case_names_are_made_from_any_text(text: str, name: str) -> None:
    assert training_case_name(text) == name
    training_pair_paths("dataset", name)  # accepted as it is


@pytest.mark.parametrize("bad", ["", "a b", ".hidden", "_x", "x/y", "..", "case_0000", "x" * 121, "Ü"])
def test_bad_case_names_are_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    ct, labels = chest_case()
    with pytest.raises(AirwayInputError, match="case name"):
        add_training_pair(tmp_path, bad, ct, labels)
    assert not any(tmp_path.iterdir())


def test_names_without_letters_or_digits_cannot_be_made() -> None:
    with pytest.raises(AirwayInputError, match="not a usable case name"):
        training_case_name(" (#) ")


def test_wrong_inputs_are_refused(tmp_path: Path) -> None:
    ct, labels = chest_case()
    shifted = Volume(labels.array_zyx, Geometry(GEOMETRY.spacing_xyz, (0.0, 0.0, 0.0), GEOMETRY.direction))
    with pytest.raises(AirwayInputError, match="does not lie on the grid of the CT"):
        add_training_pair(tmp_path, "c", ct, shifted)
    with pytest.raises(AirwayInputError, match="no airway"):
        add_training_pair(tmp_path, "c", ct, labels.with_array(np.zeros_like(labels.array_zyx)))
    with pytest.raises(AirwayInputError, match="float32 values"):
        add_training_pair(tmp_path, "c", ct, labels.with_array(labels.array_zyx.astype(np.float32)))
    with pytest.raises(AirwayInputError, match="values up to 300"):
        add_training_pair(tmp_path, "c", ct, labels.with_array(labels.array_zyx.astype(np.int16) * 100))
    with pytest.raises(AirwayInputError, match="Hounsfield"):
        add_training_pair(tmp_path, "c", ct.with_array((ct.array_zyx // 8 + 128).astype(np.int16)), labels)
    (tmp_path / "file").write_text("")
    with pytest.raises(AirwayInputError, match="is a file"):
        add_training_pair(tmp_path / "file", "c", ct, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_folder_of_batches_is_refused(tmp_path: Path) -> None:
    ct, labels = chest_case()
    add_training_pair(tmp_path / "TrainBatch1", "a", ct, labels)
    with pytest.raises(AirwayInputError, match=r"holds dataset batches \(TrainBatch1\); choose one of them"):
        add_training_pair(tmp_path, "b", ct, labels)
    add_training_pair(tmp_path / "TrainBatch2", "b", ct, labels)
    assert [case.name for case in find_cases(tmp_path)] == ["a", "b"]


def test_a_dataset_the_trainer_cannot_read_gets_no_new_pair(tmp_path: Path) -> None:
    ct, labels = chest_case()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "orphan.nii.gz").write_bytes(b"")
    with pytest.raises(AirwayInputError, match="cannot read .* with case new added: 1 labels have no image .*orphan"):
        add_training_pair(tmp_path, "new", ct, labels)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["orphan.nii.gz"]


def test_the_pair_is_checked_against_what_the_trainer_lists(tmp_path: Path, monkeypatch) -> None:
    ct, labels = chest_case()
    monkeypatch.setattr(training_pairs, "find_cases", lambda root: [])
    with pytest.raises(AirwayInputError, match="does not read .* as case c"):
        add_training_pair(tmp_path, "c", ct, labels)
