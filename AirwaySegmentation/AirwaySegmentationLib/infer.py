"""Sliding-window inference engine: any airway network over a whole CT (METHODS.md section 5).

The network sees windows at least as large as the patch it was trained on; the windows of a
:class:`Tiling` are evenly spaced over the volume with at least the requested overlap.  With
``max_window_zyx`` above the training patch the windows grow (up to that size) so that fewer
of them cover the volume: a network of convolutions, instance norms and 1x1x1 attention has
no fixed input size, and fewer, larger windows waste less work on overlaps.

Overlapping windows are blended with a separable Gaussian importance map (nnU-Net's choice,
sigma = window / 8, so the window centres, which saw the most context, count most) or a plain
mean (Tang: "average overlaps").  The engine accumulates, per class, the weighted
probabilities ("sums", float16 by default: 8 bytes a voxel for four classes, no weight
volume); the classes need no normalisation, because the weights of a voxel sum to the same
number in every class:

- airway where ``1 - p_background >= threshold`` (0.5, METHODS section 5), i.e.
  ``sum_background <= (1 - threshold) * sum_all``;
- an airway voxel takes the most likely airway class, so the union is never split by a
  background-vs-class argmax.

The airway probability, when asked for, is normalised with the weight sum, which for a
separable map over a grid of windows is the outer product of three 1-D sums.

Devices and precision: :func:`resolve_device` (``auto``: CUDA when available), and
:func:`resolve_precision` (``auto``: bfloat16 on CPUs with native bfloat16 and on CUDA devices
that support it, float16 on older GPUs, else float32).  On the CPU, windows go in as
channels-last 3-D tensors and torch uses one thread per physical core.  On CUDA, windows are
batched and copied from pinned memory; an out-of-memory error halves the batch and retries,
and at batch 1 the run falls back to the CPU with a message.

Examples
--------
>>> from AirwaySegmentationLib.networks import build_network
>>> net = build_network("wingsnet", base_width=2)
>>> hu = np.full((20, 40, 36), -1000.0, dtype=np.float32)
>>> sums = predict_volume(net, hu, patch_size_zyx=(16, 16, 16), overlap_zyx=(4, 4, 4))
>>> sums.probabilities().shape, sums.labels().shape
((4, 20, 40, 36), (20, 40, 36))
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .arrays import Box
from .errors import AirwayInputError
from .inference_settings import BLENDINGS, CUDA_BATCH_SIZE, DEVICES, PRECISIONS, InferenceSettings
from .losses import class_log_probabilities
from .preprocess import DEFAULT_INPUT_SPEC, InputSpec, network_input
from .progress import Cancelled, ProgressCallback, report
from .sampling import PAD_HU

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Gaussian blending: sigma as a share of the window edge (nnU-Net's choice).
_GAUSSIAN_SIGMA_SHARE = 1.0 / 8.0
#: Floor of each 1-D Gaussian profile: the corners' weight (0.1^3) stays well above float16's
#: resolution, so voxels seen only by window corners are still blended soundly.
_PROFILE_FLOOR = 0.1
#: Airway union probability at and above which a voxel is airway (METHODS section 5).
AIRWAY_THRESHOLD = 0.5
#: Test-time mirroring (nnU-Net's): the flips, as tensor dimensions of (N, C, D, H, W).
_MIRROR_FLIPS = tuple(
    flip for r in range(4) for flip in itertools.combinations((2, 3, 4), r)
)


class CancelToken(Protocol):
    """Anything with ``is_set()`` (e.g. :class:`threading.Event`); set it to stop between windows."""

    def is_set(self) -> bool: ...


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


def physical_cpu_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's vector units).

    Counts distinct (package, core) pairs of the CPUs in the process's affinity mask from
    Linux's sysfs topology; elsewhere, or when that is unreadable, the usable logical CPUs.
    """
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return max(os.cpu_count() or 1, 1)
    cores = set()
    for cpu in usable:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return max(len(usable), 1)
    return max(len(cores), 1)


