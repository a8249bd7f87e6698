"""The visual report of one run: ``report.png`` and a self-contained ``report.html``.

The figure lets a user judge a result at a glance:

(a) a 3-D rendering of the final airway tree seen from the front, coloured by class (the
    colours of :data:`~AirwaySegmentationLib.classes.AIRWAY_CLASSES`), with every break
    marked by a numbered sphere: green where its bridge was merged, magenta where it was not.
    It is rendered offscreen with VTK; where VTK or an OpenGL context is missing, a
    matplotlib scatter of the surface voxels stands in and the panel title says so;
(b) a coronal minimum-intensity projection of the CT (lung window) through the slab that
    holds the airway, with the final labels overlaid by class and the breaks circled;
(c) three axial slices, through the first three breaks (zoomed on them) or, with fewer
    breaks, through the airway, with the breakage attention (inferno) and the final label
    contours over the CT;
(d) a table: branches per generation and total centerline length (from the centerlines),
    airway volume, components before and after refinement, breaks found, connected and
    merged, then every key of the run summary in the order given; beside it, the break list.

The HTML page holds the PNG as a base64 data URI, the same table and the full break list,
and nothing that loads from elsewhere.

Every 2-D panel follows the radiological convention: the patient's head up, the patient's
right on the image's left, anterior up in axial slices, pixels in their physical aspect.

Examples
--------
>>> png, html = write_report("out/run", ct, stage1, refined, attention, breaks, tree,
...                          {"run_time_s": 31.2})                    # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from scipy import ndimage

from AirwaySegmentationLib.arrays import bounding_box
from AirwaySegmentationLib.classes import AIRWAY_CLASSES
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.volume import Volume, atomic_outputs, check_same_grid

from .centerline import CenterlineTree

REPORT_PNG = "report.png"
REPORT_HTML = "report.html"
#: Size of ``report.png`` in pixels (width, height).
REPORT_SIZE_PX = (1600, 1000)
_DPI = 100

#: Lung window (width 1500 HU, level -600 HU).
LUNG_WINDOW_HU = (-1350.0, 150.0)
#: Break markers: bridge merged into the labels, or not.
MERGED_RGB = (0.15, 0.75, 0.30)
NOT_MERGED_RGB = (0.85, 0.20, 0.85)
_CLASS_RGB = {airway_class.label: airway_class.color_rgb for airway_class in AIRWAY_CLASSES}

#: Side of the offscreen rendering in pixels.
_RENDER_SIZE_PX = 800
#: Above this many voxels in the airway's bounding box the surface is extracted from a
#: block-maximum reduction (keeps thin branches connected; the picture is a preview).
_MAX_SURFACE_VOXELS = 8_000_000
#: Surface voxels drawn by the matplotlib fallback.
_MAX_SCATTER_POINTS = 20_000
#: Half the side of the square shown around a break in an axial slice.
_BREAK_ZOOM_HALF_MM = 40.0
#: Attention below this is left transparent so the CT stays readable.
_ATTENTION_FLOOR = 0.05
#: The coronal projection covers the airway's anterior-posterior extent plus this margin.
_SLAB_MARGIN_MM = 5.0
#: Breaks listed in the figure (all of them are in the HTML page).
_BREAKS_IN_FIGURE = 16
#: Longest value shown in a figure table cell (the HTML page shows it whole).
_CELL_CHARS = 26
#: Outlines that keep text legible over any background.
_DARK_OUTLINE = [withStroke(linewidth=2.5, foreground="black")]
_LIGHT_OUTLINE = [withStroke(linewidth=2.5, foreground="white")]
#: Fields every break record must have.
_BREAK_KEYS = ("id", "position_lps_mm", "index_zyx", "gap_mm", "confidence", "connected", "merged")


def write_report(
    out_dir: str | os.PathLike,
    ct: Volume,
    labels_before: Volume,
    labels_after: Volume,
    attention: Volume,
    breaks: Sequence[dict],
    centerlines: CenterlineTree | None,
    summary: dict,
    title: str = "Airway report",
) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` about one run into ``out_dir``, atomically.

    Parameters
    ----------
    out_dir : str or path-like
        Output folder (created if missing).
    ct : Volume
        The CT in Hounsfield units.
    labels_before : Volume
        Stage-1 labels (0 background, 1 trachea and main bronchi, 2 lobar to segmental,
        3 smaller bronchi) on the CT's grid.
    labels_after : Volume
        Final labels after breakage connection, on the CT's grid.
    attention : Volume
        Breakage attention in [0, 1] on the CT's grid.
    breaks : sequence of dict
        One record per break with at least ``id``, ``position_lps_mm`` (x, y, z),
        ``index_zyx``, ``gap_mm``, ``confidence``, ``connected`` and ``merged`` (the records
        of ``breaks.json``).
    centerlines : CenterlineTree or None
        Centerlines of the final tree, for branches per generation and total length.
    summary : dict
        Facts about the run shown in the table in the order given (e.g. ``run_time_s``,
        ``model``).  ``components_before`` and ``components_after``, when given, replace the
        counts the report would take from the label volumes (26-connected).
    title : str
        Title of the figure and the page.

    Returns
    -------
    tuple of pathlib.Path
        ``(report.png, report.html)``.

    Raises
    ------
    AirwayInputError
        A volume is not on the CT's grid, or a break record lacks a field.

    Notes
    -----
    About 1 s for a 256 x 256 x 256 CT on two CPU cores (0.5 s for the VTK rendering).  The 3-D panel never stops the
    report: any failure of the VTK rendering falls back to a matplotlib scatter.
    """
    for volume, name in ((labels_before, "the stage-1 labels"), (labels_after, "the final labels"),
                         (attention, "the attention map")):  # fmt: skip
        check_same_grid(volume, ct, name, "the CT")
    breaks = [_checked_break(record, ct.array_zyx.shape) for record in breaks]
    out_dir = Path(out_dir)
    png_path, html_path = out_dir / REPORT_PNG, out_dir / REPORT_HTML

    rows = _table_rows(labels_before, labels_after, breaks, centerlines, summary)
    # Text is drawn as given: a "$" in a file or model name is no mathtext (it failed to parse).
    with matplotlib.rc_context({"text.parse_math": False}):
        figure, note = _figure(ct, labels_after, attention, breaks, rows, title)
        with atomic_outputs([png_path, html_path]) as (png_tmp, html_tmp):
            figure.savefig(png_tmp, format="png", dpi=_DPI)
            html_tmp.write_text(_html_page(title, png_tmp.read_bytes(), rows, breaks, note), encoding="utf-8")
    return png_path, html_path


