"""The `airway` command: subcommands work end to end on files, bad input exits 2 in one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from AirwaySegmentationLib.cli import EXIT_BAD_INPUT, main
from AirwaySegmentationLib.volume import Geometry, Volume, read_label, write_volume
from synthetic_trees import binary_tree, capsule_mask, place

SPACING_ZYX = (0.8, 0.6, 0.6)
GEOMETRY = Geometry(spacing_xyz=SPACING_ZYX[::-1], origin_xyz=(-40.0, 12.5, -300.0))


@pytest.fixture(scope="module")
def tree_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tree")
    shape, segments = place(binary_tree(generations=3), SPACING_ZYX)
    mask = capsule_mask(shape, SPACING_ZYX, segments).astype(np.uint8)
    broken = mask.copy()
    broken[:, :, : mask.shape[2] // 2 - 3] = 0  # lose the left half of the tree
    return {
        "mask": write_volume(Volume(mask, GEOMETRY), folder / "airway.nii.gz"),
        "broken": write_volume(Volume(broken, GEOMETRY), folder / "broken.nii.gz"),
        "shifted": write_volume(
            Volume(mask, Geometry(GEOMETRY.spacing_xyz, (-39.0, 12.5, -300.0))), folder / "shifted.nii.gz"
        ),
    }


def test_labels_writes_a_slicer_segmentation_and_branch_table(tree_files, tmp_path, capsys) -> None:
    out = tmp_path / "labels.seg.nrrd"
    assert main(["labels", "--in", str(tree_files["mask"]), "--out", str(out), "--branches", str(tmp_path / "b.json")]) == 0
    assert "7 branches over 3 generations" in capsys.readouterr().out
    labels = read_label(out)
    mask = read_label(tree_files["mask"])
    np.testing.assert_array_equal(labels.array_zyx > 0, mask.array_zyx > 0)
    np.testing.assert_allclose(labels.geometry.origin_xyz, GEOMETRY.origin_xyz, atol=1e-6)
    names = slicerio.segment_names(slicerio.read_segmentation(str(out), skip_voxels=True))
    assert names == ["Trachea and main bronchi", "Lobar to segmental bronchi", "Small bronchi"]
    branches = json.loads((tmp_path / "b.json").read_text())["branches"]
    assert [b["generation"] for b in branches].count(2) == 4 and branches[0]["parent"] is None


def test_evaluate_prints_a_table_and_writes_json(tree_files, tmp_path, capsys) -> None:
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(tree_files["broken"]), "--gt", str(tree_files["mask"]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Tree length detected" in printed and "ATM'22 score" in printed
    metrics = json.loads(out.read_text())
    assert 0 < metrics["td"] < 100 and metrics["precision"] == pytest.approx(100.0)
    assert main(["evaluate", "--pred", str(tree_files["mask"]), "--gt", str(tree_files["mask"]), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["atm22_score"] == pytest.approx(100.0)


def _two_d(folder: Path) -> Path:
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(folder / "slice.nii.gz"))
    return folder / "slice.nii.gz"


def _not_an_image(folder: Path) -> Path:
    (folder / "notes.nii.gz").write_text("hello")
    return folder / "notes.nii.gz"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (lambda f, d: ["labels", "--in", str(d / "missing.nii.gz"), "--out", str(d / "out.nii.gz")], "does not exist"),
        (lambda f, d: ["labels", "--in", str(_two_d(d)), "--out", str(d / "out.nii.gz")], "2-D image"),
        (lambda f, d: ["labels", "--in", str(_not_an_image(d)), "--out", str(d / "out.nii.gz")], "not a readable image"),
        (lambda f, d: ["labels", "--in", str(f["mask"]), "--out", str(d / "out.png")], "expected a file name ending"),
        (lambda f, d: ["evaluate", "--pred", str(f["shifted"]), "--gt", str(f["mask"])], "does not lie on the grid"),
        (lambda f, d: ["labels", "--in", str(f["mask"]), "--out", str(f["mask"])], "is an input of this command"),
        (lambda f, d: ["labels", "--in", str(f["mask"]), "--out", str(d / "out.nii.gz"), "--segmental-generation", "-5"],
         "segmental generation -5 is not usable"),
        (lambda f, d: ["centerline", "--labels", str(f["mask"]), "--out", str(f["mask"])], "it is a file, not a folder"),
    ],
    ids=["missing", "2-d", "not-an-image", "bad-output-name", "grid-mismatch", "output-is-input", "bad-generation",
         "output-folder-is-a-file"],
)
def test_bad_input_exits_2_with_one_sentence_and_no_output(tree_files, tmp_path, capsys, arguments, message) -> None:
    status = main(arguments(tree_files, tmp_path))
    err = capsys.readouterr().err.strip()
    assert status == EXIT_BAD_INPUT
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_console_script_runs_as_a_process(tree_files, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "AirwaySegmentationLib.cli", "labels", "--in", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "o.nii.gz")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2 and result.stderr.startswith("airway labels: error:")


def test_phantom_labels_evaluate_chain(tmp_path, capsys) -> None:
    """The README's main job on a small grid: phantom -> three-class labels -> evaluation."""
    out = tmp_path / "phantom"
    assert main(["phantom", "--seed", "3", "--shape", "64", "96", "96", "--spacing", "2.5", "2", "2", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"ct.nii.gz", "airway.nii.gz", "airway3.nii.gz", "lungs.nii.gz", "tree.json"}
    assert main(["labels", "--in", str(out / "airway.nii.gz"), "--out", str(tmp_path / "labels.nrrd")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "labels.nrrd"), "--gt", str(out / "airway.nii.gz"),
                 "--tree", str(out / "tree.json"), "--json", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["td"] == pytest.approx(100.0) and metrics["dsc"] == pytest.approx(100.0)
    # The reference classes come from tree.json, the predicted ones from the parse.
    assert {"1", "2"} <= set(metrics["td_per_class"])  # JSON object keys are strings
    assert {"1", "2"} <= set(metrics["dice_per_class"])


def test_phantom_bad_shape_exits_2(tmp_path, capsys) -> None:
    status = main(["phantom", "--shape", "40", "96", "96", "--out", str(tmp_path / "p")])
    assert status == EXIT_BAD_INPUT and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_evaluate_reads_0_255_masks_as_binary(tree_files, tmp_path, capsys) -> None:
    mask = read_label(tree_files["mask"])
    path = write_volume(mask.with_array((mask.array_zyx > 0).astype(np.uint8) * 255), tmp_path / "mask255.nii.gz")
    assert main(["evaluate", "--pred", str(path), "--gt", str(tree_files["mask"]), "--json", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["atm22_score"] == pytest.approx(100.0) and metrics["dice_per_class"] == {}


def test_failed_branch_table_keeps_no_label_file(tree_files, tmp_path, capsys) -> None:
    (tmp_path / "blocked").write_text("a file where a folder is needed")
    out = tmp_path / "labels.nii.gz"
    status = main(["labels", "--in", str(tree_files["mask"]), "--out", str(out), "--branches", str(tmp_path / "blocked" / "b.json")])
    assert status == EXIT_BAD_INPUT and "Cannot write" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]


@pytest.mark.parametrize("branch", [{"class": -1, "points_mm": [[0, 0, 0]]}, {"class": 1, "points_mm": [[0, float("nan"), 0]]}])
def test_bad_tree_json_is_one_sentence(tree_files, tmp_path, capsys, branch) -> None:
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"branches": [branch]}))
    assert main(["evaluate", "--pred", str(tree_files["mask"]), "--gt", str(tree_files["mask"]), "--tree", str(path)]) == EXIT_BAD_INPUT
    assert "class outside 1-3 or a non-finite" in capsys.readouterr().err


def test_missing_optional_package_is_one_sentence(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "AirwaySegmentationLib.train", raising=False)
    config = tmp_path / "c.toml"
    config.write_text("seed = 0\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "needs torch" in err and "slicer-airway[torch]" in err and len(err.strip().splitlines()) == 1
