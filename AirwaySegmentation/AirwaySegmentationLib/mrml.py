"""Conversion between MRML nodes and our arrays + geometry: the only Lib file that touches MRML.

The Slicer module files stay thin: they take nodes from ``slicer.mrmlScene``, call these
functions, run the headless core on :class:`~AirwaySegmentationLib.volume.Volume` objects and
put the results back as nodes.  Nothing here imports ``slicer``; every function works on the
node objects and the scene it is given, so the same code runs inside Slicer and headless with
the PyPI ``slicer-core`` wheel (which the tests use).

Conventions bridged here:

* MRML geometry (``IJKToRAS``) is in RAS; ours is in LPS (x and y negated).
* A node's image data holds voxels with i fastest; as a numpy array that is z, y, x order,
  the order of :attr:`Volume.array_zyx` (as ``slicer.util.arrayFromVolume`` gives).
* Nodes under a linear transform are read in world coordinates and written so that they land
  in the given physical place; a non-linear transform must be hardened first.

Example, inside Slicer::

    from AirwaySegmentationLib import mrml
    ct_node = slicer.util.getNode("CT")
    ct = mrml.volume_from_node(ct_node)
    labels = ...  # a Volume computed by the core from ct
    mrml.segmentation_node_from_labels(labels, slicer.mrmlScene, "Airway", reference_node=ct_node)
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import ndimage
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkImageData, vtkPolyData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .classes import AIRWAY_CLASSES
from .errors import AirwayInputError
from .segfile import airway_label_plan, terminology_string
from .volume import Geometry, Volume

#: Name of the segmentation representation that holds voxels.
BINARY_LABELMAP = "Binary labelmap"
#: Name and units of the per-control-point measurement that carries the lumen radius of a curve.
RADIUS_MEASUREMENT = "Radius"
RADIUS_UNITS = "mm"
#: Slicer's Inferno colour table (loaded from its colour files when Slicer starts).
INFERNO_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"

# RAS <-> LPS: negate x and y (the matrix is its own inverse).
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INT32 = np.iinfo(np.int32)


def _mrml_class(instance: Any, class_name: str) -> type:
    """A class wrapped in the same library as ``instance`` (e.g. MRMLCore, vtkSegmentationCore).

    The library is ``MRMLCore`` inside Slicer and ``slicer_core.MRMLCore`` in the slicer-core
    wheel; asking the instance for it keeps this module free of ``slicer`` imports.
    """
    return getattr(importlib.import_module(type(instance).__module__), class_name)


def _array_from_vtk_matrix(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _vtk_matrix_from_array(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def _node_to_world(node: Any) -> np.ndarray:
    """4x4 RAS matrix from the node's own coordinates to world (identity without a transform)."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise AirwayInputError(
            f"{node.GetName()!r} is under a non-linear transform; harden the transform "
            "(Data module, right-click, Harden transform) and try again."
        )
    matrix = vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _array_from_vtk_matrix(matrix)