def _checked_break(record: dict, shape_zyx: tuple[int, ...]) -> dict:
    missing = [key for key in _BREAK_KEYS if key not in record]
    if missing:
        raise AirwayInputError(
            f"Break record {record.get('id', '?')} lacks {', '.join(missing)}; give the records of breaks.json."
        )
    index = np.asarray(record["index_zyx"], dtype=int)
    if index.shape != (3,) or np.any(index < 0) or np.any(index >= np.asarray(shape_zyx)):
        raise AirwayInputError(
            f"Break {record['id']} lies at voxel {record['index_zyx']}, outside the CT's grid {tuple(shape_zyx)}; "
            "give breaks found on this CT."
        )
    return record


# ---------------------------------------------------------------------------------------------
# Orientation: every 2-D panel shows arrays re-ordered to (superior, posterior, left)


@dataclass(frozen=True)
class _SPLView:
    """How a z, y, x array maps onto superior, posterior and left (LPS) axes for display.

    Attributes
    ----------
    axes : tuple of 3 int
        The array axis shown as the superior, posterior and left axis.
    flips : tuple of 3 bool
        Whether that array axis runs towards inferior, anterior or right (and is reversed).
    spacing_mm : tuple of 3 float
        Voxel size along the superior, posterior and left display axes.
    shape : tuple of 3 int
        Shape of the re-ordered array.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]

    def array(self, values_zyx: np.ndarray) -> np.ndarray:
        """A view of ``values_zyx`` indexed [superior, posterior, left]."""
        reordered = np.transpose(values_zyx, self.axes)
        return reordered[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)]

    def index(self, index_zyx: Sequence[int]) -> tuple[int, int, int]:
        """The display index (superior, posterior, left) of an array index (z, y, x)."""
        return tuple(
            int(size - 1 - index_zyx[axis]) if flip else int(index_zyx[axis])
            for axis, flip, size in zip(self.axes, self.flips, self.shape)
        )


def _spl_view(volume: Volume) -> _SPLView:
    """The axis order and flips that show ``volume`` with the head up and the patient's right on the left.

    The direction matrix decides: each array axis is matched to the physical axis it runs
    along, and reversed where it runs towards inferior, anterior or right.  For an oblique
    direction each array axis goes to the physical axis it is most aligned with (the
    assignment with the largest total alignment); the slices are shown as stored, without
    resampling, so the anatomy appears tilted by the obliquity.
    """
    # alignment[a, p]: component of array axis a (z, y, x) along physical axis p (S, P, L);
    # direction columns are i, j, k and its rows L, P, S in LPS order, hence both reversals.
    alignment = volume.geometry.direction_matrix[::-1, ::-1].T
    axes = max(itertools.permutations(range(3)), key=lambda perm: sum(abs(alignment[perm[p], p]) for p in range(3)))
    flips = tuple(bool(alignment[axes[p], p] < 0) for p in range(3))
    spacing = tuple(float(volume.spacing_zyx[axis]) for axis in axes)
    shape = tuple(int(volume.array_zyx.shape[axis]) for axis in axes)
    return _SPLView(tuple(axes), flips, spacing, shape)


# ---------------------------------------------------------------------------------------------
# The table


def _table_rows(
    labels_before: Volume,
    labels_after: Volume,
    breaks: list[dict],
    centerlines: CenterlineTree | None,
    summary: dict,
) -> list[tuple[str, str]]:
    """(name, value) rows of the report's table, measured facts first, then the summary."""
    rows: list[tuple[str, str]] = []
    if centerlines is None or not centerlines.branches:
        rows.append(("branches per generation", "no centerlines"))
    else:
        per_generation = Counter(branch.generation for branch in centerlines.branches)
        rows += [(f"branches, generation {g}", str(per_generation[g])) for g in sorted(per_generation)]
        rows.append(("branches, total", str(len(centerlines.branches))))
        total_mm = sum(branch.length_mm for branch in centerlines.branches)
        rows.append(("total centerline length (mm)", _format_value(total_mm)))
    voxel_ml = float(np.prod(labels_after.spacing_zyx)) / 1000.0
    rows.append(("airway volume (mL)", _format_value(np.count_nonzero(labels_after.array_zyx) * voxel_ml)))
    for key, labels in (("components_before", labels_before), ("components_after", labels_after)):
        if key not in summary:
            rows.append((key.replace("_", " "), str(_components(labels.array_zyx))))
    rows.append(("breaks found", str(len(breaks))))
    rows.append(("breaks bridged (connected)", str(sum(bool(b["connected"]) for b in breaks))))
    rows.append(("breaks merged", str(sum(bool(b["merged"]) for b in breaks))))
    rows += [(str(key), _format_value(value)) for key, value in summary.items()]
    return rows


