"""Airway losses and loss weights: hand-computed values, gradients, weight maps on tubes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from AirwaySegmentationLib.loss_weights import (
    centerline_distance_weight,
    gul_distance_weight,
    lumen_geometry,
)
from AirwaySegmentationLib.losses import (
    AttentionDistillationLoss,
    DeepTreeLoss,
    DiceFocalLoss,
    GeneralUnionLoss,
    TangUnionLoss,
    general_union_ratio,
    local_imbalance_weight,
)


def binary_logits(probability: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) airway probabilities -> (N, 1, D, H, W) sigmoid logits."""
    return torch.logit(probability)[:, None]


def confident_logits(target: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    """Logits whose softmax is (almost exactly) the one-hot target."""
    return 30.0 * F.one_hot(target, num_classes).permute(0, 4, 1, 2, 3).double()


def tube_label(shape=(24, 24, 32), radius=1.5, center=(12, 12)) -> np.ndarray:
    """Binary tube along x with the given radius (voxels)."""
    z, y, _ = np.indices(shape)
    return ((z - center[0]) ** 2 + (y - center[1]) ** 2 <= radius**2).astype(np.uint8)


# 2x2x2 example: p = 0.5 everywhere, the first z-slice (4 voxels) is airway.
HALF = torch.full((1, 2, 2, 2), 0.5, dtype=torch.float64)
HALF_TARGET = torch.tensor([[[[1, 1], [1, 1]], [[0, 0], [0, 0]]]])


def test_general_union_loss_by_hand_without_weight():
    # I = 4 * 0.5001^0.7, U = 8 * 0.1 * 0.5 + 4 * 0.9 = 4.0, L = 1 - (I + 1) / (U + 1)
    expected = 1 - (4 * 0.5001**0.7 + 1) / 5.0
    loss = GeneralUnionLoss()(binary_logits(HALF), HALF_TARGET)
    assert float(loss) == pytest.approx(expected, abs=1e-9)
    assert float(loss) == pytest.approx(0.30754, abs=1e-4)


def test_general_union_loss_by_hand_with_distance_weight():
    # dist = 2 on the airway: w = 2 on airway voxels, 1 on background voxels.
    # I = 2 * 4 * 0.5001^0.7; U = 4 * 2 * (0.05 + 0.9) + 4 * 1 * 0.05 = 7.8
    expected = 1 - (8 * 0.5001**0.7 + 1) / 8.8
    dist = torch.full((1, 2, 2, 2), 2.0, dtype=torch.float64)
    loss = GeneralUnionLoss()(binary_logits(HALF), HALF_TARGET, dist)
    assert float(loss) == pytest.approx(expected, abs=1e-9)
    assert float(loss) == pytest.approx(0.32675, abs=1e-4)


def test_general_union_loss_uses_the_union_of_the_airway_classes():
    target = torch.tensor([[[[0, 1], [2, 3]], [[0, 0], [3, 3]]]])
    # Probability mass moved between airway classes leaves the union loss unchanged.
    logits = torch.randn(1, 4, 2, 2, 2, dtype=torch.float64)
    swapped = logits[:, [0, 3, 1, 2]]
    loss = GeneralUnionLoss(alpha=0.2)
    assert float(loss(logits, target)) == pytest.approx(float(loss(swapped, target)), abs=1e-12)
    assert float(loss(confident_logits(target), target)) == pytest.approx(0.0, abs=1e-3)


def test_tang_union_loss_by_hand():
    # Empty target: FR = 0 everywhere, so w_p = 1 whatever r.  p = 0.5: I = 0,
    # U = sum w (0.5 p + 0.5 y) = 8 * 0.25 = 2  ->  L = 1 - 1 / 3.
    empty = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    loss = TangUnionLoss(rng=np.random.default_rng(0))
    assert float(loss(binary_logits(HALF), empty)) == pytest.approx(2 / 3, abs=1e-9)
    # With w_d = 1 everywhere: w = 2, U = 4  ->  L = 1 - 1 / 5.
    ones = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    assert float(loss(binary_logits(HALF), empty, ones)) == pytest.approx(0.8, abs=1e-9)


def test_tang_union_loss_is_zero_for_a_perfect_prediction():
    target = torch.from_numpy(tube_label((8, 8, 8), radius=1.0, center=(4, 4))).long()[None]
    loss = TangUnionLoss(rng=np.random.default_rng(1))
    assert float(loss(confident_logits(target, 2), target)) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("form", ["gul", "printed"])
def test_tang_union_loss_reads_eq_2_as_configured(form):
    """"gul": the probability's root (1 / beta) and background weight 1; "printed": p^beta and
    w_p on every voxel.  A thick tube puts background of weight < 1 beside it."""
    target = torch.from_numpy(tube_label((16, 16, 16), radius=4.0, center=(8, 8))).long()[None]
    probability = torch.rand(target.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.98 + 0.01
    airway = target.double()
    w_p = local_imbalance_weight(airway, 2.5)
    assert float(w_p[airway == 0].min()) < 0.5  # background the printed form weights down
    weight, exponent = (w_p * airway + (1 - airway), 0.5) if form == "gul" else (w_p, 2.0)
    expected = general_union_ratio(probability, airway, weight, 0.5, exponent, 1.0)
    loss = TangUnionLoss(root_range=(2.5, 2.5), form=form)
    assert float(loss(binary_logits(probability), target)) == pytest.approx(float(expected), abs=1e-9)


def test_tang_union_loss_as_printed_pushes_a_missed_airway_voxel_down():
    """90 airway voxels found (p = 0.95), 10 missed (p = 0.05), no background: the root form
    raises the missed ones, eq. 2 as printed lowers them further."""
    probability = torch.tensor([0.95] * 90 + [0.05] * 10, dtype=torch.float64).reshape(1, 1, 10, 10)
    target = torch.ones(probability.shape, dtype=torch.long)
    for form, sign in (("gul", -1.0), ("printed", 1.0)):
        logits = binary_logits(probability).requires_grad_()
        TangUnionLoss(root_range=(2.5, 2.5), form=form)(logits, target).backward()
        missed = logits.grad[0, 0][probability[0] < 0.5]
        assert torch.all(torch.sign(missed) == sign), form


def test_local_imbalance_weight_is_higher_in_a_thin_tube_than_in_a_thick_one():
    thin = torch.from_numpy(tube_label(radius=1.0)).float()[None]
    thick = torch.from_numpy(tube_label(radius=6.0)).float()[None]
    w_thin = local_imbalance_weight(thin, root=2.5)
    w_thick = local_imbalance_weight(thick, root=2.5)
    assert w_thin[thin > 0].mean() > 3 * w_thick[thick > 0].mean()
    assert float(w_thick.min()) == pytest.approx(0.05, abs=1e-6)  # FR = 1 inside: w = l
    assert float(w_thin.max()) == pytest.approx(1.0)  # FR <= 0.1: w = 1
    # FR by hand at the tube centre: the 7^3 box holds 7 x (5-voxel cross) = 35 airway voxels.
    fr = 35 / 343
    expected = 0.95 * min(-math.log10(fr), 1.0) ** 2.5 + 0.05
    assert float(w_thin[0, 12, 12, 16]) == pytest.approx(expected, abs=1e-6)


def test_local_imbalance_weight_takes_one_root_per_sample():
    label = torch.from_numpy(tube_label(radius=3.0)).float()[None].repeat(2, 1, 1, 1)
    weight = local_imbalance_weight(label, torch.tensor([2.0, 3.0]))
    assert torch.all(weight[1] <= weight[0] + 1e-7)
    assert not torch.equal(weight[0], weight[1])


def test_dice_focal_loss_matches_eq_7_for_a_binary_network():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 3, 4, 5, generator=gen, dtype=torch.float64)
    target = (torch.rand(2, 3, 4, 5, generator=gen) > 0.6).long()
    p = torch.sigmoid(logits[:, 0]).numpy()
    y = target.numpy()
    p_t = np.where(y == 1, p, 1 - p)
    dice = 2 * (p * y).sum() / ((p + y).sum() + 1e-7)
    focal = -((1 - p_t) ** 2 * np.log(p_t)).mean()
    expected = 1 - dice + focal  # Qin 2020, eq. 7 plus the constant 1
    assert float(DiceFocalLoss()(logits, target)) == pytest.approx(expected, abs=1e-7)


def test_dice_focal_loss_multi_class_and_its_cross_entropy_limit():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 4, 4, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 4, 4, 4), generator=gen)
    p = torch.softmax(logits, 1)
    y = F.one_hot(target, 4).permute(0, 4, 1, 2, 3).double()
    dice = (2 * (p * y).sum((0, 2, 3, 4)) + 1e-7) / ((p + y).sum((0, 2, 3, 4)) + 1e-7)
    p_t = (p * y).sum(1)
    expected = (1 - dice[1:]).sum() - ((1 - p_t) ** 2 * p_t.log()).mean()
    assert float(DiceFocalLoss()(logits, target)) == pytest.approx(float(expected), abs=1e-9)
    # gamma = 0: the focal term is the cross-entropy.
    with_ce = (1 - dice[1:]).sum() + F.cross_entropy(logits, target)
    assert float(DiceFocalLoss(gamma=0.0)(logits, target)) == pytest.approx(
        float(with_ce), abs=1e-9
    )
    # A one-hot target gives the same value as the labels.
    assert float(DiceFocalLoss()(logits, y)) == pytest.approx(float(expected), abs=1e-9)


