"""Settings of the sliding-window inference engine, importable without torch.

The CLI, run manifests and the Slicer module read and write them; the engine itself is
:mod:`AirwaySegmentationLib.infer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .errors import AirwayInputError

BLENDINGS = ("gaussian", "mean")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ACCUMULATORS = ("float16", "float32")
#: Windows per batch on CUDA before any out-of-memory retry (the CPU runs one at a time:
#: a batch does not make the CPU's convolutions faster and only costs memory).
CUDA_BATCH_SIZE = 4


@dataclass(frozen=True)
class InferenceSettings:
    """How the engine runs a network over a volume; stored in run manifests as :meth:`as_dict`.

    Attributes
    ----------
    overlap : float
        Minimum overlap of neighbouring windows as a share of the training patch, in [0, 1)
        (nnU-Net's tile step 0.5 is overlap 0.5; Tang used 0.5 at a 128 patch).
    max_window_zyx : tuple of 3 int or None
        Largest window (None: the training patch).  Larger windows mean fewer windows.
    blending : {"gaussian", "mean"}
        How overlapping windows are averaged.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    precision : str
        One of :data:`PRECISIONS`; ``auto`` picks the fastest exact-enough one.
    batch_size : int or None
        Windows per forward pass (None: 1 on the CPU, :data:`CUDA_BATCH_SIZE` on CUDA).
    mirror : bool
        Test-time mirroring over the three axes (8 passes per window, nnU-Net's default).
    accumulator : {"float16", "float32"}
        dtype of the per-class sums of weighted probabilities.
    channels_last : bool
        Feed windows and weights as channels-last 3-D tensors (oneDNN's fast layout).
    threads : int or None
        CPU threads (None: one per physical core).
    """

    overlap: float = 0.25
    max_window_zyx: tuple[int, int, int] | None = (192, 192, 192)
    blending: str = "gaussian"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    mirror: bool = False
    accumulator: str = "float16"
    channels_last: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.overlap, (int, float)) and 0.0 <= self.overlap < 1.0):
            raise AirwayInputError(f"The window overlap {self.overlap!r} is not usable; expected a share in [0, 1).")
        if self.blending not in BLENDINGS:
            raise AirwayInputError(f"Unknown blending {self.blending!r}; expected one of {', '.join(BLENDINGS)}.")
        if self.precision not in PRECISIONS:
            raise AirwayInputError(f"Unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}.")
        if self.accumulator not in ACCUMULATORS:
            raise AirwayInputError(f"Unknown accumulator {self.accumulator!r}; expected one of {', '.join(ACCUMULATORS)}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise AirwayInputError(f"Batch size {self.batch_size} is not usable; expected at least 1.")
        if self.threads is not None and self.threads < 1:
            raise AirwayInputError(f"Thread count {self.threads} is not usable; expected at least 1.")
        if self.max_window_zyx is not None:
            object.__setattr__(self, "max_window_zyx", tuple(int(n) for n in self.max_window_zyx))

    def overlap_voxels(self, patch_size_zyx: Sequence[int]) -> tuple[int, int, int]:
        """The overlap in voxels for a training patch."""
        return tuple(min(int(round(self.overlap * p)), p - 1) for p in patch_size_zyx)

    def as_dict(self) -> dict:
        """JSON-ready dictionary."""
        values = asdict(self)
        values["max_window_zyx"] = None if self.max_window_zyx is None else list(self.max_window_zyx)
        return values