def _components(labels_zyx: np.ndarray) -> int:
    box = bounding_box(labels_zyx)
    if box is None:
        return 0
    return int(cc3d.connected_components(labels_zyx[box] > 0, connectivity=26, return_N=True)[1])


def _format_value(value: object) -> str:
    """Booleans as yes/no, reals to three significant digits (never in exponent form), lists joined, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        decimals = max(0, 2 - math.floor(math.log10(abs(value))))
        return f"{value:.{decimals}f}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_format_value(item) for item in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# The figure


def _figure(
    ct: Volume,
    labels_after: Volume,
    attention: Volume,
    breaks: list[dict],
    rows: list[tuple[str, str]],
    title: str,
) -> tuple[Figure, str | None]:
    """The report figure, and a note on the 3-D panel when it shows no VTK rendering (None when it does)."""
    width, height = REPORT_SIZE_PX
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    grid = figure.add_gridspec(
        2, 4, width_ratios=(1.0, 1.0, 1.0, 1.2), left=0.015, right=0.99, top=0.885, bottom=0.035,
        wspace=0.2, hspace=0.2,
    )  # fmt: skip
    figure.suptitle(title, fontsize=16, fontweight="bold", y=0.985)
    figure.legend(handles=_legend_handles(), loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=5,
                  frameon=False, fontsize=10)  # fmt: skip

    view = _spl_view(ct)
    ct_spl = view.array(ct.array_zyx)
    labels_spl = view.array(labels_after.array_zyx)
    note = None
    if not labels_after.array_zyx.any():
        note = "The final labels are empty: there is no airway tree to show in 3-D."
        axes = figure.add_subplot(grid[0, 0])
        axes.set_axis_off()
        axes.set_title("(a) 3-D tree, front view", fontsize=11)
        axes.text(0.5, 0.5, "no airway: the final labels are empty", ha="center", va="center", fontsize=11)
    else:
        try:
            rendering = _render_tree_vtk(labels_after, breaks)
        except Exception as error:  # noqa: BLE001 - the picture must never stop the pipeline
            reason = f"{type(error).__name__}: {error}".strip().rstrip(":")
            note = f"The 3-D view is a fallback matplotlib scatter: VTK offscreen rendering failed ({reason})."
            _scatter_tree(figure.add_subplot(grid[0, 0], projection="3d"), labels_after, breaks, reason)
        else:
            _show_rendering(figure.add_subplot(grid[0, 0]), rendering)
    _coronal_minip(figure.add_subplot(grid[0, 1]), view, ct_spl, labels_spl, breaks)
    _break_list(figure.add_subplot(grid[0, 2]), breaks)
    attention_spl = view.array(attention.array_zyx)
    for column, (level, record) in enumerate(_axial_targets(view, labels_spl, breaks)):
        axial = figure.add_subplot(grid[1, column])
        attention_image = _axial_slice(axial, view, ct_spl, labels_spl, attention_spl, level, record)
    colourbar = figure.colorbar(attention_image, cax=axial.inset_axes((1.04, 0.15, 0.05, 0.7)))
    colourbar.set_label("breakage attention", fontsize=9)
    _table(figure.add_subplot(grid[:, 3]), rows)
    return figure, note


def _legend_handles() -> list[Artist]:
    handles: list[Artist] = [Patch(color=c.color_rgb, label=f"{c.label}: {c.name}") for c in AIRWAY_CLASSES]
    for rgb, text in ((MERGED_RGB, "break, merged"), (NOT_MERGED_RGB, "break, not merged")):
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=10, markerfacecolor="none",
                              markeredgecolor=rgb, markeredgewidth=2, label=text))  # fmt: skip
    return handles


def _break_rgb(record: dict) -> tuple[float, float, float]:
    return MERGED_RGB if record["merged"] else NOT_MERGED_RGB


def _orientation_letters(axes: Axes, top: str, bottom: str) -> None:
    """Mark the patient's directions on the edges of a 2-D panel (right is always on the left)."""
    style = dict(transform=axes.transAxes, color="white", fontsize=10, fontweight="bold", path_effects=_DARK_OUTLINE)
    axes.text(0.01, 0.5, "R", ha="left", va="center", **style)
    axes.text(0.99, 0.5, "L", ha="right", va="center", **style)
    axes.text(0.5, 0.99, top, ha="center", va="top", **style)
    axes.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


