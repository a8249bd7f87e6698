"""Image volumes with their geometry: reading, validating and writing CT and label files.

A :class:`Volume` is a numpy array in z, y, x order plus the :class:`Geometry` that places it
in physical (LPS, mm) space.  Readers accept NIfTI, NRRD, MHA/MHD and a folder holding one
DICOM series; writers produce NIfTI, NRRD and MHA, always atomically (temporary file in the
target folder, then rename), so a failed run never leaves a partial file behind.

Every problem with user input raises :class:`~AirwaySegmentationLib.errors.AirwayInputError`
with a one-sentence message.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import AirwayInputError

#: File name endings the readers and writers accept (compared in lower case).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

# Plausible CT attenuation: air is -1000 HU (scanners clip at -1024 or a little below),
# dense bone and contrast reach a few thousand, metal is clipped at 3071 or more.
_CT_MIN_PLAUSIBLE_HU = -1400.0
_CT_AIR_MAX_HU = -700.0
_CT_MAX_PLAUSIBLE_HU = 32767.0
# A plateau of one value below this (scanners clip air at -1024) is outside-field-of-view padding.
_CT_PADDING_BELOW_HU = -1024.0


@dataclass(frozen=True)
class Geometry:
    """Placement of a voxel grid in physical space (SimpleITK / ITK conventions, LPS, mm).

    Attributes
    ----------
    spacing_xyz : tuple of 3 float
        Voxel size in mm along the image's i, j, k (x, y, z) axes.
    origin_xyz : tuple of 3 float
        Physical position (mm) of the centre of voxel (0, 0, 0).
    direction : tuple of 9 float
        Row-major 3x3 matrix whose columns are the physical directions of the i, j, k axes.
    """

    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        spacing = np.asarray(self.spacing_xyz, dtype=float)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise AirwayInputError(
                f"Voxel spacing {tuple(spacing.tolist())} mm is not usable: expected three "
                "positive, finite sizes; fix the image header."
            )
        origin = np.asarray(self.origin_xyz, dtype=float)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise AirwayInputError("The image origin is not three finite numbers; fix the image header.")
        matrix = np.asarray(self.direction, dtype=float)
        if matrix.shape != (9,) or not np.all(np.isfinite(matrix)):
            raise AirwayInputError("The image direction is not a 3x3 matrix of finite numbers; fix the image header.")
        matrix = matrix.reshape(3, 3)
        if abs(abs(np.linalg.det(matrix)) - 1.0) > 1e-3 or not np.allclose(
            matrix.T @ matrix, np.eye(3), atol=1e-3
        ):
            raise AirwayInputError(
                "The image direction matrix is degenerate (its axes are not orthonormal); "
                "fix the image header."
            )
        object.__setattr__(self, "spacing_xyz", tuple(float(v) for v in spacing))
        object.__setattr__(self, "origin_xyz", tuple(float(v) for v in origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in matrix.ravel()))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm in numpy (z, y, x) axis order."""
        return self.spacing_xyz[::-1]

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3x3 direction matrix (columns = physical directions of the i, j, k axes)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices (i, j, k, 1) to LPS millimetres (the ``.seg.nrrd`` and MRML form)."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix * np.asarray(self.spacing_xyz)
        matrix[:3, 3] = self.origin_xyz
        return matrix

    @classmethod
    def from_ijk_to_lps(cls, matrix: np.ndarray, what: str) -> "Geometry":
        """The geometry of a 4x4 index-to-LPS matrix; ``what`` names its source in errors."""
        matrix = np.asarray(matrix, dtype=float)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise AirwayInputError(f"{what} has a zero voxel spacing; fix its geometry.")
        try:
            return cls(tuple(spacing), tuple(matrix[:3, 3]), tuple((matrix[:3, :3] / spacing).ravel()))
        except AirwayInputError as error:
            raise AirwayInputError(f"{what}: {error}") from None

    @property
    def superior_zyx(self) -> tuple[float, float, float]:
        """Index-space direction (z, y, x) in which the patient's head lies.

        Row 2 of the direction matrix holds the physical superior (LPS +z) component of a
        step along each index axis i, j, k; reversed, it is the step in z, y, x order.
        """
        k, j, i = self.direction_matrix[2, ::-1]
        return (float(k), float(j), float(i))

    def index_zyx_to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
        """Map continuous voxel indices (..., 3) in z, y, x order to physical LPS points (..., 3) x, y, z in mm."""
        index_xyz = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return np.asarray(self.origin_xyz) + (index_xyz * np.asarray(self.spacing_xyz)) @ self.direction_matrix.T

    def physical_to_index_zyx(self, point_xyz: np.ndarray) -> np.ndarray:
        """Map physical LPS points (..., 3) x, y, z in mm to continuous voxel indices (..., 3) in z, y, x order."""
        offset = np.asarray(point_xyz, dtype=float) - np.asarray(self.origin_xyz)
        index_xyz = (offset @ self.direction_matrix) / np.asarray(self.spacing_xyz)
        return index_xyz[..., ::-1]

    def same_grid(self, other: "Geometry", shape_zyx: tuple[int, ...], other_shape_zyx: tuple[int, ...]) -> bool:
        """True when both grids have the same shape and place every voxel within 1e-3 voxel of the other."""
        if tuple(shape_zyx) != tuple(other_shape_zyx):
            return False
        spacing = np.asarray(self.spacing_xyz)
        return bool(
            np.allclose(spacing, other.spacing_xyz, rtol=1e-4, atol=1e-6)
            and np.allclose(self.origin_xyz, other.origin_xyz, atol=1e-3 * spacing.min())
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )


