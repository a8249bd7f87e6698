"""Stage 2: breaks found and bridged by a known network, merge of chosen breaks, outputs, training data, training."""

from __future__ import annotations

import json
import re

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from AirwayRefineLib import connect
from AirwayRefineLib.attention import blob_labels, breakage_attention, find_attention_blobs
from AirwayRefineLib.breakage import harvest_real_breaks, simulate_breakage
from AirwayRefineLib.connect import Break, BreakPrediction, find_breaks, merge_breaks
from AirwayRefineLib.connect_training import (
    CONNECTION_INPUT_SPEC,
    ConnectionPatches,
    ConnectionTask,
    lumen_oracle,
    real_examples,
    reconnection_metrics,
    simulated_examples,
)
from AirwayRefineLib.refine import REFINE_FILES, merge_selected, refine_ct, refine_file
from AirwaySegmentationLib.catalogue import catalogue, default_model_name
from AirwaySegmentationLib.cli import main
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.models import bundle_model, export_model
from AirwaySegmentationLib.networks import build_network
from AirwaySegmentationLib.segment import SegmentationModel, load_segmentation_model
from AirwaySegmentationLib.train import Runtime, train
from AirwaySegmentationLib.train_config import config_from_dict
from AirwaySegmentationLib.tree import parse_airway_tree
from AirwaySegmentationLib.volume import Geometry, Volume, read_volume, to_sitk
from conftest import broken_tube_arrays

FLOAT32 = InferenceSettings(device="cpu", precision="float32")
PATCH = (32, 32, 32)


def oracle() -> SegmentationModel:
    """The core's lumen oracle: breakage where the CT is below about -925 HU and the attention above 0.2."""
    return lumen_oracle(PATCH)


tube_case = broken_tube_arrays


def test_a_gap_in_a_lumen_is_bridged_and_a_false_positive_is_not():
    ct, labels, gap = tube_case()
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    assert prediction.components_before == 3
    bridged = [b for b in prediction.breaks if b.connected]
    assert len(bridged) == 1
    bridge = bridged[0]
    filled = np.zeros(ct.shape, dtype=bool)
    filled[tuple(bridge.bridge_zyx.T)] = True
    # Every bridge voxel is in the gap and the bridge spans it.
    assert not (filled & ~gap).any()
    assert filled[gap].all()
    assert bridge.gap_mm == pytest.approx(7.0)  # from x = 27 to x = 34
    assert bridge.point_zyx[:2] == (16, 12)  # on the lumen's axis, not its wall
    assert bridge.confidence > 0.95  # sigmoid(100 * min(0.25 - 0.143, ...))
    assert len(set(bridge.components)) == 2 and set(bridge.joined) == set(bridge.components)
    others = [b for b in prediction.breaks if not b.connected]
    assert others and all(b.confidence < 0.5 and len(b.bridge_zyx) == 0 for b in others)

    merged = merge_breaks(labels, prediction, (1.0, 1.0, 1.0))
    assert cc3d.connected_components(merged > 0, connectivity=26, return_N=True)[1] == 1
    # New voxels take the class of the nearest labelled voxel: 2 on the x < 31 side, 3 beyond.
    _, y, x = np.indices(ct.shape)
    assert (merged[gap & (x <= 29)] == 2).all() and (merged[gap & (x >= 32)] == 3).all()
    assert not merged[(labels == 3) & (y > 20)].any()  # the false-positive ball is gone
    assert (labels[gap] == 0).all()  # the input is not modified


def test_a_bridge_bulging_off_its_gap_keeps_the_lumen_tube_along_it(monkeypatch):
    # A thin tube (radius 2) with a 6-voxel gap beside a dark pocket (radius 5, centred 5
    # voxels off the axis): the oracle predicts gap and pocket in one piece.
    shape = (32, 32, 64)
    z, y, x = np.indices(shape)
    lumen = ((z - 16) ** 2 + (y - 16) ** 2 <= 4) & (x >= 4) & (x < 60)
    gap = lumen & (x >= 28) & (x < 34)
    pocket = (z - 16) ** 2 + (y - 21) ** 2 + (x - 30.5) ** 2 <= 25
    ct = np.where(lumen | pocket, -1000, -850).astype(np.int16)
    labels = (lumen & ~gap).astype(np.uint8)

    def bridge_mask() -> np.ndarray:
        (bridge,) = [b for b in find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32).breaks if b.connected]
        mask = np.zeros(shape, dtype=bool)
        mask[tuple(bridge.bridge_zyx.T)] = True
        return mask

    bulge = y >= 21  # 3 voxels and more beyond the lumen wall
    with monkeypatch.context() as patch:
        patch.setattr(connect, "_lumen_tube", lambda piece, *_: piece)  # the network's piece, untrimmed
        whole = bridge_mask()
    assert (whole & bulge).sum() > 20  # the network's bridge bulges off the gap...
    kept = bridge_mask()
    assert kept[gap].all() and not (kept & bulge).any()  # ...the kept one follows it
    assert kept.sum() < whole.sum() and kept[gap].sum() >= 0.5 * kept.sum()  # half lumen or more: not a false bridge
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    merged = merge_breaks(labels, prediction, (1.0, 1.0, 1.0))
    assert cc3d.connected_components(merged > 0, connectivity=26, return_N=True)[1] == 1