def _voxels_from_image(image: vtkImageData, what: str) -> np.ndarray:
    """A copy of an image's scalars as a (Z, Y, X) numpy array."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise AirwayInputError(f"{what} holds no voxels; load or compute the image first.")
    if scalars.GetNumberOfComponents() != 1:
        raise AirwayInputError(
            f"{what} has {scalars.GetNumberOfComponents()} values per voxel; expected a scalar (grey-level) volume."
        )
    shape_zyx = tuple(reversed(image.GetDimensions()))
    return numpy_support.vtk_to_numpy(scalars).reshape(shape_zyx).copy()


def _vtk_compatible(values: np.ndarray) -> np.ndarray:
    """The voxels in a C-contiguous type that Slicer displays (no bool, float16 or 64-bit integers)."""
    values = np.asarray(values)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    elif values.dtype == np.float16:
        values = values.astype(np.float32)
    elif values.dtype.kind in "iu" and values.dtype.itemsize == 8:
        # Slicer does not render "long long" volumes; int32 holds every value we produce.
        if values.size and (values.min() < _INT32.min or values.max() > _INT32.max):
            raise AirwayInputError("The volume holds integers beyond the 32-bit range; convert it to float32 first.")
        values = values.astype(np.int32)
    elif values.dtype.kind not in "iuf":
        raise AirwayInputError(f"Cannot put {values.dtype} voxels into a volume node; give integer or real values.")
    return np.ascontiguousarray(values.astype(values.dtype.newbyteorder("="), copy=False))


def _image_from_voxels(values_zyx: np.ndarray, image: vtkImageData) -> vtkImageData:
    """Fill ``image`` (dimensions, scalars) with a deep copy of the voxels; origin and spacing stay 0 and 1."""
    image.SetDimensions(*reversed(values_zyx.shape))
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values_zyx.ravel(), deep=True))
    return image


def volume_from_node(node: Any) -> Volume:
    """Read a scalar or label map volume node as a :class:`Volume` in LPS, world coordinates.

    Parameters
    ----------
    node : vtkMRMLScalarVolumeNode or vtkMRMLLabelMapVolumeNode
        The volume; a linear parent transform is applied to its geometry.

    Returns
    -------
    Volume
        A copy of the voxels in z, y, x order and the node's geometry (spacing, origin,
        direction) in LPS millimetres.

    Raises
    ------
    AirwayInputError
        The node has no voxels, more than one value per voxel, a degenerate geometry or a
        non-linear transform.
    """
    what = f"The volume {node.GetName()!r}"
    image = node.GetImageData()
    values = _voxels_from_image(image, what)
    ijk_to_ras = vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    # IJK counts from the image extent's first corner, which is (0, 0, 0) for almost every node.
    extent_start = np.eye(4)
    extent_start[:3, 3] = image.GetExtent()[::2]
    world = _node_to_world(node) @ _array_from_vtk_matrix(ijk_to_ras) @ extent_start
    return Volume(values, Geometry.from_ijk_to_lps(_RAS_FROM_LPS @ world, what))


def node_from_volume(volume: Volume, scene: Any, name: str, node: Any = None, labelmap: bool = False) -> Any:
    """Put a :class:`Volume` into a volume node, placed at the volume's physical position.

    Parameters
    ----------
    volume : Volume
        Voxels (z, y, x) and LPS geometry.  bool becomes uint8, float16 float32, and 64-bit
        integers int32 (Slicer does not display 64-bit integer volumes).
    scene : vtkMRMLScene
        The scene that receives a new node (``slicer.mrmlScene`` inside Slicer).
    name : str
        Node name.
    node : vtkMRMLVolumeNode, optional
        Existing node to overwrite (voxels, geometry, name) instead of adding a new one; its
        class is kept.  If it is under a linear transform, the geometry is written so that
        the voxels still land at the volume's physical position.
    labelmap : bool
        Add a ``vtkMRMLLabelMapVolumeNode`` (for label maps) instead of a
        ``vtkMRMLScalarVolumeNode``; only used when ``node`` is None.

    Returns
    -------
    vtkMRMLVolumeNode
        The node, with default display nodes.
    """
    values = _vtk_compatible(volume.array_zyx)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    else:
        node.SetName(name)
    node.SetAndObserveImageData(_image_from_voxels(values, vtkImageData()))
    world = _RAS_FROM_LPS @ volume.geometry.ijk_to_lps
    node.SetIJKToRASMatrix(_vtk_matrix_from_array(np.linalg.inv(_node_to_world(node)) @ world))
    node.CreateDefaultDisplayNodes()
    return node


def segmentation_node_from_labels(
    labels: Volume, scene: Any, name: str, reference_node: Any = None, node: Any = None
) -> Any:
    """A segmentation node with one named, coloured, SNOMED-coded segment per airway class.

    The three segments (ids ``airway_class_1`` to ``airway_class_3``, present even when
    empty so that they can be painted into) share one binary labelmap on the labels' grid,
    with label values 1, 2, 3, as in the ``.seg.nrrd`` files of
    :func:`~AirwaySegmentationLib.segfile.write_segmentation`.

    Parameters
    ----------
    labels : Volume
        Label map with values 0 (background), 1, 2, 3 (see :data:`classes.AIRWAY_CLASSES`).
    scene : vtkMRMLScene
        The scene that receives the node.
    name : str
        Node name.
    reference_node : vtkMRMLVolumeNode, optional
        The volume the labels were computed from: becomes the segmentation's reference
        geometry (the grid the Segment Editor paints on).  Without it the labels' own grid is
        the reference geometry.
    node : vtkMRMLSegmentationNode, optional
        A node to fill instead of adding one (its segments are replaced; its name is kept).

    Returns
    -------
    vtkMRMLSegmentationNode
        The node, with default display nodes.

    Raises
    ------
    AirwayInputError
        The labels hold values other than 0-3.
    """
    values = np.asarray(labels.array_zyx)
    # isin is one pass over a CT-sized array; unique would sort it.
    unknown = values[~np.isin(values, [0, *(c.label for c in AIRWAY_CLASSES)])]
    if unknown.size:
        raise AirwayInputError(
            f"The labels hold values {np.unique(unknown)[:5].tolist()} that are not airway classes; expected 0-3."
        )
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    oriented_image = _mrml_class(segmentation, "vtkOrientedImageData")()
    labelmap = _image_from_voxels(np.ascontiguousarray(values, dtype=np.uint8), oriented_image)
    # The labelmap's "world" is the node's own frame: undo a transform the node sits under
    # (as node_from_volume does), so the labels land where the labels' geometry puts them.
    world = _RAS_FROM_LPS @ labels.geometry.ijk_to_lps
    labelmap.SetImageToWorldMatrix(_vtk_matrix_from_array(np.linalg.inv(_node_to_world(node)) @ world))
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    for airway_class in AIRWAY_CLASSES:
        segment = _mrml_class(segmentation, "vtkSegment")()
        segment.SetName(airway_class.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*airway_class.color_rgb)
        segment.SetColorAutoGenerated(False)
        segment.SetTerminology(terminology_string(airway_class.snomed_type))
        segment.SetLabelValue(airway_class.label)
        segment.AddRepresentation(BINARY_LABELMAP, labelmap)
        segmentation.AddSegment(segment, f"airway_class_{airway_class.label}")
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    else:
        converter = _mrml_class(segmentation, "vtkSegmentationConverter")
        segmentation.SetConversionParameter(
            converter.GetReferenceImageGeometryParameterName(), converter.SerializeImageGeometry(labelmap)
        )
    node.CreateDefaultDisplayNodes()
    return node


def _segment_description(segment: Any) -> dict:
    """Name and terminology type of a segment, in the form segfile reads from files.

    The terminology entry string is ``context~category~type~...``, each code ``scheme^value^meaning``.
    """
    parts = segment.GetTerminology().split("~")
    return {"name": segment.GetName(), "terminology": {"type": parts[2].split("^") if len(parts) > 2 else []}}


def _resample_nearest(
    values_zyx: np.ndarray, values_ijk_to_lps: np.ndarray, reference: Geometry, shape_zyx: tuple[int, ...]
) -> np.ndarray:
    """Nearest-neighbour values of a grid at the voxel centres of another (0 outside), as Slicer resamples labelmaps."""
    # Affine map from reference voxel indices to source voxel indices, both in i, j, k order.
    mapping = np.linalg.inv(values_ijk_to_lps) @ reference.ijk_to_lps
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    shift = np.rint(offset).astype(int)
    if np.allclose(linear, np.eye(3), atol=1e-6) and np.allclose(offset, shift, atol=1e-3):
        # Same grid up to whole voxels (a segmentation cropped to its extent): copy the overlap.
        out = np.zeros(shape_zyx, dtype=values_zyx.dtype)
        target, source = [], []
        for size_out, size_in, step in zip(shape_zyx, values_zyx.shape, shift[::-1]):
            start, stop = max(0, -step), min(size_out, size_in - step)
            if stop <= start:
                return out
            target.append(slice(start, stop))
            source.append(slice(start + step, stop + step))
        out[tuple(target)] = values_zyx[tuple(source)]
        return out
    return ndimage.affine_transform(
        values_zyx, linear[::-1, ::-1], offset[::-1], output_shape=shape_zyx, order=0, mode="constant", cval=0
    )


def _create_binary_labelmaps(node: Any, reference: Volume) -> None:
    """Convert segments held as closed surfaces to binary labelmaps on the reference grid.

    The segmentation's reference geometry is set to that grid for the conversion (so that
    no resampling follows) and then restored.
    """
    segmentation = node.GetSegmentation()
    converter = _mrml_class(segmentation, "vtkSegmentationConverter")
    parameter = converter.GetReferenceImageGeometryParameterName()
    kept = segmentation.GetConversionParameter(parameter)
    grid_ras = np.linalg.inv(_node_to_world(node)) @ _RAS_FROM_LPS @ reference.geometry.ijk_to_lps
    extent = [v for size in reversed(reference.array_zyx.shape) for v in (0, size - 1)]
    segmentation.SetConversionParameter(
        parameter, converter.SerializeImageGeometry(_vtk_matrix_from_array(grid_ras), extent)
    )
    try:
        created = node.CreateBinaryLabelmapRepresentation()
    finally:
        segmentation.SetConversionParameter(parameter, kept)
    if not created:
        raise AirwayInputError(
            f"The segmentation {node.GetName()!r} cannot be turned into a binary labelmap; "
            "create the binary labelmap representation in the Segmentations module first."
        )


def _labelmap_on_grid(image: Any, to_world_lps: np.ndarray, reference: Volume) -> np.ndarray:
    """The label values of one (possibly shared) binary labelmap, a vtkOrientedImageData, on the reference grid."""
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros(reference.array_zyx.shape, dtype=np.uint8)  # an empty layer has no voxels at all
    ijk_to_ras = vtkMatrix4x4()
    image.GetImageToWorldMatrix(ijk_to_ras)
    # Voxel (0, 0, 0) of the scalars sits at the extent's first corner, not at IJK (0, 0, 0).
    extent_start = np.eye(4)
    extent_start[:3, 3] = extent[::2]
    values_ijk_to_lps = to_world_lps @ _array_from_vtk_matrix(ijk_to_ras) @ extent_start
    values = _voxels_from_image(image, "A segment's binary labelmap")
    return _resample_nearest(values, values_ijk_to_lps, reference.geometry, reference.array_zyx.shape)


def labels_from_segmentation_node(node: Any, reference: Volume, *, refuse_others: bool = False) -> Volume:
    """An airway label map on the reference grid from a segmentation node.

    Segments are matched to our classes as :func:`~AirwaySegmentationLib.segfile.read_segmentation`
    matches them in files: by name first, then by terminology (trachea code); other airway
    segments (names with "airway", "trachea" or "bronch", SNOMED CT airway codes) make the
    result a binary mask (label 1), and a lone segment is taken as the airway whatever its name.
    Segments stored as closed surfaces are converted to binary labelmaps first (Slicer's
    converters).  Each labelmap is resampled to the reference grid by nearest neighbour.

    Parameters
    ----------
    node : vtkMRMLSegmentationNode
        The segmentation; a linear parent transform is applied.
    reference : Volume
        The grid of the result (usually the CT the labels belong to); only its geometry and
        shape are used.
    refuse_others : bool
        Refuse a segment that holds voxels but is no airway segment, instead of leaving it
        out: where the labels become training data, a correction painted into a new segment
        (the Segment Editor names it "Segment_4") must not vanish without a word.

    Returns
    -------
    Volume
        uint8 labels (0-3, or 0/1 for a binary airway mask) on the reference geometry.

    Raises
    ------
    AirwayInputError
        No airway segment, no binary labelmap can be made, a non-linear transform, or (with
        ``refuse_others``) a non-airway segment that holds voxels.
    """
    segmentation = node.GetSegmentation()
    segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    descriptions = [_segment_description(segmentation.GetSegment(sid)) for sid in segment_ids]
    plan = airway_label_plan(descriptions, f"The segmentation {node.GetName()!r}")
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        _create_binary_labelmaps(node, reference)
    to_world_lps = _RAS_FROM_LPS @ _node_to_world(node)
    # Segments often share one labelmap (a layer); resample each shared labelmap once.
    resampled: dict[str, np.ndarray] = {}

    def voxels_of(index: int) -> np.ndarray:
        segment = segmentation.GetSegment(segment_ids[index])
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        key = labelmap.GetAddressAsString("vtkObject")
        if key not in resampled:
            resampled[key] = _labelmap_on_grid(labelmap, to_world_lps, reference)
        return resampled[key] == segment.GetLabelValue()

    if refuse_others:
        planned = {index for index, _ in plan}
        for index, description in enumerate(descriptions):
            if index not in planned and voxels_of(index).any():
                raise AirwayInputError(
                    f"Segment {description.get('name', '?')!r} of {node.GetName()!r} holds voxels but is not an airway "
                    "segment, so it would be left out; rename it 'airway' (or a class name) or delete it."
                )
    labels = np.zeros(reference.array_zyx.shape, dtype=np.uint8)
    for index, value in plan:
        labels[voxels_of(index)] = value
    return Volume(labels, reference.geometry)


def _checked_centerlines(
    centerlines: Iterable[tuple[str, np.ndarray, np.ndarray]]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The centerlines as (name, float points (N, 3), float radii (N,)), or ValueError before any node is made."""
    checked = []
    for name, points_xyz, radius_mm in centerlines:
        points = np.asarray(points_xyz, dtype=float)
        radius = np.asarray(radius_mm, dtype=float)
        if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2 or not np.all(np.isfinite(points)):
            raise ValueError(
                f"centerline {name!r}: expected (N, 3) finite points with N >= 2, got shape {points.shape}"
            )
        if radius.shape != (len(points),) or not np.all(np.isfinite(radius)) or np.any(radius < 0):
            raise ValueError(
                f"centerline {name!r}: expected {len(points)} finite, non-negative radii, got shape {radius.shape}"
            )
        checked.append((name, points, radius))
    return checked