@dataclass
class Volume:
    """A 3-D array in z, y, x order and the geometry that places it.

    Attributes
    ----------
    array_zyx : numpy.ndarray
        Voxel values, shape (Z, Y, X).
    geometry : Geometry
        Spacing, origin and direction.
    """

    array_zyx: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if self.array_zyx.ndim != 3:
            raise AirwayInputError(
                f"Expected a 3-D volume but got an array with {self.array_zyx.ndim} dimensions; "
                "give a single 3-D image."
            )

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm in z, y, x order."""
        return self.geometry.spacing_zyx

    def with_array(self, array_zyx: np.ndarray) -> "Volume":
        """A new volume on the same grid holding ``array_zyx`` (same shape required)."""
        if array_zyx.shape != self.array_zyx.shape:
            raise ValueError(f"array shape {array_zyx.shape} differs from the grid shape {self.array_zyx.shape}")
        return Volume(array_zyx, self.geometry)


def geometry_of(image: sitk.Image) -> Geometry:
    """The :class:`Geometry` of a SimpleITK image."""
    return Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image holding a copy of the volume's voxels and its geometry.

    Types SimpleITK cannot hold are converted without loss of meaning: bool to uint8,
    float16 to float32, and non-native byte order to native.
    """
    values = np.asarray(volume.array_zyx)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    elif values.dtype == np.float16:
        values = values.astype(np.float32)
    elif values.dtype.kind not in "uif":
        raise AirwayInputError(f"Cannot store {values.dtype} voxels in an image file; give integer or real values.")
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    image = sitk.GetImageFromArray(np.ascontiguousarray(values))
    image.SetSpacing(volume.geometry.spacing_xyz)
    image.SetOrigin(volume.geometry.origin_xyz)
    image.SetDirection(volume.geometry.direction)
    return image


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES + (".seg.nrrd",):
        if name.endswith(suffix):
            return ".seg.nrrd" if name.endswith(".seg.nrrd") else suffix
    return path.suffix.lower()


def _read_image(path: Path) -> sitk.Image:
    if not path.exists():
        raise AirwayInputError(f"{path} does not exist; check the path.")
    if path.is_dir():
        return _read_dicom_series(path)
    if not os.access(path, os.R_OK):
        raise AirwayInputError(f"{path} cannot be read (permission denied); check the file's permissions.")
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise AirwayInputError(_describe_read_error(path, error)) from None