def test_per_sample_dice_is_the_mean_of_each_samples_loss_and_weighs_a_small_target_up():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 4, 4, 4, generator=gen, dtype=torch.float64)
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, :, :3, :3] = 1  # a wide gap: 36 voxels
    target[1, 2, 2, 2] = 1  # a thin one: 1 voxel
    per_sample = DiceFocalLoss(gamma=0.0, eps=1e-5, batch_dice=False)
    alone = [DiceFocalLoss(gamma=0.0, eps=1e-5)(logits[i : i + 1], target[i : i + 1]) for i in range(2)]
    assert float(per_sample(logits, target)) == pytest.approx(float(sum(alone) / 2), abs=1e-12)
    # Missing the one-voxel target: half the loss per sample (Dice 1 and 0), 1/73 over the
    # batch (2 * 36 / (36 + 37)); the cross-entropy is the same in both.
    missed = confident_logits(target, 2)
    missed[1, :, 2, 2, 2] = missed[1, :, 0, 0, 0]
    batch = DiceFocalLoss(gamma=0.0, eps=1e-5)
    assert float(per_sample(missed, target) - batch(missed, target)) == pytest.approx(0.5 - 1 / 73, abs=1e-4)


@pytest.mark.parametrize(
    "loss",
    [
        DiceFocalLoss(),
        DeepTreeLoss(),
        DeepTreeLoss(union_loss=TangUnionLoss(rng=np.random.default_rng(2))),
        GeneralUnionLoss(),
    ],
    ids=["dice_focal", "deep_tree", "deep_tree_tang", "general_union"],
)
def test_dice_type_losses_are_zero_for_a_perfect_prediction(loss):
    target = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    target[0, :, 2:4, 2:4] = 1
    target[0, 3:, 2:4, 4:] = 2
    target[0, 4:, 4:, 4:] = 3
    assert float(loss(confident_logits(target), target)) == pytest.approx(0.0, abs=1e-3)