def test_a_bridge_across_a_noisy_lumen_keeps_the_lumen_width():
    """The lumen radius is that of the branch where the bridge meets it, not the one voxel between
    its cut face and the gap; with noise in the lumen the darkest path is one line of voxels, so
    a radius read at the face would keep that line alone."""
    ct, labels, gap = tube_case()
    noisy = ct + np.random.default_rng(0).integers(-20, 21, ct.shape)
    noisy = np.where(ct == -1000, np.minimum(noisy, -940), noisy).astype(np.int16)  # still lumen for the oracle
    (bridge,) = [b for b in find_breaks(noisy, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32).breaks if b.connected]
    kept = np.zeros(ct.shape, dtype=bool)
    kept[tuple(bridge.bridge_zyx.T)] = True
    assert kept[gap].sum() >= 0.6 * gap.sum() and not (kept & ~gap).any()


def test_a_bridge_across_a_thin_lumen_keeps_its_darkest_face_connected_path():
    # A lumen one voxel wide (-1000 HU) with a 5-voxel gap inside a darker-than-tissue sleeve
    # 3 x 3 voxels wide (-950 HU): the oracle predicts the whole sleeve, and every straight
    # line through it is a shortest path.  The lumen is off the sleeve's centre (y = 15 of 15-17).
    shape = (32, 32, 64)
    z, y, x = np.indices(shape)
    lumen = (z == 16) & (y == 15) & (x >= 4) & (x < 60)
    gap = lumen & (x >= 28) & (x < 33)
    sleeve = (abs(z - 16) <= 1) & (y >= 15) & (y <= 17) & (x >= 28) & (x < 33)
    ct = np.select([lumen, sleeve], [-1000, -950], -850).astype(np.int16)
    labels = (lumen & ~gap).astype(np.uint8)
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    (bridge,) = [b for b in prediction.breaks if b.connected]
    kept = np.zeros(shape, dtype=bool)
    kept[tuple(bridge.bridge_zyx.T)] = True
    assert np.array_equal(kept, gap)  # the darkest path, as wide as the lumen: not the sleeve
    merged = merge_breaks(labels, prediction, (1.0, 1.0, 1.0))
    assert np.array_equal(merged > 0, lumen)
    assert cc3d.connected_components(merged > 0, connectivity=6, return_N=True)[1] == 1


def test_a_diagonal_bridge_joins_its_pieces_face_to_face():
    # A thin lumen running diagonally in (y, x) as a staircase of face-connected voxels, its
    # gap inside a -950 HU sleeve that the oracle predicts whole: the bridge is the staircase
    # (face steps), so the tree is one piece at 6-connectivity too (the ATM'22 evaluation's),
    # which a diagonal line of voxels would not give.
    shape = (32, 64, 64)
    lumen = np.zeros(shape, dtype=bool)
    for k in range(6, 58):
        lumen[16, k, k] = lumen[16, k, k + 1] = True
    gap = lumen.copy()
    gap[:, :, :30] = False
    gap[:, :, 33:] = False
    sleeve = ndimage.binary_dilation(gap, np.ones((3, 3, 3), dtype=bool)) & ~lumen
    ct = np.select([lumen, sleeve], [-1000, -950], -850).astype(np.int16)
    labels = (lumen & ~gap).astype(np.uint8)
    assert cc3d.connected_components(labels > 0, connectivity=6, return_N=True)[1] == 2
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    (bridge,) = [b for b in prediction.breaks if b.connected]
    kept = np.zeros(shape, dtype=bool)
    kept[tuple(bridge.bridge_zyx.T)] = True
    assert np.array_equal(kept, gap)
    merged = merge_breaks(labels, prediction, (1.0, 1.0, 1.0))
    assert cc3d.connected_components(merged > 0, connectivity=6, return_N=True)[1] == 1


def test_each_bridge_belongs_to_the_break_of_its_own_gap():
    # Two 3-voxel gaps 10 voxels apart: two blobs, and each one's 32^3 patch sees both gaps.
    shape = (32, 32, 96)
    z, y, x = np.indices(shape)
    lumen = ((z - 16) ** 2 + (y - 16) ** 2 <= 4) & (x >= 4) & (x < 92)
    ct = np.where(lumen, -1000, -850).astype(np.int16)
    gaps = [lumen & (x >= 28) & (x < 31), lumen & (x >= 38) & (x < 41)]
    labels = (lumen & ~gaps[0] & ~gaps[1]).astype(np.uint8)
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    assert prediction.components_before == 3 and len(prediction.breaks) == 2
    for gap in gaps:
        # Exactly one break holds this gap's bridge, and nothing else.
        holding = [b for b in prediction.breaks if gap[tuple(b.bridge_zyx.T)].any()]
        assert len(holding) == 1
        bridge = np.zeros(shape, dtype=bool)
        bridge[tuple(holding[0].bridge_zyx.T)] = True
        assert np.array_equal(bridge, gap) and len(holding[0].joined) == 2
        assert gap[holding[0].point_zyx]  # the break's own gap point
    merged = merge_breaks(labels, prediction, (1.0, 1.0, 1.0))
    assert np.array_equal(merged > 0, lumen)


