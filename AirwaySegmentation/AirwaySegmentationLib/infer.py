"""Sliding-window prediction of a whole CT with any airway network (METHODS.md section 5).

The network sees patches of the size it was trained on; overlapping windows are blended
with a Gaussian importance map (nnU-Net's, sigma = patch / 8, so the window centres, which
saw the most context, count most) or a plain mean (Tang: "average overlaps").  Probabilities
are turned into the three classes by thresholding the airway union at 0.5 (METHODS section 5)
and giving each airway voxel its most likely class.

Precision: :func:`resolve_precision` picks the autocast dtype (``auto``: bfloat16 on CPUs
with native bfloat16 and on CUDA devices that support it, float16 on older GPUs, else
float32), :func:`autocast` applies it.

This is the simple, correct reference used by training (validation, hard mining); batching
of windows, tiling across devices and post-processing (largest component, hole filling)
belong to the inference engine.

Examples
--------
>>> from AirwaySegmentationLib.networks import build_network
>>> net = build_network("wingsnet", base_width=2)
>>> hu = np.full((20, 40, 36), -1000.0, dtype=np.float32)
>>> probabilities = predict_volume(net, hu, patch_size_zyx=(16, 16, 16), overlap_zyx=(4, 4, 4))
>>> probabilities.shape, probabilities_to_classes(probabilities).shape
((4, 20, 40, 36), (20, 40, 36))
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import AirwayInputError
from .losses import class_log_probabilities
from .preprocess import DEFAULT_INPUT_SPEC, InputSpec, network_input
from .sampling import PAD_HU

BLENDINGS = ("gaussian", "mean")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Gaussian blending: sigma as a share of the patch edge (nnU-Net's choice).
_GAUSSIAN_SIGMA_SHARE = 1.0 / 8.0
#: Airway union probability at and above which a voxel is airway (METHODS section 5).
AIRWAY_THRESHOLD = 0.5


def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512-BF16 or AMX), per ``/proc/cpuinfo``.

    ``torch.backends.cpu.get_cpu_capability()`` reports only the vector width ("AVX512")
    and oneDNN accepts bfloat16 on any AVX-512 CPU (emulated, slower than float32), so the
    CPU's own flags decide.  Elsewhere than Linux: False.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    if precision == "float16" and device.type != "cuda":
        raise AirwayInputError("Precision float16 needs a CUDA device; use bfloat16 or float32 on the CPU.")
    return _DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def window_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Start indices of windows of ``patch`` voxels covering ``size >= patch`` voxels.

    Windows step by ``patch - overlap``; the last one is moved back to end at ``size``, so
    every voxel is covered and no window leaves the volume.

    Examples
    --------
    >>> window_starts(100, 64, 32)
    [0, 32, 36]
    """
    step = patch - overlap
    starts = list(range(0, size - patch, step))
    return starts + [size - patch]


def importance_map(patch_size_zyx: Sequence[int], blending: str) -> np.ndarray:
    """Per-voxel weight of a window's prediction, float32 ``patch_size_zyx``, max 1, all > 0."""
    if blending not in BLENDINGS:
        raise AirwayInputError(f"Unknown blending {blending!r}; expected one of {', '.join(BLENDINGS)}.")
    if blending == "mean":
        return np.ones(tuple(patch_size_zyx), dtype=np.float32)
    profiles = []
    for n in patch_size_zyx:
        offset = np.arange(n) - (n - 1) / 2.0
        profiles.append(np.exp(-0.5 * (offset / (_GAUSSIAN_SIGMA_SHARE * n)) ** 2))
    weight = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    # The corners' tiny weights would make voxels seen only by corners numerically fragile.
    return np.maximum(weight / weight.max(), 1e-3).astype(np.float32)


