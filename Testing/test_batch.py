"""Tests of batch runs: input discovery, shards, resuming finished cases, failures.

Tiny synthetic inputs only (4x5x6 NIfTI files, fake DICOM files), so the file runs in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AirwaySegmentationLib.batch import (
    MANIFEST_NAME,
    Case,
    find_inputs,
    parse_shard,
    run_cases,
    select_shard,
)
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.progress import Cancelled
from AirwaySegmentationLib.volume import atomic_output


def write_ct(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 5, 4), -1000, dtype=np.int16)), str(path))
    return path


def write_dicom_folder(folder: Path, names=("IM0001", "IM0002")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(bytes(128) + b"DICM" + b"\x02\x00")
    return folder


class Recorder:
    """A ``process`` that writes one output atomically and records the cases it saw."""

    def __init__(self, fail_on: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, case: Case, case_dir: Path, progress) -> dict:
        self.calls.append(case.name)
        if progress is not None:
            progress(0.5, "working")
        with atomic_output(case_dir / "result.txt") as tmp:
            tmp.write_text(case.name)
        if case.name in self.fail_on:
            raise ValueError(f"cannot segment\n{case.name}")
        return {"outputs": ["result.txt"], "voxels": 120}


@pytest.fixture
def collection(tmp_path):
    """Three CTs in a folder, ready for run_cases."""
    for name in ("a", "b", "c"):
        write_ct(tmp_path / "in" / f"{name}_0000.nii.gz")
    cases, is_collection = find_inputs(tmp_path / "in")
    assert is_collection
    return cases


# ---------------------------------------------------------------- discovery


@pytest.mark.parametrize("file_name", ["lung_0000.nii.gz", "lung.nrrd", "lung.mha"])
def test_single_file_is_one_case_named_without_ending_and_channel(tmp_path, file_name):
    path = write_ct(tmp_path / file_name)
    assert find_inputs(path) == ([Case("lung", path)], False)


@pytest.mark.parametrize("names", [("IM0001", "IM0002"), ("slice1.dcm",)])
def test_dicom_folder_is_one_case_named_after_the_folder(tmp_path, names):
    folder = write_dicom_folder(tmp_path / "series7", names)
    if names == ("slice1.dcm",):
        (folder / "slice1.dcm").write_bytes(b"no preamble needed for .dcm")
    assert find_inputs(folder) == ([Case("series7", folder)], False)


def test_files_without_the_dicom_preamble_are_not_dicom(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "IM0001").write_bytes(bytes(200))
    with pytest.raises(AirwayInputError, match="no CT images"):
        find_inputs(tmp_path / "notes")


def test_folder_is_a_collection_of_images_and_dicom_subfolders(tmp_path):
    root = tmp_path / "cts"
    write_ct(root / "b_0000.nii.gz")
    write_ct(root / "a.nrrd")
    write_ct(root / ".a_0000.nii.gz.tmp123.nii.gz")  # leftover of an interrupted atomic write
    (root / "readme.txt").write_text("not a CT")
    write_dicom_folder(root / "patient9")
    (root / "empty").mkdir()
    cases, is_collection = find_inputs(root)
    assert is_collection
    assert cases == [Case("a", root / "a.nrrd"), Case("b", root / "b_0000.nii.gz"), Case("patient9", root / "patient9")]


def test_a_dicomdir_beside_series_folders_leaves_them_a_collection(tmp_path):
    root = tmp_path / "medium"
    for name in ("p1", "p2"):
        write_dicom_folder(root / name)
    (root / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + b"directory records")
    cases, is_collection = find_inputs(root)
    assert is_collection and [c.name for c in cases] == ["p1", "p2"]


def test_dataset_folder_uses_its_image_folders(tmp_path):
    write_ct(tmp_path / "imagesTr" / "ATM_001_0000.nii.gz")
    write_ct(tmp_path / "labelsTr" / "ATM_001.nii.gz")
    write_ct(tmp_path / "imagesTs" / "ATM_200_0000.nii.gz")
    cases, is_collection = find_inputs(tmp_path)
    assert is_collection
    assert [(c.name, c.path.parent.name) for c in cases] == [("ATM_001", "imagesTr"), ("ATM_200", "imagesTs")]


def test_two_cases_with_one_name_are_refused_naming_both(tmp_path):
    first = write_ct(tmp_path / "x.nii.gz")
    second = write_ct(tmp_path / "x_0000.nii.gz")
    with pytest.raises(AirwayInputError) as error:
        find_inputs(tmp_path)
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_list_file_keeps_its_order_resolves_relative_paths_and_skips_comments(tmp_path):
    far = write_ct(tmp_path / "elsewhere" / "zeta_0000.nii.gz")
    near = write_ct(tmp_path / "lists" / "cts" / "alpha.nii.gz")
    series = write_dicom_folder(tmp_path / "lists" / "series3")
    listing = tmp_path / "lists" / "batch.txt"
    listing.write_text(f"# cases for the paper\n{far}\n\n  cts/alpha.nii.gz  \n# series3 is DICOM\nseries3\n")
    cases, is_collection = find_inputs(listing)
    assert is_collection
    assert [(c.name, c.path.resolve()) for c in cases] == [
        ("zeta", far),
        ("alpha", near.resolve()),
        ("series3", series.resolve()),
    ]


def test_csv_list_reads_the_first_column_and_skips_a_header(tmp_path):
    write_ct(tmp_path / "p1_0000.nii.gz")
    write_ct(tmp_path / "p2_0000.nii.gz")
    listing = tmp_path / "cases.csv"
    listing.write_text("image,label\np2_0000.nii.gz,p2_label.nii.gz\n\"p1_0000.nii.gz\",x\n")
    cases, _ = find_inputs(listing)
    assert [c.name for c in cases] == ["p2", "p1"]


def test_list_line_that_does_not_exist_is_named_by_its_number(tmp_path):
    write_ct(tmp_path / "ok.nii.gz")
    listing = tmp_path / "cases.lst"
    listing.write_text("# header comment\nok.nii.gz\nmissing.nii.gz\n")
    with pytest.raises(AirwayInputError, match=r"Line 3 of .*missing\.nii\.gz.*does not exist"):
        find_inputs(listing)


def test_list_line_naming_a_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    listing = tmp_path / "cases.txt"
    listing.write_text("plain\n")
    with pytest.raises(AirwayInputError, match="Line 1 .*neither a CT image .* nor a folder of DICOM"):
        find_inputs(listing)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda root: root / "nothing_here", "does not exist"),
        (lambda root: root, "holds no CT images"),
        (lambda root: (root / "empty.txt").write_text("# only a comment\n\n") and root / "empty.txt", "names no CTs"),
        (lambda root: (root / "notes.doc").write_text("x") and root / "notes.doc", "neither a CT image"),
    ],
)
def test_unusable_sources_are_refused_with_one_sentence(tmp_path, make, match):
    with pytest.raises(AirwayInputError, match=match):
        find_inputs(make(tmp_path))


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("3/8", (3, 8)), (" 8 / 8 ", (8, 8))])
def test_parse_shard_accepts_i_of_n(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "2", "a/b", "-1/3", "1/2/3", ""])
def test_parse_shard_refuses_other_forms(text):
    with pytest.raises(AirwayInputError, match="form i/n"):
        parse_shard(text)


def test_shards_partition_the_cases_round_robin():
    cases = [Case(f"c{k}", Path(f"c{k}.nii.gz")) for k in range(7)]
    shards = [select_shard(cases, index, 3) for index in (1, 2, 3)]
    assert [len(shard) for shard in shards] == [3, 2, 2]
    assert sorted((c for shard in shards for c in shard), key=cases.index) == cases
    for index, shard in enumerate(shards, start=1):
        assert all(cases.index(c) % 3 + 1 == index for c in shard)
    with pytest.raises(AirwayInputError):
        select_shard(cases, 4, 3)


# ---------------------------------------------------------------- resuming


def test_finished_cases_are_skipped_and_the_manifest_is_complete(tmp_path, collection):
    process = Recorder()
    first = run_cases(collection, tmp_path / "out", process, collection=True, settings={"tta": (1, 2)})
    assert (first.done, first.skipped, first.failed, first.exit_code) == (3, 0, [], 0)
    manifest = json.loads((tmp_path / "out" / "b" / MANIFEST_NAME).read_text())
    assert manifest["outputs"] == ["result.txt"] and manifest["info"] == {"voxels": 120}
    assert manifest["settings"] == {"tta": [1, 2]}
    assert manifest["input"]["path"] == str(collection[1].path.resolve())
    assert manifest["input"]["size"] == collection[1].path.stat().st_size
    assert manifest["finished_utc"].endswith("+00:00") and manifest["seconds"] >= 0
    assert (tmp_path / "out" / "b" / "result.txt").read_text() == "b"

    second = run_cases(collection, tmp_path / "out", process, collection=True, settings={"tta": (1, 2)})
    assert (second.done, second.skipped, second.exit_code) == (0, 3, 0)
    assert process.calls == ["a", "b", "c"]

    third = run_cases(collection, tmp_path / "out", process, collection=True, settings={"tta": [1, 2]},
                      skip_finished=False)
    assert third.done == 3 and process.calls == ["a", "b", "c"] * 2


def test_a_single_input_writes_into_the_output_folder_itself(tmp_path):
    ct = write_ct(tmp_path / "one_0000.nii.gz")
    cases, is_collection = find_inputs(ct)
    process = Recorder()
    run_cases(cases, tmp_path / "out", process, collection=is_collection, settings={})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST_NAME, "result.txt"]
    assert run_cases(cases, tmp_path / "out", process, collection=is_collection, settings={}).skipped == 1


def test_changed_settings_redo_every_case(tmp_path, collection):
    process = Recorder()
    run_cases(collection, tmp_path / "out", process, collection=True, settings={"model": "v1"})
    summary = run_cases(collection, tmp_path / "out", process, collection=True, settings={"model": "v2"})
    assert (summary.done, summary.skipped) == (3, 0)
    assert json.loads((tmp_path / "out" / "a" / MANIFEST_NAME).read_text())["settings"] == {"model": "v2"}


def test_touched_input_is_redone(tmp_path, collection):
    process = Recorder()
    run_cases(collection, tmp_path / "out", process, collection=True, settings={})
    stat = collection[2].path.stat()
    os.utime(collection[2].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    summary = run_cases(collection, tmp_path / "out", process, collection=True, settings={})
    assert (summary.done, summary.skipped) == (1, 2)
    assert process.calls[3:] == ["c"]


def test_changed_dicom_folder_is_redone(tmp_path):
    series = write_dicom_folder(tmp_path / "series")
    cases, _ = find_inputs(series)
    process = Recorder()
    run_cases(cases, tmp_path / "out", process, collection=False, settings={})
    assert run_cases(cases, tmp_path / "out", process, collection=False, settings={}).skipped == 1
    (series / "IM0002").write_bytes(bytes(128) + b"DICM" + b"re-exported slice")  # same file count
    assert run_cases(cases, tmp_path / "out", process, collection=False, settings={}).done == 1
    write_dicom_folder(series, ("IM0003",))
    assert run_cases(cases, tmp_path / "out", process, collection=False, settings={}).done == 1
    assert process.calls == ["series"] * 3


def test_deleted_output_is_redone(tmp_path, collection):
    process = Recorder()
    run_cases(collection, tmp_path / "out", process, collection=True, settings={})
    (tmp_path / "out" / "a" / "result.txt").unlink()
    summary = run_cases(collection, tmp_path / "out", process, collection=True, settings={})
    assert (summary.done, summary.skipped) == (1, 2)
    assert (tmp_path / "out" / "a" / "result.txt").exists()


def test_crash_leaves_no_manifest_and_the_next_run_redoes_the_case(tmp_path, collection):
    run_cases(collection, tmp_path / "out", Recorder(), collection=True, settings={"v": 1})
    # Redo with new settings crashes in case b after writing its output: b's old manifest must go.
    crashed = run_cases(collection, tmp_path / "out", Recorder(fail_on=("b",)), collection=True, settings={"v": 2})
    assert not (tmp_path / "out" / "b" / MANIFEST_NAME).exists()
    assert (tmp_path / "out" / "b" / "result.txt").exists()
    assert (crashed.done, crashed.exit_code) == (2, 1)
    process = Recorder()
    summary = run_cases(collection, tmp_path / "out", process, collection=True, settings={"v": 2})
    assert process.calls == ["b"] and (summary.done, summary.skipped, summary.exit_code) == (1, 2, 0)


def test_a_redo_that_fails_leaves_none_of_the_last_runs_outputs(tmp_path, collection):
    run_cases(collection, tmp_path / "out", Recorder(), collection=True, settings={"v": 1})

    def unreadable(case, case_dir, progress):
        raise AirwayInputError(f"{case.name} is not a readable image")

    summary = run_cases(collection, tmp_path / "out", unreadable, collection=True, settings={"v": 2})
    assert summary.done == 0 and len(summary.failed) == 3
    assert not list((tmp_path / "out").rglob("result.txt")) and not list((tmp_path / "out").rglob(MANIFEST_NAME))


def test_outputs_are_never_written_into_a_dicom_input_folder(tmp_path):
    patients = tmp_path / "patients"
    for name in ("p1", "p2"):
        write_dicom_folder(patients / name)
    cases, is_collection = find_inputs(patients)
    summary = run_cases(cases, patients, Recorder(), collection=is_collection, settings={})
    assert summary.done == 0 and [name for name, _ in summary.failed] == ["p1", "p2"]
    assert "its own DICOM folder" in summary.failed[0][1]
    assert sorted(p.name for p in (patients / "p1").iterdir()) == ["IM0001", "IM0002"]
    single, _ = find_inputs(patients / "p1")
    with pytest.raises(AirwayInputError, match="its own DICOM folder"):
        run_cases(single, patients / "p1", Recorder(), collection=False, settings={})


def test_a_failing_case_does_not_stop_the_others(tmp_path, collection):
    process = Recorder(fail_on=("a",))
    summary = run_cases(collection, tmp_path / "out", process, collection=True, settings={})
    assert process.calls == ["a", "b", "c"]
    assert summary.done == 2 and summary.exit_code == 1
    assert summary.failed == [("a", "ValueError: cannot segment a")]
    assert "2 done, 0 skipped (already finished), 1 failed" in summary.describe()


def test_a_missing_declared_output_is_a_failure(tmp_path, collection):
    def forgetful(case, case_dir, progress):
        return {"outputs": ["never_written.nii.gz"]}

    summary = run_cases(collection[:1], tmp_path / "out", forgetful, collection=True, settings={})
    assert summary.failed == [("a", "RuntimeError: the case's work did not write never_written.nii.gz")]
    assert not (tmp_path / "out" / "a" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("stop", [Cancelled, KeyboardInterrupt])
def test_cancel_and_interrupt_in_the_work_stop_the_batch(tmp_path, collection, stop):
    calls = []

    def process(case, case_dir, progress):
        calls.append(case.name)
        raise stop("stop")

    with pytest.raises(stop):
        run_cases(collection, tmp_path / "out", process, collection=True, settings={})
    assert calls == ["a"]


def test_cancel_from_progress_stops_the_batch(tmp_path, collection):
    process = Recorder()

    def cancel_in_b(fraction, message):
        if message.startswith("b "):
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run_cases(collection, tmp_path / "out", process, collection=True, settings={}, progress=cancel_in_b)
    assert process.calls == ["a", "b"]
    assert not (tmp_path / "out" / "b" / MANIFEST_NAME).exists()


def test_progress_maps_each_case_onto_its_share_with_its_name(tmp_path, collection):
    seen: list[tuple[float, str]] = []
    run_cases(collection[:2], tmp_path / "out", Recorder(), collection=True, settings={},
              progress=lambda fraction, message: seen.append((fraction, message)))
    assert (0.25, "a (1/2): working") in seen and (0.75, "b (2/2): working") in seen
    assert seen[-1][0] == 1.0 and "2 done" in seen[-1][1]
    seen.clear()
    run_cases(collection[:2], tmp_path / "out", Recorder(), collection=True, settings={},
              progress=lambda fraction, message: seen.append((fraction, message)))
    assert (0.5, "a (1/2): already finished (manifest.json matches), skipped") in seen


def test_a_single_input_raises_its_error_and_leaves_no_empty_folder(tmp_path):
    cases, is_collection = find_inputs(write_ct(tmp_path / "lung.nii.gz"))

    def refuse(case, case_dir, progress):
        raise AirwayInputError("lung.nii.gz is not a CT.")

    with pytest.raises(AirwayInputError, match="is not a CT"):
        run_cases(cases, tmp_path / "out", refuse, collection=is_collection, settings={})
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(AirwayInputError):
        run_cases(cases, tmp_path / "kept", refuse, collection=is_collection, settings={})
    assert (tmp_path / "kept").is_dir()  # a folder the user made is never removed


def test_a_failing_case_of_a_collection_leaves_no_empty_folder(tmp_path, collection):
    def refuse_b(case, case_dir, progress):
        if case.name == "b":
            raise AirwayInputError("b is not a CT.")
        return Recorder()(case, case_dir, progress)

    summary = run_cases(collection, tmp_path / "out", refuse_b, collection=True, settings={})
    assert summary.failed == [("b", "b is not a CT.")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "c"]


def test_csv_first_line_naming_a_missing_ct_is_an_error_not_a_header(tmp_path):
    write_ct(tmp_path / "b.nii.gz")
    listing = tmp_path / "cases.csv"
    listing.write_text("a_typo.nii.gz,1\nb.nii.gz,2\n")
    with pytest.raises(AirwayInputError, match="Line 1 of .*does not exist"):
        find_inputs(listing)
