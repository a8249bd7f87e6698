"""Stage 1 on a whole CT: crop, network, post-processing, outputs in the input's geometry.

:func:`segment_ct` is the array API (HU array + geometry in, labels + geometry out) used by
the Slicer module and batch scripts; :func:`segment_file` reads a CT file and writes the
results; :func:`segment_files` runs a folder or list of CTs resumably (``airway segment``).

Steps, each timed (``SegmentationResult.timings_s``):

1. ``crop``: the box of the lungs and airway (:func:`~AirwaySegmentationLib.preprocess.crop_to_body`);
2. ``input``: the model card's input channels, padded to the tiling;
3. ``network``: the sliding-window engine (:class:`~AirwaySegmentationLib.infer.SlidingWindow`);
4. ``postprocess``: airway union thresholded (0.5), airway outside the body's outline
   removed (:func:`~AirwaySegmentationLib.preprocess.inside_body`: air pockets in clothing
   look like a lumen), largest component (26-connected by default), holes filled (METHODS
   section 5) in 3-D, then in each z slice (a hollow lumen wider than the training data's
   is a hole only there: :func:`~AirwaySegmentationLib.arrays.fill_holes_in_slices`, ours);
   every airway voxel takes its most likely
   airway class, so filled voxels get a class too;
5. the labels are put back into the full grid (zero outside the crop).

Examples
--------
>>> result = segment_ct(ct.array_zyx, ct.geometry)  # doctest: +SKIP
>>> result.labels.array_zyx.max(), result.labels.geometry == ct.geometry  # doctest: +SKIP
(3, True)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from . import __version__
from .arrays import Box, check_connectivity, fill_holes, fill_holes_in_slices, largest_component
from .batch import BatchSummary, Case, find_inputs, parse_shard, run_cases, select_shard
from .catalogue import default_model_name
from .errors import AirwayInputError
from .infer import (
    AIRWAY_THRESHOLD,
    CancelToken,
    SlidingWindow,
    check_threshold,
    plan_tiling,
    resolve_device,
    resolve_precision,
    tiled_network_input,
)
from .inference_settings import InferenceSettings
from .models import load_model
from .preprocess import InputSpec, crop_to_body, inside_body
from .progress import ProgressCallback, report, sub_progress
from .orientation import canonical
from .volume import Geometry, Volume, atomic_outputs, check_ct, output_folder, read_ct, refuse_overwriting_inputs, to_sitk

#: Files one segmentation writes into its output folder.
LABELS_FILE = "labels.nii.gz"
AIRWAY_FILE = "airway.nii.gz"
PROBABILITY_FILE = "airway_probability.nii.gz"
#: Every file :func:`write_result` may write.
SEGMENT_FILES = (LABELS_FILE, AIRWAY_FILE, PROBABILITY_FILE)


@dataclass(frozen=True)
class SegmentationModel:
    """A stage-1 network with what its model card says about its input.

    Attributes
    ----------
    network : torch.nn.Module
        The network, in eval mode.
    card : dict
        Its model card.
    source : str
        The bundled name or path it was loaded from.
    spec : InputSpec
        Input channels the network was trained with.
    patch_size_zyx : tuple of 3 int
        Training patch: the smallest inference window.
    """

    network: nn.Module
    card: dict
    source: str
    spec: InputSpec
    patch_size_zyx: tuple[int, int, int]

    @property
    def divisor(self) -> int:
        """Window sizes must be multiples of this (the network's ``input_divisor``, else 1)."""
        return int(getattr(self.network, "input_divisor", 1))

    def describe(self) -> dict:
        """JSON-ready identity: source, architecture and the weights' SHA-256."""
        return {"source": self.source, "architecture": self.card.get("architecture"), "sha256": self.card.get("sha256")}


def load_segmentation_model(model: str | os.PathLike | None = None, task: str = "segmentation") -> SegmentationModel:
    """Load a bundled model by name (None: the catalogue's default for ``task``) or a model file by path.

    ``task`` is "segmentation" (stage 1) or "connection" (the stage-2 breakage connection
    network); a model card of the other task is refused.

    Raises
    ------
    AirwayInputError
        No bundled model and none given, a model of another task, a card without
        ``input_spec`` or ``patch_size_zyx``, or a card asking for resampling (the engine
        predicts on the CT's own grid, as all models trained here are).
    """
    source = str(model) if model is not None else default_model_name(task=task)
    network, card = load_model(source)
    if card.get("task", "segmentation") != task:
        raise AirwayInputError(
            f"The model {source} is a {card.get('task', 'segmentation')} model, not a {task} model; give a {task} model."
        )
    if "input_spec" not in card or "patch_size_zyx" not in card:
        raise AirwayInputError(f"The model card of {source} lacks input_spec or patch_size_zyx; export it with airway train.")
    spec = InputSpec.from_dict(card["input_spec"])
    if spec.target_spacing_zyx is not None:
        raise AirwayInputError(
            f"The model {source} was trained on a resampled grid ({spec.target_spacing_zyx} mm); "
            "this version predicts on the CT's own grid only."
        )
    patch = tuple(int(n) for n in card["patch_size_zyx"])
    return SegmentationModel(network, card, source, spec, patch)


def check_settings(model: SegmentationModel, settings: InferenceSettings) -> None:
    """Refuse settings no CT could run with (device, precision, window sizes), before any work."""
    resolve_precision(settings.precision, resolve_device(settings.device))
    plan_tiling(model.patch_size_zyx, model.patch_size_zyx, settings.overlap_voxels(model.patch_size_zyx),
                settings.max_window_zyx, model.divisor)


@dataclass
class SegmentationResult:
    """Stage-1 output in the input's geometry.

    Attributes
    ----------
    labels : Volume
        uint8 classes: 0 background, 1 trachea and main bronchi, 2 lobar to segmental
        bronchi, 3 smaller bronchi.
    probability : Volume or None
        float16 airway probability (``1 - p_background``), when asked for; 0 outside the crop.
        Written as float32 (NIfTI, NRRD and MetaImage have no 16-bit float).
    crop_box : tuple of 3 slice
        The box the network saw, in the canonical order of the CT (``info["canonical_order"]``,
        :mod:`~AirwaySegmentationLib.orientation`).
    timings_s : dict
        Seconds per step (``crop``, ``input``, ``network``, ``postprocess``).
    info : dict
        Model, device, precision, tiling and voxel counts, JSON-ready.
    """

    labels: Volume
    probability: Volume | None
    crop_box: Box
    timings_s: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def airway(self) -> Volume:
        """uint8 binary airway (1 = any airway class)."""
        return self.labels.with_array((self.labels.array_zyx > 0).astype(np.uint8))


def segment_ct(
    ct_zyx: np.ndarray,
    geometry: Geometry,
    model: SegmentationModel | str | os.PathLike | None = None,
    settings: InferenceSettings = InferenceSettings(),
    *,
    threshold: float = AIRWAY_THRESHOLD,
    keep_largest_component: bool = True,
    connectivity: int = 26,
    keep_probability: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SegmentationResult:
    """Three-class airway labels of a chest CT.

    Parameters
    ----------
    ct_zyx : numpy.ndarray
        CT in Hounsfield units, shape (Z, Y, X); it is not modified.
    geometry : Geometry
        Its spacing, origin and direction; the outputs carry the same.
    model : SegmentationModel, str or path-like, optional
        A loaded model, a bundled model's name or a model path (None: the default model).
    settings : InferenceSettings
        Windows, device, precision, blending.
    threshold : float
        Airway union probability at which a voxel is airway.
    keep_largest_component : bool
        Keep only the largest airway component (stage 2 wants all of them: False).
    connectivity : int
        Connectivity of that component: 26 (ATM'26) or 6 (what ATM'22's evaluation keeps).
    keep_probability : bool
        Also return the airway probability (float16).
    progress : callable, optional
        ``progress(fraction, message)``.
    cancel : CancelToken, optional
        Checked between windows; when set, :class:`~AirwaySegmentationLib.progress.Cancelled` is raised.

    Returns
    -------
    SegmentationResult
    """
    ct = check_ct(Volume(np.asarray(ct_zyx), geometry))
    return _segment_checked(
        ct, model, settings, threshold=threshold, keep_largest_component=keep_largest_component,
        connectivity=connectivity, keep_probability=keep_probability, progress=progress, cancel=cancel,
    )


def _segment_checked(
    ct: Volume,
    model: SegmentationModel | str | os.PathLike | None,
    settings: InferenceSettings,
    *,
    threshold: float,
    keep_largest_component: bool,
    connectivity: int,
    keep_probability: bool,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> SegmentationResult:
    """:func:`segment_ct` on a CT already checked by :func:`~AirwaySegmentationLib.volume.check_ct`."""
    check_connectivity(connectivity)
    check_threshold(threshold)
    loaded = model if isinstance(model, SegmentationModel) else load_segmentation_model(model)
    check_settings(loaded, settings)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    report(progress, 0.0, "Finding the lungs")
    stored = ct
    ct, orientation = canonical(stored)  # the network sees the order it was trained in (orientation.py)
    box = crop_to_body(ct.array_zyx, ct.spacing_zyx)
    crop = ct.array_zyx[box]
    timings["crop"] = time.perf_counter() - start

    start = time.perf_counter()
    report(progress, 0.02, "Preparing the network input")
    tiling = plan_tiling(
        crop.shape, loaded.patch_size_zyx, settings.overlap_voxels(loaded.patch_size_zyx),
        settings.max_window_zyx, loaded.divisor,
    )
    image = tiled_network_input(crop, loaded.spec, tiling)
    timings["input"] = time.perf_counter() - start

    start = time.perf_counter()
    engine = SlidingWindow(loaded.network, settings)
    sums = engine.run(image, tiling, sub_progress(progress, 0.05, 0.92), cancel)
    del image
    timings["network"] = time.perf_counter() - start

    start = time.perf_counter()
    report(progress, 0.92, "Keeping the airway tree and filling its holes")
    airway, airway_class = sums.classes(threshold)
    airway &= inside_body(ct.array_zyx, ct.spacing_zyx)[box]
    if keep_largest_component:
        airway = largest_component(airway, connectivity)
    airway = fill_holes_in_slices(fill_holes(airway))
    labels = np.zeros(ct.array_zyx.shape, dtype=np.uint8)
    labels[box] = np.where(airway, airway_class, 0)
    probability = None
    if keep_probability:
        probability = np.zeros(ct.array_zyx.shape, dtype=np.float16)
        probability[box] = sums.airway_probability()
    timings["postprocess"] = time.perf_counter() - start
    report(progress, 1.0, "Segmentation done")

    counts = np.bincount(labels[box].ravel(), minlength=int(sums.sums.shape[0]))  # zero outside the box
    info = {
        "model": loaded.describe(),
        "device": str(sums.device),
        "precision": str(sums.dtype).removeprefix("torch."),
        "settings": settings.as_dict(),
        "crop_box_zyx": [[s.start, s.stop] for s in box],
        "canonical_order": {"axes_zyx": list(orientation.axes_zyx), "flips_zyx": list(orientation.flips_zyx)},
        "windows": len(tiling),
        "window_zyx": list(tiling.window_zyx),
        "window_overlap_zyx": list(tiling.overlaps_zyx()),
        "network_voxels": len(tiling) * int(np.prod(tiling.window_zyx)),
        "airway_voxels": int(counts[1:].sum()),
        "class_voxels": {str(c): int(counts[c]) for c in range(1, len(counts))},
    }
    return SegmentationResult(
        labels=Volume(np.ascontiguousarray(orientation.from_canonical(labels)), stored.geometry),
        probability=None if probability is None else Volume(np.ascontiguousarray(orientation.from_canonical(probability)), stored.geometry),
        crop_box=box,
        timings_s=timings,
        info=info,
    )


def write_result(result: SegmentationResult, out_dir: str | os.PathLike) -> list[str]:
    """Write labels, binary airway and (if present) the probability into ``out_dir``, all or none.

    A probability file left by an earlier run with other settings is removed when this result
    has none, so the folder holds only this run's outputs.

    Returns
    -------
    list of str
        The written file names, relative to ``out_dir``.
    """
    import SimpleITK as sitk

    out_dir = output_folder(out_dir)
    volumes = {LABELS_FILE: result.labels, AIRWAY_FILE: result.airway}
    if result.probability is not None:
        volumes[PROBABILITY_FILE] = result.probability
    with atomic_outputs([out_dir / name for name in volumes]) as temporary:
        for volume, tmp in zip(volumes.values(), temporary):
            sitk.WriteImage(to_sitk(volume), str(tmp), True)
    if PROBABILITY_FILE not in volumes:
        (out_dir / PROBABILITY_FILE).unlink(missing_ok=True)
    return list(volumes)


def segment_file(
    ct_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: SegmentationModel | str | os.PathLike | None = None,
    settings: InferenceSettings = InferenceSettings(),
    *,
    keep_probability: bool = False,
    keep_largest_component: bool = True,
    connectivity: int = 26,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    """Segment one CT file or DICOM folder and write :data:`LABELS_FILE`, :data:`AIRWAY_FILE` (and the probability).

    Returns
    -------
    dict
        JSON-ready: ``outputs`` (file names in ``out_dir``), ``timings_s`` (``read`` and
        ``write`` added to :func:`segment_ct`'s) and the result's ``info``.
    """
    refuse_overwriting_inputs([ct_path], [Path(out_dir) / name for name in SEGMENT_FILES])
    start = time.perf_counter()
    report(progress, 0.0, f"Reading {ct_path}")
    ct = read_ct(ct_path)
    read_seconds = time.perf_counter() - start
    result = _segment_checked(
        ct, model, settings, threshold=AIRWAY_THRESHOLD, keep_largest_component=keep_largest_component,
        connectivity=connectivity, keep_probability=keep_probability,
        progress=sub_progress(progress, 0.03, 0.97), cancel=cancel,
    )
    start = time.perf_counter()
    report(progress, 0.97, f"Writing to {out_dir}")
    outputs = write_result(result, out_dir)
    timings = {"read": read_seconds, **result.timings_s, "write": time.perf_counter() - start}
    report(progress, 1.0, "Done")
    return {
        "outputs": outputs,
        "timings_s": {step: round(seconds, 3) for step, seconds in timings.items()},
        "shape_zyx": list(ct.array_zyx.shape),
        "spacing_zyx": list(ct.spacing_zyx),
        **result.info,
    }


def segment_files(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    settings: InferenceSettings = InferenceSettings(),
    *,
    shard: str | None = None,
    keep_probability: bool = False,
    keep_largest_component: bool = True,
    connectivity: int = 26,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> BatchSummary:
    """``airway segment``: one CT, a folder of CTs or a list file, resumable and shardable.

    One CT writes into ``out_dir``; a collection writes ``out_dir/NAME/`` per case.  Each case
    folder gets a ``manifest.json`` last; a re-run skips cases whose manifest matches the
    input, the model and these settings, and redoes the rest (see
    :func:`~AirwaySegmentationLib.batch.run_cases`).  The model is loaded once.

    Parameters
    ----------
    source : str or path-like
        A CT file, a DICOM folder, a folder of CTs (or an ATM'22 dataset) or a list file.
    out_dir : str or path-like
        Output folder.
    model : str or path-like, optional
        Bundled model name or model path (None: the default model).
    settings : InferenceSettings
        Engine settings.
    shard : str, optional
        ``"i/n"``: process only the i-th of n round-robin shards of the cases.
    keep_probability, keep_largest_component, connectivity
        As in :func:`segment_ct`.
    progress : callable, optional
        ``progress(fraction, message)`` over the whole batch.
    cancel : CancelToken, optional
        Stops between windows.

    Returns
    -------
    BatchSummary
        Done, skipped and failed cases; ``exit_code`` is 1 when any case failed.
    """
    cases, collection = find_inputs(source)
    if shard is not None:
        cases = select_shard(cases, *parse_shard(shard))
    loaded = load_segmentation_model(model)
    check_settings(loaded, settings)
    # Everything that decides the outputs: the weights and their card, the engine settings
    # that change results (not threads or batch size), the post-processing, this version.
    inference = settings.as_dict()
    for speed_only in ("threads", "batch_size"):
        inference.pop(speed_only)
    # The device and precision as they resolve here, not as asked: "auto" on a CPU and "cpu"
    # give the same outputs (not redone), "auto" on a CPU and then on a GPU do not (redone).
    device = resolve_device(settings.device)
    inference.update(device=device.type, precision=str(resolve_precision(settings.precision, device)).removeprefix("torch."))
    run_settings = {
        "version": __version__,
        "model_sha256": loaded.card["sha256"],  # checked against the weights by load_model
        "model_input": {"input_spec": loaded.card["input_spec"], "patch_size_zyx": loaded.card["patch_size_zyx"]},
        "inference": inference,
        "keep_probability": keep_probability,
        "keep_largest_component": keep_largest_component,
        "connectivity": connectivity,
    }

    def process(case: Case, case_dir: Path, case_progress: ProgressCallback | None) -> Mapping:
        return segment_file(
            case.path, case_dir, loaded, settings, keep_probability=keep_probability,
            keep_largest_component=keep_largest_component, connectivity=connectivity,
            progress=case_progress, cancel=cancel,
        )

    return run_cases(cases, out_dir, process, collection=collection, settings=run_settings, progress=progress)
