"""Tests of the breakage attention (DeepTree eq. 2, METHODS.md section 2) and its blobs.

The reference is a brute force written here: one full-volume scipy distance transform per
component, sorted per voxel.  The fast version truncates H at the cutoff, so the comparison
is exact (1e-3) where the brute-force H is below the cutoff, and elsewhere the fast map must
be 0 while the brute force is at most sigmoid(alpha - cutoff).
"""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage
from scipy.special import expit

from AirwayRefineLib.attention import (
    AttentionBlob,
    breakage_attention,
    find_attention_blobs,
    second_nearest_component_distance,
)
from AirwaySegmentationLib.errors import AirwayInputError
from synthetic_trees import capsule_mask

SPACING = (1.5, 0.8, 0.6)
SHAPE = (28, 48, 64)


def brute_force_second_distance(mask: np.ndarray, spacing, connectivity: int) -> np.ndarray:
    """H by definition: a full distance transform per component, second smallest per voxel."""
    labels, count = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    if count < 2:
        return np.full(mask.shape, np.inf)
    distances = np.stack([ndimage.distance_transform_edt(labels != k, sampling=spacing) for k in range(1, count + 1)])
    return np.sort(distances, axis=0)[1]


def fragments_mask(seed: int) -> np.ndarray:
    """Seven random tube fragments (capsules) in a small anisotropic volume, some touching."""
    rng = np.random.default_rng(seed)
    extent = np.asarray(SHAPE) * np.asarray(SPACING)
    segments = []
    for _ in range(7):
        p0 = rng.uniform(0.1, 0.9) * extent
        p1 = np.clip(p0 + rng.normal(0.0, 8.0, 3), 0.0, extent)
        segments.append((tuple(p0), tuple(p1), rng.uniform(0.8, 2.0)))
    return capsule_mask(SHAPE, SPACING, segments)


def collinear_tubes(gap_voxels: int, spacing=(1.25, 0.8, 0.5), radius_mm: float = 1.6):
    """Two tubes along x with ``gap_voxels`` voxel steps between their facing end planes."""
    shape = (17, 25, 120)
    z, y = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape[:2], spacing[:2])), indexing="ij")
    disk = (z - 8 * spacing[0]) ** 2 + (y - 12 * spacing[1]) ** 2 <= radius_mm**2
    mask = np.zeros(shape, dtype=bool)
    end = 40
    mask[:, :, 5 : end + 1] = disk[:, :, None]
    mask[:, :, end + gap_voxels : 115] = disk[:, :, None]
    midpoint = (8, 12, end + gap_voxels // 2)
    return mask, spacing, midpoint


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("connectivity, cutoff_mm", [(26, None), (6, None), (26, 4.0)])
def test_matches_brute_force(seed, connectivity, cutoff_mm):
    mask = fragments_mask(seed)
    alpha = 5.0
    cutoff = alpha + 10.0 if cutoff_mm is None else cutoff_mm
    h_exact = brute_force_second_distance(mask, SPACING, connectivity)
    assert np.isfinite(h_exact).all(), "the random volume should hold several components"
    reference = expit(alpha - h_exact)
    attention = breakage_attention(mask, SPACING, alpha, connectivity=connectivity, cutoff_mm=cutoff_mm)
    assert attention.dtype == np.float32 and attention.shape == mask.shape
    defined = h_exact < cutoff
    assert defined.any()
    assert np.abs(attention[defined] - reference[defined]).max() < 1e-3
    assert (attention[~defined] == 0).all()
    assert np.abs(attention - reference).max() <= expit(alpha - cutoff) + 1e-6
    h_fast = second_nearest_component_distance(mask, SPACING, cutoff, connectivity=connectivity)
    np.testing.assert_allclose(h_fast, np.minimum(h_exact, cutoff), atol=1e-3)


def test_one_component_and_empty_give_zeros():
    mask, spacing, _ = collinear_tubes(gap_voxels=0)
    assert cc3d.connected_components(mask, return_N=True)[1] == 1
    assert not breakage_attention(mask, spacing).any()
    assert not breakage_attention(np.zeros((5, 6, 7), dtype=bool), spacing).any()


def test_far_apart_components_give_about_zero():
    mask, spacing, _ = collinear_tubes(gap_voxels=60)  # 30 mm apart
    assert breakage_attention(mask, spacing).max() < 1e-4


@pytest.mark.parametrize("gap_voxels", [4, 12, 20])
def test_gap_midpoint_is_sigmoid_of_half_gap(gap_voxels):
    mask, spacing, midpoint = collinear_tubes(gap_voxels)
    gap_mm = gap_voxels * spacing[2]
    attention = breakage_attention(mask, spacing)
    assert attention[midpoint] == pytest.approx(expit(5.0 - gap_mm / 2), abs=1e-4)


def test_blob_sits_at_the_gap():
    mask, spacing, midpoint = collinear_tubes(gap_voxels=12)
    blobs = find_attention_blobs(breakage_attention(mask, spacing))
    assert len(blobs) == 1
    blob = blobs[0]
    assert isinstance(blob, AttentionBlob) and blob.size_voxels > 0 and 0.5 < blob.peak < 1
    assert np.abs(np.subtract(blob.centre_zyx, midpoint)).max() <= 1
    assert find_attention_blobs(np.zeros((4, 4, 4), dtype=np.float32)) == []


def test_progress_and_bad_input():
    calls = []
    breakage_attention(fragments_mask(0), SPACING, progress=lambda f, m: calls.append(f))
    assert calls and calls[-1] == 1.0 and calls == sorted(calls)
    with pytest.raises(AirwayInputError):
        breakage_attention(np.zeros((4, 4), dtype=bool), SPACING)
    with pytest.raises(AirwayInputError):
        breakage_attention(np.zeros((4, 4, 4), dtype=bool), (1.0, 0.0, 1.0))
    with pytest.raises(AirwayInputError):
        breakage_attention(np.zeros((4, 4, 4), dtype=bool), SPACING, connectivity=8)