@dataclass
class _Rendering:
    """An offscreen image (H, W, 3 uint8) and where each break landed in it (id, column, row, record)."""

    image: np.ndarray
    marks: list[tuple[int, float, float, dict]]


def _render_tree_vtk(labels: Volume, breaks: list[dict]) -> _Rendering:
    """Render the labelled surface and the breaks offscreen with VTK, seen from the patient's front.

    The surface comes from discrete flying edges on the label grid (block-maximum reduced when
    large), lightly smoothed, then mapped to LPS millimetres with the volume's index-to-LPS
    matrix, so oblique directions render correctly.  Raises when VTK, an OpenGL context or a
    non-blank image is missing.
    """
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonCore import vtkLogger, vtkLookupTable, vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkPolyDataNormals, vtkWindowedSincPolyDataFilter
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D
    from vtkmodules.vtkFiltersSources import vtkSphereSource
    from vtkmodules.vtkRenderingCore import (
        vtkActor,
        vtkCoordinate,
        vtkPolyDataMapper,
        vtkRenderer,
        vtkRenderWindow,
        vtkWindowToImageFilter,
    )
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401 - registers the OpenGL render window

    labels_zyx = np.asarray(labels.array_zyx)
    box = bounding_box(labels_zyx, pad=1)
    if box is None:
        raise ValueError("the final labels are empty")
    block = max(1, math.ceil((labels_zyx[box].size / _MAX_SURFACE_VOXELS) ** (1 / 3)))
    grid_zyx = _block_maximum(np.ascontiguousarray(labels_zyx[box], dtype=np.uint8), block)

    image = vtkImageData()
    image.SetDimensions(grid_zyx.shape[::-1])
    image.GetPointData().SetScalars(numpy_to_vtk(grid_zyx.ravel(), deep=True))
    present = np.unique(grid_zyx)
    surface = vtkDiscreteFlyingEdges3D()
    surface.SetInputData(image)
    surface.ComputeNormalsOff()  # they would be index-space normals; computed after the mapping below
    for n, label in enumerate(present[present > 0]):
        surface.SetValue(n, float(label))
    smoother = vtkWindowedSincPolyDataFilter()
    smoother.SetInputConnection(surface.GetOutputPort())
    smoother.SetNumberOfIterations(20)
    smoother.SetPassBand(0.05)
    smoother.NonManifoldSmoothingOn()
    smoother.NormalizeCoordinatesOn()
    smoother.Update()
    mesh = smoother.GetOutput()

    # Reduced-grid index -> original index (x, y, z) -> LPS mm.
    start_xyz = np.array([s.start for s in box[::-1]], dtype=float) + (block - 1) / 2.0
    index_to_lps = labels.geometry.ijk_to_lps
    points = vtk_to_numpy(mesh.GetPoints().GetData()).astype(float) * block + start_xyz
    lps = points @ index_to_lps[:3, :3].T + index_to_lps[:3, 3]
    mapped = vtkPoints()
    mapped.SetData(numpy_to_vtk(np.ascontiguousarray(lps), deep=True))
    mesh.SetPoints(mapped)
    # A mirroring grid reverses the triangles' winding, and with it these normals; the renderer's
    # two-sided lighting (on by default) lights both windings alike.
    normals = vtkPolyDataNormals()
    normals.SetInputData(mesh)
    normals.SplittingOff()
    normals.Update()

    table = vtkLookupTable()
    table.SetNumberOfTableValues(4)
    table.SetTableRange(0, 3)
    for label in range(4):
        table.SetTableValue(label, *_CLASS_RGB.get(label, (0.7, 0.7, 0.7)), 1.0)
    table.Build()
    mapper = vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.SetLookupTable(table)
    mapper.SetColorModeToMapScalars()  # uint8 labels would otherwise be taken as grey levels
    mapper.SetScalarRange(0, 3)
    mapper.InterpolateScalarsBeforeMappingOn()
    tree_actor = vtkActor()
    tree_actor.SetMapper(mapper)
    tree_actor.GetProperty().SetSpecular(0.2)
    renderer = vtkRenderer()
    renderer.SetBackground(1.0, 1.0, 1.0)
    renderer.AddActor(tree_actor)
    # The break markers go on a layer of their own, drawn over the tree: a merged break lies
    # inside the bronchus it closed and would otherwise be hidden.
    markers = vtkRenderer()
    markers.SetLayer(1)
    markers.SetActiveCamera(renderer.GetActiveCamera())

    extent_mm = float(np.linalg.norm(np.ptp(lps, axis=0)))
    sphere_mm = max(1.5, 0.02 * extent_mm)
    for record in breaks:
        sphere = vtkSphereSource()
        sphere.SetCenter(*(float(v) for v in record["position_lps_mm"]))
        sphere.SetRadius(sphere_mm)
        sphere.SetThetaResolution(24)
        sphere.SetPhiResolution(16)
        sphere_mapper = vtkPolyDataMapper()
        sphere_mapper.SetInputConnection(sphere.GetOutputPort())
        marker = vtkActor()
        marker.SetMapper(sphere_mapper)
        marker.GetProperty().SetColor(*_break_rgb(record))
        markers.AddActor(marker)

    # From the patient's front (anterior is -y in LPS), head up: the patient's right is on the left.
    camera = renderer.GetActiveCamera()
    centre = lps.min(axis=0) / 2 + lps.max(axis=0) / 2
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] - 1.0, centre[2])
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer.ResetCamera()
    camera.Zoom(1.3)

    # VTK logs a warning while it probes for an X display before taking EGL or OSMesa; keep
    # stderr clean.  It has no getter for the stderr level: the cutoff equals it unless a log
    # callback was added.
    stderr_verbosity = vtkLogger.GetCurrentVerbosityCutoff()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_ERROR)
    try:
        window = vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.SetSize(_RENDER_SIZE_PX, _RENDER_SIZE_PX)
        window.SetMultiSamples(0)
        if not window.SupportsOpenGL():
            raise RuntimeError("no OpenGL context for offscreen rendering")
        window.SetNumberOfLayers(2)
        window.AddRenderer(renderer)
        window.AddRenderer(markers)
        window.Render()
        capture = vtkWindowToImageFilter()
        capture.SetInput(window)
        capture.SetInputBufferTypeToRGB()
        capture.ReadFrontBufferOff()
        capture.Update()
        width, height, _ = capture.GetOutput().GetDimensions()
        pixels = vtk_to_numpy(capture.GetOutput().GetPointData().GetScalars()).reshape(height, width, 3)
        marks = []
        for record in breaks:
            coordinate = vtkCoordinate()
            coordinate.SetCoordinateSystemToWorld()
            coordinate.SetValue(*(float(v) for v in record["position_lps_mm"]))
            x, y = coordinate.GetComputedDoubleDisplayValue(renderer)
            marks.append((int(record["id"]), x, height - 1 - y, record))
        window.Finalize()
    finally:
        vtkLogger.SetStderrVerbosity(vtkLogger.ConvertToVerbosity(stderr_verbosity))
    if pixels.min() == pixels.max():
        raise RuntimeError("the offscreen rendering came back blank")
    return _Rendering(np.ascontiguousarray(pixels[::-1]), marks)


