"""The sliding-window engine: tiling, blending weights, accumulation, devices, retries, cancel."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.infer import (
    SlidingWindow,
    cpu_threads,
    importance_map,
    physical_cpu_cores,
    plan_tiling,
    resolve_device,
    resolve_precision,
    tiled_network_input,
    weight_sum_profiles,
)
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.networks import SegmentationOutput, build_network
from AirwaySegmentationLib.preprocess import DEFAULT_INPUT_SPEC
from AirwaySegmentationLib.progress import Cancelled


class Pointwise(nn.Module):
    """Logits from each voxel alone: any tiling, blending or flip gives the same probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([[-6.0, 6.0], [5.0, -5.0], [1.0, 2.0], [0.5, -3.0]]))

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        return SegmentationOutput(main=torch.einsum("kc,ncdhw->nkdhw", self.scale, x - 0.4))


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than ``limit`` (as a small GPU would)."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def _ct(shape=(37, 45, 29), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1100, 300, size=shape).astype(np.float32)


def _run(model: nn.Module, ct: np.ndarray, patch=(16, 16, 16), **settings):
    settings = {"device": "cpu", "precision": "float32", "threads": 1, **settings}
    engine_settings = InferenceSettings(**settings)
    tiling = plan_tiling(ct.shape, patch, engine_settings.overlap_voxels(patch), engine_settings.max_window_zyx, 8)
    return SlidingWindow(model, engine_settings).run(tiled_network_input(ct, DEFAULT_INPUT_SPEC, tiling), tiling)


def _direct(model: nn.Module, ct: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(tiled_network_input(ct, DEFAULT_INPUT_SPEC, plan_tiling(ct.shape, (1, 1, 1), (0, 0, 0))))
    with torch.no_grad():
        return torch.softmax(model(x[None]).main, dim=1)[0].numpy()


# --- tiling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [5, 16, 17, 64, 100, 275, 321])
@pytest.mark.parametrize("max_window", [None, 24, 48])
def test_tiling_covers_every_voxel_with_the_overlap_asked(size, max_window):
    patch, overlap, divisor = 16, 4, 8
    tiling = plan_tiling((size, 16, 16), (patch,) * 3, (overlap, 0, 0), None if max_window is None else (max_window, 16, 16), divisor)
    window = tiling.window_zyx[0]
    assert window >= patch and window % divisor == 0 and window <= (max_window or patch)
    assert tiling.shape_zyx[0] == max(size, window) and tiling.volume_zyx == (size, 16, 16)
    covered = np.zeros(tiling.shape_zyx[0], dtype=int)
    for start in tiling.starts_zyx[0]:
        assert 0 <= start <= tiling.shape_zyx[0] - window
        covered[start : start + window] += 1
    assert covered.min() >= 1
    if len(tiling.starts_zyx[0]) > 1:
        assert tiling.overlaps_zyx()[0] >= overlap
        # The fewest windows: one window fewer of the largest allowed size could not cover.
        count = len(tiling.starts_zyx[0])
        largest = max_window or patch
        assert (count - 1) * largest - (count - 2) * overlap < size


def test_larger_windows_mean_fewer_windows_on_a_chest_crop():
    fixed = plan_tiling((275, 265, 321), (128,) * 3, (32,) * 3, None, 8)
    grown = plan_tiling((275, 265, 321), (128,) * 3, (32,) * 3, (192,) * 3, 8)
    assert len(fixed) == 3 * 3 * 4 and len(grown) == 2 * 2 * 2
    assert min(grown.overlaps_zyx()) >= 32


def test_tiling_refuses_unusable_sizes():
    with pytest.raises(AirwayInputError, match="overlap"):
        plan_tiling((40, 40, 40), (16,) * 3, (16, 0, 0))
    with pytest.raises(AirwayInputError, match="largest window"):
        plan_tiling((40, 40, 40), (16,) * 3, (4,) * 3, (8, 16, 16))
    with pytest.raises(AirwayInputError, match="multiples of 8"):
        plan_tiling((40, 40, 40), (12,) * 3, (4,) * 3, None, 8)


@pytest.mark.parametrize("blending", ["gaussian", "mean"])
def test_weight_sums_are_the_sum_of_the_windows_importance_maps(blending):
    tiling = plan_tiling((40, 23, 35), (16,) * 3, (6, 3, 5), (24, 16, 16), 8)
    brute = np.zeros(tiling.shape_zyx)
    weight = importance_map(tiling.window_zyx, blending)
    for box in tiling.boxes():
        brute[box] += weight
    wz, wy, wx = weight_sum_profiles(tiling, blending)
    np.testing.assert_allclose(wz[:, None, None] * wy[None, :, None] * wx[None, None, :], brute, rtol=1e-6)
    assert weight.min() > 0 and weight.max() == pytest.approx(1.0)


# --- accumulation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_window_zyx": None, "overlap": 0.5},
        {"blending": "mean", "max_window_zyx": (32, 24, 24)},
        {"mirror": True, "accumulator": "float32"},
        {"batch_size": 3, "channels_last": False},
    ],
)
def test_blended_probabilities_equal_the_network_on_the_whole_volume(settings):
    model, ct = Pointwise(), _ct()
    sums = _run(model, ct, **settings)
    expected = _direct(model, ct)
    tolerance = 2e-3 if sums.sums.dtype == torch.float16 else 1e-5
    np.testing.assert_allclose(sums.probabilities(), expected, atol=tolerance)
    np.testing.assert_allclose(sums.airway_probability(), 1 - expected[0], atol=max(tolerance, 1e-3))  # float16 output
    expected_labels = np.where(1 - expected[0] >= 0.5, np.argmax(expected[1:], axis=0) + 1, 0)
    differ = sums.labels() != expected_labels
    if sums.sums.dtype == torch.float32:
        assert not differ.any()
    else:  # float16 sums may only flip near-ties: airway probability at 0.5 or two classes equally likely
        top2 = np.sort(expected[1:], axis=0)[-2:]
        near_tie = (np.abs(0.5 - expected[0]) < tolerance) | (top2[1] - top2[0] < tolerance)
        assert not (differ & ~near_tie).any() and differ.mean() < 1e-3


