"""Stage 2 on volumes and files: ``airway refine`` and the refinement step of ``airway run``.

:func:`refine_ct` runs :func:`~AirwayRefineLib.connect.find_breaks` and
:func:`~AirwayRefineLib.connect.merge_breaks` on a CT and its stage-1 labels in one
geometry; :func:`write_refinement` writes the outputs all or none; :func:`refine_file`
reads, refines and writes.  Outputs in the output folder:

- ``labels.nii.gz``: the refined labels (the stage-1 classes, largest component), in the CT's geometry;
- ``attention.nii.gz``: the breakage attention (float32: NIfTI, NRRD and MetaImage have no
  16-bit float, so the float16 the issue asks for is not possible in these formats);
- ``breaks.json``: every break with its id, position (LPS mm), voxel index, gap length,
  the two components, confidence, whether a bridge was predicted (``connected``) and whether
  it is in the refined labels (``merged``: chosen, and part of the largest component).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from AirwaySegmentationLib import __version__
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.infer import CancelToken
from AirwaySegmentationLib.progress import ProgressCallback, report, sub_progress
from AirwaySegmentationLib.segment import SegmentationModel
from AirwaySegmentationLib.volume import (
    Volume, atomic_outputs, check_ct, output_folder, read_ct, read_label, refuse_overwriting_inputs, to_sitk, write_json,
)

from .connect import BreakPrediction, find_breaks, load_connection_model, merge_breaks, tree_component

REFINED_LABELS_FILE = "labels.nii.gz"
ATTENTION_FILE = "attention.nii.gz"
BREAKS_FILE = "breaks.json"
REFINE_FILES = (REFINED_LABELS_FILE, ATTENTION_FILE, BREAKS_FILE)
BREAKS_FORMAT = "airway-breaks"
BREAKS_VERSION = 1


@dataclass
class RefineResult:
    """Stage 2 of one CT.

    Attributes
    ----------
    labels : Volume
        Refined labels (same dtype and geometry as the stage-1 labels).
    attention : Volume
        float32 breakage attention.
    prediction : BreakPrediction
        The breaks and their bridges, to merge another subset without predicting again.
    merged_ids : list of int
        The chosen breaks whose bridges are in ``labels`` (a bridge between two pieces that
        are not the largest component is dropped with them).
    components_after : int
        Components after the merge, before keeping the largest.
    timings_s : dict
    info : dict
        Model and settings.
    """

    labels: Volume
    attention: Volume
    prediction: BreakPrediction
    merged_ids: list[int]
    components_after: int
    timings_s: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def breaks_document(self) -> dict:
        """The content of ``breaks.json``."""
        geometry = self.labels.geometry
        merged = set(self.merged_ids)
        return {
            "format": BREAKS_FORMAT,
            "version": BREAKS_VERSION,
            "coordinates": "LPS mm (position_lps_mm); index_zyx is the voxel (z, y, x) of the labels",
            "components_before": self.prediction.components_before,
            "components_after_merge": self.components_after,
            "found": len(self.prediction.breaks),
            "bridged": sum(b.connected for b in self.prediction.breaks),
            "merged": sorted(merged),
            **self.info,
            "breaks": [{**b.record(geometry), "merged": b.id in merged} for b in self.prediction.breaks],
        }


def _chosen(prediction: BreakPrediction, connect: str | Iterable[int]) -> list[int] | None:
    """Break ids to merge: "all" (every bridged break: None), "none" ([]), or the given ids."""
    if isinstance(connect, str):
        if connect == "all":
            return None
        if connect == "none":
            return []
        raise AirwayInputError(f"connect must be 'all', 'none' or a list of break ids, got {connect!r}.")
    return sorted({int(i) for i in connect})


def merge_selected(
    stage1_labels: Volume, prediction: BreakPrediction, connect: str | Iterable[int] = "all"
) -> tuple[Volume, list[int], int]:
    """Merge the chosen breaks into the stage-1 labels (the GUI's "connect selected").

    Returns
    -------
    labels : Volume
        Refined labels (largest component).
    merged_ids : list of int
        Chosen breaks whose bridges survive in ``labels``.
    components_after : int
        Components after the merge and before keeping the largest.
    """
    ids = _chosen(prediction, connect)
    spacing = stage1_labels.spacing_zyx
    final = merge_breaks(stage1_labels.array_zyx, prediction, spacing, ids, keep_tree=False)
    tree, components = tree_component(final, prediction)
    final[~tree] = 0  # DeepTree: the largest component is the tree (tree_component)
    chosen = [b for b in prediction.breaks if b.connected and (ids is None or b.id in ids)]
    merged_ids = [b.id for b in chosen if final[tuple(b.bridge_zyx.T)].any()]
    return stage1_labels.with_array(final), merged_ids, components


def refine_ct(
    ct: Volume,
    stage1_labels: Volume,
    model: SegmentationModel | str | None = None,
    settings: InferenceSettings = InferenceSettings(),
    *,
    connect: str | Iterable[int] = "all",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> RefineResult:
    """Stage 2 of a CT: breakage attention, connection network, merge, largest component.

    Parameters
    ----------
    ct : Volume
        The CT in HU.
    stage1_labels : Volume
        Its stage-1 labels on the same grid, with all components.
    model : SegmentationModel or str, optional
        Connection network, its bundled name or path (None: the bundled default).
    settings : InferenceSettings
        Device, precision, batch size, threads.
    connect : "all", "none" or iterable of int
        Which breaks to merge: every bridged one, none, or these ids.  The labels are always
        cut to their largest component, so "none" gives stage 1's largest component.
    progress, cancel
        ``progress(fraction, message)``; a cancel token checked between batches.

    Returns
    -------
    RefineResult
    """
    ct = check_ct(ct)
    if not ct.geometry.same_grid(stage1_labels.geometry, ct.array_zyx.shape, stage1_labels.array_zyx.shape):
        raise AirwayInputError("The stage-1 labels are not on the CT's grid; give the labels segmented from this CT.")
    loaded = model if isinstance(model, SegmentationModel) else load_connection_model(model)
    start = time.perf_counter()
    prediction = find_breaks(
        ct.array_zyx, stage1_labels.array_zyx, ct.spacing_zyx, loaded, settings,
        progress=sub_progress(progress, 0.0, 0.95), cancel=cancel,
    )
    found = time.perf_counter() - start
    start = time.perf_counter()
    report(progress, 0.95, "Merging the bridges")
    labels, merged_ids, components = merge_selected(stage1_labels, prediction, connect)
    report(progress, 1.0, f"{len(merged_ids)} of {len(prediction.breaks)} breaks connected")
    return RefineResult(
        labels=labels,
        attention=Volume(prediction.attention_zyx, ct.geometry),
        prediction=prediction,
        merged_ids=merged_ids,
        components_after=components,
        timings_s={"breaks": found, "merge": time.perf_counter() - start},
        info={"model": loaded.describe(), "alpha_mm": float(loaded.card.get("attention", {}).get("alpha_mm", 5.0))},
    )


def write_refinement(result: RefineResult, out_dir: str | os.PathLike) -> list[str]:
    """Write :data:`REFINE_FILES` into ``out_dir``, all or none; returns their names."""
    import SimpleITK as sitk

    out_dir = output_folder(out_dir)
    paths = [out_dir / name for name in REFINE_FILES]
    with atomic_outputs(paths) as (labels_tmp, attention_tmp, breaks_tmp):
        sitk.WriteImage(to_sitk(result.labels), str(labels_tmp), True)
        attention = result.attention.with_array(result.attention.array_zyx.astype(np.float32))
        sitk.WriteImage(to_sitk(attention), str(attention_tmp), True)
        write_json(result.breaks_document(), breaks_tmp)
    return list(REFINE_FILES)


def refine_file(
    ct_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: SegmentationModel | str | None = None,
    settings: InferenceSettings = InferenceSettings(),
    *,
    connect: str | Iterable[int] = "all",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> RefineResult:
    """``airway refine``: read a CT and its stage-1 labels, refine, write :data:`REFINE_FILES`."""
    refuse_overwriting_inputs([ct_path, labels_path], [Path(out_dir) / name for name in REFINE_FILES])
    loaded = model if isinstance(model, SegmentationModel) else load_connection_model(model)  # a wrong model fails first
    report(progress, 0.0, f"Reading {ct_path} and {labels_path}")
    ct = read_ct(ct_path)
    labels = read_label(labels_path, reference=ct)
    result = refine_ct(ct, labels, loaded, settings, connect=connect, progress=sub_progress(progress, 0.02, 0.97), cancel=cancel)
    report(progress, 0.97, f"Writing to {out_dir}")
    result.info.update({"ct": str(Path(ct_path).resolve()), "labels": str(Path(labels_path).resolve()), "airway_version": __version__})
    write_refinement(result, out_dir)
    report(progress, 1.0, "Done")
    return result