def _block_maximum(labels_zyx: np.ndarray, block: int) -> np.ndarray:
    """Each block x block x block cube replaced by its largest label (a preview that keeps thin branches)."""
    if block == 1:
        return labels_zyx
    padded_shape = [math.ceil(n / block) * block for n in labels_zyx.shape]
    padded = np.zeros(padded_shape, dtype=labels_zyx.dtype)
    padded[tuple(slice(0, n) for n in labels_zyx.shape)] = labels_zyx
    blocks = padded.reshape(padded_shape[0] // block, block, padded_shape[1] // block, block,
                            padded_shape[2] // block, block)  # fmt: skip
    return np.ascontiguousarray(blocks.max(axis=(1, 3, 5)))


def _show_rendering(axes: Axes, rendering: _Rendering) -> None:
    axes.imshow(rendering.image)
    for break_id, column, row, record in rendering.marks:
        axes.annotate(str(break_id), (column, row), xytext=(7, 7), textcoords="offset points", fontsize=9,
                      fontweight="bold", color=_break_rgb(record), path_effects=_LIGHT_OUTLINE)  # fmt: skip
    axes.set_title("(a) 3-D tree, front view (VTK)", fontsize=11)
    axes.text(0.02, 0.5, "R", transform=axes.transAxes, fontsize=10, fontweight="bold", va="center")
    axes.text(0.98, 0.5, "L", transform=axes.transAxes, fontsize=10, fontweight="bold", va="center", ha="right")
    axes.set_axis_off()


def _scatter_tree(axes: Axes, labels: Volume, breaks: list[dict], reason: str) -> None:
    """Fallback 3-D panel: the surface voxels as points in LPS mm, seen from the front."""
    axes.computed_zorder = False  # the break markers stay in front of the tree
    labels_zyx = np.asarray(labels.array_zyx)
    box = bounding_box(labels_zyx, pad=1)
    if box is not None:
        airway = labels_zyx[box] > 0
        surface_zyx = np.argwhere(airway & ~ndimage.binary_erosion(airway))
        if len(surface_zyx) > _MAX_SCATTER_POINTS:
            surface_zyx = surface_zyx[np.linspace(0, len(surface_zyx) - 1, _MAX_SCATTER_POINTS).astype(int)]
        surface_zyx += [s.start for s in box]
        points = labels.geometry.index_zyx_to_physical(surface_zyx)
        colours = [_CLASS_RGB.get(int(label), (0.7, 0.7, 0.7)) for label in labels_zyx[tuple(surface_zyx.T)]]
        axes.scatter(points[:, 0], points[:, 1], points[:, 2], c=colours, s=1, depthshade=False)
        axes.set_box_aspect(np.maximum(np.ptp(points, axis=0), 1e-3))
    for record in breaks:
        x, y, z = (float(v) for v in record["position_lps_mm"])
        axes.scatter([x], [y], [z], s=80, facecolors="none", edgecolors=[_break_rgb(record)], linewidths=2, zorder=3)
        axes.text(x, y, z, f" {record['id']}", color=_break_rgb(record), fontsize=9, fontweight="bold",
                  path_effects=_LIGHT_OUTLINE)  # fmt: skip
    axes.view_init(elev=0, azim=-90)  # from the front (-y): +x, the patient's left, to the right
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_zticks([])
    axes.set_title(f"(a) 3-D tree, front view - fallback scatter:\n{_shorten(reason, 60)}", fontsize=9)


def _coronal_minip(
    axes: Axes, view: _SPLView, ct_spl: np.ndarray, labels_spl: np.ndarray, breaks: list[dict]
) -> None:
    """Minimum-intensity projection from front to back through the airway's slab, labels overlaid."""
    box = bounding_box(labels_spl)
    if box is None:
        slab = slice(0, view.shape[1])
    else:
        margin = int(round(_SLAB_MARGIN_MM / view.spacing_mm[1]))
        slab = slice(max(box[1].start - margin, 0), min(box[1].stop + margin, view.shape[1]))
    projection = ct_spl[:, slab, :].min(axis=1)
    aspect = view.spacing_mm[0] / view.spacing_mm[2]
    axes.imshow(projection, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], origin="lower",
                aspect=aspect, interpolation="bilinear")  # fmt: skip
    overlay = np.zeros(projection.shape + (4,), dtype=np.float32)
    for label in (3, 2, 1):  # the trachea drawn last, on top
        seen = (labels_spl[:, slab, :] == label).any(axis=1)
        overlay[seen] = (*_CLASS_RGB[label], 0.55)
    axes.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
    for record in breaks:
        s, _, left = view.index(record["index_zyx"])
        axes.plot(left, s, marker="o", markersize=12, markerfacecolor="none", markeredgecolor=_break_rgb(record),
                  markeredgewidth=2)  # fmt: skip
        axes.annotate(str(record["id"]), (left, s), xytext=(7, 7), textcoords="offset points", fontsize=9,
                      fontweight="bold", color=_break_rgb(record), path_effects=_LIGHT_OUTLINE)  # fmt: skip
    thickness_mm = (slab.stop - slab.start) * view.spacing_mm[1]
    axes.set_title(f"(b) coronal MinIP, {thickness_mm:.0f} mm slab, lung window", fontsize=11)
    _orientation_letters(axes, "S", "I")
    axes.set_axis_off()