def curve_nodes_from_centerlines(
    centerlines: Iterable[tuple[str, np.ndarray, np.ndarray]], scene: Any
) -> list[Any]:
    """One open markups curve per centerline, carrying the lumen radius at every control point.

    Each curve is linear with one point per segment, so it is exactly the given polyline;
    the radius is a static measurement named ``"Radius"`` in mm (the form SlicerVMTK's
    Extract Centerline produces), shown as a point-data array on the curve.

    Parameters
    ----------
    centerlines : iterable of (str, array (N, 3), array (N,))
        Name, points in LPS millimetres (x, y, z) and lumen radius in mm at each point.
    scene : vtkMRMLScene
        The scene that receives the curves.

    Returns
    -------
    list of vtkMRMLMarkupsCurveNode
        The curves, in the order given, with default display nodes.

    Raises
    ------
    ValueError
        Points are not (N, 3) with N >= 2, radii are not N non-negative numbers, or either
        holds non-finite values.
    """
    nodes = []
    for name, points, radius in _checked_centerlines(centerlines):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", name)
        node.SetCurveTypeToLinear()
        node.SetNumberOfPointsPerInterpolatingSegment(1)
        positions = vtkPoints()
        positions.SetData(numpy_support.numpy_to_vtk(points * _RAS_FROM_LPS.diagonal()[:3], deep=True))
        node.SetControlPointPositionsWorld(positions)
        values = numpy_support.numpy_to_vtk(radius, deep=True)
        values.SetName(RADIUS_MEASUREMENT)
        measurement = _mrml_class(scene, "vtkMRMLStaticMeasurement")()
        measurement.SetName(RADIUS_MEASUREMENT)
        measurement.SetUnits(RADIUS_UNITS)
        measurement.SetPrintFormat("")  # a per-point array, not one value for the Description column
        measurement.SetControlPointValues(values)
        node.AddMeasurement(measurement)
        node.CreateDefaultDisplayNodes()
        nodes.append(node)
    return nodes


