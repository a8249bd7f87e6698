"""Tests of the visual report (AirwayRefineLib.report): files, picture content, page content, geometry, fallback."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the report needs matplotlib (extra 'report')")

from AirwayRefineLib import report
from AirwayRefineLib.centerline import extract_centerlines
from AirwayRefineLib.report import REPORT_SIZE_PX, write_report
from AirwaySegmentationLib.classes import AIRWAY_CLASSES
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.volume import Geometry, Volume
from matplotlib.image import imread
from synthetic_trees import binary_tree, capsule_mask, place

SPACING_ZYX = (1.2, 0.9, 0.9)
# Index axis k runs to the feet, so the top of the synthetic trachea (p0, at small z) is superior.
FEET_FIRST = (1, 0, 0, 0, 1, 0, 0, 0, -1)
# The same turned 25 degrees about the body axis: an oblique grid.
_C, _S = np.cos(np.deg2rad(25.0)), np.sin(np.deg2rad(25.0))
OBLIQUE = tuple((np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]]) @ np.diag([1, 1, -1])).ravel())
# i runs posterior, j left and k to the feet: a grid with permuted axes.
PERMUTED = (0, 1, 0, 1, 0, 0, 0, 0, -1)
SUMMARY = {"components_before": 3, "run_time_s": 31.2, "model": "wingsnet_phantom", "connection_model": "connect_tiny"}
# Branches cut in the stage-1 labels: the first gap is bridged and merged, the second is not.
CUT_BRANCHES = (3, 6)
GAP_RADIUS_MM = 4.0  # wider than the cut branches (3.1 mm), so each gap splits the tree


def _case(direction=FEET_FIRST) -> dict:
    """A 15-branch tree in three classes with two gaps, a CT, attention blobs and break records."""
    shape, segments = place(binary_tree(generations=4, trachea_radius_mm=5.0, trachea_length_mm=36.0), SPACING_ZYX, 6.0)
    labels = np.zeros(shape, np.uint8)
    for generations, label in (((0, 1), 1), ((2,), 2), ((3,), 3)):
        inside = capsule_mask(shape, SPACING_ZYX, [s for s in segments if s.generation in generations])
        labels[inside & (labels == 0)] = label
    geometry = Geometry(SPACING_ZYX[::-1], (10.0, -50.0, 80.0), direction)
    grid_mm = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING_ZYX)), indexing="ij"), axis=-1)
    before, after = labels.copy(), labels.copy()
    attention = np.zeros(shape, np.float32)
    breaks = []
    for number, segment in enumerate(CUT_BRANCHES, start=1):
        gap_mm = (np.asarray(segments[segment].p0_mm) + np.asarray(segments[segment].p1_mm)) / 2
        distance = np.linalg.norm(grid_mm - gap_mm, axis=-1)
        before[distance < GAP_RADIUS_MM] = 0
        if number == 2:
            after[distance < GAP_RADIUS_MM] = 0
        attention = np.maximum(attention, np.exp(-(distance**2) / 18.0).astype(np.float32))
        index = [int(v) for v in np.round(gap_mm / SPACING_ZYX)]
        breaks.append({
            "id": number,
            "position_lps_mm": geometry.index_zyx_to_physical(np.asarray(index, float)).tolist(),
            "index_zyx": index,
            "gap_mm": 2 * GAP_RADIUS_MM,
            "confidence": 0.91 if number == 1 else 0.23,
            "connected": number == 1,
            "merged": number == 1,
        })  # fmt: skip
    ct = np.full(shape, -850, np.int16)
    ct[labels > 0] = -1000
    return {
        "ct": Volume(ct, geometry),
        "labels_before": Volume(before, geometry),
        "labels_after": Volume(after, geometry),
        "attention": Volume(attention, geometry),
        "breaks": breaks,
        "centerlines": extract_centerlines(after, geometry, labels_zyx=after),
        "summary": dict(SUMMARY),
    }


@pytest.fixture(scope="module")
def case() -> dict:
    return _case()


@pytest.fixture(scope="module")
def written(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, write_report(out, **case, title="Synthetic tree")


def _panel_3d(png: np.ndarray) -> np.ndarray:
    """The pixels of the 3-D panel (top-left cell of the figure's grid)."""
    height, width = png.shape[:2]
    return png[int(0.13 * height) : int(0.55 * height), int(0.02 * width) : int(0.23 * width), :3]


def test_writes_both_files_and_nothing_else(written):
    out, (png_path, html_path) = written
    assert (png_path, html_path) == (out / "report.png", out / "report.html")
    assert png_path.stat().st_size > 10_000 and html_path.stat().st_size > png_path.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.png"]  # no temporary files left


def test_png_has_the_size_and_a_drawn_3d_panel(written):
    _, (png_path, _) = written
    png = imread(png_path)
    assert png.shape[:2] == (REPORT_SIZE_PX[1], REPORT_SIZE_PX[0])
    panel = _panel_3d(png).reshape(-1, 3)
    assert len(np.unique(np.round(panel * 255), axis=0)) > 20


def test_html_is_self_contained_with_table_and_breaks(written, case):
    _, (png_path, html_path) = written
    page = html_path.read_text(encoding="utf-8")
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == png_path.read_bytes()
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert '<td class="merged">1</td>' in page and '<td class="not-merged">2</td>' in page
    for key, value in SUMMARY.items():
        assert f"<tr><th>{key}</th><td>{value}</td></tr>" in page
    assert "<tr><th>breaks found</th><td>2</td></tr>" in page
    assert "<tr><th>breaks merged</th><td>1</td></tr>" in page
    # components_before comes from the summary; components after is counted in the final labels
    assert "<tr><th>components after</th><td>2</td></tr>" in page
    total = sum(b.length_mm for b in case["centerlines"].branches)
    assert f"<tr><th>total centerline length (mm)</th><td>{total:.0f}</td></tr>" in page
    assert "<tr><th>branches, generation 0</th><td>1</td></tr>" in page


@pytest.mark.parametrize("direction", [FEET_FIRST, PERMUTED], ids=["feet-first", "permuted"])
def test_vtk_rendering_colours_classes_and_marks_breaks(direction):
    pytest.importorskip("vtkmodules.vtkRenderingOpenGL2", reason="VTK is not installed")
    case = _case(direction)
    try:
        rendering = report._render_tree_vtk(case["labels_after"], case["breaks"])
    except RuntimeError as error:
        pytest.skip(f"no offscreen OpenGL here: {error}")
    image = rendering.image.astype(float) / 255
    size = image.shape[0]

    # Shading scales a colour and adds some white: give each lit pixel the reference colour
    # nearest in chromaticity (colour over brightness).
    references = [c.color_rgb for c in AIRWAY_CLASSES] + [report.MERGED_RGB, report.NOT_MERGED_RGB]
    chroma = image / np.maximum(image.sum(axis=-1, keepdims=True), 1e-6)
    targets = np.array([np.asarray(rgb) / sum(rgb) for rgb in references])
    distance = np.linalg.norm(chroma[:, :, None, :] - targets, axis=-1)
    shaded = (image.sum(axis=-1) > 0.3) & (image.sum(axis=-1) < 2.9) & (distance.min(axis=-1) < 0.12)
    nearest = np.where(shaded, distance.argmin(axis=-1), -1)
    shares = [float(np.mean(nearest == n)) for n in range(len(references))]
    assert min(shares[:3]) > 0.005 and min(shares[3:]) > 0.0005, shares
    # Lit from the viewer: hardly any of the drawn surface is black (normals facing the wrong way).
    drawn = image.sum(axis=-1) < 2.9
    assert np.mean(image[drawn].sum(axis=-1) < 0.25) < 0.05

    # Seen from the front: the patient's right (LPS -x) on the image's left, the trachea above the breaks.
    marks = {break_id: (column, row) for break_id, column, row, _ in rendering.marks}
    positions = {b["id"]: b["position_lps_mm"] for b in case["breaks"]}
    assert sorted(marks, key=lambda i: marks[i][0]) == sorted(positions, key=lambda i: positions[i][0])
    assert all(0 <= column < size and 0 <= row < size for column, row in marks.values())
    trachea_rows = np.nonzero(nearest == 0)[0]
    assert trachea_rows.mean() < min(row for _, row in marks.values())


def test_display_view_puts_head_up_and_right_on_the_left():
    """Whatever the grid's axis order and signs, the re-ordered array is the same (S, P, L) array."""
    rng = np.random.default_rng(0)
    spl = rng.random((4, 5, 6))  # on an identity grid, z, y, x already are S, P, L
    identity = Volume(spl, Geometry((0.7, 0.8, 0.9)))
    view = report._spl_view(identity)
    np.testing.assert_array_equal(view.array(spl), spl)
    assert view.spacing_mm == (0.9, 0.8, 0.7)

    flipped = Volume(spl[::-1, :, ::-1].copy(), Geometry((0.7, 0.8, 0.9), direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1)))
    view = report._spl_view(flipped)
    np.testing.assert_array_equal(view.array(flipped.array_zyx), spl)
    assert view.index((0, 1, 0)) == (3, 1, 5)

    # Array axes (P, S, L): i runs left, j superior, k posterior.
    permuted_grid = Geometry((0.7, 0.9, 0.8), direction=(1, 0, 0, 0, 0, 1, 0, 1, 0))
    permuted = Volume(np.transpose(spl, (1, 0, 2)).copy(), permuted_grid)
    view = report._spl_view(permuted)
    np.testing.assert_array_equal(view.array(permuted.array_zyx), spl)
    assert view.spacing_mm == (0.9, 0.8, 0.7)

    turned = Volume(spl, Geometry((0.7, 0.8, 0.9), direction=OBLIQUE))  # snapped to the nearest axes
    np.testing.assert_array_equal(report._spl_view(turned).array(spl), spl[::-1])


