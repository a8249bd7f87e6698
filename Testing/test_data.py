"""Tests of the training data: dataset folders, chest crop, input channels, patch sampling.

Small phantoms and synthetic arrays only, so the file runs in well under a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from AirwaySegmentationLib.data import (
    PHANTOM_SPLITS,
    find_cases,
    load_case,
    phantom_seeds,
    phantom_training_volume,
    three_class_labels,
)
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.phantom import generate_phantom
from AirwaySegmentationLib.preprocess import (
    InputSpec,
    crop_to_body,
    crop_volume,
    inside_body,
    network_input,
)
from AirwaySegmentationLib.sampling import (
    PAD_HU,
    Augmentation,
    CropMix,
    PatchDataset,
    PatchSampler,
    sampling_targets,
    with_miss_mask,
)
from AirwaySegmentationLib.segfile import write_segmentation
from AirwaySegmentationLib.volume import Geometry, Volume, write_volume
from torch.utils.data import DataLoader

SMALL = {"shape_zyx": (64, 96, 96), "spacing_zyx": (2.5, 2.0, 2.0)}
NO_CHANGE = Augmentation(
    flip_axes=(), max_rotation_deg=0.0, scale_range=(1.0, 1.0), hu_scale_range=(1.0, 1.0), max_hu_shift=0.0,
    max_noise_sd_hu=0.0,
)


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(seed=1, **SMALL)


@pytest.fixture(scope="module")
def volume(phantom):
    return phantom_training_volume(1, "standard", **SMALL)


@pytest.fixture(scope="module")
def targets(volume):
    return sampling_targets(volume.labels3, volume.spacing_zyx)


def _write_case(root, name, ct: Volume, labels: Volume, label_ending=".nii.gz"):
    write_volume(ct, root / "imagesTr" / f"{name}_0000.nii.gz")
    path = root / "labelsTr" / f"{name}{label_ending}"
    if label_ending == ".seg.nrrd":
        write_segmentation(labels, path)
    else:
        write_volume(labels, path)


def _tiny_case(root, name, label_ending=".nii.gz", label_spacing_xyz=(1.0, 1.0, 1.0)):
    ct = np.full((6, 7, 8), -1000, dtype=np.int16)
    ct[2:4] = 40
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[2:4, 3, 3] = 1
    _write_case(root, name, Volume(ct, Geometry()), Volume(labels, Geometry(label_spacing_xyz)), label_ending)


# ------------------------------------------------------------------------------ dataset folders


def test_find_cases_pairs_images_and_labels_of_every_format(tmp_path):
    _tiny_case(tmp_path, "ATM_002")
    _tiny_case(tmp_path, "ATM_001", ".nrrd")
    _tiny_case(tmp_path, "ATM_003", ".seg.nrrd")
    (tmp_path / "imagesTr" / "README.txt").write_text("not an image")
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["ATM_001", "ATM_002", "ATM_003"]
    assert [c.label_path.name for c in cases] == ["ATM_001.nrrd", "ATM_002.nii.gz", "ATM_003.seg.nrrd"]
    assert all(c.image_path.name == f"{c.name}_0000.nii.gz" for c in cases)


def test_find_cases_says_which_folder_is_missing(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(AirwayInputError, match="labelsTr is not a folder"):
        find_cases(tmp_path)


def test_find_cases_lists_images_without_labels_and_labels_without_images(tmp_path):
    _tiny_case(tmp_path, "A")
    _tiny_case(tmp_path, "B")
    _tiny_case(tmp_path, "C")
    (tmp_path / "labelsTr" / "B.nii.gz").unlink()
    (tmp_path / "labelsTr" / "C.nii.gz").unlink()
    with pytest.raises(AirwayInputError, match=r"2 images have no label .*\(B, C\)"):
        find_cases(tmp_path)
    (tmp_path / "imagesTr" / "B_0000.nii.gz").unlink()
    (tmp_path / "imagesTr" / "C_0000.nii.gz").unlink()
    (tmp_path / "labelsTr" / "Z.nii.gz").write_bytes((tmp_path / "labelsTr" / "A.nii.gz").read_bytes())
    with pytest.raises(AirwayInputError, match=r"1 labels have no image .*\(Z\)"):
        find_cases(tmp_path)


def test_find_cases_refuses_other_channels_and_duplicate_labels(tmp_path):
    _tiny_case(tmp_path, "A")
    (tmp_path / "labelsTr" / "A.nrrd").write_bytes(b"")
    with pytest.raises(AirwayInputError, match="two files for A"):
        find_cases(tmp_path)
    (tmp_path / "labelsTr" / "A.nrrd").unlink()
    (tmp_path / "imagesTr" / "A_0001.nii.gz").write_bytes(b"")
    with pytest.raises(AirwayInputError, match="not named NAME_0000 .*A_0001"):
        find_cases(tmp_path)


def test_find_cases_reads_the_atm22_release_naming_and_its_batches(tmp_path):
    # The release names each label like its image (labelsTr/ATM_001_0000.nii.gz) and ships
    # the cases in batch folders; nnU-Net style labels (ATM_164.nii.gz) mix in freely.
    _tiny_case(tmp_path / "TrainBatch1", "ATM_001", "_0000.nii.gz")
    _tiny_case(tmp_path / "TrainBatch1", "ATM_002", "_0000.nii.gz")
    _tiny_case(tmp_path / "TrainBatch2", "ATM_164")
    (tmp_path / "README.md").write_text("not a batch")
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["ATM_001", "ATM_002", "ATM_164"]
    assert [c.label_path.name for c in cases] == ["ATM_001_0000.nii.gz", "ATM_002_0000.nii.gz", "ATM_164.nii.gz"]
    assert [c.name for c in find_cases(tmp_path / "TrainBatch1")] == ["ATM_001", "ATM_002"]
    assert load_case(cases[0]).labels3.any()
    # The same label under both names is ambiguous, and so is a case in two batches.
    labels = tmp_path / "TrainBatch1" / "labelsTr"
    (labels / "ATM_001.nii.gz").write_bytes((labels / "ATM_001_0000.nii.gz").read_bytes())
    with pytest.raises(AirwayInputError, match=r"both as NAME and NAME_0000 \(ATM_001_0000\)"):
        find_cases(tmp_path)
    (labels / "ATM_001.nii.gz").unlink()
    _tiny_case(tmp_path / "TrainBatch2", "ATM_002")
    with pytest.raises(AirwayInputError, match="ATM_002 is in both"):
        find_cases(tmp_path)
    with pytest.raises(AirwayInputError, match="holds no imagesTr folder"):
        find_cases(tmp_path / "TrainBatch1" / "imagesTr")


def test_load_case_refuses_labels_on_another_grid(tmp_path):
    _tiny_case(tmp_path, "A", label_spacing_xyz=(1.0, 1.0, 2.0))
    with pytest.raises(AirwayInputError, match="does not lie on the grid of its CT"):
        load_case(find_cases(tmp_path)[0])


@pytest.mark.parametrize("label_ending", [".nii.gz", ".seg.nrrd"])
def test_load_case_keeps_three_class_labels(phantom, tmp_path, label_ending):
    _write_case(tmp_path, "P", phantom.ct, phantom.airway3, label_ending)
    loaded = load_case(find_cases(tmp_path)[0])
    assert loaded.labels3.dtype == np.uint8
    assert np.array_equal(loaded.labels3, phantom.airway3.array_zyx[loaded.crop_box])
    assert np.array_equal(loaded.ct.array_zyx, phantom.ct.array_zyx[loaded.crop_box])


def test_binary_labels_become_three_classes_on_the_same_voxels(phantom, tmp_path):
    _write_case(tmp_path, "P", phantom.ct, phantom.airway)
    loaded = load_case(find_cases(tmp_path)[0])
    airway = phantom.airway.array_zyx > 0
    assert airway[loaded.crop_box].sum() == airway.sum()
    assert np.array_equal(loaded.labels3 > 0, airway[loaded.crop_box])
    assert set(np.unique(loaded.labels3).tolist()) >= {0, 1, 2}
    assert loaded.labels3.max() <= 3


def test_training_crop_grows_to_keep_labels_outside_the_chest(tmp_path):
    ct = np.full((30, 30, 30), -1000, dtype=np.int16)
    ct[10:20, 10:20, 10:20] = 40
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[2:4, 2:5, 3:6] = 1  # an annotation in the air beside the body
    geometry = Geometry((3.0, 3.0, 3.0))
    _write_case(tmp_path, "A", Volume(ct, geometry), Volume(labels, geometry))
    loaded = load_case(find_cases(tmp_path)[0], margin_mm=0.0)
    assert loaded.crop_box == (slice(2, 20), slice(2, 20), slice(3, 20))
    assert np.count_nonzero(loaded.labels3) == labels.sum()


def test_three_class_labels_reads_0_255_masks_as_binary():
    labels = np.zeros((30, 9, 9), dtype=np.uint8)
    labels[2:28, 3:6, 3:6] = 255
    classes = three_class_labels(labels, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(classes > 0, labels > 0)
    assert set(np.unique(classes).tolist()) <= {0, 1, 2, 3}


def test_phantom_seed_splits_are_disjoint():
    splits = {split: set(phantom_seeds(split, 50)) for split in PHANTOM_SPLITS}
    assert all(len(seeds) == 50 for seeds in splits.values())
    assert not (splits["train"] & splits["validation"] or splits["train"] & splits["test"]
                or splits["validation"] & splits["test"])
    assert phantom_seeds("train", 3) == phantom_seeds("train", 5)[:3]
    with pytest.raises(AirwayInputError, match="Unknown phantom split"):
        phantom_seeds("holdout", 3)


# ------------------------------------------------------------------------------ preprocessing


def test_crop_to_body_keeps_the_airway_and_lungs_and_drops_the_surrounding_air(phantom):
    ct = phantom.ct.array_zyx
    box = crop_to_body(ct, phantom.ct.spacing_zyx)
    for mask in (phantom.airway.array_zyx, phantom.lungs.array_zyx):
        assert mask[box].sum() == mask.sum()
    assert ct[box].size < 0.6 * ct.size


def test_crop_to_body_falls_back_to_the_body_and_refuses_a_ct_without_one():
    ct = np.full((20, 30, 30), -1000, dtype=np.int16)
    spacing = (3.0, 3.0, 3.0)  # the coarse grid itself, so the box is exact
    with pytest.raises(AirwayInputError, match="holds no body"):
        crop_to_body(ct + np.random.default_rng(0).integers(-20, 20, ct.shape), spacing)
    ct[5:15, 10:20, 8:22] = 40  # a body without lungs
    assert crop_to_body(ct, spacing, margin_mm=0) == (slice(5, 15), slice(10, 20), slice(8, 22))
    assert crop_to_body(ct, spacing, margin_mm=6.0) == (slice(3, 17), slice(8, 22), slice(6, 24))


def test_inside_body_keeps_lungs_airway_and_clothes_pockets_apart(phantom):
    """On a phantom (gown and blanket included for this seed): airway and lungs inside, the air around outside."""
    inside = inside_body(phantom.ct.array_zyx, phantom.ct.spacing_zyx)
    assert inside[phantom.airway.array_zyx > 0].all() and inside[phantom.lungs.array_zyx > 0].all()
    outside_air = ~inside & (phantom.ct.array_zyx < -900)
    assert outside_air.sum() > 0.2 * phantom.ct.array_zyx.size
    assert not inside[:, 0, :].any()  # the row in front of the patient is air


def _chest_slices(depth: int) -> np.ndarray:
    """A body ring (wall 3 voxels) with two lungs and a trachea, surrounded by air, at 1 mm."""
    ct = np.full((depth, 40, 60), -1000, dtype=np.int16)
    ct[:, 8:32, 6:54] = 40
    ct[:, 11:29, 9:27] = -850  # right lung
    ct[:, 11:29, 33:51] = -850  # left lung
    ct[:, 14:18, 28:32] = -1000  # trachea
    return ct


def test_inside_body_drops_a_walled_pocket_of_air_outside_the_skin():
    ct = _chest_slices(6)
    ct[:, 2:6, 20:40] = 30  # a fold of blanket, 4 mm thick: a thick wall round a pocket
    ct[:, 3:5, 22:38] = -1000
    ct[:, 1, 10:50] = -200  # and a thin gown sheet in front of it
    inside = inside_body(ct, (1.0, 1.0, 1.0))
    assert inside[:, 14:18, 28:32].all() and inside[:, 11:29, 9:27].all()
    assert not inside[:, 3:5, 22:38].any()  # the pocket is not part of the largest tissue
    assert not inside[:, 0, :].any() and not inside[:, 35:, :].any()


def test_inside_body_reads_cut_slices_through_the_air_of_whole_ones():
    """Shoulders reaching the image edge: outside is the air joined to the air outside lower down."""
    ct = _chest_slices(14)
    ct[4:, 8:32, :] = 40  # upper slices: the body touches both sides of the image
    ct[8:, 11:29, 0:27] = -850  # and the right lung is cut by the field of view, above 4 mm of tissue
    ct[8:, 14:18, 28:32] = -1000
    inside = inside_body(ct, (1.0, 1.0, 1.0))
    assert inside[8:, 11:29, 0:27].all()  # the cut lung stays in
    assert inside[8:, 14:18, 28:32].all()
    assert not inside[4:, 0:6, :].any()  # the air in front of the shoulders is still outside
    everywhere_cut = np.full((4, 20, 20), 40, dtype=np.int16)
    everywhere_cut[:, 5:15, 0:10] = -900
    assert inside_body(everywhere_cut, (1.0, 1.0, 1.0)).all()
    assert inside_body(np.full((4, 20, 20), -1000, dtype=np.int16), (1.0, 1.0, 1.0)).all()


def test_crop_volume_keeps_physical_positions(phantom):
    box = (slice(3, 40), slice(10, 70), slice(5, 90))
    crop = crop_volume(phantom.ct, box)
    point = np.array([7.0, 11.0, 13.0])
    assert np.allclose(
        crop.geometry.index_zyx_to_physical(point),
        phantom.ct.geometry.index_zyx_to_physical(point + [3, 10, 5]),
    )


def test_network_input_channels_and_ranges():
    hu = np.array([-3000, -1200, -625, -250, 125, 600, 2000], dtype=np.int16).reshape(1, 1, 7)
    channels = network_input(hu)
    assert channels.dtype == np.float32 and channels.shape == (2, 1, 1, 7)
    assert np.allclose(channels[0, 0, 0], [0, 0, 575 / 1800, 950 / 1800, 1325 / 1800, 1, 1])
    assert np.allclose(channels[1, 0, 0], [0, 0, 0, 0.5, 1, 1, 1])  # W750 / L-250
    assert network_input(hu, InputSpec(windows=())).shape == (1, 1, 1, 7)


def test_input_spec_round_trips_through_json_and_refuses_bad_cards():
    spec = InputSpec(hu_clip=(-1000, 400), windows=((750, -250), (1500, -600)), target_spacing_zyx=(1, 0.8, 0.8))
    again = InputSpec.from_dict(json.loads(json.dumps(spec.as_dict())))
    assert again == spec and again.n_channels == 3
    assert InputSpec.from_dict(InputSpec().as_dict()) == InputSpec()
    with pytest.raises(AirwayInputError, match="malformed"):
        InputSpec.from_dict({"hu_clip": [-1000, 400]})
    with pytest.raises(AirwayInputError, match="clip range"):
        InputSpec(hu_clip=(400, -1000))
    with pytest.raises(AirwayInputError, match="clip range"):
        InputSpec.from_dict({"hu_clip": [-1000, 0, 400], "windows": [], "target_spacing_zyx": None})


@pytest.mark.parametrize(
    "make",
    [
        lambda: InputSpec(hu_clip=(-1000.0, 0.0, 400.0)),
        lambda: InputSpec(windows=(750.0, -250.0)),
        lambda: crop_to_body(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), margin_mm=None),
        lambda: PatchSampler(128),
        lambda: PatchSampler("abc"),
        lambda: Augmentation(scale_range=(1.0,)),
        lambda: Augmentation(flip_axes=2),
        lambda: CropMix("a", 0, 0),
        lambda: phantom_seeds("train", 2.5),
        lambda: find_cases(None),
    ],
    ids=["hu_clip-3", "windows-flat", "margin-None", "patch-int", "patch-str", "scale-1", "flip-int", "mix-str",
         "seeds-float", "root-None"],
)
def test_malformed_arguments_raise_input_errors_not_tracebacks(make):
    with pytest.raises(AirwayInputError):
        make()


# ------------------------------------------------------------------------------ sampling


def _box_holds(mask: np.ndarray, corner: np.ndarray, size: tuple[int, int, int]) -> bool:
    return bool(mask[tuple(slice(max(int(a), 0), int(a + n)) for a, n in zip(corner, size))].any())


def test_crops_have_the_requested_shape_and_dtypes(volume, targets):
    sampler = PatchSampler((16, 24, 32))
    rng = np.random.default_rng(0)
    for augmentation in (None, Augmentation()):
        patch = sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, targets, rng, augmentation)
        assert patch.ct_zyx.shape == patch.labels_zyx.shape == (16, 24, 32)
        assert patch.ct_zyx.dtype == np.float32 and patch.labels_zyx.dtype == np.uint8


def test_small_airway_crops_hold_small_airways_more_often_than_random_crops():
    labels = np.zeros((48, 64, 64), dtype=np.uint8)
    y, x = np.mgrid[:64, :64]
    labels[:, ((y - 20) ** 2 + (x - 20) ** 2) <= 25] = 1  # trachea-like tube along z, radius 5 voxels
    labels[40, 50, 40:60] = 3  # one thin bronchus in a corner
    ct = labels.astype(np.float32) * 1000 - 1000
    targets = sampling_targets(labels, (1.0, 1.0, 1.0))
    small = np.zeros(labels.shape, dtype=bool)
    small[tuple(targets.small_airway_zyx.T)] = True
    assert small.any() and np.all(labels[small] == 3)
    size = (16, 16, 16)
    rates = {}
    for name, mix in {"random": CropMix(1, 0, 0), "small_airway": CropMix(0, 0, 1)}.items():
        rng = np.random.default_rng(5)
        sampler = PatchSampler(size, mix)
        corners = [sampler.sample(ct, labels, (1.0, 1.0, 1.0), targets, rng).corner_zyx for _ in range(200)]
        rates[name] = np.mean([_box_holds(small, corner, size) for corner in corners])
    assert rates["small_airway"] == 1.0
    assert rates["random"] < 0.2


def test_small_airways_are_measured_in_in_plane_pixels_on_thin_slices():
    labels = np.zeros((40, 30, 40), dtype=np.uint8)
    labels[5:25, 3:15, 2:38] = 1  # thick tube: 10 x 9.6 mm
    labels[30:35, 22:25, 2:38] = 1  # thin tube: 2.5 x 2.4 mm, radius under 2 in-plane pixels, not under 2 slices
    points = sampling_targets(labels, (0.5, 0.8, 0.8)).small_airway_zyx
    assert len(points) > 10
    assert np.all(points[:, 0] == 32)


def test_small_airway_targets_are_thin_centreline_voxels():
    labels = np.zeros((30, 30, 40), dtype=np.uint8)
    labels[10:20, 10:20, 2:38] = 1  # thick tube: radius 5 voxels
    labels[25, 24:26, 2:38] = 1  # thin tube: 1 x 2 voxels
    points = sampling_targets(labels, (1.0, 1.0, 1.0)).small_airway_zyx
    assert len(points) > 10
    assert np.all(points[:, 0] == 25)


def test_hard_mining_centres_lie_in_the_miss_mask(volume, targets):
    miss = np.zeros(volume.labels3.shape, dtype=bool)
    miss[tuple(np.argwhere(volume.labels3 > 0)[::25].T)] = True
    mined = with_miss_mask(targets, miss)
    sampler = PatchSampler((16, 16, 16), CropMix(0, 1, 0))
    rng = np.random.default_rng(2)
    for _ in range(50):
        patch = sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, mined, rng)
        assert patch.source == "hard_mining" and miss[tuple(patch.target_zyx)]
        assert np.all(patch.corner_zyx <= patch.target_zyx) and np.all(patch.target_zyx < patch.corner_zyx + 16)
    # Without a miss mask the hard-mining share falls back to random crops.
    patch = sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, with_miss_mask(mined, None), rng)
    assert patch.source == "random"


def test_sampling_is_deterministic_per_seed(volume, targets):
    sampler = PatchSampler((16, 16, 16))

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, targets, rng, Augmentation())
                for _ in range(3)]

    first, again, other = draw(11), draw(11), draw(12)
    assert all(np.array_equal(a.ct_zyx, b.ct_zyx) and np.array_equal(a.labels_zyx, b.labels_zyx)
               for a, b in zip(first, again))
    assert not all(np.array_equal(a.ct_zyx, b.ct_zyx) for a, b in zip(first, other))


def test_volumes_smaller_than_the_patch_are_padded_with_air():
    ct = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    labels = np.ones(ct.shape, dtype=np.uint8)
    sampler = PatchSampler((16, 16, 16), CropMix(1, 0, 0))
    empty = sampling_targets(np.zeros(ct.shape), (1.0, 1.0, 1.0))
    for augmentation in (None, NO_CHANGE):
        patch = sampler.sample(ct, labels, (1.0, 1.0, 1.0), empty, np.random.default_rng(0), augmentation)
        inside = (slice(3, 13), slice(2, 14), slice(1, 15))
        assert np.array_equal(patch.ct_zyx[inside], ct) and patch.labels_zyx[inside].all()
        outside = np.ones(patch.ct_zyx.shape, dtype=bool)
        outside[inside] = False
        assert np.all(patch.ct_zyx[outside] == PAD_HU) and not patch.labels_zyx[outside].any()


def _tube_phantom() -> tuple[np.ndarray, np.ndarray]:
    """Crossing tubes of several calibres; CT = label * 1000 - 1000 (airway 0 HU, rest air)."""
    z, y, x = np.mgrid[:48, :56, :56]
    labels = (((y - 28) ** 2 + (x - 26) ** 2) <= 36).astype(np.uint8)  # along z, radius 6
    labels[((z - 20) ** 2 + (y - 20) ** 2) <= 9] = 2  # along x, radius 3
    labels[((z - 34) ** 2 + (x - 36) ** 2) <= 4] = 3  # along y, radius 2
    return labels.astype(np.float32) * 1000 - 1000, labels


def test_augmentation_keeps_ct_and_labels_aligned():
    ct, labels = _tube_phantom()
    targets = sampling_targets(labels, (1.0, 1.0, 1.0))
    augmentation = Augmentation(flip_axes=(0, 1, 2), max_rotation_deg=10.0, scale_range=(0.9, 1.1))
    sampler = PatchSampler((32, 40, 40), CropMix(0, 0, 1))
    rng = np.random.default_rng(4)
    agree = total = 0
    for _ in range(20):
        patch = sampler.sample(ct, labels, (1.0, 1.0, 1.0), targets, rng, augmentation)
        airway = patch.labels_zyx > 0
        agree += np.count_nonzero(airway & (patch.ct_zyx > -500))
        total += np.count_nonzero(airway)
    assert total > 1000 and agree / total >= 0.95


def test_flips_are_exact(volume, targets):
    sampler = PatchSampler((16, 20, 24))
    flip_all = Augmentation(flip_axes=(0, 1, 2), flip_probability=1.0, max_rotation_deg=0.0, scale_range=(1.0, 1.0),
                            hu_scale_range=(1.0, 1.0), max_hu_shift=0.0, max_noise_sd_hu=0.0)
    for seed in range(3):
        plain = sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, targets,
                               np.random.default_rng(seed), NO_CHANGE)
        flipped = sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, targets,
                                 np.random.default_rng(seed), flip_all)
        assert np.array_equal(flipped.ct_zyx, np.flip(plain.ct_zyx))
        assert np.array_equal(flipped.labels_zyx, np.flip(plain.labels_zyx))


def test_patch_dataset_yields_typed_tensors_with_a_dataloader(volume):
    dataset = PatchDataset([volume], PatchSampler((16, 16, 16)), Augmentation(), seed=3, n_patches=4)
    batches = list(DataLoader(dataset, batch_size=2, num_workers=0))
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 2, 16, 16, 16)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (2, 16, 16, 16)
    for name in ("gul_weight", "centerline_weight"):
        assert batch[name].dtype == torch.float32 and batch[name].shape == (2, 16, 16, 16)
        assert torch.all(batch[name][batch["labels"] == 0] == 0)
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_two_workers_draw_different_patches_and_epochs_differ(volume):
    dataset = PatchDataset([volume], PatchSampler((16, 16, 16)), Augmentation(), seed=3, n_patches=4)
    items = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert len(items) == 4
    # The DataLoader alternates workers: items 0 and 1 come from different workers.
    assert not torch.equal(items[0]["image"], items[1]["image"])
    first = [item["image"] for item in DataLoader(dataset, batch_size=None, num_workers=0)]
    dataset.set_epoch(1)
    second = [item["image"] for item in DataLoader(dataset, batch_size=None, num_workers=0)]
    assert not torch.equal(first[0], second[0])