def test_a_real_network_in_one_window_is_the_network_itself():
    torch.manual_seed(0)
    net = build_network("wingsnet", base_width=2).eval()
    ct = _ct((16, 24, 16))
    sums = _run(net, ct, max_window_zyx=(16, 24, 16), accumulator="float32")
    assert len(sums.tiling) == 1
    np.testing.assert_allclose(sums.probabilities(), _direct(net, ct), atol=1e-5)


def test_float16_sums_give_the_classes_of_float32_sums():
    torch.manual_seed(1)
    net = build_network("wingsnet", base_width=2).eval()
    ct = _ct((40, 40, 40), seed=3)
    half, full = (_run(net, ct, accumulator=a, overlap=0.5) for a in ("float16", "float32"))
    labels_half = np.where(*half.classes(), 0)
    labels_full = np.where(*full.classes(), 0)
    assert np.mean(labels_half == labels_full) > 0.999


# --- devices, retries, cancel ---------------------------------------------------------------


def test_out_of_memory_halves_the_batch_and_gives_the_same_result():
    ct = _ct()
    reference = _run(Pointwise(), ct, batch_size=1, max_window_zyx=None).sums
    flaky = OutOfMemoryAbove(Pointwise(), limit=1)
    messages = []
    settings = InferenceSettings(device="cpu", precision="float32", batch_size=4, threads=1, max_window_zyx=None)
    tiling = plan_tiling(ct.shape, (16,) * 3, settings.overlap_voxels((16,) * 3), None, 8)
    engine = SlidingWindow(flaky, settings)
    sums = engine.run(tiled_network_input(ct, DEFAULT_INPUT_SPEC, tiling), tiling, lambda f, m: messages.append(m))
    assert flaky.batches[:3] == [4, 2, 1] and engine.batch_size == 1
    assert any("retrying with 2" in m for m in messages) and any("retrying with 1" in m for m in messages)
    torch.testing.assert_close(sums.sums, reference)


