"""Airway segmentation losses (METHODS.md section 3).

Conventions shared by every loss here:

- ``logits``: ``(N, C, D, H, W)`` raw network outputs (D = z, H = y, W = x).  ``C >= 2``:
  softmax over the classes, class 0 is background.  ``C == 1``: a binary network, sigmoid,
  treated as the two classes (background, airway).
- ``target``: integer labels ``(N, D, H, W)`` in ``[0, C)`` (``{0, 1}`` when ``C == 1``),
  or one-hot / soft ``(N, C, D, H, W)`` (``(N, 1, D, H, W)`` airway probability when
  ``C == 1``).
- The airway *union* is every class but background: ``p = 1 - p_background``,
  ``y = 1 - y_background``.
- Sums run over the whole batch (one ratio per batch, "batch Dice"), so a crop without
  airway does not give an undefined or meaningless per-sample ratio.  Only
  :class:`DiceFocalLoss` can be asked for one ratio per sample (``batch_dice=False``).
- Losses are computed in at least float32 whatever the autocast dtype (float64 stays
  float64 so ``torch.autograd.gradcheck`` works).

The local-imbalance weight (Tang eq. 1, 3) lives here, in torch, because it is a 7^3 box
mean of the label that ``avg_pool3d`` computes on the device at no cost; the weights that
need a skeleton (GUL distance, centerline distance) are numpy functions in
:mod:`AirwaySegmentationLib.loss_weights`, computed per crop by the data pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Offset added to probabilities before the root in the GUL intersection (WingsNet code):
#: d/dp p^0.7 is infinite at p = 0.
_PROBABILITY_OFFSET = 1e-4
#: Readings of Tang's eq. 2 (:class:`TangUnionLoss`).
TANG_FORMS = ("gul", "printed")


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def class_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``(N, K, D, H, W)``, ``K = max(C, 2)``, from logits ``(N, C, D, H, W)``.

    Softmax over the classes for ``C >= 2``; for ``C == 1`` the sigmoid's two classes
    (background, airway).  Computed in at least float32.
    """
    if logits.dim() != 5:
        raise ValueError(f"logits must be (N, C, D, H, W), got shape {tuple(logits.shape)}")
    logits = _at_least_float32(logits)
    if logits.shape[1] == 1:
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
    return F.log_softmax(logits, dim=1)


def one_hot_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot ``(N, num_classes, D, H, W)`` from labels ``(N, D, H, W)`` or one-hot.

    A one-channel ``(N, 1, D, H, W)`` target with ``num_classes == 2`` is read as the airway
    probability of a binary network.
    """
    if target.dim() == 4:
        if target.is_floating_point():
            raise ValueError("an integer label target (N, D, H, W) must have an integer dtype")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise ValueError(
                f"target labels must lie in [0, {num_classes}), got "
                f"[{int(target.min())}, {int(target.max())}]"
            )
        return F.one_hot(target.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    if target.dim() == 5:
        target = target.float()
        if target.shape[1] == 1 and num_classes == 2:
            return torch.cat([1.0 - target, target], dim=1)
        if target.shape[1] == num_classes:
            return target
    raise ValueError(
        f"target must be labels (N, D, H, W) or one-hot (N, {num_classes}, D, H, W), "
        f"got shape {tuple(target.shape)}"
    )


def _probabilities_and_target(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities, probabilities, one-hot target), all ``(N, K, D, H, W)``."""
    log_probabilities = class_log_probabilities(logits)
    one_hot = one_hot_target(target, log_probabilities.shape[1]).to(log_probabilities.dtype)
    if one_hot.shape[0] != logits.shape[0] or one_hot.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    return log_probabilities, log_probabilities.exp(), one_hot


def _check_weight(weight: torch.Tensor | None, airway: torch.Tensor) -> None:
    if weight is not None and weight.shape != airway.shape:
        raise ValueError(
            f"weight must be (N, D, H, W) = {tuple(airway.shape)}, got {tuple(weight.shape)}"
        )


