"""Breakage connection (DeepTree stage 2, METHODS.md section 2): find breaks, predict bridges, merge.

:func:`find_breaks` labels the components of a stage-1 result, computes the breakage
attention (:func:`~AirwayRefineLib.attention.breakage_attention`), finds its blobs, crops a
CT + attention patch (early fusion, :func:`connection_input`) at each blob's centre, runs the
connection network on all of them in batches and turns each prediction into a
:class:`Break`: where it is, how long the gap is, which two components it lies between, and
the bridge the network predicts.  :func:`merge_breaks` then adds the bridges of all or of a
chosen subset of breaks (a clinician accepts or rejects each one) to the labels and keeps the
largest component, as DeepTree does (precisely: the component holding the stage-1 tree,
:func:`tree_component`).  Nothing is predicted twice: choosing another subset
only merges again.

Choices where the paper is silent (each also said where it is made):

* A *bridge* is a 26-connected piece of predicted breakage voxels (probability > 0.5, outside
  the stage-1 mask) that touches at least two different stage-1 components; predicted voxels
  that touch one component or none join nothing and are dropped.  A patch sees more than its
  own gap, so a bridge belongs to the break whose blob holds the bridge's voxel of highest
  attention (to the patch that predicted it when that voxel is in no blob), and a
  break's bridge is the union of the pieces that belong to it, whichever patch predicted
  them: each break is one place a clinician accepts or rejects.  A break is *connected* when
  it keeps a bridge after the widening guard (below).
* *Bridge width* (ours): the network's bridge across a thin gap often spreads into the dark
  tissue beside it, two to five times wider than the lumen.  A bridge between two components
  keeps a tube of the lumen's radius around its darkest path:

  - the *axis* is the minimal path through the bridge from the voxels facing one component
    to those facing the other, in face-neighbour steps whose cost grows with the HU above air
    (``1 + (HU + 1000) / 100``), as minimal-path centerline extraction for virtual
    bronchoscopy does (Deschamps and Cohen, Med Image Anal 2001).  Face steps make the bridge
    join the pieces at 6-connectivity too, which the ATM'22 evaluation and 6-connected
    tools use (a piece that only reaches a component diagonally falls back to its shortest
    26-connected paths);
  - the *radius* is the lumen radius of the thinner of the two pieces where the bridge meets
    them: the widest ball inside each piece that reaches the contact (the rule of the
    widening guard below; at a branch's cut end the contact voxels themselves lie one voxel
    from the gap, whatever the lumen's width), less half a voxel (a lumen one voxel wide
    keeps the axis alone);
  - of the rest, only voxels within that radius of the axis stay, and only those with
    ``dA(x) + dB(x) <= L + v``: ``dA``, ``dB`` the geodesic distances (mm) inside the
    bridge from its voxels touching each component, ``L`` the shortest such path and ``v``
    one voxel step (the smallest spacing), so that nothing bulging off the way from one
    piece to the other stays.

  Bridges touching three or more components are kept whole.
* *Widening guard* (ours): airways narrow from the trachea outwards, so a bridge must not
  hang a region off the tree that is much wider than the airway it hangs from.  Region
  growing guards against leaks into the lung the same way, by refusing a step where the
  segmented calibre suddenly grows.  Starting from the largest component (the stage-1 tree),
  the bridges are followed outwards, piece by piece (a break's bridge may be several
  predicted pieces): a piece that reaches from the tree (or from a component already hung
  on it) to components whose widest lumen radius (distance transform maximum) is over
  ``WIDENING_FACTOR`` times the radius of the airway it leaves, plus one voxel step, is
  refused.  That radius is the one of the widest ball inside the airway that reaches the
  bridge's contact with it (the lumen the bridge leaves, not the wider airway it may branch
  from farther away).  A break keeps the pieces that were not refused and records why
  any were (``rejected``); one left with none is not connected.  Each ring of bridges is
  judged against the tree as it stood before that ring, so the outcome does not depend on
  the order of the breaks; a piece between components that joined the tree in the same ring
  closes a loop and is kept.  Bridges that the tree never reaches are left as they are: the
  merge keeps the tree (:func:`tree_component`), so what they join is dropped even when it
  has grown larger than the tree; a merge that keeps every component keeps them, apart from
  the tree.  A stage-1 false-positive region in the lung, a blob several
  millimetres wide, so cannot be joined to a peripheral bronchus through a chain of
  fragments.
* *Confidence*: the mean predicted probability over the bridge's voxels; for a break without
  a bridge, the highest probability its patch predicted outside the mask inside its blob
  (how close the network came to bridging it).
* *Gap point*: the blob's attention peak (its voxels nearest to a second component); where
  a gap's whole cross-section ties, the tied voxel nearest their centroid (on the axis).
* *Gap length*: at the gap point, the distance to the nearest plus to the second-nearest
  component: the distance between the facing voxel centres across a straight gap (as the
  simulation's ``length_mm``).
* *Components*: the two components nearest that point (labels of ``cc3d`` at the given
  connectivity, largest first numbering is not implied); a bridge may join more.
* *Class of new voxels*: "the class of the branch they join": each bridge voxel takes the
  class of the nearest labelled voxel (Euclidean, in mm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cc3d
import numpy as np
from scipy import ndimage
from skimage.graph import MCP_Geometric

from AirwaySegmentationLib.arrays import as_spacing_zyx, bounding_box, check_connectivity, grow_box
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.infer import CancelToken, SlidingWindow, check_threshold
from AirwaySegmentationLib.preprocess import InputSpec, network_input
from AirwaySegmentationLib.progress import ProgressCallback, report, sub_progress
from AirwaySegmentationLib.sampling import PAD_HU
from AirwaySegmentationLib.segment import SegmentationModel, load_segmentation_model
from AirwaySegmentationLib.volume import Geometry

from .attention import DEFAULT_ALPHA_MM, AttentionBlob, blob_labels, breakage_attention, find_attention_blobs

#: The patch DeepTree crops at each break (section 2.3).
CONNECTION_PATCH_ZYX = (64, 64, 64)
#: Patches per forward pass when the settings leave the batch size open.
PATCH_BATCH_SIZE = 4
#: Attention above this forms a blob (the second-nearest component is closer than alpha).
BLOB_THRESHOLD = 0.5
#: A bridge keeps no voxel off paths through it more than this many voxels longer than its
#: shortest path from one component to the other (module docstring, "Bridge width").
BRIDGE_SLACK_VOXELS = 1.0
#: HU above air that doubles the cost of a step on a bridge's darkest path (air, -1000 HU:
#: cost 1; lung tissue at -850 HU: 2.5).
DARK_PATH_HU = 100.0
#: Voxels around a bridge in which the lumen radius of the pieces it joins is measured.
LUMEN_MARGIN_VOXELS = 6
#: A bridge may hang pieces off the tree whose widest lumen radius is at most this many times
#: that of the airway it leaves, plus one voxel step (module docstring, "Widening guard").
WIDENING_FACTOR = 2.0
#: The radius of the airway a bridge leaves is measured exactly up to this radius (wider
#: airways count as this wide: they may still hang pieces more than twice as wide as that).
RADIUS_REACH_MM = 6.0
#: The first box around a bridge in which that radius is measured reaches this far; it
#: doubles while the widest ball found fills it (most bridges leave thin airways).
FIRST_REACH_MM = 4.0


def connection_input(hu_zyx: np.ndarray, attention_zyx: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The connection network's input: the CT channels of ``spec``, then the attention (early fusion).

    Parameters
    ----------
    hu_zyx : numpy.ndarray
        CT patch in HU, shape (D, H, W).
    attention_zyx : numpy.ndarray
        Breakage attention on the same patch, values in [0, 1].
    spec : InputSpec
        CT channels (the connection model's card: the clipped HU channel only).

    Returns
    -------
    numpy.ndarray
        float32, shape (``spec.n_channels + 1``, D, H, W).
    """
    if np.shape(hu_zyx) != np.shape(attention_zyx):
        raise AirwayInputError(f"The CT patch {np.shape(hu_zyx)} and the attention patch {np.shape(attention_zyx)} differ in shape.")
    ct = network_input(hu_zyx, spec)
    return np.concatenate([ct, np.asarray(attention_zyx, dtype=np.float32)[None]], axis=0)