@pytest.mark.parametrize("direction", [OBLIQUE, PERMUTED], ids=["oblique", "permuted"])
def test_other_grid_directions(direction, tmp_path):
    case = _case(direction)
    png_path, html_path = write_report(tmp_path, **case)
    assert imread(png_path).shape[:2] == (REPORT_SIZE_PX[1], REPORT_SIZE_PX[0])
    assert "<tr><th>breaks found</th><td>2</td></tr>" in html_path.read_text(encoding="utf-8")


def test_a_failing_rendering_falls_back_to_a_scatter(case, tmp_path, monkeypatch):
    def no_opengl(*args):
        raise RuntimeError("no OpenGL context for offscreen rendering")

    monkeypatch.setattr(report, "_render_tree_vtk", no_opengl)
    png_path, html_path = write_report(tmp_path, **case)
    page = html_path.read_text(encoding="utf-8")
    assert "fallback" in page and "no OpenGL context" in page
    panel = _panel_3d(imread(png_path)).reshape(-1, 3)
    assert len(np.unique(np.round(panel * 255), axis=0)) > 20


def test_without_breaks_or_centerlines(case, tmp_path):
    empty = {**case, "breaks": [], "centerlines": None, "summary": {}}
    _, html_path = write_report(tmp_path, **empty)
    page = html_path.read_text(encoding="utf-8")
    assert "No breaks found." in page and "<td>no centerlines</td>" in page
    assert "<tr><th>components before</th><td>3</td></tr>" in page  # counted: the two gaps cut the tree in 3