def general_union_ratio(
    probability: torch.Tensor,
    airway: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    exponent: float,
    smooth: float,
) -> torch.Tensor:
    """``1 - (I + s) / (U + s)``, the General Union loss core (METHODS section 3).

    ``I = sum w (p + 1e-4)^exponent y``, ``U = sum w (alpha p + (1 - alpha) y)``; all
    arguments are ``(N, D, H, W)`` and the sums run over the whole batch.
    """
    intersection = (weight * (probability + _PROBABILITY_OFFSET) ** exponent * airway).sum()
    union = (weight * (alpha * probability + (1.0 - alpha) * airway)).sum()
    return 1.0 - (intersection + smooth) / (union + smooth)


class _UnionLoss(nn.Module):
    """Shared argument checks and the union probability of the two union losses."""

    def __init__(self, alpha: float, exponent: float, smooth: float) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if exponent <= 0.0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        if smooth < 0.0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.alpha = alpha
        self.exponent = exponent
        self.smooth = smooth

    @staticmethod
    def _union(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Airway probability and airway target, both ``(N, D, H, W)``."""
        _, probabilities, one_hot = _probabilities_and_target(logits, target)
        return 1.0 - probabilities[:, 0], 1.0 - one_hot[:, 0]

    def _ratio(
        self, probability: torch.Tensor, airway: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        return general_union_ratio(
            probability, airway, weight, self.alpha, self.exponent, self.smooth
        )


class GeneralUnionLoss(_UnionLoss):
    """General Union loss of WingsNet (Zheng 2021) on the airway union (METHODS section 3).

    ``w = dist * y + (1 - y)``; ``I = sum w (p + 1e-4)^0.7 y``;
    ``U = sum w (a p + (1 - a) y)``; ``L = 1 - (I + 1) / (U + 1)``.  Without ``dist``
    (``w = 1``) it is the "root Tversky" loss.

    Parameters
    ----------
    alpha : float
        ``a``: weight of the prediction in the union; 0.1 early, 0.2 in the later stage.
    exponent : float
        Root applied to the probability in the intersection (0.7).
    smooth : float
        Added to intersection and union (1).

    Shapes
    ------
    ``forward(logits (N, C, D, H, W), target (N, D, H, W) or (N, C, D, H, W),
    distance_weight (N, D, H, W) or None) -> scalar``.  ``distance_weight`` is ``dist``, e.g.
    :func:`AirwaySegmentationLib.loss_weights.gul_distance_weight` of the crop's label;
    only its values on airway voxels matter.

    Examples
    --------
    >>> loss = GeneralUnionLoss()
    >>> target = torch.zeros(1, 4, 4, 4, dtype=torch.long); target[0, 1:3, 1:3, 1:3] = 2
    >>> logits = 20.0 * F.one_hot(target, 4).permute(0, 4, 1, 2, 3).float()
    >>> float(loss(logits, target)) < 0.01
    True
    """

    def __init__(self, alpha: float = 0.1, exponent: float = 0.7, smooth: float = 1.0) -> None:
        super().__init__(alpha, exponent, smooth)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        distance_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        probability, airway = self._union(logits, target)
        _check_weight(distance_weight, airway)
        if distance_weight is None:
            weight = torch.ones_like(airway)
        else:
            weight = distance_weight.to(airway.dtype) * airway + (1.0 - airway)
        return self._ratio(probability, airway, weight)


def _check_local_imbalance_arguments(box_size: int, floor: float) -> None:
    if box_size < 1 or box_size % 2 == 0:
        raise ValueError(f"box_size must be a positive odd number, got {box_size}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor}")


def _box_mean(volume: torch.Tensor, box_size: int) -> torch.Tensor:
    """Mean over every ``box_size``^3 box (stride 1, no padding) of ``(N, 1, D, H, W)``.

    The box mean is separable: three 1-D means do ``3 * box_size`` additions per voxel
    instead of ``box_size^3`` (6x faster for 7^3 on a 128^3 crop on the CPU).
    """
    for kernel in ((box_size, 1, 1), (1, box_size, 1), (1, 1, box_size)):
        volume = F.avg_pool3d(volume, kernel, stride=1)
    return volume


def local_imbalance_weight(
    airway: torch.Tensor, root: float | torch.Tensor, box_size: int = 7, floor: float = 0.05
) -> torch.Tensor:
    """Local-imbalance weight of Tang (eqs. 1, 3), from the airway label.

    ``FR_p`` = mean airway label in the ``box_size``^3 box around p (eq. 1);
    ``w_p = (1 - l) min(-log10 FR_p, 1)^r + l`` (eq. 3).  Thin airways and the background
    beside them get weights near 1, the inside of thick airways near ``l``.

    At the crop border the box mean is taken over the voxels inside the crop only (the
    paper is silent; zero padding would make border voxels of a thick airway look thin).

    Parameters
    ----------
    airway : torch.Tensor
        ``(N, D, H, W)`` binary (or soft) airway label.
    root : float or torch.Tensor
        ``r`` (drawn from U[2, 3] in Tang); a tensor of shape ``(N,)`` gives one per sample.
    box_size : int
        Edge of the cubic neighbourhood, odd (7).
    floor : float
        ``l``, the smallest weight (0.05).

    Returns
    -------
    torch.Tensor
        ``(N, D, H, W)`` weights in ``[floor, 1]``, no gradient.
    """
    _check_local_imbalance_arguments(box_size, floor)
    with torch.no_grad():
        # Explicit zero padding (avg_pool3d refuses crops smaller than the box) and division
        # by the number of in-crop voxels of each box.
        padding = (box_size // 2,) * 6
        label = F.pad(airway[:, None].float(), padding)
        inside = F.pad(torch.ones_like(airway[:1, None], dtype=torch.float32), padding)
        foreground_rate = (_box_mean(label, box_size) / _box_mean(inside, box_size))[:, 0]  # Tang, eq. 1
        # f_c(-log10 FR_p) = min(-log10 FR_p, 1); FR_p = 0 (far background) gives 1.
        imbalance = (-torch.log10(foreground_rate.clamp_min(1e-12))).clamp(0.0, 1.0)
        roots = torch.as_tensor(root, dtype=imbalance.dtype, device=imbalance.device)
        if roots.dim() == 1:
            roots = roots[:, None, None, None]
        return ((1.0 - floor) * imbalance**roots + floor).to(airway.dtype)  # Tang, eq. 3


class TangUnionLoss(_UnionLoss):
    """Weighted union ("weight Dice") loss of Tang, eq. 2, with ``w = w_p + w_d`` (eq. 5).

    Tang eq. 2 is printed ``1 - sum w p^beta g / sum w (p + g)`` with ``beta = 2``, and
    introduced as "the general union loss [2]".  We write it in the General Union form with
    ``a = 0.5``, i.e. with Dice's factor 2, so that a perfect prediction scores 0 as for every
    other Dice-type loss here (as printed the minimum is 0.5); the smoothing 1 and the 1e-4
    offset are the General Union loss's.  The paper contradicts itself, so ``form`` chooses:

    - ``"printed"`` (default): ``p^beta`` as printed and ``w_p`` on every voxel.  Its gradient
      on an airway voxel with ``p`` below about a quarter of the current overlap ratio points
      the wrong way (a missed airway voxel is pushed further down), and it weights the
      background beside thick airways below 1.  The bundled stage-1 models were trained with
      it, and it measured better than the other form (README, "Tang's loss");
    - ``"gul"``: ``p^(1/beta)``, a root as in the General Union loss it names (``p^0.7``),
      and ``w_p`` on airway voxels only, background weight 1, as in the code of Tang's ref.
      [1] (Zheng's local-imbalance weight: ``weight**r * label + (1 - label)``).

    ``w_p`` (eq. 3) is computed here from the target with a root ``r`` drawn per sample from
    U[``root_range``] with the ``rng`` given; ``w_d`` (eq. 4) is passed in, from
    :func:`AirwaySegmentationLib.loss_weights.centerline_distance_weight` (0 outside the
    lumen).  Tang's schedule: plain Dice, then ``w = w_p`` (no ``centerline_weight``), then
    ``w = w_p + w_d``.

    Parameters
    ----------
    beta : float
        Tang's beta (2): the root (``"gul"``) or power (``"printed"``) of the probability in
        the intersection.
    root_range : tuple of float
        Range of the uniform draw of ``r`` (2, 3).
    floor : float
        ``l`` of eq. 3 (0.05).
    box_size : int
        Neighbourhood of eq. 1 (7).
    rng : numpy.random.Generator or None
        Source of the ``r`` draws; ``None`` makes a fresh unseeded generator.
    form : {"gul", "printed"}
        How eq. 2 is read (above).

    Shapes
    ------
    ``forward(logits (N, C, D, H, W), target (N, D, H, W) or (N, C, D, H, W),
    centerline_weight (N, D, H, W) or None) -> scalar``
    """

    def __init__(
        self,
        beta: float = 2.0,
        root_range: tuple[float, float] = (2.0, 3.0),
        floor: float = 0.05,
        box_size: int = 7,
        rng: np.random.Generator | None = None,
        form: str = "printed",
    ) -> None:
        if form not in TANG_FORMS:
            raise ValueError(f"form must be one of {', '.join(TANG_FORMS)}, got {form!r}")
        if beta <= 0.0:
            raise ValueError(f"beta must be > 0, got {beta}")
        super().__init__(alpha=0.5, exponent=1.0 / beta if form == "gul" else beta, smooth=1.0)
        self.form = form
        if not 0.0 < root_range[0] <= root_range[1]:
            raise ValueError(
                f"root_range must be (low, high) with 0 < low <= high, got {root_range}"
            )
        _check_local_imbalance_arguments(box_size, floor)
        self.root_range = root_range
        self.floor = floor
        self.box_size = box_size
        self.rng = np.random.default_rng() if rng is None else rng

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        centerline_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        probability, airway = self._union(logits, target)
        _check_weight(centerline_weight, airway)
        roots = torch.as_tensor(self.rng.uniform(*self.root_range, size=airway.shape[0]))
        weight = local_imbalance_weight(airway, roots, self.box_size, self.floor)
        if self.form == "gul":
            weight = weight * airway + (1.0 - airway)  # background weight 1 (Tang's ref. [1])
        if centerline_weight is not None:
            weight = weight + centerline_weight.to(weight.dtype)  # Tang, eq. 5
        return self._ratio(probability, airway, weight)  # Tang, eq. 2 (with Dice's factor 2)


class DiceFocalLoss(nn.Module):
    """Dice + focal loss (Qin 2020, eq. 7), per airway class.

    ``L = sum_c (1 - 2 sum p_c y_c / (sum (p_c + y_c) + eps))
    - 1/|X| sum (1 - p_t)^gamma log p_t``, the Dice term over the foreground classes
    ``c >= 1`` and the focal term with ``p_t`` the probability of the true class.  For a
    binary network this is exactly eq. 7 plus the constant 1 (so a perfect prediction scores
    0; the gradient is unchanged).  ``eps`` is also added to the Dice numerator (as MONAI's
    ``smooth_nr``) so a class absent from the target scores 0 only once its predicted mass
    ``sum p_c`` falls well below ``eps``; until then its Dice term is close to 1 with a small
    gradient that pushes ``p_c`` down (the paper's binary airway target is never empty).

    With ``gamma = 0`` the focal term is the cross-entropy, so ``DiceFocalLoss(gamma=0)`` is
    the Dice + CE loss of DeepTree's per-class term (the multi-class cross-entropy is the sum
    of the per-class terms ``-y_c log p_c``).

    Parameters
    ----------
    gamma : float
        Focusing exponent (2; 0 gives cross-entropy).
    eps : float
        Dice smoothing (1e-7).
    batch_dice : bool
        True: one Dice ratio per class over the whole batch (the module's rule, as above);
        False: one per sample and class, averaged over the samples (nnU-Net's
        ``batch_dice = False``), so a sample whose target is a few voxels (the gap of a thin
        branch) weighs as much as one with thousands.

    ``forward(logits, target, mask)``: an optional voxel mask (1 counts, 0 is left out of both
    terms) for voxels whose prediction is never used (stage 2: voxels already in the broken
    mask, which the merge does not touch).

    Shapes
    ------
    ``forward(logits (N, C, D, H, W), target (N, D, H, W) or (N, C, D, H, W), mask (N, D, H, W) = None) -> scalar``
    """

    def __init__(self, gamma: float = 2.0, eps: float = 1e-7, batch_dice: bool = True) -> None:
        super().__init__()
        if gamma < 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.gamma = gamma
        self.eps = eps
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        log_probabilities, probabilities, one_hot = _probabilities_and_target(logits, target)
        if mask is not None:
            if mask.shape != one_hot[:, 0].shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the target {tuple(one_hot[:, 0].shape)}")
            mask = mask.to(probabilities.dtype)
            probabilities = probabilities * mask[:, None]
            one_hot = one_hot * mask[:, None]
        dims = (0, 2, 3, 4) if self.batch_dice else (2, 3, 4)
        intersection = (probabilities * one_hot).sum(dims)[..., 1:]
        total = (probabilities + one_hot).sum(dims)[..., 1:]
        dice = (2.0 * intersection + self.eps) / (total + self.eps)  # Qin 2020, eq. 7 (Dice)
        if not self.batch_dice:
            dice = dice.mean(dim=0)  # (N, C - 1) -> (C - 1): the samples' mean per class
        log_true = (one_hot * log_probabilities).sum(dim=1)  # log p_t (0 where masked out)
        focal_terms = -((1.0 - log_true.exp()) ** self.gamma * log_true)
        # Qin 2020, eq. 7 (focal): the mean over the voxels that count.
        focal = focal_terms.mean() if mask is None else focal_terms.sum() / mask.sum().clamp_min(1.0)
        return (1.0 - dice).sum() + focal


class DeepTreeLoss(nn.Module):
    """Anatomy-aware multi-class loss of DeepTree (eq. 1) plus the union loss (METHODS 1, 3).

    ``L = sum_{c=1..3} L_S(p_c, y_c) + L_union(p_airway, y_airway)`` with ``L_S`` Dice + CE
    (:class:`DiceFocalLoss` with ``gamma = 0`` and nnU-Net's Dice smoothing 1e-5, DeepTree
    being built on nnU-Net) and ``L_union`` the General Union loss on the whole tree.

    Parameters
    ----------
    class_loss : nn.Module or None
        Per-class loss ``(logits, target) -> scalar``; default Dice + CE.
    union_loss : nn.Module or None
        Union loss ``(logits, target, weight) -> scalar``; default
        :class:`GeneralUnionLoss`; may be a :class:`TangUnionLoss`.
    union_weight : float
        Factor of the union term (1).

    Shapes
    ------
    ``forward(logits (N, C, D, H, W), target (N, D, H, W) or (N, C, D, H, W),
    weight (N, D, H, W) or None) -> scalar``; ``weight`` goes to the union loss (the GUL
    ``dist`` or Tang's ``w_d``).
    """

    def __init__(
        self,
        class_loss: nn.Module | None = None,
        union_loss: nn.Module | None = None,
        union_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if union_weight < 0.0:
            raise ValueError(f"union_weight must be >= 0, got {union_weight}")
        self.class_loss = DiceFocalLoss(gamma=0.0, eps=1e-5) if class_loss is None else class_loss
        self.union_loss = GeneralUnionLoss() if union_loss is None else union_loss
        self.union_weight = union_weight

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.class_loss(logits, target) + self.union_weight * self.union_loss(
            logits, target, weight
        )


def spatial_attention(features: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Activation-based spatial attention ``G = sum_c |A_c|^p`` (Qin 2020, AD).

    ``(N, C, D, H, W) -> (N, D, H, W)``, in at least float32.
    """
    return _at_least_float32(features).abs().pow(power).sum(dim=1)


def channel_attention(features: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Channel attention ``mean_xyz |A_c|^p`` sorted in decreasing order (AttdKD interpretation).

    ``(N, C, D, H, W) -> (N, C)``, in at least float32.  Sorted because channel ``c`` of one
    stage has nothing to do with channel ``c`` of the next: what is compared between stages is
    how sharply the activation energy concentrates on a few competitive channels.
    """
    energy = _at_least_float32(features).abs().pow(power).mean(dim=(2, 3, 4))
    return energy.sort(dim=1, descending=True).values


def _distillation_term(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``||S(I(student)) - S(teacher)||_F^2``, batch mean; teacher detached (Qin 2020, eq. 6).

    ``student`` and ``teacher`` are ``(N, *size)`` with 1 (channel) or 3 (spatial) sizes;
    the student is linearly interpolated to the teacher's size.
    """
    size = teacher.shape[1:]
    mode = "linear" if len(size) == 1 else "trilinear"
    if student.shape[1:] != size:
        student = F.interpolate(student[:, None], size=size, mode=mode, align_corners=False)[:, 0]
    student = F.softmax(student.flatten(1), dim=1)
    teacher = F.softmax(teacher.detach().flatten(1), dim=1)
    return ((student - teacher) ** 2).sum(dim=1).mean()


class AttentionDistillationLoss(nn.Module):
    """Attention distillation between consecutive stages (Qin 2020, eq. 6; AttdKD option).

    For stage outputs ``A_1 .. A_M`` in forward order (``SegmentationOutput.features``,
    decoder scales coarse to fine), ``L = alpha sum_m ||G^_m - G^_{m+1}||_F^2`` with
    ``G^ = S(I(G))``: ``G`` the spatial attention (:func:`spatial_attention`), ``I`` trilinear
    interpolation of the earlier (coarser) map to the size of the later one (our choice: the
    later, finer map is the teacher and keeps its detail), ``S`` softmax over all voxels.
    ``G^_{m+1}`` is detached, so attention flows from the last stage back to the first.
    The squared norm is summed over voxels and averaged over the batch.

    With ``channel=True`` the same term is added for the channel attention
    (:func:`channel_attention`, resampled to the teacher's channel count): our
    interpretation of Zhang 2026's AttdKD, which distils "spatial and channel knowledge".

    Parameters
    ----------
    power : float
        ``p`` of the attention map (2).
    alpha : float
        Factor of the loss in the total (0.1); the returned value is already scaled.
    channel : bool
        Also distil channel attention (AttdKD interpretation).

    Shapes
    ------
    ``forward(features: sequence of M >= 2 tensors (N, C_m, D_m, H_m, W_m)) -> scalar``
    """

    def __init__(self, power: float = 2.0, alpha: float = 0.1, channel: bool = False) -> None:
        super().__init__()
        if power <= 0.0:
            raise ValueError(f"power must be > 0, got {power}")
        if alpha < 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.power = power
        self.alpha = alpha
        self.channel = channel

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) < 2:
            raise ValueError(
                f"attention distillation needs at least two stage outputs, got {len(features)}; "
                "use a network that returns SegmentationOutput.features"
            )
        loss = 0.0
        for student, teacher in pairwise(features):
            loss = loss + _distillation_term(
                spatial_attention(student, self.power), spatial_attention(teacher, self.power)
            )  # Qin 2020, eq. 6
            if self.channel:
                loss = loss + _distillation_term(
                    channel_attention(student, self.power), channel_attention(teacher, self.power)
                )
        return self.alpha * loss