def centerline_model_node(
    centerlines: Iterable[tuple[str, np.ndarray, np.ndarray]],
    scene: Any,
    name: str,
    cell_values: dict[str, Iterable[int]] | None = None,
) -> Any:
    """A model node holding the centerlines as polylines with a lumen radius per point.

    The form of SlicerVMTK's centerline model (and of ``centerlines.vtp``): one polyline cell
    per centerline, point array ``"Radius"`` (mm), and optional integer cell arrays such as
    ``BranchId`` or ``Generation``.

    Parameters
    ----------
    centerlines : iterable of (str, array (N, 3), array (N,))
        As for :func:`curve_nodes_from_centerlines` (the names are not used).
    scene : vtkMRMLScene
        The scene that receives the model.
    name : str
        Node name.
    cell_values : dict of str to sequence of int, optional
        Cell arrays, one value per centerline.

    Returns
    -------
    vtkMRMLModelNode
        The model (points in RAS, as models are stored), with default display nodes.

    Raises
    ------
    ValueError
        Bad points or radii (as :func:`curve_nodes_from_centerlines`), or a cell array whose
        length is not the number of centerlines.
    """
    checked = _checked_centerlines(centerlines)
    cells = {key: np.asarray(list(values), dtype=np.int32) for key, values in (cell_values or {}).items()}
    for key, values in cells.items():
        if values.shape != (len(checked),):
            raise ValueError(f"cell array {key!r}: expected {len(checked)} values, one per centerline, got {values.shape}")
    points = np.concatenate([np.zeros((0, 3))] + [p for _, p, _ in checked])
    radius = np.concatenate([np.zeros(0)] + [r for _, _, r in checked])
    # Cell i holds the consecutive points offsets[i] to offsets[i + 1] - 1.
    offsets = np.r_[0, np.cumsum([len(p) for _, p, _ in checked], dtype=np.int64)]
    lines = vtkCellArray()
    lines.SetData(
        numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
        numpy_support.numpy_to_vtkIdTypeArray(np.arange(len(points), dtype=np.int64), deep=True),
    )
    polydata = vtkPolyData()
    positions = vtkPoints()
    positions.SetData(numpy_support.numpy_to_vtk(points * _RAS_FROM_LPS.diagonal()[:3], deep=True))
    polydata.SetPoints(positions)
    polydata.SetLines(lines)
    radius_array = numpy_support.numpy_to_vtk(radius, deep=True)
    radius_array.SetName(RADIUS_MEASUREMENT)
    polydata.GetPointData().AddArray(radius_array)
    polydata.GetPointData().SetActiveScalars(RADIUS_MEASUREMENT)
    for key, values in cells.items():
        array = numpy_support.numpy_to_vtk(values, deep=True)
        array.SetName(key)
        polydata.GetCellData().AddArray(array)
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(polydata)
    node.CreateDefaultDisplayNodes()
    return node