def test_cancel_stops_between_windows():
    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if fraction > 0:
            cancel.set()

    ct = _ct()
    settings = InferenceSettings(device="cpu", precision="float32", threads=1, max_window_zyx=None)
    tiling = plan_tiling(ct.shape, (16,) * 3, (4,) * 3, None, 8)
    with pytest.raises(Cancelled):
        SlidingWindow(Pointwise(), settings).run(tiled_network_input(ct, DEFAULT_INPUT_SPEC, tiling), tiling, progress, cancel)
    assert len(tiling) > 2 and len([f for f in seen if f > 0]) == 1


def test_progress_reaches_one_in_order():
    seen = []
    ct = _ct()
    settings = InferenceSettings(device="cpu", precision="float32", threads=1, max_window_zyx=None)
    tiling = plan_tiling(ct.shape, (16,) * 3, (4,) * 3, None, 8)
    SlidingWindow(Pointwise(), settings).run(
        tiled_network_input(ct, DEFAULT_INPUT_SPEC, tiling), tiling, lambda f, m: seen.append(f)
    )
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) == len(tiling) + 1


def test_threads_are_restored_and_devices_resolved():
    before = torch.get_num_threads()
    with cpu_threads(1) as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert 1 <= physical_cpu_cores() <= os.cpu_count()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(AirwayInputError, match="Unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AirwayInputError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(AirwayInputError, match="float16 needs a CUDA"):
        resolve_precision("float16", torch.device("cpu"))


def test_settings_refuse_bad_values():
    for bad in ({"overlap": 1.0}, {"overlap": -0.1}, {"blending": "max"}, {"precision": "int8"},
                {"accumulator": "bfloat16"}, {"batch_size": 0}):
        with pytest.raises(AirwayInputError):
            InferenceSettings(**bad)
    assert InferenceSettings().as_dict()["max_window_zyx"] == [192, 192, 192]


def test_bfloat16_matches_float32_on_the_cpu():
    """The CPU fast path: bfloat16 autocast + channels-last against float32 (random small network)."""
    torch.manual_seed(2)
    net = build_network("wingsnet", base_width=4).eval()
    ct = _ct((32, 48, 48), seed=5)
    full = _run(net, ct, precision="float32", accumulator="float32").probabilities()
    fast = _run(net, ct, precision="bfloat16", channels_last=True).probabilities()
    assert np.abs(full - fast).max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_of_memory_at_one_window_on_cuda_continues_on_the_cpu():
    ct = _ct()
    reference = _run(Pointwise(), ct, max_window_zyx=None).sums
    flaky = OutOfMemoryAbove(Pointwise(), limit=0)  # every window is too large for "the GPU"...

    class OnlyOnCuda(nn.Module):  # ...but fine on the CPU
        def __init__(self) -> None:
            super().__init__()
            self.flaky = flaky

        def forward(self, x):
            return self.flaky(x) if x.is_cuda else self.flaky.inner(x)

    settings = InferenceSettings(device="cuda", precision="float32", batch_size=2, threads=1, max_window_zyx=None)
    tiling = plan_tiling(ct.shape, (16,) * 3, settings.overlap_voxels((16,) * 3), None, 8)
    engine = SlidingWindow(OnlyOnCuda(), settings)
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        sums = engine.run(tiled_network_input(ct, DEFAULT_INPUT_SPEC, tiling), tiling)
    assert engine.device.type == "cpu" and flaky.batches[:2] == [2, 1]
    torch.testing.assert_close(sums.sums, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_result():
    torch.manual_seed(3)
    net = build_network("wingsnet", base_width=4).eval()
    ct = _ct((32, 48, 48), seed=6)
    cpu = _run(net, ct, accumulator="float32").probabilities()
    gpu = _run(net, ct, device="cuda", precision="float32", accumulator="float32").probabilities()
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)