def crop_padded(array_zyx: np.ndarray, centre_zyx: Sequence[int], size_zyx: Sequence[int], fill: float) -> np.ndarray:
    """A ``size_zyx`` crop of ``array_zyx`` centred on ``centre_zyx`` (``centre - size // 2`` is its
    first voxel), filled with ``fill`` where it leaves the array."""
    size = np.asarray(size_zyx, dtype=int)
    start = np.asarray(centre_zyx, dtype=int) - size // 2
    out = np.full(tuple(size), fill, dtype=array_zyx.dtype)
    low = np.maximum(start, 0)
    high = np.minimum(start + size, array_zyx.shape)
    if np.all(high > low):
        source = tuple(slice(a, b) for a, b in zip(low, high))
        target = tuple(slice(a - s, b - s) for a, b, s in zip(low, high, start))
        out[target] = array_zyx[source]
    return out


@dataclass
class Break:
    """One break of a stage-1 result: a blob of breakage attention and what the network made of it.

    Attributes
    ----------
    id : int
        1-based, in the order of the blobs (highest attention first).
    point_zyx : tuple of 3 int
        Voxel index of the gap point (the blob's attention peak).
    gap_mm : float or None
        Distance to the nearest plus to the second-nearest component at that point: the
        distance between the facing voxel centres across a straight gap (None when the
        components lie beyond the patch).
    components : tuple of 2 int
        The two components nearest the gap point (labels of the stage-1 mask's components).
    component_voxels : tuple of 2 int
        Their sizes in voxels.
    confidence : float
        Mean bridge probability (or the best probability of an unbridged blob), see the module docstring.
    connected : bool
        The break has a bridge that joins two or more components: a piece the network
        predicted and the widening guard kept.
    joined : tuple of int
        Every component the bridge touches (empty without a bridge).
    bridge_zyx : numpy.ndarray
        (K, 3) int voxel indices the bridge adds.
    rejected : str
        Why the widening guard refused the network's bridge or a piece of it (module
        docstring); empty when it did not.  A break whose every piece was refused is not
        connected.
    """

    id: int
    point_zyx: tuple[int, int, int]
    gap_mm: float | None
    components: tuple[int, int]
    component_voxels: tuple[int, int]
    confidence: float
    connected: bool
    joined: tuple[int, ...] = ()
    bridge_zyx: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64), repr=False)
    rejected: str = ""

    def record(self, geometry: Geometry) -> dict:
        """JSON-ready description; the position is the gap point in LPS millimetres."""
        position = geometry.index_zyx_to_physical(np.asarray([self.point_zyx], dtype=float))[0]
        return {
            "id": self.id,
            "position_lps_mm": [round(float(v), 3) for v in position],
            "index_zyx": list(self.point_zyx),
            "gap_mm": None if self.gap_mm is None else round(self.gap_mm, 3),
            "components": list(self.components),
            "component_voxels": list(self.component_voxels),
            "confidence": round(self.confidence, 4),
            "connected": self.connected,
            "joined_components": list(self.joined),
            "bridge_voxels": int(len(self.bridge_zyx)),
            "rejected": self.rejected or None,
        }