def _axial_targets(view: _SPLView, labels_spl: np.ndarray, breaks: list[dict]) -> list[tuple[int, dict | None]]:
    """Three (display superior index, break or None): the first breaks by id, then levels through the airway."""
    chosen = sorted(breaks, key=lambda record: int(record["id"]))[:3]
    targets = [(view.index(record["index_zyx"])[0], record) for record in chosen]
    box = bounding_box(labels_spl)
    top, bottom = (box[0].stop - 1, box[0].start) if box is not None else (view.shape[0] - 1, 0)
    missing = 3 - len(targets)
    for n in range(missing):
        level = top - (n + 1) * (top - bottom) / (missing + 1)
        targets.append((int(round(level)), None))
    return targets


def _axial_slice(
    axes: Axes,
    view: _SPLView,
    ct_spl: np.ndarray,
    labels_spl: np.ndarray,
    attention_spl: np.ndarray,
    level: int,
    record: dict | None,
) -> AxesImage:
    """One axial slice (anterior up, the patient's right on the left) with attention and label contours."""
    aspect = view.spacing_mm[1] / view.spacing_mm[2]
    axes.imshow(ct_spl[level], cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], aspect=aspect,
                interpolation="bilinear")  # fmt: skip
    shown = np.ma.masked_less(attention_spl[level], _ATTENTION_FLOOR)
    image = axes.imshow(shown, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.45, aspect=aspect, interpolation="nearest")
    labels = labels_spl[level]
    for label in (1, 2, 3):
        if (labels == label).any():
            axes.contour((labels == label).astype(np.float32), levels=[0.5], colors=[_CLASS_RGB[label]],
                         linewidths=1.0)  # fmt: skip
    height_mm = (view.shape[0] - 1 - level) * view.spacing_mm[0]
    if record is None:
        axes.set_title(f"(c) axial through the airway, {height_mm:.0f} mm below the top", fontsize=10)
    else:
        _, posterior, left = view.index(record["index_zyx"])
        half_rows = _BREAK_ZOOM_HALF_MM / view.spacing_mm[1]
        half_columns = _BREAK_ZOOM_HALF_MM / view.spacing_mm[2]
        axes.set_xlim(max(left - half_columns, -0.5), min(left + half_columns, view.shape[2] - 0.5))
        axes.set_ylim(min(posterior + half_rows, view.shape[1] - 0.5), max(posterior - half_rows, -0.5))
        axes.plot(left, posterior, marker="o", markersize=18, markerfacecolor="none",
                  markeredgecolor=_break_rgb(record), markeredgewidth=1.5)  # fmt: skip
        state = "merged" if record["merged"] else ("bridged, not merged" if record["connected"] else
                                                   "bridge refused" if record.get("rejected") else "not bridged")
        axes.set_title(f"(c) break {record['id']}: gap {_format_value(record['gap_mm'])} mm, {state}",
                       fontsize=10)  # fmt: skip
    _orientation_letters(axes, "A", "P")
    axes.set_axis_off()
    return image