def show_as_overlay(
    volume_node: Any,
    color_node_id: str = INFERNO_COLOR_NODE_ID,
    opacity: float = 0.4,
    value_range: tuple[float, float] = (0.0, 1.0),
    transparent_below: float = 0.05,
) -> bool:
    """Show a volume over the background of every slice view, in a colour table, its low values transparent.

    Parameters
    ----------
    volume_node : vtkMRMLScalarVolumeNode
        The overlay (e.g. the breakage attention, values 0-1), in a scene.
    color_node_id : str
        Colour table; Slicer's Inferno by default.
    opacity : float
        Opacity of the foreground layer, in [0, 1].
    value_range : (float, float)
        Values mapped to the two ends of the colour table.
    transparent_below : float
        Values below this are not drawn (the threshold of the volume's display), so that the
        overlay does not darken the CT where it is 0.

    Returns
    -------
    bool
        Whether the colour table is in the scene.  Slicer loads its colour files at start-up;
        a scene without them (Slicer's MRML libraries alone) keeps the default grey.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    scene = volume_node.GetScene()
    volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*value_range)
    display.AutoThresholdOff()
    display.SetThreshold(transparent_below, max(value_range[1], transparent_below))
    display.ApplyThresholdOn()
    has_colors = scene.GetNodeByID(color_node_id) is not None
    if has_colors:
        display.SetAndObserveColorNodeID(color_node_id)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetForegroundVolumeID(volume_node.GetID())
        composite.SetForegroundOpacity(opacity)
    return has_colors


def jump_slices_to(scene: Any, point_lps: Iterable[float]) -> None:
    """Centre every slice view of the scene on a point given in LPS millimetres (orientations stay).

    Parameters
    ----------
    scene : vtkMRMLScene
    point_lps : sequence of 3 float
        x, y, z in LPS mm (as the core reports positions); Slicer's RAS is (-x, -y, z).
    """
    point = np.asarray(list(point_lps), dtype=float)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise ValueError(f"expected a point of 3 finite LPS coordinates, got {point.tolist()}")
    slice_node = _mrml_class(scene, "vtkMRMLSliceNode")
    slice_node.JumpAllSlices(scene, *(point * _RAS_FROM_LPS.diagonal()[:3]), slice_node.CenteredJumpSlice)
