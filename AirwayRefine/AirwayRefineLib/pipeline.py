"""The whole job in one call: ``airway run`` (stage 1 -> stage 2 -> centerlines -> report) and ``airway demo``.

:func:`run_pipeline` reads a CT, segments it with all components kept (stage 1), finds and
connects the breaks (stage 2), extracts the centerlines of the final tree and draws the
report, under one progress callback.  Each step writes its files as soon as it is done, each
file atomically, so a failure or a cancel keeps every earlier step's outputs; ``run.json``
(steps, timings, counts, models) is written last and removed when a run starts, so a folder
with a ``run.json`` holds one finished run (a failed rerun can leave its new files beside an
earlier run's later ones, and no ``run.json``).  Files in the output folder:

- ``stage1_labels.nii.gz``: stage-1 labels with all their components (before refinement);
- ``labels.nii.gz``, ``attention.nii.gz``, ``breaks.json``: stage 2 (:mod:`~AirwayRefineLib.refine`);
- ``centerlines.vtp``, ``centerlines.mrk.json``, ``branches.csv``, ``branches.json``: the
  centerlines of the final tree (:mod:`~AirwayRefineLib.centerline`);
- ``report.png``, ``report.html``: the visual report (needs matplotlib, the ``report`` extra);
- ``run.json``.

:func:`run_demo` does the same on a freshly generated phantom.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from AirwaySegmentationLib import __version__
from AirwaySegmentationLib.classes import as_class_map
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.infer import CancelToken
from AirwaySegmentationLib.progress import ProgressCallback, report, sub_progress
from AirwaySegmentationLib.segment import SegmentationModel, load_segmentation_model, segment_ct
from AirwaySegmentationLib.volume import output_folder, read_ct, refuse_overwriting_inputs, write_json, write_volume

from .centerline import CENTERLINE_FILES, extract_centerlines, write_centerlines
from .connect import load_connection_model
from .refine import REFINE_FILES, refine_ct, write_refinement

STAGE1_FILE = "stage1_labels.nii.gz"
REPORT_FILES = ("report.png", "report.html")
RUN_FILE = "run.json"
#: Every file a run may write into its folder.
PIPELINE_FILES = (STAGE1_FILE, *REFINE_FILES, *CENTERLINE_FILES, *REPORT_FILES, RUN_FILE)


@dataclass
class PipelineResult:
    """What ``airway run`` did.

    Attributes
    ----------
    out_dir : pathlib.Path
    outputs : list of str
        Files written, relative to ``out_dir``.
    summary : dict
        The content of ``run.json``.
    """

    out_dir: Path
    outputs: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def run_pipeline(
    ct_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: SegmentationModel | str | None = None,
    connection_model: SegmentationModel | str | None = None,
    settings: InferenceSettings = InferenceSettings(),
    connect: str | Iterable[int] = "all",
    make_report: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> PipelineResult:
    """Segment, refine, extract centerlines and report one CT (see the module docstring).

    Parameters
    ----------
    ct_path : str or path-like
        CT file or DICOM folder.
    out_dir : str or path-like
        Output folder (created).
    model, connection_model : SegmentationModel or str, optional
        Stage-1 and stage-2 networks (loaded models, bundled names or paths; None: the bundled defaults).
    settings : InferenceSettings
        Engine settings for both networks (device, precision, windows, threads).
    connect : "all", "none" or iterable of int
        Breaks to merge (see :func:`~AirwayRefineLib.refine.refine_ct`).
    make_report : bool
        Draw ``report.png`` / ``report.html`` (skipped with a note in ``run.json`` when
        matplotlib is not installed).
    progress, cancel
        One ``progress(fraction, message)`` for the whole run; a cancel token checked inside
        both networks.

    Returns
    -------
    PipelineResult
    """
    started = time.perf_counter()
    refuse_overwriting_inputs([ct_path], [Path(out_dir) / name for name in PIPELINE_FILES])
    out = output_folder(out_dir)
    # Both models first: a wrong name fails before minutes of work.
    stage1 = model if isinstance(model, SegmentationModel) else load_segmentation_model(model)
    stage2 = connection_model if isinstance(connection_model, SegmentationModel) else load_connection_model(connection_model)
    # run.json marks a finished run: an earlier one's goes now, so a failure here leaves none.
    (out / RUN_FILE).unlink(missing_ok=True)
    timings: dict[str, float] = {}
    outputs: list[str] = []

    def step(name: str, begin: float) -> None:
        timings[name] = round(time.perf_counter() - begin, 3)

    begin = time.perf_counter()
    report(progress, 0.0, f"Reading {ct_path}")
    ct = read_ct(ct_path)
    step("read", begin)

    begin = time.perf_counter()
    stage1_result = segment_ct(ct.array_zyx, ct.geometry, stage1, settings, keep_largest_component=False,
                               progress=sub_progress(progress, 0.02, 0.55), cancel=cancel)
    write_volume(stage1_result.labels, out / STAGE1_FILE)
    outputs.append(STAGE1_FILE)
    step("stage1", begin)

    begin = time.perf_counter()
    refined = refine_ct(ct, stage1_result.labels, stage2, settings, connect=connect,
                        progress=sub_progress(progress, 0.55, 0.8), cancel=cancel)
    refined.info.update({"ct": str(Path(ct_path).resolve()), "airway_version": __version__})
    outputs += write_refinement(refined, out)
    step("stage2", begin)

    begin = time.perf_counter()
    labels = refined.labels.array_zyx
    centerlines, skipped = None, "skipped: the final labels are empty"
    if labels.any():
        try:
            centerlines = extract_centerlines(labels > 0, ct.geometry, labels_zyx=as_class_map(labels),
                                              progress=sub_progress(progress, 0.8, 0.9))
        except AirwayInputError as error:  # an airway too small to have a centerline
            skipped = f"skipped: {error}"
        else:
            write_centerlines(centerlines, out)
            outputs += list(CENTERLINE_FILES)
    step("centerlines", begin)

    prediction = refined.prediction
    summary = {
        "version": __version__,
        "ct": str(Path(ct_path).resolve()),
        "shape_zyx": list(ct.array_zyx.shape),
        "spacing_zyx": list(ct.spacing_zyx),
        "models": {"stage1": stage1.describe(), "stage2": stage2.describe()},
        "device": stage1_result.info["device"],
        "precision": stage1_result.info["precision"],
        "components_before": prediction.components_before,
        "components_after_merge": refined.components_after,
        "breaks_found": len(prediction.breaks),
        "breaks_bridged": sum(b.connected for b in prediction.breaks),
        "breaks_merged": len(refined.merged_ids),
        "airway_voxels": int((labels > 0).sum()),
        "branches": 0 if centerlines is None else len(centerlines.branches),
        "timings_s": timings,
    }
    if centerlines is None:
        summary["centerlines"] = skipped
    if make_report:
        begin = time.perf_counter()
        report(progress, 0.9, "Drawing the report")
        try:
            from .report import write_report
        except ModuleNotFoundError as error:
            if error.name != "matplotlib":
                raise
            summary["report"] = "skipped: matplotlib is not installed (pip install 'slicer-airway[report]')"
        else:
            summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
            write_report(out, ct, stage1_result.labels, refined.labels, refined.attention,
                         refined.breaks_document()["breaks"], centerlines, _report_table(summary),
                         title=f"Airway tree of {Path(ct_path).name}")
            outputs += list(REPORT_FILES)
        step("report", begin)
    timings["total"] = round(time.perf_counter() - started, 3)
    # Files an earlier run left that this one did not write (no centerlines, no report).
    for name in (*CENTERLINE_FILES, *REPORT_FILES):
        if name not in outputs:
            (out / name).unlink(missing_ok=True)
    summary["outputs"] = outputs + [RUN_FILE]
    write_json(summary, out / RUN_FILE)
    report(progress, 1.0, f"Done in {timings['total']:.1f} s")
    return PipelineResult(out, summary["outputs"], summary)


def _report_table(summary: dict) -> dict:
    """The run facts the report's table shows, from ``run.json``'s content."""
    # The report counts breaks and branches itself; components_after is the count after the
    # merge (before the largest component is kept, after which it is always 1).
    return {
        "components_before": summary["components_before"],
        "components_after": summary["components_after_merge"],
        "run time (s)": round(summary["timings_s"]["total"], 1),
        "stage-1 model": summary["models"]["stage1"]["source"],
        "stage-2 model": summary["models"]["stage2"]["source"],
        "device": summary["device"],
    }


def report_folder(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``airway report``: draw ``report.png`` / ``report.html`` again from the files of an ``airway run`` folder.

    Reads ``run.json`` (which names the CT), the stage-1 and final labels, the attention,
    ``breaks.json`` and ``branches.json``.
    """
    import json

    from AirwaySegmentationLib.volume import read_label, read_volume

    from .centerline import read_centerlines
    from .report import write_report

    folder = Path(run_dir)
    missing = [name for name in (RUN_FILE, STAGE1_FILE, *REFINE_FILES) if not (folder / name).is_file()]
    if missing:
        raise AirwayInputError(f"{folder} is not a finished airway run folder: {missing[0]} is missing; run airway run first.")
    try:
        summary = json.loads((folder / RUN_FILE).read_text())
        ct_path, table = Path(summary["ct"]), _report_table(summary)
        breaks = json.loads((folder / REFINE_FILES[2]).read_text())["breaks"]
        if not isinstance(breaks, list):
            raise TypeError("'breaks' is not a list")
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AirwayInputError(
            f"{folder}'s {RUN_FILE} or {REFINE_FILES[2]} is damaged ({error.__class__.__name__}: {error}); run airway run again."
        ) from None
    ct = read_ct(ct_path)
    stage1_labels = read_label(folder / STAGE1_FILE, reference=ct)
    labels = read_label(folder / REFINE_FILES[0], reference=ct)
    attention = read_volume(folder / REFINE_FILES[1])
    branches = folder / CENTERLINE_FILES[3]
    centerlines = read_centerlines(branches) if branches.is_file() else None
    return write_report(folder, ct, stage1_labels, labels, attention, breaks, centerlines, table,
                        title=f"Airway tree of {ct_path.name}")


def run_demo(
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    shape_zyx: tuple[int, int, int] = (160, 192, 192),
    settings: InferenceSettings = InferenceSettings(),
    progress: ProgressCallback | None = None,
) -> PipelineResult:
    """Generate a phantom chest CT into ``out_dir/phantom`` and run :func:`run_pipeline` on it into ``out_dir``.

    The phantom (a held-out seed by default, never trained on) comes with its ground truth in
    ``out_dir/phantom`` so the result can be checked with ``airway evaluate``.
    """
    from AirwaySegmentationLib.data import phantom_seeds
    from AirwaySegmentationLib.phantom import generate_phantom, write_phantom

    out = Path(out_dir)
    report(progress, 0.0, "Generating a phantom chest CT")
    phantom = generate_phantom(phantom_seeds("test", 1)[0] if seed is None else seed, shape_zyx, variant="standard")
    paths = write_phantom(phantom, out / "phantom")
    return run_pipeline(paths["ct"], out, settings=settings, progress=sub_progress(progress, 0.1, 1.0))