def _break_list(axes: Axes, breaks: list[dict]) -> None:
    axes.set_axis_off()
    axes.set_title("breaks", fontsize=11)
    if not breaks:
        axes.text(0.5, 0.6, "no breaks found", ha="center", va="center", fontsize=12, transform=axes.transAxes)
        return
    shown = breaks[:_BREAKS_IN_FIGURE]
    height = min(1.0, 0.06 * (len(shown) + 1))
    table = axes.table(
        cellText=[_break_cells(record) for record in shown],
        colLabels=["id", "gap mm", "confidence", "bridged", "merged"],
        colWidths=[0.12, 0.2, 0.26, 0.21, 0.21], bbox=[0.0, 1.0 - height, 1.0, height], cellLoc="center",
    )  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for row, record in enumerate(shown, start=1):
        table[row, 0].get_text().set_color(_break_rgb(record))
        table[row, 0].get_text().set_fontweight("bold")
    if len(breaks) > len(shown):
        axes.text(0.5, 1.0 - height - 0.03, f"... and {len(breaks) - len(shown)} more in report.html",
                  ha="center", va="top", fontsize=9, transform=axes.transAxes)  # fmt: skip


def _break_cells(record: dict) -> list[str]:
    """Id, gap (mm), confidence, connected ("refused" where the widening guard refused its
    whole bridge) and merged of one break, as shown in both tables."""
    return [
        str(record["id"]), _format_value(record["gap_mm"]), _format_value(float(record["confidence"])),
        "refused" if record.get("rejected") and not record["connected"] else _format_value(bool(record["connected"])),
        _format_value(bool(record["merged"])),
    ]  # fmt: skip