def test_dollar_signs_in_names_are_drawn_as_text(case, tmp_path):
    """A "$" in a file or model name is no mathtext: it failed to parse and stopped airway run."""
    title = r"Airway tree of a$\x$b.nii.gz"
    png_path, html_path = write_report(tmp_path, **{**case, "title": title, "summary": {"stage-1 model": r"x$_{\frac}$"}})
    assert imread(png_path).shape[:2] == (REPORT_SIZE_PX[1], REPORT_SIZE_PX[0])
    assert "a$\\x$b.nii.gz" in html_path.read_text(encoding="utf-8")


def test_empty_final_labels_still_give_a_report(case, tmp_path):
    empty = case["labels_after"].with_array(np.zeros_like(case["labels_after"].array_zyx))
    png_path, html_path = write_report(tmp_path, **{**case, "labels_after": empty, "centerlines": None})
    assert imread(png_path).shape[:2] == (REPORT_SIZE_PX[1], REPORT_SIZE_PX[0])
    page = html_path.read_text(encoding="utf-8")
    assert "The final labels are empty: there is no airway tree to show in 3-D." in page and "fallback" not in page
    assert "<tr><th>components after</th><td>0</td></tr>" in page


def test_an_error_while_writing_keeps_no_file(case, tmp_path, monkeypatch):
    def broken_page(*args):
        raise OSError("disk full")

    monkeypatch.setattr(report, "_html_page", broken_page)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, **case)
    assert list(tmp_path.iterdir()) == []


def test_inputs_are_checked(case, tmp_path):
    shifted = Volume(case["attention"].array_zyx, Geometry(SPACING_ZYX[::-1], (0.0, 0.0, 0.0), FEET_FIRST))
    with pytest.raises(AirwayInputError, match="attention"):
        write_report(tmp_path, **{**case, "attention": shifted})
    incomplete = [{k: v for k, v in case["breaks"][0].items() if k != "merged"}]
    with pytest.raises(AirwayInputError, match="lacks merged"):
        write_report(tmp_path, **{**case, "breaks": incomplete})
    outside = [{**case["breaks"][0], "index_zyx": [0, 0, 10_000]}]
    with pytest.raises(AirwayInputError, match="outside"):
        write_report(tmp_path, **{**case, "breaks": outside})
    assert list(tmp_path.iterdir()) == []


def test_a_break_whose_bridge_was_refused_says_so(case):
    record = {**case["breaks"][1], "rejected": "it would hang component 7 (lumen radius up to 5.0 mm) off an airway of radius 1.0 mm"}
    assert report._break_cells(record)[3] == "refused"
    assert report._break_cells(case["breaks"][1])[3] == "no"  # not bridged, nothing refused (older breaks.json: no key)
    assert report._break_cells({**record, "connected": True})[3] == "yes"  # a piece refused, the rest bridged