def test_deep_tree_loss_is_class_terms_plus_union_term():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 4, 4, 4, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (1, 4, 4, 4), generator=gen)
    dist = torch.rand(1, 4, 4, 4, generator=gen, dtype=torch.float64) + 0.5
    expected = DiceFocalLoss(gamma=0.0, eps=1e-5)(logits, target) + GeneralUnionLoss()(
        logits, target, dist
    )
    assert float(DeepTreeLoss()(logits, target, dist)) == pytest.approx(float(expected), abs=1e-12)


def test_gradients_of_general_union_and_dice_focal_losses():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[[0, 1], [2, 0]], [[1, 1], [0, 2]]]])
    dist = torch.rand(1, 2, 2, 2, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda z: GeneralUnionLoss()(z, target, dist), (logits,))
    assert torch.autograd.gradcheck(lambda z: DiceFocalLoss()(z, target), (logits,))
    binary = torch.randn(1, 1, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: DiceFocalLoss()(z, (target > 0).long()), (binary,))


def test_losses_run_under_bfloat16_autocast_in_float32():
    logits = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 4, (1, 4, 4, 4))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = DeepTreeLoss()(logits.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_attention_distillation_by_hand_and_direction():
    # Two stages with the same size: S(G_1) vs S(G_2) over 8 voxels.
    student = torch.zeros(1, 2, 2, 2, 2, requires_grad=True)
    teacher = torch.zeros(1, 3, 2, 2, 2, requires_grad=True)
    with torch.no_grad():
        teacher[0, 0, 0, 0, 0] = 1.0  # G_2 = 1 at one voxel, 0 elsewhere
    loss = AttentionDistillationLoss(alpha=0.1)([student, teacher])
    t = np.exp([1.0] + [0.0] * 7)
    t /= t.sum()
    expected = 0.1 * ((1 / 8 - t) ** 2).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert teacher.grad is None  # the later stage is the teacher: detached (Qin 2020, eq. 6)


def test_attention_distillation_across_scales_and_channels():
    gen = torch.Generator().manual_seed(4)
    features = [
        torch.randn(2, 8, 4, 4, 4, generator=gen, requires_grad=True),
        torch.randn(2, 4, 8, 8, 8, generator=gen, requires_grad=True),
    ]
    spatial = AttentionDistillationLoss()(features)
    both = AttentionDistillationLoss(channel=True)(features)
    assert both.item() > spatial.item() > 0.0
    both.backward()
    assert features[0].grad.abs().sum() > 0
    # Identical stages distil to nothing.
    same = torch.randn(1, 4, 4, 4, 4, generator=gen)
    assert float(AttentionDistillationLoss(channel=True)([same, same.clone()])) == pytest.approx(
        0.0, abs=1e-12
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GeneralUnionLoss(alpha=1.5), "alpha"),
        (lambda: DiceFocalLoss(gamma=-1.0), "gamma"),
        (lambda: TangUnionLoss(box_size=6), "box_size"),
        (lambda: AttentionDistillationLoss(power=0.0), "power"),
        (
            lambda: GeneralUnionLoss()(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 2, 2, 2)),
            "integer",
        ),
        (
            lambda: GeneralUnionLoss()(torch.zeros(1, 4, 2, 2, 2), torch.full((1, 2, 2, 2), 4)),
            r"\[0, 4\)",
        ),
        (
            lambda: GeneralUnionLoss()(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 3, 3, 3).long()),
            "match",
        ),
        (lambda: AttentionDistillationLoss()([torch.zeros(1, 2, 2, 2, 2)]), "two stage"),
    ],
)
def test_losses_reject_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_centerline_weight_is_one_on_the_centerline_decreasing_outward_and_zero_outside():
    label = tube_label(radius=4.0)
    weight = centerline_distance_weight(label, spacing_zyx=(1.0, 1.0, 1.0))
    profile = weight[12, 12:18, 16]  # from the centre outward along y
    assert profile[0] == pytest.approx(1.0)
    assert np.all(np.diff(profile) <= 0) and profile[1] < 1.0
    assert profile[-1] == 0.0  # outside the lumen
    assert weight[label == 0].max() == 0.0
    assert 0.0 <= weight.min() and weight.max() <= 1.0