#: glibc ``mallopt`` parameters (malloc.h) and the values the engine sets on the CPU.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: 1 << 31}
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it to the kernel (once per process).

    Every window allocates and frees gigabytes of activations; by default glibc serves blocks
    that large with fresh ``mmap`` pages, so each window pays a page fault per 4 KiB page
    (measured: a third of a window's time in the kernel on 2 cores).  Raising the mmap and
    trim thresholds keeps freed blocks for the next window, at the cost of keeping up to the
    largest window's activations resident (PyTorch's tuning guide recommends jemalloc or
    tcmalloc for the same reason).  Returns False where there is no glibc.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        _malloc_tuned = all(libc.mallopt(option, value) == 1 for option, value in _KEEP_FREED_BYTES.items())
    except (OSError, AttributeError):
        return False
    return _malloc_tuned


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[int]:
    """Run the block with ``count`` torch threads (None: :func:`physical_cpu_cores`), then restore."""
    previous = torch.get_num_threads()
    count = physical_cpu_cores() if count is None else int(count)
    if count < 1:
        raise AirwayInputError(f"Thread count {count} is not usable; expected at least 1.")
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise AirwayInputError("Device cuda was asked for but no CUDA GPU is available to torch; use --device cpu or auto.")
        return torch.device(name)
    raise AirwayInputError(f"Unknown device {name!r}; expected one of {', '.join(DEVICES)} (or cuda:N).")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise AirwayInputError(f"Unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    if precision == "float16" and device.type != "cuda":
        raise AirwayInputError("Precision float16 needs a CUDA device; use bfloat16 or float32 on the CPU.")
    return _DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; for float32, true float32.

    cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa): on an H100 that
    moved probabilities by up to 2e-3 from the CPU's.  Whoever asks for float32 gets it.
    """
    if dtype == torch.float32:
        if device.type != "cuda":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False)
    return torch.autocast(device.type, dtype=dtype)


# --- tiling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """Equal windows evenly spaced over a volume (padded to at least one window).

    Attributes
    ----------
    volume_zyx : tuple of 3 int
        Shape of the volume to predict.
    shape_zyx : tuple of 3 int
        The covered volume: ``volume_zyx`` padded at the far end to at least ``window_zyx``.
    window_zyx : tuple of 3 int
        Size of every window.
    starts_zyx : tuple of 3 tuples of int
        Window starts along each axis; the windows are all their combinations.
    """

    volume_zyx: tuple[int, int, int]
    shape_zyx: tuple[int, int, int]
    window_zyx: tuple[int, int, int]
    starts_zyx: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    def __len__(self) -> int:
        return math.prod(len(starts) for starts in self.starts_zyx)

    def boxes(self) -> list[Box]:
        """The windows as slices, z slowest (neighbouring windows share memory pages)."""
        return [
            tuple(slice(start, start + size) for start, size in zip(corner, self.window_zyx))
            for corner in itertools.product(*self.starts_zyx)
        ]

    def overlaps_zyx(self) -> tuple[int, int, int]:
        """The smallest overlap between neighbouring windows along each axis (0 for one window)."""
        return tuple(
            min((size - (b - a) for a, b in zip(starts, starts[1:])), default=0)
            for starts, size in zip(self.starts_zyx, self.window_zyx)
        )


def _axis_windows(size: int, patch: int, overlap: int, max_window: int, divisor: int) -> tuple[int, int, tuple[int, ...]]:
    """Window size, padded axis length and evenly spaced starts for one axis."""
    for count in itertools.count(1):
        window = max(patch, divisor * math.ceil(math.ceil((size + (count - 1) * overlap) / count) / divisor))
        if window <= max_window or window == patch:
            break
    padded = max(size, window)
    if count == 1:
        return window, padded, (0,)
    step = (padded - window) / (count - 1)
    return window, padded, tuple(int(math.floor(i * step)) for i in range(count - 1)) + (padded - window,)


def plan_tiling(
    shape_zyx: Sequence[int],
    patch_size_zyx: Sequence[int],
    overlap_zyx: Sequence[int],
    max_window_zyx: Sequence[int] | None = None,
    divisor: int = 1,
) -> Tiling:
    """The fewest equal windows that cover ``shape_zyx`` with at least ``overlap_zyx`` overlap.

    Parameters
    ----------
    shape_zyx : sequence of 3 int
        Volume to cover.
    patch_size_zyx : sequence of 3 int
        The network's training patch: the smallest window (a smaller volume is padded).
    overlap_zyx : sequence of 3 int
        Minimum overlap of neighbouring windows in voxels, ``0 <= overlap < patch``.
    max_window_zyx : sequence of 3 int, optional
        Largest window; windows grow from the patch up to it so that fewer cover the volume.
        Default: the patch (fixed windows, as in training).
    divisor : int
        Window sizes are multiples of it (the network's :attr:`input_divisor`).

    Returns
    -------
    Tiling

    Examples
    --------
    >>> plan_tiling((100, 64, 64), (64, 64, 64), (32, 32, 32)).starts_zyx
    ((0, 18, 36), (0,), (0,))
    >>> tiling = plan_tiling((275, 265, 321), (128,) * 3, (32,) * 3, max_window_zyx=(192,) * 3, divisor=8)
    >>> tiling.window_zyx, len(tiling)
    ((160, 152, 184), 8)
    """
    patch, overlap = _check_window(patch_size_zyx, overlap_zyx)
    max_window = patch if max_window_zyx is None else tuple(int(n) for n in max_window_zyx)
    if len(max_window) != 3 or any(m < p for m, p in zip(max_window, patch)):
        raise AirwayInputError(f"The largest window {tuple(max_window)} is not usable; expected three sizes >= the patch {patch}.")
    if divisor < 1 or any(p % divisor for p in patch):
        raise AirwayInputError(f"The patch size {patch} is not usable; the network needs multiples of {divisor}.")
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise AirwayInputError(f"Cannot tile a volume of shape {tuple(shape_zyx)}; expected three positive sizes.")
    axes = [_axis_windows(*args, divisor) for args in zip(shape, patch, overlap, max_window)]
    return Tiling(
        volume_zyx=shape,
        shape_zyx=tuple(a[1] for a in axes),
        window_zyx=tuple(a[0] for a in axes),
        starts_zyx=tuple(a[2] for a in axes),
    )


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


def importance_profiles(window_zyx: Sequence[int], blending: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three 1-D profiles (float32, max 1, all > 0) whose outer product weighs a window's voxels."""
    if blending not in BLENDINGS:
        raise AirwayInputError(f"Unknown blending {blending!r}; expected one of {', '.join(BLENDINGS)}.")
    profiles = []
    for n in window_zyx:
        if blending == "mean":
            profiles.append(np.ones(n, dtype=np.float32))
            continue
        offset = np.arange(n) - (n - 1) / 2.0
        profile = np.exp(-0.5 * (offset / (_GAUSSIAN_SIGMA_SHARE * n)) ** 2)
        profiles.append(np.maximum(profile / profile.max(), _PROFILE_FLOOR).astype(np.float32))
    return tuple(profiles)


def importance_map(window_zyx: Sequence[int], blending: str) -> np.ndarray:
    """Per-voxel weight of a window's prediction: the outer product of :func:`importance_profiles`."""
    pz, py, px = importance_profiles(window_zyx, blending)
    return pz[:, None, None] * py[None, :, None] * px[None, None, :]


def weight_sum_profiles(tiling: Tiling, blending: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis sums of the window profiles; their outer product is every voxel's total weight."""
    sums = []
    for size, window, starts, profile in zip(
        tiling.shape_zyx, tiling.window_zyx, tiling.starts_zyx, importance_profiles(tiling.window_zyx, blending)
    ):
        total = np.zeros(size, dtype=np.float64)
        for start in starts:
            total[start : start + window] += profile
        sums.append(total)
    return tuple(sums)


# --- the engine ---------------------------------------------------------------------------


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` if it is a probability in (0, 1), else raise :class:`AirwayInputError`."""
    if not 0.0 < threshold < 1.0:
        raise AirwayInputError(f"The airway threshold {threshold} is not usable; expected a probability in (0, 1).")
    return threshold


@dataclass
class WindowSums:
    """What the engine accumulated: per-class weighted probability sums over a tiling.

    Attributes
    ----------
    sums : torch.Tensor
        ``(K, Z, Y, X)`` on the CPU, cropped back to the input's shape.
    tiling : Tiling
        The windows that produced them.
    blending : str
        Their importance map.
    device : torch.device
        Where the network ended up running (CPU after a CUDA out-of-memory fallback).
    dtype : torch.dtype
        Its autocast dtype.
    """

    sums: torch.Tensor
    tiling: Tiling
    blending: str
    device: torch.device
    dtype: torch.dtype

    def classes(self, threshold: float = AIRWAY_THRESHOLD, slab: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """``(airway, airway_class)``: bool union mask and the most likely airway class (uint8, 1..K-1) everywhere.

        Computed in z-slabs of ``slab`` slices, so the float32 temporaries stay small.
        """
        check_threshold(threshold)
        shape = tuple(self.sums.shape[1:])
        airway = np.empty(shape, dtype=bool)
        airway_class = np.empty(shape, dtype=np.uint8)
        for z in range(0, shape[0], slab):
            part = self.sums[:, z : z + slab].float()
            airway[z : z + slab] = (part[0] <= (1.0 - threshold) * part.sum(0)).numpy()
            airway_class[z : z + slab] = (part[1:].argmax(0) + 1).to(torch.uint8).numpy()
        return airway, airway_class

    def labels(self, threshold: float = AIRWAY_THRESHOLD) -> np.ndarray:
        """uint8 class labels (0 background, 1.. airway classes) without post-processing."""
        airway, airway_class = self.classes(threshold)
        return np.where(airway, airway_class, 0).astype(np.uint8)

    def _weight_slabs(self, slab: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(z slice, float64 total weight of its voxels)`` for consecutive z-slabs."""
        wz, wy, wx = (
            torch.from_numpy(w[:n]) for w, n in zip(weight_sum_profiles(self.tiling, self.blending), self.sums.shape[1:])
        )
        for z in range(0, self.sums.shape[1], slab):
            yield slice(z, z + slab), wz[z : z + slab, None, None] * wy[None, :, None] * wx[None, None, :]

    def probabilities(self, slab: int = 32) -> np.ndarray:
        """float32 ``(K, Z, Y, X)`` class probabilities (normalised by the blending weights)."""
        result = np.empty(tuple(self.sums.shape), dtype=np.float32)
        for z, total in self._weight_slabs(slab):
            result[:, z] = (self.sums[:, z].double() / total).float().numpy()
        return result

    def airway_probability(self, slab: int = 32) -> np.ndarray:
        """float16 ``(Z, Y, X)`` probability of the airway union, ``1 - p_background``."""
        result = np.empty(tuple(self.sums.shape[1:]), dtype=np.float16)
        for z, total in self._weight_slabs(slab):
            result[z] = (1.0 - self.sums[0, z].double() / total).clamp_(0.0, 1.0).numpy().astype(np.float16)
        return result


class SlidingWindow:
    """Runs a network over the windows of a volume and accumulates weighted class probabilities.

    Parameters
    ----------
    model : torch.nn.Module
        An airway network returning :class:`~AirwaySegmentationLib.networks.SegmentationOutput`;
        it is put in eval mode, moved to the device (and to channels-last if asked).
    settings : InferenceSettings
        Device, precision, batch, mirroring, blending and accumulator.
    """

    def __init__(self, model: nn.Module, settings: InferenceSettings = InferenceSettings()) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_precision(settings.precision, self.device)
        self.batch_size = settings.batch_size or (CUDA_BATCH_SIZE if self.device.type == "cuda" else 1)
        self.memory_format = torch.channels_last_3d if settings.channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        if self.device.type == "cpu":
            keep_freed_memory()

    def run(
        self,
        image_czyx: np.ndarray,
        tiling: Tiling,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> WindowSums:
        """Accumulate the blended class probabilities of every window of ``tiling``.

        Parameters
        ----------
        image_czyx : numpy.ndarray
            float32 network input ``(C, *tiling.shape_zyx)``, see :func:`tiled_network_input`.
        tiling : Tiling
            Windows planned for this shape (:func:`plan_tiling`).
        progress : callable, optional
            ``progress(fraction, message)`` after each batch of windows.
        cancel : CancelToken, optional
            Checked before each batch; when set, :class:`~AirwaySegmentationLib.progress.Cancelled` is raised.

        Returns
        -------
        WindowSums
        """
        if image_czyx.ndim != 4 or tuple(image_czyx.shape[1:]) != tiling.shape_zyx:
            raise AirwayInputError(
                f"The network input has shape {tuple(image_czyx.shape)} but the tiling covers {tiling.shape_zyx}; "
                "prepare it with tiled_network_input."
            )
        image = torch.from_numpy(np.asarray(image_czyx, dtype=np.float32))
        boxes = tiling.boxes()
        weight_cpu = torch.from_numpy(importance_map(tiling.window_zyx, self.settings.blending))
        weight = weight_cpu.to(self.device)
        accumulator = _DTYPES[self.settings.accumulator]
        sums: torch.Tensor | None = None
        done = 0
        report(progress, 0.0, f"Predicting {len(boxes)} windows of {'x'.join(map(str, tiling.window_zyx))} voxels")
        with cpu_threads(self.settings.threads), torch.inference_mode():
            while done < len(boxes):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Segmentation cancelled.")
                batch_boxes = boxes[done : done + self.batch_size]
                try:
                    probabilities = self._predict(image, batch_boxes)
                    probabilities = probabilities.mul_(weight).to(accumulator).cpu()
                except torch.cuda.OutOfMemoryError:
                    probabilities = None
                if probabilities is None:
                    # Outside the handler: the traceback no longer holds the failed batch's memory.
                    self._shrink_after_out_of_memory(progress, done / len(boxes))
                    weight = weight_cpu.to(self.device)  # the CPU after a fallback
                    continue
                if sums is None:
                    sums = torch.zeros((probabilities.shape[1],) + tiling.shape_zyx, dtype=accumulator)
                for box, window in zip(batch_boxes, probabilities):
                    sums[(slice(None),) + box] += window
                done += len(batch_boxes)
                report(progress, done / len(boxes), f"Predicted window {done} of {len(boxes)}")
        crop = (slice(None),) + tuple(slice(0, n) for n in tiling.volume_zyx)
        return WindowSums(sums[crop], tiling, self.settings.blending, self.device, self.dtype)

    def predict_patches(
        self,
        patches_nczyx: np.ndarray,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        channel: int | None = None,
    ) -> np.ndarray:
        """Class probabilities of separate patches (no blending), in batches of the settings' size.

        Used by stage 2, whose patches lie at breaks rather than on a grid.  Out-of-memory
        handling and cancelling are those of :meth:`run`.

        Parameters
        ----------
        patches_nczyx : numpy.ndarray
            float32 network inputs ``(N, C, D, H, W)``.
        progress : callable, optional
            ``progress(fraction, message)`` after each batch.
        cancel : CancelToken, optional
            Checked before each batch.
        channel : int, optional
            Keep only this class's probability.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, classes, D, H, W)``, or ``(N, D, H, W)`` for one ``channel``.
        """
        patches = torch.from_numpy(np.ascontiguousarray(patches_nczyx, dtype=np.float32))
        out: np.ndarray | None = None
        done = 0
        with cpu_threads(self.settings.threads), torch.inference_mode():
            while done < len(patches):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Prediction cancelled.")
                batch = patches[done : done + self.batch_size]
                try:
                    probabilities = self._predict_batch(batch)
                    if channel is not None:
                        probabilities = probabilities[:, channel]
                    probabilities = probabilities.float().cpu().numpy()
                except torch.cuda.OutOfMemoryError:
                    probabilities = None
                if probabilities is None:
                    self._shrink_after_out_of_memory(progress, done / len(patches))
                    continue
                if out is None:
                    out = np.empty((len(patches),) + probabilities.shape[1:], dtype=np.float32)
                out[done : done + len(batch)] = probabilities
                done += len(batch)
                report(progress, done / len(patches), f"Predicted patch {done} of {len(patches)}")
        if out is None:  # no patches
            return np.empty((0,) + patches.shape[1 if channel is None else 2 :], dtype=np.float32)
        return out

    def _predict(self, image: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        """Class probabilities (float32, on the device) of a batch of windows."""
        return self._predict_batch(torch.stack([image[(slice(None),) + box] for box in boxes]))

    def _predict_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (float32, on the device) of a stacked batch ``(N, C, D, H, W)``."""
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.contiguous(memory_format=self.memory_format)
        flips = _MIRROR_FLIPS if self.settings.mirror else ((),)
        total: torch.Tensor | None = None
        for flip in flips:
            with autocast(self.device, self.dtype):
                logits = self.model(batch.flip(flip) if flip else batch).main
            probabilities = class_log_probabilities(logits).exp()
            probabilities = probabilities.flip(flip) if flip else probabilities
            total = probabilities if total is None else total.add_(probabilities)
        return total if len(flips) == 1 else total.div_(len(flips))

    def _shrink_after_out_of_memory(self, progress: ProgressCallback | None, fraction: float) -> None:
        """Halve the batch after a CUDA out-of-memory error; at batch 1 continue on the CPU."""
        if self.batch_size > 1:
            self.batch_size //= 2
            torch.cuda.empty_cache()
            report(progress, fraction, f"Out of GPU memory: retrying with {self.batch_size} window(s) per batch")
            return
        message = "Out of GPU memory with one window per batch; continuing on the CPU (slower)."
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        report(progress, fraction, message)
        self.device = torch.device("cpu")
        self.dtype = resolve_precision(self.settings.precision if self.settings.precision != "float16" else "auto", self.device)
        self.model = self.model.to(self.device)
        torch.cuda.empty_cache()  # after the move: the cache held the model's GPU copy too
        keep_freed_memory()


def tiled_network_input(ct_zyx: np.ndarray, spec: InputSpec, tiling: Tiling) -> np.ndarray:
    """The network input of a CT, padded at the far end with air (``PAD_HU``) to ``tiling.shape_zyx``."""
    ct = np.asarray(ct_zyx)
    if ct.ndim != 3:
        raise AirwayInputError(f"Expected a 3-D CT but got an array with {ct.ndim} dimensions; give one 3-D volume.")
    if ct.shape != tiling.volume_zyx:
        raise AirwayInputError(f"The CT has shape {ct.shape} but the tiling was planned for {tiling.volume_zyx}.")
    if ct.shape != tiling.shape_zyx:
        # Padded in the CT's own type (int16 for most scans): half the memory of float32.
        dtype = ct.dtype if np.can_cast(np.min_scalar_type(PAD_HU), ct.dtype) else np.float32
        padded = np.full(tiling.shape_zyx, PAD_HU, dtype=dtype)
        padded[tuple(slice(0, n) for n in ct.shape)] = ct
        ct = padded
    return network_input(ct, spec)


_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


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
) -> WindowSums:
    """Sliding-window prediction of a whole CT with training-size windows (training's validation and mining).

    The engine (:class:`SlidingWindow`) with fixed windows of ``patch_size_zyx``, float32
    sums and the caller's torch threads.

    Parameters
    ----------
    model : torch.nn.Module
        An airway network; it is put in eval mode.
    ct_zyx : numpy.ndarray
        CT in HU, shape (Z, Y, X); any size (a volume smaller than the patch is padded with air).
    spec : InputSpec
        Input channels the model was trained with.
    patch_size_zyx : sequence of 3 int
        Window size, one the network accepts.
    overlap_zyx : sequence of 3 int
        Minimum overlap of neighbouring windows in voxels.
    blending : {"gaussian", "mean"}
        How overlapping windows are averaged.
    device : torch.device or str
        Where the model runs.
    dtype : torch.dtype
        Autocast dtype (float32: none).
    channels_last : bool
        Feed windows as channels-last 3-D tensors.

    Returns
    -------
    WindowSums
        Its :meth:`~WindowSums.labels` are the classes, :meth:`~WindowSums.probabilities` the
        float32 ``(K, Z, Y, X)`` probabilities (``K = max(C, 2)`` classes, background first).
    """
    tiling = plan_tiling(np.shape(ct_zyx), patch_size_zyx, overlap_zyx)
    settings = InferenceSettings(
        max_window_zyx=None, blending=blending, device=str(device), precision=_DTYPE_NAMES[dtype],
        accumulator="float32", channels_last=channels_last, threads=torch.get_num_threads(),
    )
    engine = SlidingWindow(model, settings)
    return engine.run(tiled_network_input(ct_zyx, spec, tiling), tiling)