def _nifti_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1 or NIfTI-2 file holds up to the end of its image data (``vox_offset`` plus
    the voxels), from its header; None when ``header`` is not one."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 1 for n in dims[1 : dims[0] + 1]):
            return None
        return offset + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file cut short (a copy or download that stopped): ITK reads the missing
    voxels as zeros without a word."""
    compressed = _suffix(path) == ".nii.gz"
    try:
        if compressed:
            # The gzip trailer holds the data's length (mod 2^32); only a mismatch costs a full
            # decompression (a file of several gzip members has the last one's length there).
            with open(path, "rb") as stream:
                magic = stream.read(2)
                stream.seek(-4, os.SEEK_END)
                trailer = struct.unpack("<I", stream.read(4))[0]
            if magic != b"\x1f\x8b":
                return  # not gzip at all: ITK says what it is not
            with gzip.open(path, "rb") as stream:
                expected = _nifti_bytes(stream.read(540))
            if expected is None or trailer == expected % 2**32:
                return
            with gzip.open(path, "rb") as stream:
                size = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 24), b""))
        else:
            with open(path, "rb") as stream:
                expected = _nifti_bytes(stream.read(540))
            size = path.stat().st_size
    except (OSError, EOFError, zlib.error):
        raise AirwayInputError(f"{path} is truncated or damaged (its compressed data ends early); copy it again.") from None
    if expected is not None and size < expected:
        raise AirwayInputError(
            f"{path} is truncated: its header promises {expected} bytes but it holds {size}; copy it again."
        )


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr for folders without DICOM
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if not series:
        raise AirwayInputError(f"The folder {folder} holds no DICOM series; give a folder of DICOM slices or an image file.")
    if len(series) > 1:
        raise AirwayInputError(f"The folder {folder} holds {len(series)} DICOM series; put one series per folder.")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise AirwayInputError(_describe_read_error(folder, error)) from None
    _check_slice_positions(folder, files, image)
    return image


def _check_slice_positions(folder: Path, files: tuple[str, ...], image: sitk.Image) -> None:
    """Refuse a series with missing slices or uneven slice steps.

    ITK only warns and averages the spacing, which would misplace slices by up to half a gap.
    """
    if len(files) < 3:
        return
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = []
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        if not header.HasMetaDataKey("0020|0032"):
            return  # no positions to check (e.g. a multi-frame file); trust the reader
        positions.append(float(np.dot([float(v) for v in header.GetMetaData("0020|0032").split("\\")], normal)))
    steps = np.diff(np.sort(positions))
    if steps.size and (steps.min() <= 0 or steps.max() - steps.min() > 0.01 * steps.max() + 1e-3):
        raise AirwayInputError(
            f"The DICOM series in {folder} has uneven slice positions (steps {steps.min():.3g} to "
            f"{steps.max():.3g} mm): slices are missing or duplicated; export the complete series."
        )


def _describe_read_error(path: Path, error: RuntimeError) -> str:
    """One sentence for an ITK read failure: header geometry problems are named as such."""
    text = str(error)
    if "spacing" in text.lower():
        return f"{path} has a zero or negative voxel spacing in its header; fix the image header."
    if "direction" in text.lower():
        return f"{path} has a degenerate direction matrix (determinant 0) in its header; fix the image header."
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if "ERROR:" in line), lines[-1] if lines else "unknown error")
    detail = detail.split("ERROR:", 1)[-1].strip().rstrip(".")
    return f"{path} is not a readable image ({detail}); expected NIfTI, NRRD, MHA/MHD or a DICOM folder."


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D scalar image file (or DICOM series folder) with its geometry.

    Parameters
    ----------
    path : str or path-like
        NIfTI, NRRD, MHA/MHD file, or a folder holding one DICOM series.

    Returns
    -------
    Volume
        Voxels in z, y, x order and the image's geometry.

    Raises
    ------
    AirwayInputError
        The file is missing or unreadable, not an image, not 3-D, not scalar, or its
        geometry is unusable.
    """
    path = Path(path)
    image = _read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AirwayInputError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} values per voxel; expected a scalar (grey-level) image."
        )
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    elif dimension != 3:
        size = "x".join(str(s) for s in image.GetSize())
        raise AirwayInputError(f"{path} is a {dimension}-D image ({size}); expected a 3-D volume.")
    if min(image.GetSize()) < 2:
        size = "x".join(str(s) for s in image.GetSize())
        raise AirwayInputError(f"{path} is a single slice ({size}); expected a 3-D volume with several slices.")
    try:
        geometry = geometry_of(image)
    except AirwayInputError as error:
        raise AirwayInputError(f"{path}: {error}") from None
    return Volume(sitk.GetArrayFromImage(image), geometry)