@dataclass
class BreakPrediction:
    """Stage 2 before the merge: the attention map, the components and every break found.

    Attributes
    ----------
    attention_zyx : numpy.ndarray
        float32 breakage attention of the stage-1 mask.
    components_before : int
        Connected components of the stage-1 mask.
    breaks : list of Break
    tree_voxel_zyx : tuple of 3 int or None
        A voxel of the stage-1 tree (its largest component), which the merge keeps with
        whatever the bridges join to it; None when there is nothing to bridge (the merge then
        keeps the largest component, which is the tree).
    """

    attention_zyx: np.ndarray = field(repr=False)
    components_before: int
    breaks: list[Break]
    tree_voxel_zyx: tuple[int, int, int] | None = None

    @property
    def refused(self) -> int:
        """Breaks with a bridge piece the widening guard refused (module docstring)."""
        return sum(bool(b.rejected) for b in self.breaks)


def load_connection_model(model: str | None = None) -> SegmentationModel:
    """The breakage connection network: a bundled name, a path, or None for the bundled default."""
    return load_segmentation_model(model, task="connection")


def find_breaks(
    hu_zyx: np.ndarray,
    labels_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    model: SegmentationModel | str | None = None,
    settings: InferenceSettings = InferenceSettings(),
    *,
    threshold: float = 0.5,
    connectivity: int = 26,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> BreakPrediction:
    """Find the breaks of a stage-1 result and predict a bridge for each.

    Parameters
    ----------
    hu_zyx : numpy.ndarray
        CT in HU, shape (Z, Y, X).
    labels_zyx : numpy.ndarray
        Stage-1 result on the same grid (classes or binary), with all its components (stage 1
        run without keeping the largest component only).
    spacing_zyx : sequence of 3 float
        Voxel size in mm.
    model : SegmentationModel or str, optional
        The connection network (:func:`load_connection_model`), its name or path; None: the
        bundled default.
    settings : InferenceSettings
        Device, precision, batch size and threads (windows and blending do not apply).
    threshold : float
        Breakage probability from which a voxel is predicted.
    connectivity : int
        Connectivity of the components: 6, 18 or 26.
    progress, cancel
        ``progress(fraction, message)``; a cancel token checked between batches.

    Returns
    -------
    BreakPrediction
    """
    hu = np.asarray(hu_zyx)
    labels = np.asarray(labels_zyx)
    if hu.ndim != 3 or hu.shape != labels.shape:
        raise AirwayInputError(
            f"The CT {hu.shape} and the labels {labels.shape} must be 3-D volumes of the same shape; give labels on the CT's grid."
        )
    spacing = as_spacing_zyx(spacing_zyx)
    check_connectivity(connectivity)
    check_threshold(threshold)
    loaded = model if isinstance(model, SegmentationModel) else load_connection_model(model)
    alpha = float(loaded.card.get("attention", {}).get("alpha_mm", DEFAULT_ALPHA_MM))
    mask = labels > 0
    components, count = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    report(progress, 0.0, f"Breakage attention of {count} components")
    attention = breakage_attention(mask, spacing, alpha_mm=alpha, connectivity=connectivity,
                                   progress=sub_progress(progress, 0.0, 0.3))
    numbered = blob_labels(attention, BLOB_THRESHOLD, connectivity=26)
    blobs = find_attention_blobs(attention, BLOB_THRESHOLD, connectivity=26, labels=numbered)
    if not blobs:
        report(progress, 1.0, "No breaks found")
        return BreakPrediction(attention, int(count), [])
    size = np.asarray(loaded.patch_size_zyx)
    blobs_zyx = numbered[0]
    patches = np.empty((len(blobs), loaded.spec.n_channels + 1, *size), dtype=np.float32)
    for patch, blob in zip(patches, blobs):
        patch[...] = connection_input(crop_padded(hu, blob.centre_zyx, size, PAD_HU),
                                      crop_padded(attention, blob.centre_zyx, size, 0.0), loaded.spec)
    report(progress, 0.3, f"Predicting {len(blobs)} breaks")
    # Patches go 4 to a batch on the CPU too (measured: 7 % faster than one by one at 64^3).
    engine = SlidingWindow(loaded.network, dataclasses.replace(settings, batch_size=settings.batch_size or PATCH_BATCH_SIZE))
    probability = engine.predict_patches(patches, sub_progress(progress, 0.3, 0.9), cancel, channel=1)
    del patches
    report(progress, 0.9, "Finding the bridges")
    statistics = cc3d.statistics(components)
    readings = [
        _read_patch(blob, patch_probability, components, blobs_zyx, attention, hu, spacing, threshold)
        for blob, patch_probability in zip(blobs, probability)
    ]
    # Each bridge goes to the break whose blob holds its voxel of highest attention.
    patch_of_blob = {blob.label: index for index, blob in enumerate(blobs)}
    owned: list[list[_Bridge]] = [[] for _ in blobs]
    for index, reading in enumerate(readings):
        for bridge in reading.bridges:
            peak = tuple(bridge.voxels_zyx[np.argmax(attention[tuple(bridge.voxels_zyx.T)])])
            owned[patch_of_blob.get(int(blobs_zyx[peak]), index)].append(bridge)
    tree = int(np.argmax(statistics["voxel_counts"][1:])) + 1  # the stage-1 tree: the largest component
    owned, reasons = _refuse_widening(owned, components, statistics, tree, spacing)
    breaks = [
        _make_break(index, reading, bridges, statistics["voxel_counts"], reason)
        for index, (reading, bridges, reason) in enumerate(zip(readings, owned, reasons), start=1)
    ]
    box = statistics["bounding_boxes"][tree]
    first = np.unravel_index(int(np.argmax(components[box] == tree)), components[box].shape)
    tree_voxel = tuple(int(axis.start + index) for axis, index in zip(box, first))
    prediction = BreakPrediction(attention, int(count), breaks, tree_voxel)
    report(progress, 1.0, f"{sum(b.connected for b in breaks)} of {len(breaks)} breaks bridged"
           + (f", {prediction.refused} refused as widening" if prediction.refused else ""))
    return prediction


@dataclass
class _Bridge:
    """One predicted piece that joins components: its voxels (global indices), their probabilities, what it joins."""

    voxels_zyx: np.ndarray
    probability: np.ndarray
    joined: set[int]


@dataclass
class _PatchReading:
    """What one patch says of its break before the bridges go to their owners."""

    point_zyx: tuple[int, int, int]
    gap_mm: float | None
    components: tuple[int, int]
    best_probability: float
    bridges: list[_Bridge]


def _read_patch(
    blob: AttentionBlob,
    probability_zyx: np.ndarray,
    components: np.ndarray,
    blobs_zyx: np.ndarray,
    attention: np.ndarray,
    hu_zyx: np.ndarray,
    spacing: tuple[float, float, float],
    threshold: float,
) -> _PatchReading:
    """The gap point, gap, nearest components and predicted bridges of the patch centred on ``blob``."""
    size = np.asarray(probability_zyx.shape)
    start_zyx = np.asarray(blob.centre_zyx) - size // 2
    comp = crop_padded(components, blob.centre_zyx, size, 0)
    in_blob = crop_padded(blobs_zyx, blob.centre_zyx, size, 0) == blob.label
    peak = _gap_point(np.where(in_blob, crop_padded(attention, blob.centre_zyx, size, 0.0), -1.0))
    # The two components nearest the gap point (module docstring): distances from it to every
    # labelled voxel of the patch (the components that matter lie within the cutoff, well
    # inside a 64^3 patch), one vectorised pass, no transform.
    voxels = np.argwhere(comp > 0)
    owner = comp[tuple(voxels.T)]
    distance = np.sqrt(((voxels - np.asarray(peak)) ** 2 * np.square(spacing)).sum(axis=1))
    first = int(owner[np.argmin(distance)]) if len(voxels) else 0
    others = owner != first
    if others.any():
        nearest_other = int(np.argmin(np.where(others, distance, np.inf)))
        second = int(owner[nearest_other])
        gap: float | None = float(distance.min() + distance[nearest_other])
    else:  # a blob longer than its patch: the components lie beyond it
        second, gap = 0, None
    # Bridges: predicted pieces outside the mask touching two or more components.
    predicted = (probability_zyx > threshold) & (comp == 0)
    pieces, n_pieces = cc3d.connected_components(predicted, connectivity=26, return_N=True)
    bridges = []
    touching = _touched_components(pieces, n_pieces, comp) if n_pieces else {}
    joining = {piece: touched for piece, touched in touching.items() if len(touched) >= 2}
    if joining:
        hu = crop_padded(hu_zyx, blob.centre_zyx, size, PAD_HU)  # only the bridges need the CT here
        # One pass over the patch for all joining pieces, then each piece's voxels inside the volume.
        local_all = np.argwhere(np.isin(pieces, list(joining)))
        global_all = local_all + start_zyx
        inside = np.all((global_all >= 0) & (global_all < np.asarray(components.shape)), axis=1)
        local_all, global_all = local_all[inside], global_all[inside]
        piece_of = pieces[tuple(local_all.T)]
        for piece, touched in joining.items():
            mine = piece_of == piece
            if len(touched) == 2:
                mine &= _lumen_tube(pieces == piece, comp, hu, touched, spacing)[tuple(local_all.T)]
            if mine.any():
                bridges.append(_Bridge(global_all[mine].astype(np.int64), probability_zyx[tuple(local_all[mine].T)], touched))
    outside = in_blob & (comp == 0)
    best = float(probability_zyx[outside].max()) if outside.any() else 0.0
    point = tuple(int(v) for v in np.asarray(peak) + start_zyx)
    return _PatchReading(point, gap, (first, second), best, bridges)


def _lumen_tube(piece: np.ndarray, comp: np.ndarray, hu_zyx: np.ndarray, touched: set[int], spacing: tuple[float, float, float]) -> np.ndarray:
    """The voxels of a bridge piece that stay: a tube of the lumen's radius along its darkest path.

    Module docstring, "Bridge width".  ``piece`` is the bridge (bool), ``comp`` the component
    labels and ``hu_zyx`` the CT of the patch; the result has the shape of ``piece``.
    """
    box = bounding_box(piece, LUMEN_MARGIN_VOXELS)
    bridge, labels = piece[box], comp[box]
    step = min(spacing)
    all_neighbours = np.ones((3, 3, 3), dtype=bool)
    # Geodesic distances inside the bridge (26-neighbour steps in mm); outside it is impassable.
    length_costs = np.where(bridge, 1.0, np.inf)
    # The darkest path: face-neighbour steps whose cost grows with the HU above air.
    dark_costs = np.where(bridge, 1.0 + np.clip((hu_zyx[box] + 1000.0) / DARK_PATH_HU, 0.0, None), np.inf)
    through = np.zeros(bridge.shape)
    darkness = np.zeros(bridge.shape)
    inside_mm = ndimage.distance_transform_edt(labels > 0, sampling=spacing)
    radius = np.inf
    around = ndimage.binary_dilation(bridge, all_neighbours)
    for label in sorted(touched):
        side = labels == label
        # The lumen radius where the bridge meets this piece: the widest ball inside the piece
        # that reaches the contact (at a branch's cut end the contact itself is one voxel from
        # the gap, whatever the lumen's width), less half a voxel.
        contact = around & side
        from_contact = ndimage.distance_transform_edt(~contact, sampling=spacing)
        radius = min(radius, float(inside_mm[side & (from_contact <= inside_mm + step)].max()) - step / 2)
        starts = np.argwhere(bridge & ndimage.binary_dilation(side, all_neighbours))
        through += MCP_Geometric(length_costs, sampling=spacing).find_costs(starts)[0]
        faces = np.argwhere(bridge & ndimage.binary_dilation(side))  # face neighbours of the piece
        darkness += MCP_Geometric(dark_costs, sampling=spacing, fully_connected=False).find_costs(faces)[0] if len(faces) else np.inf
    shortest = through[bridge].min()
    if np.isfinite(darkness[bridge]).any():
        axis = bridge & (darkness <= darkness[bridge].min() * (1.0 + 1e-9))
    else:  # the piece joins the two only through edges or corners: its shortest 26-connected paths
        axis = bridge & (through <= shortest + 1e-6)
    near_axis = ndimage.distance_transform_edt(~axis, sampling=spacing) <= max(radius, 0.0) + 1e-6
    kept = np.zeros_like(piece)
    kept[box] = axis | (bridge & near_axis & (through <= shortest + BRIDGE_SLACK_VOXELS * step))
    return kept


def _make_break(index: int, reading: _PatchReading, bridges: list[_Bridge], sizes: np.ndarray, rejected: str) -> Break:
    """Break number ``index`` from its patch's reading and the bridges that belong to it (module docstring)."""
    first, second = reading.components
    if bridges:
        voxels, where = np.unique(np.concatenate([b.voxels_zyx for b in bridges]), axis=0, return_index=True)
        confidence = float(np.concatenate([b.probability for b in bridges])[where].mean())
        joined = tuple(sorted(set().union(*(b.joined for b in bridges))))
    else:
        voxels, confidence, joined = np.zeros((0, 3), dtype=np.int64), reading.best_probability, ()
    return Break(
        id=index, point_zyx=reading.point_zyx, gap_mm=reading.gap_mm, components=(first, second),
        component_voxels=(int(sizes[first]) if first else 0, int(sizes[second]) if second else 0),
        confidence=confidence, connected=bool(bridges), joined=joined, bridge_zyx=voxels, rejected=rejected,
    )


def _refuse_widening(
    owned: list[list[_Bridge]], components: np.ndarray, statistics: dict, tree_label: int,
    spacing: tuple[float, float, float],
) -> tuple[list[list[_Bridge]], list[str]]:
    """Each break's bridges without those that widen the tree, and why any were refused (module
    docstring, "Widening guard"; an empty reason where none was).  ``statistics`` is
    ``cc3d.statistics(components)``, ``tree_label`` the stage-1 tree's component."""
    reasons = ["" for _ in owned]
    waiting = [(index, bridge) for index, bridges in enumerate(owned) for bridge in bridges]
    if not waiting:
        return owned, reasons
    boxes = statistics["bounding_boxes"]
    step = min(spacing)
    widest: dict[int, float] = {}

    def widest_radius(label: int) -> float:
        if label not in widest:
            inside = np.pad(components[boxes[label]] == label, 1)
            widest[label] = float(ndimage.distance_transform_edt(inside, sampling=spacing).max())
        return widest[label]

    def airway_radius(label: int, bridge_zyx: np.ndarray) -> float:
        # The widest ball inside the component that reaches the bridge: the component's
        # distance transform in a box around the bridge (its faces count as outside), at
        # voxels no farther from the contact than their radius.  A ball of radius r touching
        # the contact lies within 2 r + 2 voxel steps of the bridge, so a box reaching that
        # far measures it exactly; the reach doubles while the widest ball fills the box.
        reach_mm = FIRST_REACH_MM
        while True:
            reach = np.ceil(reach_mm / np.asarray(spacing)).astype(int) + 1
            box = grow_box(_voxel_box(bridge_zyx), reach, components.shape)
            low = np.asarray([axis.start for axis in box])
            inside = components[box] == label
            radius = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
            bridge = np.zeros(inside.shape, dtype=bool)
            bridge[tuple((bridge_zyx - low).T)] = True
            contact = inside & ndimage.binary_dilation(bridge, np.ones((3, 3, 3), dtype=bool))
            from_contact = ndimage.distance_transform_edt(~contact, sampling=spacing)
            widest = float(radius[inside & (from_contact <= radius + step)].max())
            if 2 * widest + 2 * step < reach_mm or widest >= RADIUS_REACH_MM:
                return min(widest, RADIUS_REACH_MM)
            reach_mm *= 2

    tree = {tree_label}
    refused: set[int] = set()
    while waiting:  # outwards from the tree, one ring of bridges at a time
        reached = frozenset(tree)  # the tree before this ring: the order of the bridges does not matter
        unreached = []
        for index, bridge in waiting:
            leaves = [label for label in bridge.joined if label in reached]
            if not leaves:
                unreached.append((index, bridge))
                continue
            airway = max(airway_radius(label, bridge.voxels_zyx) for label in leaves)
            hung = {label: widest_radius(label) for label in bridge.joined if label not in reached}
            too_wide = {label: radius for label, radius in hung.items() if radius > WIDENING_FACTOR * airway + step}
            if too_wide:
                label, radius = max(too_wide.items(), key=lambda item: item[1])
                refused.add(id(bridge))
                reasons[index] = reasons[index] or (
                    f"it would hang component {label} (lumen radius up to {radius:.1f} mm) off an airway of radius {airway:.1f} mm")
            else:
                tree.update(hung)
        if len(unreached) == len(waiting):
            break
        waiting = unreached
    return [[b for b in bridges if id(b) not in refused] for bridges in owned], reasons


def _voxel_box(voxels_zyx: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of (K, 3) voxel indices, K > 0."""
    return tuple(slice(int(low), int(high) + 1) for low, high in zip(voxels_zyx.min(axis=0), voxels_zyx.max(axis=0)))


def _gap_point(attention_in_blob: np.ndarray) -> tuple[int, int, int]:
    """The blob's attention peak in the patch (-1 outside the blob): of the voxels tied at the peak
    (a gap's whole cross-section), the one nearest their centroid, i.e. on the lumen's axis.
    A blob that leaves the patch entirely gives the patch centre."""
    peak = attention_in_blob.max()
    if peak < 0:
        return tuple(int(n) // 2 for n in attention_in_blob.shape)
    tied = np.argwhere(attention_in_blob >= peak - 1e-6)
    nearest = tied[np.argmin(((tied - tied.mean(axis=0)) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)


def _touched_components(pieces: np.ndarray, n_pieces: int, comp: np.ndarray) -> dict[int, set[int]]:
    """For each predicted piece (1..n), the components (labels of ``comp``) it touches at 26-connectivity."""
    # Pieces and components in one label volume (components shifted past the pieces), then
    # the pairs of labels that touch.
    combined = np.where(pieces > 0, pieces, np.where(comp > 0, comp.astype(np.int64) + n_pieces, 0)).astype(np.uint32)
    touched: dict[int, set[int]] = {piece: set() for piece in range(1, n_pieces + 1)}
    for a, b in cc3d.contacts(combined, connectivity=26):
        low, high = min(a, b), max(a, b)
        if low <= n_pieces < high:
            touched[low].add(high - n_pieces)
    return touched


def merge_breaks(
    labels_zyx: np.ndarray,
    prediction: BreakPrediction,
    spacing_zyx: Sequence[float],
    break_ids: Iterable[int] | None = None,
    keep_tree: bool = True,
    connectivity: int = 26,
) -> np.ndarray:
    """Add the bridges of the chosen breaks to the labels.

    Parameters
    ----------
    labels_zyx : numpy.ndarray
        The stage-1 labels :func:`find_breaks` saw (not modified).
    prediction : BreakPrediction
        From :func:`find_breaks`.
    spacing_zyx : sequence of 3 float
        Voxel size in mm (to find each new voxel's nearest labelled voxel).
    break_ids : iterable of int, optional
        Breaks to connect; None: every connected break.  Choosing a break without a bridge
        (none predicted, or every piece refused by the widening guard) is an error.
    keep_tree : bool
        Keep only the tree afterwards (:func:`tree_component`, DeepTree's final step).
    connectivity : int
        Connectivity of that component.

    Returns
    -------
    numpy.ndarray
        Labels of the same dtype; bridge voxels take the class of the nearest labelled voxel.
    """
    labels = np.asarray(labels_zyx)
    spacing = as_spacing_zyx(spacing_zyx)
    check_connectivity(connectivity)
    by_id = {b.id: b for b in prediction.breaks}
    if break_ids is None:
        chosen = [b for b in prediction.breaks if b.connected]
    else:
        ids = sorted(set(int(i) for i in break_ids))
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            numbered = f"the breaks are numbered 1 to {len(by_id)}" if by_id else "these labels have no breaks"
            raise AirwayInputError(f"There is no break {unknown[0]}; {numbered}.")
        unbridged = [by_id[i] for i in ids if not by_id[i].connected]
        if unbridged:
            first = unbridged[0]
            why = f"'s bridge was refused ({first.rejected})" if first.rejected else " has no predicted bridge to connect"
            raise AirwayInputError(f"Break {first.id}{why}; leave it out.")
        chosen = [by_id[i] for i in ids]
    out = labels.copy()
    for chosen_break in chosen:
        voxels = chosen_break.bridge_zyx
        if not len(voxels):
            continue
        # Each new voxel takes the class of the nearest labelled voxel of the stage-1 labels; a
        # bridge touches them, so a box around it padded by 2 voxels holds that voxel.
        low = np.maximum(voxels.min(axis=0) - 2, 0)
        high = np.minimum(voxels.max(axis=0) + 3, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        nearest = ndimage.distance_transform_edt(labels[box] == 0, sampling=spacing, return_distances=False, return_indices=True)
        local = tuple((voxels - low).T)
        new = labels[box][local] == 0
        classes = labels[box][tuple(index[local] for index in nearest)]
        target = tuple(axis[new] for axis in voxels.T)
        out[target] = classes[new]
    if keep_tree:
        out[~tree_component(out, prediction, connectivity)[0]] = 0
    return out


def tree_component(merged_zyx: np.ndarray, prediction: BreakPrediction, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """The tree after a merge, and the number of components the merge left.

    DeepTree keeps the largest component.  That is the component holding the stage-1 tree
    (``prediction.tree_voxel_zyx``) unless bridges between pieces the tree never reaches, which
    the widening guard does not judge, joined something larger than the tree: the tree is kept
    all the same, never a false-positive region hung off a stray fragment.

    Returns
    -------
    tree : numpy.ndarray
        bool, the kept component (all False for empty labels).
    count : int
        Components of ``merged_zyx > 0``.
    """
    components, count = cc3d.connected_components(np.asarray(merged_zyx) > 0, connectivity=connectivity, return_N=True)
    if count == 0:
        return np.zeros(components.shape, dtype=bool), 0
    if prediction.tree_voxel_zyx is None:  # nothing was bridged: the largest component is the tree
        label = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    else:
        label = int(components[prediction.tree_voxel_zyx])
    return components == label, int(count)