def widening_case(distal: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A wide airway (radius 4) narrowing to a thin branch (radius 1) with a 4-voxel gap, and
    beyond the gap a ``"tube"`` continuing the branch, a dark ``"blob"`` of radius 6, or a
    ``"chain"``: an 8-voxel piece of the branch, a second 4-voxel gap, then the blob.  CT,
    labels, the gap next to the tree and the piece beyond the last gap."""
    shape = (40, 40, 96)
    z, y, x = np.indices(shape)
    axis = (z - 20) ** 2 + (y - 20) ** 2
    wide = (axis <= 16) & (x >= 4) & (x < 30)
    branch = (axis <= 1) & (x >= 30) & (x < 70)
    gap = branch & (x >= 44) & (x < 48)
    fragment = np.zeros(shape, dtype=bool)
    if distal == "tube":
        piece = branch & (x >= 48)
    elif distal == "blob":
        piece = (branch & (x >= 48) & (x < 52)) | (axis + (x - 57) ** 2 <= 36)
    else:
        fragment = branch & (x >= 48) & (x < 56)
        piece = (branch & (x >= 60) & (x < 64)) | (axis + (x - 69) ** 2 <= 36)
    ct = np.where(wide | branch | piece, -1000, -850).astype(np.int16)
    labels = ((wide | branch) & (x < 44) | fragment | piece).astype(np.uint8)
    return ct, labels, gap, piece


@pytest.mark.parametrize("distal", ["tube", "blob", "chain"])
def test_a_bridge_that_would_hang_a_region_wider_than_its_airway_is_refused(distal):
    ct, labels, gap, piece = widening_case(distal)
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    merged = merge_breaks(labels, prediction, (1.0, 1.0, 1.0))
    if distal == "chain":  # the first gap is bridged (the fragment is a branch), the blob beyond it is not
        first = next(b for b in prediction.breaks if gap[tuple(b.bridge_zyx.T)].any())
        assert first.connected and not first.rejected
        (only,) = [b for b in prediction.breaks if b is not first]
    else:
        (only,) = prediction.breaks
    if distal == "tube":  # a branch as wide as the one it leaves: bridged
        assert only.connected and not only.rejected and gap[tuple(only.bridge_zyx.T)].all()
        assert merged[piece].all()
    else:  # a region of radius 6 off a branch of radius 1: refused, and dropped with the largest component
        assert not only.connected and len(only.bridge_zyx) == 0 and only.joined == ()
        # Radii are distance-transform maxima: to the nearest voxel centre outside.
        assert re.search(r"radius up to 6\.\d mm\) off an airway of radius 1\.\d mm", only.rejected)
        assert only.confidence > 0.95  # the network's bridge was there
        assert not merged[piece].any() and merged[gap].all() == (distal == "chain")
        assert only.record(Geometry())["rejected"] == only.rejected
        with pytest.raises(AirwayInputError, match=f"Break {only.id}'s bridge was refused \\(it would hang component"):
            merge_breaks(labels, prediction, (1.0, 1.0, 1.0), break_ids=[only.id])


def test_a_bridge_along_the_wall_of_a_wide_airway_is_measured_against_the_airway():
    # A wide airway (radius 6) cut by a 4-voxel gap in which only a channel one voxel wide
    # beside the wall is dark: the bridge touches the airway where its distance transform is
    # 1 voxel, yet it leaves an airway of radius 6 and may hang the other half (radius 6) on it.
    shape = (40, 40, 80)
    z, y, x = np.indices(shape)
    lumen = ((z - 20) ** 2 + (y - 20) ** 2 <= 36) & (x >= 4) & (x < 76)
    gap = lumen & (x >= 40) & (x < 44)
    channel = gap & (z == 20) & (y == 25)
    ct = np.where(lumen & ~gap | channel, -1000, -850).astype(np.int16)
    labels = (lumen & ~gap).astype(np.uint8)
    (only,) = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32).breaks
    assert only.connected and not only.rejected
    bridge = np.zeros(shape, dtype=bool)
    bridge[tuple(only.bridge_zyx.T)] = True
    assert np.array_equal(bridge, channel)
    touching = ndimage.binary_dilation(bridge, np.ones((3, 3, 3), dtype=bool)) & (labels > 0)
    assert ndimage.distance_transform_edt(labels > 0)[touching].max() < 2  # the contact is at the wall


def test_a_break_across_a_trachea_wider_than_the_measuring_reach_is_bridged():
    # A lumen of radius 10 mm cut by a 4 mm gap: the airway the bridge leaves is measured up to
    # RADIUS_REACH_MM (6 mm), so the piece beyond (10 mm) is within twice that.
    shape = (32, 32, 72)
    z, y, x = np.indices(shape)
    lumen = ((z - 16) ** 2 + (y - 16) ** 2 <= 100) & (x >= 4) & (x < 68)
    gap = lumen & (x >= 40) & (x < 44)
    ct = np.where(lumen, -1000, -850).astype(np.int16)
    labels = (lumen & ~gap).astype(np.uint8)
    (only,) = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32).breaks
    assert only.connected and not only.rejected


def test_a_region_bridged_to_a_stray_fragment_never_replaces_the_tree():
    """Bridges the tree never reaches are not judged by the widening guard; what they join may
    outgrow the tree, but the merge keeps the tree."""
    shape = (28, 60, 100)
    z, y, x = np.indices(shape)
    tree = ((z - 14) ** 2 + (y - 10) ** 2 <= 16) & (x >= 2) & (x < 62)  # radius 4
    fragment = ((z - 14) ** 2 + (y - 40) ** 2 <= 4) & (x >= 2) & (x < 72)  # radius 2, apart from the tree
    gap = ((z - 14) ** 2 + (y - 40) ** 2 <= 4) & (x >= 72) & (x < 76)
    region = (z - 14) ** 2 + (y - 40) ** 2 + (x - 84) ** 2 <= 64  # radius 8, beyond the gap
    ct = np.where(tree | fragment | gap | region, -1000, -850).astype(np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[tree], labels[fragment], labels[region & ~gap] = 1, 2, 3
    assert (fragment | region).sum() > tree.sum()
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    assert any(b.connected and not b.rejected for b in prediction.breaks)  # the fragment's bridge to the region
    refined, merged_ids, components = merge_selected(Volume(labels, Geometry()), prediction, "all")
    np.testing.assert_array_equal(refined.array_zyx > 0, tree)
    assert merged_ids == [] and components == 2
    np.testing.assert_array_equal(merge_breaks(labels, prediction, (1.0, 1.0, 1.0)) > 0, tree)


def test_the_widening_guard_does_not_depend_on_the_order_of_the_breaks():
    # A tree whose wide part (radius 4) narrows to a thin branch (radius 1), and a region W of
    # radius 6 that a bridge reaches from each part: the thin one is refused whichever comes
    # first (judged before the wide one has hung W on the tree).
    shape = (40, 40, 64)
    z, y, x = np.indices(shape)
    axis = (z - 20) ** 2 + (y - 20) ** 2
    components = np.zeros(shape, dtype=np.uint32)
    components[((axis <= 16) & (x >= 4) & (x < 30)) | ((axis <= 1) & (x >= 30) & (x < 60))] = 1
    components[(z - 20) ** 2 + (y - 33) ** 2 + (x - 45) ** 2 <= 36] = 2
    plane = z == 20
    thin_voxels = np.argwhere(plane & (x == 45) & (y >= 22) & (y <= 26))
    wide_voxels = np.argwhere(plane & (((x == 25) & (y >= 25) & (y <= 30)) | ((y == 30) & (x >= 25) & (x <= 39))))
    thin = connect._Bridge(thin_voxels, np.ones(len(thin_voxels)), {1, 2})
    wide = connect._Bridge(wide_voxels, np.ones(len(wide_voxels)), {1, 2})
    statistics = cc3d.statistics(components)
    outcomes = []
    for order in ([thin, wide], [wide, thin]):
        owned, reasons = connect._refuse_widening([[b] for b in order], components, statistics, 1, (1.0, 1.0, 1.0))
        outcomes.append({("thin" if b is thin else "wide"): (bool(kept), reason) for b, kept, reason in zip(order, owned, reasons)})
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["wide"] == (True, "") and not outcomes[0]["thin"][0]
    assert re.search(r"radius up to 6\.\d mm\) off an airway of radius 1\.\d mm", outcomes[0]["thin"][1])


def test_merging_a_chosen_subset_and_refusing_impossible_choices():
    ct, labels, gap = tube_case()
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    bridged = next(b for b in prediction.breaks if b.connected)
    unbridged = next(b for b in prediction.breaks if not b.connected)
    none = merge_breaks(labels, prediction, (1.0, 1.0, 1.0), break_ids=[])
    assert not none[gap].any()
    _, y, _ = np.indices(ct.shape)
    assert np.array_equal(none > 0, (labels == 3) & (y < 20))  # the largest piece only (x >= 34 is longer)
    chosen = merge_breaks(labels, prediction, (1.0, 1.0, 1.0), break_ids=[bridged.id], keep_tree=False)
    assert chosen[gap].all() and (chosen[labels > 0] == labels[labels > 0]).all()
    with pytest.raises(AirwayInputError, match=f"Break {unbridged.id} has no predicted bridge"):
        merge_breaks(labels, prediction, (1.0, 1.0, 1.0), break_ids=[unbridged.id])
    with pytest.raises(AirwayInputError, match="There is no break 99"):
        merge_breaks(labels, prediction, (1.0, 1.0, 1.0), break_ids=[99])


def test_one_component_has_no_breaks():
    ct, labels, gap = tube_case()
    labels = labels.copy()
    labels[gap] = 2
    labels[labels == 3] = 0
    labels[:, :, 34:][ct[:, :, 34:] == -1000] = 3
    prediction = find_breaks(ct, labels, (1.0, 1.0, 1.0), oracle(), FLOAT32)
    assert prediction.components_before == 1 and prediction.breaks == []
    assert not prediction.attention_zyx.any()
    with pytest.raises(AirwayInputError, match="There is no break 1; these labels have no breaks"):
        merge_breaks(labels, prediction, (1.0, 1.0, 1.0), break_ids=[1])


def test_blob_labels_name_each_blob():
    _, labels, _ = tube_case()
    attention = breakage_attention(labels > 0, (1.0, 1.0, 1.0))
    blobs = find_attention_blobs(attention)
    numbered, count = blob_labels(attention)
    assert count == len(blobs)
    for blob in blobs:
        assert (numbered == blob.label).sum() == blob.size_voxels


def oblique_geometry() -> Geometry:
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0)
    return Geometry(spacing_xyz=(0.9, 0.8, 1.1), origin_xyz=(-120.0, 35.5, 210.0), direction=direction)


def test_refine_ct_keeps_geometry_and_records_breaks_in_lps():
    ct, labels, gap = tube_case()
    geometry = oblique_geometry()
    result = refine_ct(Volume(ct, geometry), Volume(labels, geometry), oracle(), FLOAT32)
    assert result.labels.geometry == geometry and result.attention.geometry == geometry
    assert result.components_after == 2  # the tube joined, the false-positive ball apart
    document = result.breaks_document()
    assert document["found"] == len(result.prediction.breaks) and document["merged"] == result.merged_ids
    for record, found in zip(document["breaks"], result.prediction.breaks):
        expected = geometry.index_zyx_to_physical(np.asarray([found.point_zyx], dtype=float))[0]
        assert record["position_lps_mm"] == pytest.approx(expected, abs=1e-3)
        assert record["merged"] == (found.id in result.merged_ids) == found.connected
    json.dumps(document)
    relabelled, merged_ids, components = merge_selected(Volume(labels, geometry), result.prediction, "none")
    assert merged_ids == [] and components == 3 and not relabelled.array_zyx[gap].any()


@pytest.fixture(scope="module")
def connection_model(tmp_path_factory):
    """A loadable connection network (base width 2, seeded random weights) with a connection card."""
    torch.manual_seed(0)
    card = {
        "architecture": {"name": "unet", "kwargs": {"base_width": 2, "depth": 2}},
        "input_spec": CONNECTION_INPUT_SPEC.as_dict(),
        "patch_size_zyx": [32, 32, 32],
        "task": "connection",
        "attention": {"alpha_mm": 5.0},
    }
    weights, _ = export_model(build_network("unet", base_width=2, depth=2), card, tmp_path_factory.mktemp("connection") / "conn")
    return weights


def test_refine_file_writes_all_outputs_in_the_ct_geometry(tmp_path, connection_model):
    ct, labels, _ = tube_case()
    geometry = oblique_geometry()
    sitk.WriteImage(to_sitk(Volume(ct, geometry)), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(to_sitk(Volume(labels, geometry)), str(tmp_path / "labels.nii.gz"))
    before = (tmp_path / "labels.nii.gz").read_bytes()
    out = tmp_path / "out"
    code = main(["refine", "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                 "--out", str(out), "--model", str(connection_model), "--device", "cpu", "--precision", "float32"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(REFINE_FILES)
    for name in ("labels.nii.gz", "attention.nii.gz"):
        written = read_volume(out / name)
        assert written.array_zyx.shape == ct.shape
        assert np.allclose(written.geometry.ijk_to_lps, geometry.ijk_to_lps, atol=1e-4)
    document = json.loads((out / "breaks.json").read_text())
    assert document["components_before"] == 3 and document["format"] == "airway-breaks"
    assert (tmp_path / "labels.nii.gz").read_bytes() == before


def test_refine_refuses_labels_of_another_grid_and_segmentation_models(tmp_path, connection_model, tiny_model, capsys):
    ct, labels, _ = tube_case()
    sitk.WriteImage(to_sitk(Volume(ct, oblique_geometry())), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(to_sitk(Volume(labels[:, :, :60].copy(), oblique_geometry())), str(tmp_path / "labels.nii.gz"))
    code = main(["refine", "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                 "--out", str(tmp_path / "out"), "--model", str(connection_model)])
    assert code == 2 and not (tmp_path / "out" / "breaks.json").exists()
    with pytest.raises(AirwayInputError, match="segmentation model, not a connection model"):
        refine_file(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", tmp_path / "out", str(tiny_model))
    with pytest.raises(AirwayInputError, match="connection model, not a segmentation model"):
        load_segmentation_model(str(connection_model))
    code = main(["refine", "--ct", "x", "--labels", "y", "--out", str(tmp_path), "--connect", "1,a"])
    assert code == 2 and "--connect takes" in capsys.readouterr().err
    # Refining into the folder that holds the stage-1 labels would replace them: refused, untouched.
    sitk.WriteImage(to_sitk(Volume(labels, oblique_geometry())), str(tmp_path / "labels.nii.gz"))
    before = (tmp_path / "labels.nii.gz").read_bytes()
    code = main(["refine", "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                 "--out", str(tmp_path), "--model", str(connection_model)])
    assert code == 2 and "is an input of this command" in capsys.readouterr().err
    assert (tmp_path / "labels.nii.gz").read_bytes() == before and not (tmp_path / "breaks.json").exists()


def test_the_catalogue_keeps_one_default_per_task(tmp_path, connection_model, tiny_model):
    bundle_model(tiny_model, "stage1", "tiny stage 1", default=True, models_dir=tmp_path)
    bundle_model(connection_model, "stage2", "tiny stage 2", default=True, models_dir=tmp_path)
    assert default_model_name(tmp_path) == "stage1"
    assert default_model_name(tmp_path, task="connection") == "stage2"
    assert [e["name"] for e in catalogue(tmp_path, "segmentation")] == ["stage1"]
    assert [e["default"] for e in catalogue(tmp_path)] == [True, True]


# ---------------------------------------------------------------- training data and metrics


def phantom_volume():
    from AirwaySegmentationLib.data import phantom_training_volume

    return phantom_training_volume(11, "standard", (64, 96, 96), (1.6, 1.4, 1.4), 10.0)


@pytest.fixture(scope="module")
def phantom():
    volume = phantom_volume()
    return volume, parse_airway_tree(volume.labels3 > 0, volume.spacing_zyx, connectivity=26)


def connection_config(**changes):
    table = {
        "seed": 5,
        "task": "connection",
        "network": {"name": "unet", "kwargs": {"base_width": 2, "depth": 2}},
        "data": {"phantoms": {"train": 1, "validation": 1, "shape_zyx": [64, 96, 96], "spacing_zyx": [1.6, 1.4, 1.4]}},
        "connection": {"real_breaks_model": "none", "real_break_share": 0.0, "max_shift_zyx": [0, 0, 0]},
        "sampling": {"patch_size_zyx": [32, 32, 32], "batch_size": 2, "hard_mining_every": 0, "augmentation": False},
        "schedule": {"epochs": 1, "iterations_per_epoch": 2},
        "loss": {"name": "dice_ce", "group_supervision": False, "distillation_weight": 0.0},
        "validation": {"overlap_zyx": [8, 8, 8]},
        "runtime": {"precision": "float32"},
    }
    for key, values in changes.items():
        table[key] = {**table[key], **values} if isinstance(values, dict) else values
    return config_from_dict(table)


def test_training_patches_are_the_target_around_a_blob(phantom):
    volume, tree = phantom
    config = connection_config()
    dataset = ConnectionPatches([volume], [tree], [None], config, CONNECTION_INPUT_SPEC, seed=1)
    dataset.set_epoch(0)
    items = list(dataset)
    assert len(items) == 4
    examples = dataset._simulation(0)
    centres = {blob.centre_zyx for blob in examples.blobs}
    for item in items:
        assert item["image"].shape == (2, 32, 32, 32) and item["labels"].dtype == torch.int64
        assert set(torch.unique(item["labels"]).tolist()) <= {0, 1}
    # Without shift or flips the patch is the crop of the target at one blob's centre.
    from AirwayRefineLib.connect import crop_padded

    crops = [crop_padded(examples.target_zyx, c, (32, 32, 32), False) for c in centres]
    assert all(any(np.array_equal(item["labels"].numpy(), crop) for crop in crops) for item in items)
    again = ConnectionPatches([volume], [tree], [None], config, CONNECTION_INPUT_SPEC, seed=1)
    again.set_epoch(0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(items, again))


def test_break_centres_add_a_patch_centre_at_every_simulated_break(phantom):
    volume, tree = phantom
    plain = connection_config().connection
    centred = connection_config(connection={"break_centres": True}).connection
    examples, simulation = simulated_examples(volume, tree, np.random.default_rng(3), plain)
    more, again = simulated_examples(volume, tree, np.random.default_rng(3), centred)
    assert len(simulation.breaks) >= 2 and np.array_equal(again.target_zyx, simulation.target_zyx)
    assert [b.centre_zyx for b in more.blobs] == [b.centre_zyx for b in examples.blobs] + [b.centre_zyx for b in simulation.breaks]
    assert all(simulation.target_zyx[b.centre_zyx] for b in simulation.breaks)  # the patch centre is in the gap


def test_reconnection_metrics_of_a_perfect_and_a_wrong_bridge(phantom):
    volume, tree = phantom
    simulation = simulate_breakage(volume.labels3, volume.spacing_zyx, np.random.default_rng(4), tree=tree)
    assert simulation.breaks
    attention = breakage_attention(simulation.broken_zyx > 0, volume.spacing_zyx)
    n = cc3d.connected_components(simulation.broken_zyx > 0, connectivity=26, return_N=True)[1]
    perfect = Break(1, (0, 0, 0), 1.0, (1, 2), (1, 1), 1.0, True, (1, 2), np.argwhere(simulation.target_zyx))
    prediction = BreakPrediction(attention, n, [perfect])
    metrics = reconnection_metrics(simulation, tree, prediction, volume.labels3)
    assert metrics["reconnected"] == 100.0 and metrics["false_bridges"] == 0.0 and metrics["single_component"] == 100.0
    assert metrics["bridges_without_truth"] == 0.0
    outside = np.argwhere(volume.labels3 == 0)[:50]
    wrong = BreakPrediction(attention, n, [Break(1, (0, 0, 0), 1.0, (1, 2), (1, 1), 1.0, True, (1, 2), outside)])
    metrics = reconnection_metrics(simulation, tree, wrong, volume.labels3)
    assert metrics["reconnected"] == 0.0 and metrics["false_bridges"] == 100.0 and metrics["single_component"] == 0.0
    assert metrics["bridges_without_truth"] == 100.0
    # A bridge through the true gap but three times as wide: false by share, not without truth.
    target = np.argwhere(simulation.target_zyx)
    wide = BreakPrediction(attention, n, [Break(1, (0, 0, 0), 1.0, (1, 2), (1, 1), 1.0, True, (1, 2),
                                                np.concatenate([target, np.argwhere(volume.labels3 == 0)[: 2 * len(target)]]))])
    metrics = reconnection_metrics(simulation, tree, wide, volume.labels3)
    assert metrics["false_bridges"] == 100.0 and metrics["bridges_without_truth"] == 0.0


def test_connection_training_runs_in_the_shared_loop_and_exports_a_connection_model(tmp_path, tiny_model):
    config = connection_config(connection={"real_breaks_model": str(tiny_model), "real_break_share": 0.5})
    result = train(config, tmp_path, task=ConnectionTask())
    card = json.loads((tmp_path / "best.json").read_text())
    assert card["task"] == "connection" and card["input_spec"]["windows"] == []
    assert card["attention"]["alpha_mm"] == 5.0 and card["patch_size_zyx"] == [32, 32, 32]
    assert result.best_score == pytest.approx(card["validation"]["score"])
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert {"reconnected", "false_bridges", "single_component", "score"} <= set(header)
    loaded = load_segmentation_model(str(tmp_path / "best.safetensors"), task="connection")
    assert loaded.spec.n_channels == 1


def test_trees_and_real_breaks_loaded_in_several_processes_are_the_same():
    def loaded(workers):
        config = connection_config(
            data={"load_workers": workers, "phantoms": {"train": 2, "validation": 0, "shape_zyx": [64, 96, 96], "spacing_zyx": [1.6, 1.4, 1.4]}},
            connection={"real_breaks_model": "default", "real_break_share": 0.5},
        )
        task = ConnectionTask()
        task.load(config, Runtime(torch.device("cpu"), torch.float32, 0, 1, False), None)
        return task

    serial, parallel = loaded(1), loaded(2)
    assert sum(len(examples.blobs) for examples in serial.real) > 0  # the stage-1 model left breaks to harvest
    for one, other in zip(serial.trees, parallel.trees, strict=True):
        assert np.array_equal(one.branch_labels_zyx, other.branch_labels_zyx) and len(one.branches) == len(other.branches)
    for one, other in zip(serial.real, parallel.real, strict=True):
        assert one.blobs == other.blobs
        for name in ("attention_zyx", "target_zyx", "known_zyx"):
            assert np.array_equal(getattr(one, name), getattr(other, name))


def test_connection_configs_are_checked():
    with pytest.raises(AirwayInputError, match="hard_mining_every"):
        connection_config(sampling={"hard_mining_every": 2})
    with pytest.raises(AirwayInputError, match="loss.name"):
        connection_config(loss={"name": "deeptree"})
    with pytest.raises(AirwayInputError, match="2 input and 2 output channels"):
        connection_config(network={"name": "unet", "kwargs": {"base_width": 2, "depth": 2, "out_channels": 4}})
    with pytest.raises(AirwayInputError, match="task"):
        connection_config(task="stage3")


# ---------------------------------------------------------------- the whole pipeline


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    from AirwaySegmentationLib.phantom import generate_phantom, write_phantom

    phantom = generate_phantom(21, (64, 96, 96), spacing_zyx=(1.6, 1.4, 1.4), variant="standard")
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"))["ct"]


def test_airway_run_writes_every_step_and_keeps_the_ct_geometry(tmp_path, small_ct, tiny_model, connection_model):
    from AirwayRefineLib.pipeline import REPORT_FILES, RUN_FILE, STAGE1_FILE

    out = tmp_path / "run"
    code = main(["run", "--in", str(small_ct), "--out", str(out), "--model", str(tiny_model),
                 "--connection-model", str(connection_model), "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / RUN_FILE).read_text())
    assert set(summary["outputs"]) == {p.name for p in out.iterdir()}
    assert {STAGE1_FILE, *REFINE_FILES, *REPORT_FILES, RUN_FILE} <= set(summary["outputs"])
    # The report can be drawn again from the folder alone.
    first = (out / "report.html").stat().st_mtime_ns
    assert main(["report", "--run", str(out)]) == 0
    assert (out / "report.html").stat().st_mtime_ns >= first and (out / "report.png").stat().st_size > 0
    assert main(["report", "--run", str(tmp_path)]) == 2
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in summary["outputs"]:
        (damaged / name).write_bytes((out / name).read_bytes())
    (damaged / "breaks.json").write_text('{"breaks_x": []}')
    assert main(["report", "--run", str(damaged)]) == 2
    (damaged / RUN_FILE).write_text("{")
    assert main(["report", "--run", str(damaged)]) == 2
    assert set(summary["timings_s"]) >= {"read", "stage1", "stage2", "centerlines", "total"}
    reference = read_volume(small_ct)
    for name in (STAGE1_FILE, "labels.nii.gz", "attention.nii.gz"):
        written = read_volume(out / name)
        assert written.array_zyx.shape == reference.array_zyx.shape
        assert np.allclose(written.geometry.ijk_to_lps, reference.geometry.ijk_to_lps)
    stage1 = read_volume(out / STAGE1_FILE).array_zyx
    assert summary["components_before"] == cc3d.connected_components(stage1 > 0, connectivity=26, return_N=True)[1]


def test_a_failing_stage_keeps_the_earlier_outputs(tmp_path, small_ct, tiny_model, connection_model, monkeypatch):
    from AirwayRefineLib import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("stage 2 failed")

    monkeypatch.setattr(pipeline, "refine_ct", broken)
    with pytest.raises(RuntimeError, match="stage 2 failed"):
        pipeline.run_pipeline(small_ct, tmp_path, model=str(tiny_model), connection_model=str(connection_model),
                              settings=FLOAT32, make_report=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [pipeline.STAGE1_FILE]


def test_an_airway_too_small_for_centerlines_finishes_the_run_without_them(
    tmp_path, small_ct, tiny_model, connection_model, monkeypatch
):
    from AirwayRefineLib import pipeline
    from AirwayRefineLib.centerline import CENTERLINE_FILES, extract_centerlines

    def on_a_speck(mask_zyx, geometry, **kwargs):  # the real extraction, on an airway that thins to one voxel
        speck = np.zeros(mask_zyx.shape, dtype=bool)
        speck[3:5, 3:5, 3:5] = True
        return extract_centerlines(speck, geometry)

    monkeypatch.setattr(pipeline, "extract_centerlines", on_a_speck)
    result = pipeline.run_pipeline(small_ct, tmp_path, model=str(tiny_model), connection_model=str(connection_model),
                                   settings=FLOAT32, make_report=False)
    assert result.summary["centerlines"].startswith("skipped: The airway is too small for centerlines")
    assert result.summary["branches"] == 0 and not set(CENTERLINE_FILES) & {p.name for p in tmp_path.iterdir()}


def test_airway_run_refuses_a_connection_model_as_stage_1_before_reading(tmp_path, connection_model, capsys):
    code = main(["run", "--in", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "out"),
                 "--model", str(connection_model)])
    assert code == 2 and "not a segmentation model" in capsys.readouterr().err


def test_the_loss_mask_leaves_masked_voxels_out():
    from AirwaySegmentationLib.losses import DiceFocalLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, 6)
    target = (torch.rand(2, 6, 6, 6) > 0.7).long()
    mask = (torch.rand(2, 6, 6, 6) > 0.5).float()
    loss = DiceFocalLoss(gamma=0.0, eps=1e-5)
    assert loss(logits, target, torch.ones_like(mask)) == pytest.approx(float(loss(logits, target)))
    out = (mask == 0)[:, None].expand_as(logits)
    changed = torch.where(out, torch.randn_like(logits), logits)  # only masked-out voxels change
    changed_target = target.clone()
    changed_target[mask == 0] = 1 - changed_target[mask == 0]
    assert loss(changed, changed_target, mask) == pytest.approx(float(loss(logits, target, mask)))


def test_training_patches_mask_the_broken_label_out_of_the_loss(phantom):
    volume, tree = phantom
    dataset = ConnectionPatches([volume], [tree], [None], connection_config(), CONNECTION_INPUT_SPEC, seed=2)
    dataset.set_epoch(0)
    examples = dataset._simulation(0)
    from AirwayRefineLib.connect import crop_padded

    for item in dataset:
        crops = [crop_padded(examples.known_zyx, blob.centre_zyx, (32, 32, 32), False) for blob in examples.blobs]
        assert any(np.array_equal(item["loss_mask"].numpy() == 0, crop) for crop in crops)
        assert not (item["labels"].numpy().astype(bool) & (item["loss_mask"].numpy() == 0)).any()


def test_a_bridge_between_pieces_outside_the_tree_is_not_reported_merged():
    labels = np.zeros((8, 8, 40), dtype=np.uint8)
    labels[2:5, 2:5, 0:20] = 1  # the tree
    labels[2:5, 2:5, 25:29] = 3  # two small pieces with a one-voxel gap at x = 29
    labels[2:5, 2:5, 30:34] = 3
    bridge = np.array([[3, 3, 29]])  # the gap's middle voxel joins the two small pieces
    joined = Break(1, (3, 3, 29), 2.0, (2, 3), (36, 48), 0.9, True, (2, 3), bridge)
    prediction = BreakPrediction(np.zeros(labels.shape, np.float32), 3, [joined])
    geometry = Geometry()
    refined, merged_ids, components = merge_selected(Volume(labels, geometry), prediction, [1, 1])
    assert merged_ids == [] and components == 2
    assert np.array_equal(refined.array_zyx > 0, labels == 1)


def test_real_break_centres_add_a_patch_centre_at_every_real_break(phantom):
    volume, tree = phantom
    simulation = simulate_breakage(volume.labels3, volume.spacing_zyx, np.random.default_rng(6), tree=tree)
    predicted = simulation.broken_zyx  # a "stage-1 output" with known real breaks
    plain = real_examples(volume, predicted, connection_config().connection)
    centred = real_examples(volume, predicted, connection_config(connection={"real_break_centres": True}).connection)
    harvested = harvest_real_breaks(predicted, volume.labels3 > 0, volume.spacing_zyx)
    assert len(harvested.breaks) >= 2 and np.array_equal(centred.target_zyx, plain.target_zyx)
    assert [b.centre_zyx for b in centred.blobs] == [b.centre_zyx for b in plain.blobs] + [b.centre_zyx for b in harvested.breaks]
    assert all(centred.target_zyx[b.centre_zyx] for b in harvested.breaks)  # the patch centre is in the gap