def _check_window(patch_size_zyx: Sequence[int], overlap_zyx: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    patch = tuple(int(n) for n in patch_size_zyx)
    overlap = tuple(int(n) for n in overlap_zyx)
    if len(patch) != 3 or len(overlap) != 3 or min(patch) < 1:
        raise AirwayInputError(f"The patch size {tuple(patch_size_zyx)} is not usable; expected three positive sizes.")
    if any(not 0 <= o < p for o, p in zip(overlap, patch)):
        raise AirwayInputError(
            f"The window overlap {tuple(overlap_zyx)} is not usable; expected 0 <= overlap < patch size {patch}."
        )
    return patch, overlap


def predict_volume(
    model: nn.Module,
    ct_zyx: np.ndarray,
    spec: InputSpec = DEFAULT_INPUT_SPEC,
    patch_size_zyx: Sequence[int] = (128, 128, 128),
    overlap_zyx: Sequence[int] = (64, 64, 64),
    blending: str = "gaussian",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> np.ndarray:
    """Class probabilities of a whole CT by sliding-window prediction.

    Parameters
    ----------
    model : torch.nn.Module
        An airway network returning :class:`~AirwaySegmentationLib.networks.SegmentationOutput`;
        it is put in eval mode and ``main`` is used.
    ct_zyx : numpy.ndarray
        CT in HU, shape (Z, Y, X); any size (a volume smaller than the patch is padded with
        air, ``PAD_HU``).
    spec : InputSpec
        Input channels the model was trained with.
    patch_size_zyx : sequence of 3 int
        Window size, one the network accepts (e.g. divisible by 8 or 16).
    overlap_zyx : sequence of 3 int
        Overlap of neighbouring windows in voxels (64 at a 128 patch in Tang).
    blending : {"gaussian", "mean"}
        How overlapping windows are averaged.
    device : torch.device or str
        Where the model runs (it must already be there).
    dtype : torch.dtype
        Autocast dtype (float32: none); probabilities are always accumulated in float32.
    channels_last : bool
        Feed windows as channels-last 3D tensors (as the model's weights are on CPU).

    Returns
    -------
    numpy.ndarray
        float32 ``(K, Z, Y, X)`` probabilities summing to 1 over ``K`` (``K = max(C, 2)``
        classes, background first).
    """
    patch, overlap = _check_window(patch_size_zyx, overlap_zyx)
    ct = np.asarray(ct_zyx)
    if ct.ndim != 3:
        raise AirwayInputError(f"Expected a 3-D CT but got an array with {ct.ndim} dimensions; give one 3-D volume.")
    device = torch.device(device)
    padded_shape = tuple(max(n, p) for n, p in zip(ct.shape, patch))
    padded = np.full(padded_shape, PAD_HU, dtype=np.float32)
    padded[tuple(slice(0, n) for n in ct.shape)] = ct
    image = torch.from_numpy(network_input(padded, spec))
    weight = torch.from_numpy(importance_map(patch, blending))
    probability_sum: torch.Tensor | None = None
    weight_sum = torch.zeros(padded_shape)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model.eval()
    with torch.inference_mode():
        for z in window_starts(padded_shape[0], patch[0], overlap[0]):
            for y in window_starts(padded_shape[1], patch[1], overlap[1]):
                for x in window_starts(padded_shape[2], patch[2], overlap[2]):
                    box = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                    window = image[(slice(None),) + box][None].to(device, memory_format=memory_format)
                    with autocast(device, dtype):
                        logits = model(window).main
                    probabilities = class_log_probabilities(logits).exp()[0].cpu()
                    if probability_sum is None:
                        probability_sum = torch.zeros((probabilities.shape[0],) + padded_shape)
                    probability_sum[(slice(None),) + box] += probabilities * weight
                    weight_sum[box] += weight
    result = (probability_sum / weight_sum).numpy()
    return np.ascontiguousarray(result[(slice(None),) + tuple(slice(0, n) for n in ct.shape)])


def probabilities_to_classes(probabilities: np.ndarray, threshold: float = AIRWAY_THRESHOLD) -> np.ndarray:
    """Class labels from ``(K, Z, Y, X)`` probabilities: airway union thresholded, then argmax.

    A voxel is airway when ``1 - p_background >= threshold`` (METHODS section 5); an airway
    voxel takes the most likely of the airway classes, so the union is never split by a
    background-vs-class argmax.

    Returns
    -------
    numpy.ndarray
        uint8 (Z, Y, X): 0 background, 1.. airway classes.
    """
    airway = (1.0 - probabilities[0]) >= threshold
    classes = np.argmax(probabilities[1:], axis=0).astype(np.uint8) + 1
    return np.where(airway, classes, 0).astype(np.uint8)