def check_ct(volume: Volume, source: str = "the CT") -> Volume:
    """Check that a volume holds CT attenuation in Hounsfield units.

    Parameters
    ----------
    volume : Volume
        The candidate CT.
    source : str
        How to name the volume in error messages (usually its path).

    Returns
    -------
    Volume
        The same volume.

    Raises
    ------
    AirwayInputError
        Non-finite voxels, a constant image, no air (a chest CT holds air around the body
        and in the lungs), or values outside the range of CT numbers (0-255 images, MR).
    """
    values = volume.array_zyx
    if values.dtype.kind == "b":
        raise AirwayInputError(f"{source} is a binary mask, not a CT; give the CT image in Hounsfield units.")
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise AirwayInputError(f"{source} has {bad} NaN or infinite voxels; a CT must hold finite Hounsfield units.")
    lowest, highest = float(values.min()), float(values.max())
    if highest == lowest:
        raise AirwayInputError(f"{source} is constant ({lowest:g}); expected a CT in Hounsfield units.")
    if lowest < _CT_MIN_PLAUSIBLE_HU - 2000 or highest > _CT_MAX_PLAUSIBLE_HU:
        raise AirwayInputError(
            f"{source} has values from {lowest:g} to {highest:g}, outside the range of CT numbers; "
            "expected Hounsfield units (air -1000, water 0)."
        )
    # Percentiles of a strided sample are enough to judge the intensity range.
    sample = values[:: max(1, values.shape[0] // 64), ::2, ::2].astype(np.float32).ravel()
    if lowest < _CT_PADDING_BELOW_HU:
        # Many scanners fill the corners outside the circular field of view with one value
        # far below air (-2048, -3024); that plateau is padding, not attenuation.
        inside_fov = sample[sample != lowest]
        if inside_fov.size >= sample.size // 4:
            sample = inside_fov
    low = float(np.percentile(sample, 0.5))
    if low > _CT_AIR_MAX_HU:
        raise AirwayInputError(
            f"{source} has no air-like values (0.5th percentile {low:g}, expected about -1000 HU); "
            "it does not look like a chest CT in Hounsfield units (a 0-255 image or MR?); "
            "convert it to Hounsfield units."
        )
    if low < _CT_MIN_PLAUSIBLE_HU:
        raise AirwayInputError(
            f"{source} has much of its volume below {_CT_MIN_PLAUSIBLE_HU:g} (0.5th percentile {low:g}); "
            "expected Hounsfield units with air at about -1000; apply the rescale slope and intercept."
        )
    return volume


def read_ct(path: str | os.PathLike) -> Volume:
    """Read a chest CT and check that it holds Hounsfield units (see :func:`check_ct`)."""
    return check_ct(read_volume(path), source=str(path))


def read_label(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read a label map and, when a reference CT is given, check that it lies on the CT's grid.

    ``.seg.nrrd`` files are read as label maps by :mod:`~AirwaySegmentationLib.segfile`.

    Parameters
    ----------
    path : str or path-like
        Label image (integer voxels) or a Slicer ``.seg.nrrd``.
    reference : Volume, optional
        The CT the labels belong to.

    Returns
    -------
    Volume
        Integer labels (uint8 when they fit) in z, y, x order.

    Raises
    ------
    AirwayInputError
        Unreadable file, non-integer values, negative labels, or a grid that differs from
        the reference's.
    """
    path = Path(path)
    if _suffix(path) == ".seg.nrrd":
        from .segfile import read_segmentation

        volume = read_segmentation(path)
    else:
        volume = read_volume(path)
    values = volume.array_zyx
    if values.dtype.kind not in "buif":
        raise AirwayInputError(f"{path} holds {values.dtype} values; expected a label map (0 = background).")
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise AirwayInputError(f"{path} holds non-integer values; expected a label map (0 = background).")
    if values.size and values.min() < 0:
        raise AirwayInputError(f"{path} holds negative values; expected a label map (0 = background).")
    if values.size and values.max() <= 255 and values.dtype != np.uint8:
        values = values.astype(np.uint8)
    volume = Volume(values, volume.geometry)
    if reference is not None:
        check_same_grid(volume, reference, f"{path}", "its CT")
    return volume


def check_same_grid(volume: Volume, reference: Volume, name: str, reference_name: str) -> None:
    """Raise :class:`AirwayInputError` unless both volumes share shape, spacing, origin and direction."""
    if not volume.geometry.same_grid(reference.geometry, volume.array_zyx.shape, reference.array_zyx.shape):
        raise AirwayInputError(
            f"{name} (shape {volume.array_zyx.shape}, spacing {_fmt(volume.spacing_zyx)} mm zyx, "
            f"origin {_fmt(volume.geometry.origin_xyz)}) does not lie on the grid of {reference_name} "
            f"(shape {reference.array_zyx.shape}, spacing {_fmt(reference.spacing_zyx)} mm zyx, "
            f"origin {_fmt(reference.geometry.origin_xyz)}); resample it onto that grid first."
        )


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def output_folder(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) if needed and return it; a clear
    :class:`AirwayInputError` when it is a file or cannot be created."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise AirwayInputError(f"Cannot write into {folder}: it is a file, not a folder.") from None
    except OSError as error:
        raise AirwayInputError(f"Cannot create the output folder {folder} ({error.strerror or error}).") from None
    return folder


def refuse_overwriting_inputs(inputs: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`AirwayInputError` when an output path names one of the input files.

    Inputs are never modified: a job calls this before it reads anything, so that, say,
    ``airway refine --labels case/labels.nii.gz --out case`` stops at once instead of replacing
    the stage-1 labels it was given with the refined ones.  Paths are compared after resolving
    links and ``..``; an output that does not exist yet cannot be an input.
    """
    sources = [Path(p) for p in inputs]
    for output in map(Path, outputs):
        for source in sources:
            if output.exists() and source.exists() and os.path.samefile(output, source):
                raise AirwayInputError(
                    f"{output} is an input of this command ({source}); write the outputs to another file "
                    "or folder (inputs are never modified)."
                )


def atomic_output(path: str | os.PathLike) -> "_AtomicPaths":
    """Context manager giving a temporary path beside ``path``; it is renamed onto ``path`` on success.

    The temporary name keeps the file's suffix so writers that choose the format by name work,
    and the file gets the permissions a plain ``open`` would give it (0666 less the umask).
    On any exception the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> with atomic_output("labels.nii.gz") as tmp:  # doctest: +SKIP
    ...     sitk.WriteImage(image, str(tmp))
    """
    return _AtomicPaths([Path(path)], single=True)


def atomic_outputs(paths: "list[str | os.PathLike]") -> "_AtomicPaths":
    """Like :func:`atomic_output` for several files that belong together.

    Yields the list of temporary paths, in the order of ``paths``; they are renamed onto their
    targets only after the whole block succeeded, so an error anywhere in the block keeps none
    of them.  The renames themselves run one after another: a process killed between two of
    them can leave new and old files side by side.  Where that matters (checkpoints), make one
    file the commit point and derive the others from it.
    """
    return _AtomicPaths([Path(p) for p in paths], single=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _AtomicPaths:
    def __init__(self, paths: list[Path], single: bool) -> None:
        self.paths = paths
        self.single = single
        self.temps: list[Path] = []

    def __enter__(self):
        try:
            for path in self.paths:
                if path.is_dir():
                    raise AirwayInputError(f"Cannot write {path}: it is a folder; give a file name.")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handle, name = tempfile.mkstemp(
                        prefix=f".{path.name}.", suffix=_suffix(path) or ".tmp", dir=path.parent
                    )
                except OSError as error:
                    raise AirwayInputError(
                        f"Cannot write {path} ({error.strerror or error}); check the output folder."
                    ) from None
                os.close(handle)
                self.temps.append(Path(name))
        except BaseException:
            self._discard()
            raise
        return self.temps[0] if self.single else list(self.temps)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._discard()
            return
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; set here, as some writers replace the file
        try:
            for tmp, path in zip(self.temps, self.paths):
                os.chmod(tmp, mode)
                os.replace(tmp, path)
        except OSError as error:
            self._discard()
            raise AirwayInputError(f"Cannot write {error.filename2 or error.filename} ({error.strerror}).") from None

    def _discard(self) -> None:
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)


def write_json(data: object, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume with its geometry to NIfTI, NRRD or MHA (chosen by the file name), atomically.

    Parameters
    ----------
    volume : Volume
        Voxels and geometry to write; the array's dtype is kept.
    path : str or path-like
        Output file; ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``.
    compress : bool
        Compress the voxel data.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    if _suffix(path) not in WRITABLE_SUFFIXES:
        raise AirwayInputError(
            f"Cannot write {path}: expected a file name ending in {', '.join(WRITABLE_SUFFIXES)}."
        )
    image = to_sitk(volume)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path