def _table(axes: Axes, rows: list[tuple[str, str]]) -> None:
    axes.set_axis_off()
    axes.set_title("(d) summary", fontsize=11)
    height = min(1.0, 0.032 * len(rows))
    cells = [[name, _shorten(value, _CELL_CHARS)] for name, value in rows]
    table = axes.table(cellText=cells, colWidths=[0.58, 0.42], cellLoc="left", bbox=[0.0, 1.0 - height, 1.0, height])
    table.auto_set_font_size(False)
    table.set_fontsize(9)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# ---------------------------------------------------------------------------------------------
# The page

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
img { max-width: 100%; border: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
.merged { color: #1a9e3c; font-weight: bold; }
.not-merged { color: #c020c0; font-weight: bold; }
.note { color: #a05000; }
"""


def _html_page(
    title: str, png: bytes, rows: list[tuple[str, str]], breaks: list[dict], note: str | None
) -> str:
    """A page that needs nothing else: the figure as a data URI, the table and the break list."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<img alt="{escape(title)}: 3-D tree, coronal MinIP, axial slices and summary" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
    ]
    if note is not None:
        parts.append(f'<p class="note">{escape(note)}</p>')
    parts.append("<h2>Summary</h2><table>")
    parts += [f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in rows]
    parts.append("</table><h2>Breaks</h2>")
    if not breaks:
        parts.append("<p>No breaks found.</p>")
    else:
        parts.append(
            "<table><tr><th>id</th><th>position LPS (mm)</th><th>voxel (z, y, x)</th><th>gap (mm)</th>"
            "<th>confidence</th><th>connected</th><th>merged</th></tr>"
        )
        for record in breaks:
            state = "merged" if record["merged"] else "not-merged"
            break_id, gap, confidence, connected, merged = (escape(cell) for cell in _break_cells(record))
            position = ", ".join(f"{float(v):.1f}" for v in record["position_lps_mm"])
            voxel = ", ".join(str(int(v)) for v in record["index_zyx"])
            parts.append(
                f'<tr><td class="{state}">{break_id}</td><td>{position}</td><td>{voxel}</td><td>{gap}</td>'
                f"<td>{confidence}</td><td>{connected}</td><td>{merged}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