def test_loss_weights_use_the_spacing():
    label = tube_label(radius=3.0)
    iso = lumen_geometry(label, (1.0, 1.0, 1.0))
    fine = lumen_geometry(label, (0.5, 0.5, 0.5))
    centre = (12, 12, 16)
    assert fine.lumen_radius_mm[centre] == pytest.approx(iso.lumen_radius_mm[centre] / 2)
    np.testing.assert_allclose(
        centerline_distance_weight(label, (0.5, 0.5, 0.5)),
        centerline_distance_weight(label, (1.0, 1.0, 1.0)),
        atol=1e-6,
    )


def test_gul_distance_weight_favours_thin_airways_and_has_mean_one():
    label = tube_label(shape=(32, 32, 32), radius=6.0, center=(10, 10)) | tube_label(
        shape=(32, 32, 32), radius=1.0, center=(24, 24)
    )
    weight = gul_distance_weight(label, spacing_zyx=(0.8, 0.7, 0.7))
    assert weight[label > 0].mean() == pytest.approx(1.0, abs=1e-5)
    assert weight[24, 24, 16] > 3 * weight[10, 10, 16]
    assert weight[label == 0].max() == 0.0
    assert not gul_distance_weight(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0)).any()


def test_loss_weights_reject_bad_input():
    with pytest.raises(ValueError, match="3-?D"):
        gul_distance_weight(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing"):
        centerline_distance_weight(np.zeros((4, 4, 4)), (1.0, 0.0, 1.0))


def test_gul_weight_of_an_all_airway_crop_is_finite():
    # A patch lying inside the trachea has no background: radii are infinite, weights must not be 0/0.
    full = np.ones((8, 12, 16), dtype=np.uint8)
    weight = gul_distance_weight(full, (1.0, 1.0, 1.0))
    assert np.isfinite(weight).all() and np.allclose(weight, 1.0)
