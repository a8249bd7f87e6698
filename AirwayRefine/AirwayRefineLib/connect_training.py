"""Training the breakage connection network with the shared loop (DeepTree 2.3, METHODS.md section 2).

:class:`ConnectionTask` plugs stage 2 into :func:`AirwaySegmentationLib.train.train`: the
loop, checkpoints, resume, DDP, precision and logs are stage 1's; the data, the patches and
the validation are here.

* **Simulated breaks.**  Every epoch each training volume gets a new breakage simulation
  (:func:`~AirwayRefineLib.breakage.simulate_breakage`, seeded by the run's seed, the epoch
  and the volume).  The breakage attention of the broken label gives the blobs; a patch is a
  64^3 crop of CT + attention at a blob's centre shifted at random by up to
  ``connection.max_shift_zyx`` voxels, and its target is Y_B in the crop.  With
  ``connection.break_centres`` each simulated break is a centre too.
* **Real breaks** (hard examples).  At the start, a stage-1 model predicts every training
  volume with all its components; its real breaks
  (:func:`~AirwayRefineLib.breakage.harvest_real_breaks`) are the target and the attention
  of that prediction the input.  Every blob of that attention is a patch centre, including
  blobs between false-positive pieces where the target is empty: they teach the network
  where not to bridge.  ``connection.real_break_share`` of the patches come from them.  With
  ``connection.real_break_centres`` each real break's narrowest voxel is a centre too.
* **Loss mask**: the voxels of the broken (or predicted) mask are left out of the Dice + CE
  loss.  The merge only ever adds voxels outside that mask, so the network's output there is
  never used, and neither input channel shows where the mask ends (the lumen of a kept piece
  looks like the lumen of the gap): asking for 0 there would ask for the impossible.  DeepTree
  does not say; this is our choice.
* **Augmentation**: random flips along each axis (CT, attention, target and mask together).
  DeepTree names only the random shift; flips keep the patch a possible chest CT region.
* **Validation**: fixed simulations of the validation volumes go through the product's
  inference (:func:`~AirwayRefineLib.connect.find_breaks` and
  :func:`~AirwayRefineLib.connect.merge_breaks`) and are scored by
  :func:`reconnection_metrics`; the best model has the highest ``reconnected -
  false_bridges`` (percent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from AirwaySegmentationLib.arrays import largest_component_and_count
from AirwaySegmentationLib.data import TrainingVolume
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.networks import SegmentationOutput
from AirwaySegmentationLib.preprocess import InputSpec
from AirwaySegmentationLib.progress import ProgressCallback, report
from AirwaySegmentationLib.sampling import PAD_HU
from AirwaySegmentationLib.segment import SegmentationModel, load_segmentation_model, segment_ct
from AirwaySegmentationLib.train import Runtime, TrainingTask, load_training_volumes, loading_pool
from AirwaySegmentationLib.train_config import ConnectionConfig, TrainConfig
from AirwaySegmentationLib.tree import AirwayTree, parse_airway_tree

from .attention import AttentionBlob, breakage_attention, find_attention_blobs
from .breakage import BreakageSimulation, harvest_real_breaks, simulate_breakage
from .connect import BLOB_THRESHOLD, BreakPrediction, connection_input, crop_padded, find_breaks, merge_breaks

#: The CT channel of the connection network, no display window (the attention is the second
#: channel).  DeepTree does not say how it normalises the CT; the clip range is set on the
#: contrast the network must see, lumen air (-1000 HU) against lung parenchyma (-900 to
#: -700 HU): -1100 to -400 HU maps that to a quarter of the range, where the stage-1 lung
#: window (-1200 to 600 HU) gives it less than a tenth.
CONNECTION_INPUT_SPEC = InputSpec(hu_clip=(-1100.0, -400.0), windows=())
#: Share of a bridge's voxels that must lie in the ground truth for it to count as a true bridge.
TRUE_BRIDGE_SHARE = 0.5


@dataclass
class BreakExamples:
    """Patch centres of one volume: a broken (or predicted) mask's attention, the target, the blobs.

    Attributes
    ----------
    attention_zyx : numpy.ndarray
        float16 breakage attention of the broken mask.
    target_zyx : numpy.ndarray
        bool, the voxels that repair the breaks (Y_B).
    known_zyx : numpy.ndarray
        bool, the broken (or predicted) mask itself: left out of the loss.
    blobs : list of AttentionBlob
    """

    attention_zyx: np.ndarray = field(repr=False)
    target_zyx: np.ndarray = field(repr=False)
    known_zyx: np.ndarray = field(repr=False)
    blobs: list[AttentionBlob]


def _centres(attention: np.ndarray, centres_zyx: list[tuple[int, int, int]]) -> list[AttentionBlob]:
    """One more patch centre per break (``break_centres``, ``real_break_centres``); only the centre is read."""
    return [AttentionBlob(centre, 0, float(attention[centre])) for centre in centres_zyx]


def simulated_examples(
    volume: TrainingVolume, tree: AirwayTree, rng: np.random.Generator, connection: ConnectionConfig
) -> tuple[BreakExamples, BreakageSimulation]:
    """One breakage simulation of a training volume and the blobs of its attention."""
    simulation = simulate_breakage(
        volume.labels3, volume.spacing_zyx, rng, connection.peripheral_fraction, connection.break_fraction, tree=tree,
    )
    broken = simulation.broken_zyx > 0
    attention = breakage_attention(broken, volume.spacing_zyx, alpha_mm=connection.alpha_mm)
    blobs = find_attention_blobs(attention, BLOB_THRESHOLD)
    if connection.break_centres:
        blobs += _centres(attention, [simulated.centre_zyx for simulated in simulation.breaks])
    return BreakExamples(attention.astype(np.float16), simulation.target_zyx, broken, blobs), simulation


def real_examples(volume: TrainingVolume, predicted_zyx: np.ndarray, connection: ConnectionConfig) -> BreakExamples:
    """The real breaks of a stage-1 prediction of a training volume and every blob of its attention."""
    predicted = predicted_zyx > 0
    harvested = harvest_real_breaks(predicted, volume.labels3 > 0, volume.spacing_zyx)
    attention = breakage_attention(predicted, volume.spacing_zyx, alpha_mm=connection.alpha_mm)
    blobs = find_attention_blobs(attention, BLOB_THRESHOLD)
    if connection.real_break_centres:
        blobs += _centres(attention, [real.centre_zyx for real in harvested.breaks])
    return BreakExamples(attention.astype(np.float16), harvested.target_zyx, predicted, blobs)


class ConnectionPatches(IterableDataset):
    """Training patches of the connection network (the module docstring says which).

    Items: ``"image"`` float32 (2, D, H, W) (CT, attention), ``"labels"`` int64 (D, H, W)
    (1 on Y_B) and ``"loss_mask"`` float32 (D, H, W) (0 on the broken mask, see the module
    docstring).  Seeding follows :class:`~AirwaySegmentationLib.sampling.PatchDataset`:
    ``(seed, epoch, worker)`` for the patch draws, and ``(seed, epoch, volume)`` for the
    simulation of a volume, so a resumed run repeats an uninterrupted one.

    Parameters
    ----------
    volumes, trees : sequences
        Training volumes and the parses of their labels.
    real : list of BreakExamples or None
        Real-break examples per volume (None: the volume has none).
    config : TrainConfig
        Patch size, batch size, run length and ``[connection]``.
    spec : InputSpec
        CT channels.
    seed : int
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        trees: Sequence[AirwayTree],
        real: Sequence[BreakExamples | None],
        config: TrainConfig,
        spec: InputSpec,
        seed: int,
    ) -> None:
        self.volumes, self.trees, self.real = list(volumes), list(trees), list(real)
        self.connection = config.connection
        self.patch_zyx = np.asarray(config.sampling.patch_size_zyx)
        self.flips = config.sampling.augmentation
        self.spec = spec
        self.seed = int(seed)
        self.n_patches = config.schedule.iterations_per_epoch * config.sampling.batch_size
        self.epoch = 0
        self._simulated: dict[int, BreakExamples] = {}
        self._with_real = [i for i, examples in enumerate(self.real) if examples is not None and examples.blobs]

    def set_epoch(self, epoch: int) -> None:
        """Number of the coming pass: new patches and new simulations."""
        self.epoch = int(epoch)
        self._simulated = {}

    def _simulation(self, index: int) -> BreakExamples:
        if index not in self._simulated:
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            self._simulated[index] = simulated_examples(self.volumes[index], self.trees[index], rng, self.connection)[0]
        return self._simulated[index]

    def item(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One patch as described in the class docstring."""
        if self._with_real and rng.random() < self.connection.real_break_share:
            index = self._with_real[int(rng.integers(len(self._with_real)))]
            examples = self.real[index]
        else:
            examples = None
            for _ in range(len(self.volumes)):  # a simulation can break nothing (a tree without leaves)
                index = int(rng.integers(len(self.volumes)))
                examples = self._simulation(index)
                if examples.blobs:
                    break
            if examples is None or not examples.blobs:
                raise RuntimeError("No training volume gives a breakage blob; the trees have no breakable leaves.")
        blob = examples.blobs[int(rng.integers(len(examples.blobs)))]
        shift = np.asarray(self.connection.max_shift_zyx)
        centre = np.asarray(blob.centre_zyx) + rng.integers(-shift, shift + 1)
        ct = crop_padded(self.volumes[index].ct.array_zyx, centre, self.patch_zyx, PAD_HU)
        attention = crop_padded(examples.attention_zyx, centre, self.patch_zyx, 0.0).astype(np.float32)
        target = crop_padded(examples.target_zyx, centre, self.patch_zyx, False)
        known = crop_padded(examples.known_zyx, centre, self.patch_zyx, False)
        if self.flips:
            axes = tuple(axis for axis in range(3) if rng.random() < 0.5)
            ct, attention, target, known = (np.flip(a, axes) for a in (ct, attention, target, known))
        return {
            "image": torch.from_numpy(connection_input(ct, attention, self.spec)),
            "labels": torch.from_numpy(target.astype(np.int64)),
            "loss_mask": torch.from_numpy((~known).astype(np.float32)),
        }

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        count = 0
        while worker + count * n_workers < self.n_patches:
            yield self.item(rng)
            count += 1


def reconnection_metrics(
    simulation: BreakageSimulation,
    tree: AirwayTree,
    prediction: BreakPrediction,
    ground_truth_zyx: np.ndarray,
) -> dict[str, float]:
    """How well stage 2 repaired a simulated breakage.

    Parameters
    ----------
    simulation : BreakageSimulation
        The simulation whose ``broken_zyx`` stage 2 was given.
    tree : AirwayTree
        The parse of the ground truth the simulation used.
    prediction : BreakPrediction
        :func:`~AirwayRefineLib.connect.find_breaks` on the broken label; every bridge is
        merged (:func:`~AirwayRefineLib.connect.merge_breaks`), as ``airway refine`` does.
    ground_truth_zyx : numpy.ndarray
        The label before the simulation.

    Returns
    -------
    dict
        ``breaks``: simulated breaks; ``reconnected``: percent of them whose distal piece is in
        the refined tree; ``bridges``: bridges made; ``false_bridges``: percent of those with
        less than half their voxels in the ground truth (a bridge fatter than a thin lumen
        counts); ``bridges_without_truth``: percent of bridges with no voxel in the ground
        truth at all (a bridge where the ground truth has none); ``single_component``: 100
        when the merged result (before keeping the largest component) is one component, else 0.
    """
    merged = merge_breaks(simulation.broken_zyx, prediction, tree.spacing_zyx, keep_tree=False)
    refined, components = largest_component_and_count(merged > 0, 26)
    by_id = {branch.id: branch for branch in tree.branches}
    reconnected = 0
    for simulated in simulation.breaks:
        skeleton = by_id[simulated.branch_id].skeleton_zyx
        run = {tuple(v) for v in simulated.skeleton_zyx.tolist()}
        positions = [i for i, v in enumerate(skeleton.tolist()) if tuple(v) in run]
        distal = skeleton[max(positions) + 1 :]
        distal = distal[simulation.broken_zyx[tuple(distal.T)] > 0]
        reconnected += bool(len(distal)) and bool(refined[tuple(distal[-1])])
    bridges = [b for b in prediction.breaks if b.connected]
    truth = ground_truth_zyx > 0
    in_truth = [truth[tuple(b.bridge_zyx.T)] for b in bridges]
    false = sum(inside.mean() < TRUE_BRIDGE_SHARE for inside in in_truth)
    without = sum(not inside.any() for inside in in_truth)
    return {
        "breaks": float(len(simulation.breaks)),
        "reconnected": 100.0 * reconnected / max(len(simulation.breaks), 1),
        "bridges": float(len(bridges)),
        "false_bridges": 100.0 * false / max(len(bridges), 1),
        "bridges_without_truth": 100.0 * without / max(len(bridges), 1),
        "single_component": 100.0 * (components == 1),
    }


class ConnectionTask(TrainingTask):
    """Stage 2 in the shared training loop (see the module docstring)."""

    metric_names = ("breaks", "reconnected", "bridges", "false_bridges", "bridges_without_truth", "single_component", "score")
    score_name = "score"
    output_description = "logits (N, 2, D, H, W): background, breakage Y_B (the voxels that reconnect a break)"
    input_spec = CONNECTION_INPUT_SPEC

    def __init__(self) -> None:
        self.train_volumes: list[TrainingVolume] = []
        self.trees: list[AirwayTree] = []
        self.real: list[BreakExamples | None] = []
        self.validation: list[tuple[TrainingVolume, AirwayTree, BreakageSimulation]] = []

    def load(self, config: TrainConfig, runtime: Runtime, progress: ProgressCallback | None) -> None:
        connection = config.connection
        self.train_volumes, validation_volumes = load_training_volumes(config.data, progress)
        count = len(self.train_volumes)
        # Parsing and harvesting run in config.data.load_workers processes while this one predicts.
        report(progress, 0.0, f"Parsing {count} training trees")
        with loading_pool(min(config.data.load_workers, count)) as defer:
            trees = [defer(parse_airway_tree, v.labels3 > 0, v.spacing_zyx, connectivity=26) for v in self.train_volumes]
            real = [None] * count
            if connection.real_break_share > 0 and connection.real_breaks_model != "none":
                stage1 = load_segmentation_model(None if connection.real_breaks_model == "default" else connection.real_breaks_model)
                for index, volume in enumerate(self.train_volumes):
                    report(progress, index / count, f"Real breaks of {volume.name} ({index + 1}/{count})")
                    predicted = segment_ct(volume.ct.array_zyx, volume.ct.geometry, stage1, keep_largest_component=False).labels.array_zyx
                    real[index] = defer(real_examples, volume, predicted, connection)
            self.trees = [tree() for tree in trees]
            self.real = [None if examples is None else examples() for examples in real]
        if runtime.is_main:
            for index, volume in enumerate(validation_volumes):
                tree = parse_airway_tree(volume.labels3 > 0, volume.spacing_zyx, connectivity=26)
                for repeat in range(connection.validation_simulations):
                    rng = np.random.default_rng([config.seed, index, repeat, 2])
                    simulation = simulate_breakage(volume.labels3, volume.spacing_zyx, rng, connection.peripheral_fraction,
                                                   connection.break_fraction, tree=tree)
                    self.validation.append((volume, tree, simulation))

    def dataset(self, config: TrainConfig, spec: InputSpec, seed: int) -> ConnectionPatches:
        return ConnectionPatches(self.train_volumes, self.trees, self.real, config, spec, seed)

    @property
    def validates(self) -> bool:
        return bool(self.validation)

    def validate(self, model: nn.Module, config: TrainConfig, spec: InputSpec, runtime: Runtime) -> dict[str, float]:
        loaded = SegmentationModel(model, self.card(config), "training", spec, tuple(config.sampling.patch_size_zyx))
        settings = InferenceSettings(
            device=runtime.device.type, precision=str(runtime.dtype).removeprefix("torch."),
            channels_last=config.runtime.channels_last,
        )
        rows = []
        for volume, tree, simulation in self.validation:
            prediction = find_breaks(volume.ct.array_zyx, simulation.broken_zyx, volume.spacing_zyx, loaded, settings)
            rows.append(reconnection_metrics(simulation, tree, prediction, volume.labels3))
        means = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        means["score"] = means["reconnected"] - means["false_bridges"]
        return means

    def card(self, config: TrainConfig) -> dict:
        return {
            **super().card(config),
            "task": "connection",
            "attention": {"alpha_mm": config.connection.alpha_mm, "channel": "last (after the CT channels)"},
        }


class _LumenOracle(nn.Module):
    """logit(breakage) = 100 * min(0.25 - ct, attention - 0.2) on the channels of CONNECTION_INPUT_SPEC."""

    def forward(self, image: torch.Tensor) -> SegmentationOutput:
        ct, attention = image[:, :1], image[:, 1:2]
        breakage = 100.0 * torch.minimum(0.25 - ct, attention - 0.2)
        return SegmentationOutput(torch.cat([torch.zeros_like(breakage), breakage], dim=1))


def lumen_oracle(patch_size_zyx: Sequence[int] = (32, 32, 32)) -> SegmentationModel:
    """A hand-written connection network with known behaviour, for self-tests that need no trained model.

    It predicts breakage where the CT is lumen-dark (CT channel below 0.25: about -925 HU) and
    the attention is above 0.2 (the second-nearest component closer than about 6.4 mm): the
    missing lumen of a short break, never tissue.
    """
    card = {"attention": {"alpha_mm": 5.0}, "task": "connection"}
    return SegmentationModel(_LumenOracle(), card, "lumen oracle", CONNECTION_INPUT_SPEC, tuple(patch_size_zyx))
