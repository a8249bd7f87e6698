"""Training: a TOML configuration, a resumable loop, DDP, mixed precision, export.

The loop is shared by the stage-1 networks (:class:`SegmentationTask`, the default) and the
stage-2 breakage connection network (``AirwayRefineLib.connect_training.ConnectionTask``): a
:class:`TrainingTask` gives the data, the patches and the validation, the loop does the rest.

The stage-1 recipe is METHODS.md section 5 (Tang; Qin; Zheng): 128^3 crops drawn at random, where
the model misses (hard mining) and on small airways; AdamW at lr 1e-4; the union loss
scheduled from plain Dice to the local-imbalance weight to local-imbalance plus
centerline-distance weight; group supervision of every output the network gives
(``SegmentationOutput.aux``); attention distillation for networks that expose
``SegmentationOutput.features``.  The loop knows no particular network: it builds one by
name (:func:`~AirwaySegmentationLib.networks.build_network`) and reads its
:class:`~AirwaySegmentationLib.networks.SegmentationOutput`.

Outputs in ``out_dir``:

- ``last.pt``: the checkpoint, written at the end of every epoch and renamed into place
  (after an fsync) as the single commit point of the run.  It holds only tensors and
  strings (read with ``torch.load(weights_only=True)``): the state dicts of the model,
  optimizer and gradient scaler, the packed hard-mining masks in use, and the run's
  non-tensor state as a JSON string (epoch, iteration, best score, the log rows, the config).
- ``last.json`` and ``log.csv``: copies of that JSON and of its log rows (one per epoch:
  losses, validation metrics, learning rate, seconds), written after ``last.pt`` for people
  and tools; a resume never reads them.  TensorBoard event files too when ``tensorboard``
  is installed.
- ``best.safetensors`` + ``best.json``: the model with the best validation score (for stage
  1 the mean ATM'22 score of the validation volumes, 0 when their mean precision is under
  50%) and its model card (:func:`~AirwaySegmentationLib.models.export_model`), written
  after ``last.pt`` too: a kill in between leaves them one best epoch behind, and the resume
  exports the checkpoint's model again when its epoch was the best.

A run that starts over (``resume=False``) removes ``last.pt`` and its copies first.

Resume: :func:`train` continues from ``last.pt`` after a kill, from the start of the epoch
after the last one saved.  Every random source (patches, augmentation, dropout, the loss's
random roots) is reseeded from ``(seed, rank, epoch)`` at the start of an epoch, so the
epoch number is the whole random state; with the hard-mining masks kept in ``last.pt`` a
resumed run repeats an uninterrupted one.  The learning rate is a function of the iteration
and the config, so a run resumed with more ``schedule.epochs`` follows the longer schedule.

DDP: launched by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) every process trains a
replica wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA) on its own stream
of patches (seeded by rank); hard mining predicts a share of the training volumes on each
rank; only rank 0 validates and writes.

Precision: ``auto`` is bfloat16 autocast on CPUs with native bfloat16 (AVX-512-BF16 or AMX)
and on CUDA devices that support it, float16 with a gradient scaler on older GPUs, float32
otherwise; weights are channels-last 3D on the CPU (oneDNN's fast layout).

Examples
--------
>>> from AirwaySegmentationLib.train_config import load_config
>>> config = load_config("Resources/Training/phantom_wingsnet.toml")  # doctest: +SKIP
>>> result = train(config, "runs/wingsnet", progress=TextProgressBar())  # doctest: +SKIP
>>> result.best_score  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import contextlib
import csv
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .data import (
    TrainingVolume,
    find_cases,
    load_case,
    phantom_seeds,
    phantom_training_volume,
)
from .errors import AirwayInputError
from .infer import autocast, predict_volume, resolve_device, resolve_precision
from .losses import (
    AttentionDistillationLoss,
    DeepTreeLoss,
    DiceFocalLoss,
    GeneralUnionLoss,
    TangUnionLoss,
)
from .metrics import evaluate_airway
from .models import export_model, load_model
from .networks import SegmentationOutput, build_network
from .preprocess import DEFAULT_INPUT_SPEC, InputSpec
from .progress import ProgressCallback, report
from .sampling import Augmentation, PatchDataset, PatchSampler
from .train_config import (
    UNION_LOSSES,
    DataConfig,
    LossConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainConfig,
)
from .tree import parse_airway_tree
from .volume import atomic_output, atomic_outputs

CHECKPOINT_VERSION = 2
#: Mean validation precision (percent) below which a stage-1 model is never the best one.
MIN_SELECTION_PRECISION = 50.0
#: Columns of ``log.csv`` before the task's validation metrics (:attr:`TrainingTask.metric_names`).
LOG_COLUMNS = ("epoch", "iteration", "phase", "loss", "loss_main", "loss_aux", "loss_distillation")
#: Columns of ``log.csv`` after them.
LOG_TAIL_COLUMNS = ("lr", "seconds_per_iteration", "seconds")


# --------------------------------------------------------------------------------------
# Devices, precision, processes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains.

    Attributes
    ----------
    device : torch.device
    dtype : torch.dtype
        Autocast dtype (float32: none).
    rank, world_size : int
        This process among the DDP processes (0 of 1 without DDP).
    owns_process_group : bool
        The process group was started here (and is ended by :func:`train`).
    """

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_runtime(config: RuntimeConfig) -> Runtime:
    """The device and precision, joining the DDP process group when launched by ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = resolve_device(config.device).type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # Every step has the same patch shape: let cuDNN time its algorithms once and keep the
        # fastest (nnU-Net does the same).  CUDA training is not bitwise repeatable anyway.
        torch.backends.cudnn.benchmark = True
    dtype = resolve_precision(config.precision, device)
    start_group = world_size > 1 and not dist.is_initialized()
    if start_group:
        # Rank 0 validates while the others wait at a barrier: allow long validations.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Runtime(device, dtype, rank, world_size, start_group)


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def _seed(config: TrainConfig, runtime: Runtime, epoch: int, purpose: int) -> int:
    """A seed for one random source of one rank and epoch (see "Resume" in the module docstring)."""
    return int(np.random.SeedSequence([config.seed, runtime.rank, epoch, purpose]).generate_state(1)[0])


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def loading_pool(workers: int) -> Iterator[Callable[..., Callable[[], Any]]]:
    """``defer(function, *args, **kwargs)``: a callable that gives ``function(*args, **kwargs)``.

    With ``workers`` > 1 the call starts at once in one of that many processes (the function
    and its arguments must pickle) and the callable waits for its result; with one it runs
    when the callable is called.  Either way the results are the same.
    """
    if workers <= 1:
        yield functools.partial
        return
    # spawn, not fork: the training process may hold threads (BLAS, CUDA) a fork would copy mid-state.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda function, *args, **kwargs: pool.submit(function, *args, **kwargs).result


def load_training_volumes(
    data: DataConfig, progress: ProgressCallback | None = None
) -> tuple[list[TrainingVolume], list[TrainingVolume]]:
    """The training and validation volumes of a :class:`DataConfig` (ATM folder, then phantoms).

    With ``data.load_workers`` > 1 the cases are read and the phantoms generated in that many
    processes; the volumes and their order are the same as with one.
    """
    jobs: list[tuple[str, functools.partial]] = []
    if data.atm_root is not None:
        cases = find_cases(data.atm_root)
        if data.atm_validation_cases >= len(cases):
            raise AirwayInputError(
                f"data.atm_validation_cases is {data.atm_validation_cases} but {data.atm_root} holds "
                f"{len(cases)} cases; leave at least one for training."
            )
        cut = len(cases) - data.atm_validation_cases
        jobs += [
            ("train" if i < cut else "validation", functools.partial(load_case, case, data.margin_mm))
            for i, case in enumerate(cases)
        ]
    if data.phantoms is not None:
        p = data.phantoms
        for split, count in (("train", p.train), ("validation", p.validation)):
            for i, seed in enumerate(phantom_seeds(split, count)):
                variant = p.variants[i % len(p.variants)]
                jobs.append((split, functools.partial(
                    phantom_training_volume, seed, variant, p.shape_zyx, p.spacing_zyx, data.margin_mm,
                )))
    volumes: dict[str, list[TrainingVolume]] = {"train": [], "validation": []}
    with loading_pool(min(data.load_workers, len(jobs))) as defer:
        loads = [defer(load) for _, load in jobs]
        for index, ((split, _), load) in enumerate(zip(jobs, loads)):
            report(progress, index / len(jobs), f"loading training data ({index + 1}/{len(jobs)})")
            volumes[split].append(load())
    return volumes["train"], volumes["validation"]


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


@dataclass
class LossTerms:
    """The loss of one step and its parts (``total`` carries the gradient)."""

    total: torch.Tensor
    main: float
    aux: float
    distillation: float


class TrainingLoss(nn.Module):
    """The configured loss, in the phase of the current iteration, on a :class:`SegmentationOutput`.

    ``forward(output, batch, iteration)``: the loss of ``output.main`` plus, with group
    supervision, of every ``output.aux`` (weight 1 each, WingsNet), plus attention
    distillation over ``output.features`` when the network gives them.  ``batch`` is the
    :class:`~AirwaySegmentationLib.sampling.PatchDataset` batch (labels and loss weights).
    See :class:`LossConfig` and :class:`ScheduleConfig` for what each phase is.
    """

    def __init__(self, config: LossConfig, schedule: ScheduleConfig) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule
        # Tang's random roots r ~ U[2, 3]; reseeded every epoch by the loop.
        self.tang = TangUnionLoss(rng=np.random.default_rng(0), form=self.config.tang_form)
        union = self.config.name if self.config.name in UNION_LOSSES else self.config.union
        if union == "tang":
            phases = [
                (GeneralUnionLoss(alpha=0.5, exponent=1.0), None),  # plain Dice: 2I / (P + G)
                (self.tang, None),  # Tang eq. 2 with w = w_p
                (self.tang, "centerline_weight"),  # Tang eq. 2 with w = w_p + w_d
            ]
        else:
            phases = [
                (GeneralUnionLoss(alpha=0.1), None),  # root Tversky (w = 1)
                (GeneralUnionLoss(alpha=0.1), "gul_weight"),
                (GeneralUnionLoss(alpha=0.2), "gul_weight"),  # Zheng's later stage
            ]
        if self.config.name == "deeptree":
            class_loss = DiceFocalLoss(gamma=0.0, eps=1e-5, batch_dice=self.config.batch_dice)
            phases = [(DeepTreeLoss(class_loss, union_loss), key) for union_loss, key in phases]
        elif self.config.name == "dice_focal":
            phases = [(DiceFocalLoss(batch_dice=self.config.batch_dice), None)] * 3
        elif self.config.name == "dice_ce":
            # Batches may carry a "loss_mask" (stage 2: voxels whose prediction is never used).
            phases = [(DiceFocalLoss(gamma=0.0, eps=1e-5, batch_dice=self.config.batch_dice), "loss_mask")] * 3
        self.phases = phases
        self.distillation = (
            AttentionDistillationLoss(alpha=config.distillation_weight, channel=config.distillation_channel)
            if config.distillation_weight > 0
            else None
        )

    def reseed(self, seed: int) -> None:
        """Restart the random roots of Tang's local-imbalance weight from ``seed``."""
        self.tang.rng = np.random.default_rng(seed)

    def _term(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], phase: int) -> torch.Tensor:
        loss, weight_key = self.phases[phase - 1]
        if weight_key is None or (weight_key == "loss_mask" and weight_key not in batch):
            return loss(logits, batch["labels"])
        return loss(logits, batch["labels"], batch[weight_key])

    def forward(self, output: SegmentationOutput, batch: Mapping[str, torch.Tensor], iteration: int) -> LossTerms:
        phase = self.schedule.phase(iteration)
        main = self._term(output.main, batch, phase)
        total = main
        aux = torch.zeros((), device=main.device)
        if self.config.group_supervision:
            for logits in output.aux:
                aux = aux + self._term(logits, batch, phase)
            total = total + aux
        distillation = torch.zeros((), device=main.device)
        if self.distillation is not None and len(output.features) >= 2:
            distillation = self.distillation(output.features)
            total = total + distillation
        return LossTerms(total, float(main.detach()), float(aux.detach()), float(distillation.detach()))


# --------------------------------------------------------------------------------------
# Tasks: what is trained (the loop knows none in particular)
# --------------------------------------------------------------------------------------


class TrainingTask(abc.ABC):
    """One kind of training the loop runs: its data, its patches, its validation.

    The loop (:func:`train`) owns the model, optimizer, schedule, precision, DDP, checkpoints
    and logs; a task owns everything that depends on what is learnt.  :class:`SegmentationTask`
    (stage 1) is the default; the breakage connection network of stage 2 is
    ``AirwayRefineLib.connect_training.ConnectionTask``.

    Attributes
    ----------
    metric_names : tuple of str
        What :meth:`validate` returns, in ``log.csv``'s column order.
    score_name : str
        The metric that picks the best model (higher is better).
    output_description : str
        The model card's ``output`` entry.
    input_spec : InputSpec
        How the CT becomes input channels, unless a fine-tuned model brings its own.
    """

    metric_names: tuple[str, ...] = ()
    score_name: str = ""
    output_description: str = ""
    input_spec: InputSpec = DEFAULT_INPUT_SPEC

    @abc.abstractmethod
    def load(self, config: TrainConfig, runtime: Runtime, progress: ProgressCallback | None) -> None:
        """Load or build the training and (on the main process) validation data, once per run."""

    @abc.abstractmethod
    def dataset(self, config: TrainConfig, spec: InputSpec, seed: int) -> IterableDataset:
        """The patch stream of one process: ``config.schedule.iterations_per_epoch * batch_size``
        dicts of tensors (``"image"``, ``"labels"`` and the loss weights) per epoch; it has
        ``set_epoch(epoch)``, which reseeds it."""

    @property
    @abc.abstractmethod
    def validates(self) -> bool:
        """Whether there are validation data (without, the newest model is kept as the best)."""

    @abc.abstractmethod
    def validate(self, model: nn.Module, config: TrainConfig, spec: InputSpec, runtime: Runtime) -> dict[str, float]:
        """The :attr:`metric_names` of ``model`` on the validation data (main process only)."""

    def mine(self, model: nn.Module, config: TrainConfig, spec: InputSpec, runtime: Runtime) -> list[np.ndarray] | None:
        """Hard-mining state from the current model (every ``sampling.hard_mining_every``
        epochs), as bit-packed uint8 arrays the checkpoint keeps; None: the task mines nothing."""
        return None

    def use_mined(self, dataset: IterableDataset, packed: Sequence[np.ndarray]) -> None:
        """Give ``dataset`` the state :meth:`mine` returned (also after a resume)."""

    def card(self, config: TrainConfig) -> dict:
        """Model-card entries of this task besides the architecture, input spec and training."""
        return {"patch_size_zyx": list(config.sampling.patch_size_zyx), "output": self.output_description}


class SegmentationTask(TrainingTask):
    """Stage 1: three-class airway segmentation, validated by the ATM'22 score.

    Data: :func:`load_training_volumes`; patches: :class:`~AirwaySegmentationLib.sampling.PatchDataset`
    (random, hard-mining and small-airway crops); validation: sliding-window prediction of the
    validation volumes, mean TD, BD, DSC, precision and ATM'22 score (percent), and the
    selection ``score`` (the ATM'22 score, 0 below :data:`MIN_SELECTION_PRECISION`); hard mining:
    ``label & ~prediction`` of every training volume.
    """

    metric_names = ("td", "bd", "dsc", "precision", "atm22_score", "score")
    score_name = "score"
    output_description = "logits (N, 4, D, H, W): background, trachea + main bronchi, lobar to segmental, smaller"

    def __init__(self) -> None:
        self.train_volumes: list[TrainingVolume] = []
        self.validation_volumes: list[TrainingVolume] = []
        self.trees: list = []

    def load(self, config: TrainConfig, runtime: Runtime, progress: ProgressCallback | None) -> None:
        self.train_volumes, self.validation_volumes = load_training_volumes(config.data, progress)
        if runtime.is_main:
            self.trees = [parse_airway_tree(v.labels3 > 0, v.spacing_zyx, connectivity=6) for v in self.validation_volumes]

    def dataset(self, config: TrainConfig, spec: InputSpec, seed: int) -> PatchDataset:
        return PatchDataset(
            self.train_volumes,
            PatchSampler(config.sampling.patch_size_zyx, config.sampling.crop_mix),
            Augmentation() if config.sampling.augmentation else None,
            spec,
            seed=seed,
            n_patches=config.schedule.iterations_per_epoch * config.sampling.batch_size,
        )

    @property
    def validates(self) -> bool:
        return bool(self.validation_volumes)

    def validate(self, model: nn.Module, config: TrainConfig, spec: InputSpec, runtime: Runtime) -> dict[str, float]:
        scores = []
        for volume, tree in zip(self.validation_volumes, self.trees):
            classes = _predict(model, volume, config, spec, runtime)
            metrics = evaluate_airway(
                classes > 0, volume.labels3 > 0, volume.spacing_zyx, "atm22",
                gt_classes_zyx=volume.labels3, gt_tree=tree, pred_classes_zyx=classes,
            )
            scores.append([metrics.td, metrics.bd, metrics.dsc, metrics.precision, metrics.atm22_score])
        means = dict(zip(self.metric_names, np.mean(scores, axis=0).tolist()))
        # The best model is picked by the ATM'22 score, except that a network whose predicted
        # tree lies mostly outside the reference (precision under MIN_SELECTION_PRECISION) is
        # never picked: labelling every voxel airway gives TD = BD = 100 and scores about 52,
        # more than a half-trained real model (seen in an FR/AD run, whose first epoch won).
        usable = means["precision"] >= MIN_SELECTION_PRECISION
        return means | {"score": means["atm22_score"] if usable else 0.0}

    def mine(self, model: nn.Module, config: TrainConfig, spec: InputSpec, runtime: Runtime) -> list[np.ndarray]:
        """Hard-mining masks ``label & ~prediction`` of every training volume, shared by all ranks.

        Bit-packed (``np.packbits`` of the flattened mask, uint8): the form they travel
        between ranks and are stored in the checkpoint in.
        """
        volumes = self.train_volumes
        mine = {}
        for index in range(runtime.rank, len(volumes), runtime.world_size):
            volume = volumes[index]
            missed = (volume.labels3 > 0) & (_predict(model, volume, config, spec, runtime) == 0)
            mine[index] = np.packbits(missed)
        if runtime.distributed:
            gathered: list[dict] = [{} for _ in range(runtime.world_size)]
            dist.all_gather_object(gathered, mine)
            mine = {index: bits for part in gathered for index, bits in part.items()}
        return [mine[i] for i in range(len(volumes))]

    def use_mined(self, dataset: PatchDataset, packed: Sequence[np.ndarray]) -> None:
        dataset.set_miss_masks([
            np.unpackbits(bits, count=v.labels3.size).reshape(v.labels3.shape).astype(bool)
            for bits, v in zip(packed, self.train_volumes)
        ])


def _predict(model: nn.Module, volume: TrainingVolume, config: TrainConfig, spec: InputSpec, runtime: Runtime) -> np.ndarray:
    """The class labels the model gives a whole volume (then back to training mode)."""
    labels = predict_volume(
        model, volume.ct.array_zyx, spec, config.sampling.patch_size_zyx, config.validation.overlap_zyx,
        config.validation.blending, runtime.device, runtime.dtype, config.runtime.channels_last,
    ).labels()
    model.train()
    return labels


# --------------------------------------------------------------------------------------
# Checkpoints and log
# --------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The non-tensor state of a run, kept as JSON in ``last.pt`` (and copied to ``last.json``).

    Attributes
    ----------
    epoch : int
        Epochs finished.
    iteration : int
        Optimizer steps done.
    best_score : float or None
        Best validation score so far (the task's ``score_name``; None: not validated yet).
    best_epoch : int or None
        The epoch (1-based) that gave it.
    log : list of dict
        The rows of ``log.csv``.
    """

    epoch: int = 0
    iteration: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    log: list[dict] = field(default_factory=list)


def _checkpoint_paths(out_dir: Path) -> tuple[Path, Path, Path]:
    return out_dir / "last.pt", out_dir / "last.json", out_dir / "log.csv"


#: What ``last.pt`` must hold besides the optional ``miss_masks``.
_CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "sidecar")


class _Checkpoint(NamedTuple):
    """A checkpoint as read back: the state dicts, the run state, the input spec, the packed miss masks."""

    tensors: dict[str, Any]
    state: TrainState
    spec: InputSpec
    packed_masks: list[np.ndarray] | None


def _save_checkpoint(
    out_dir: Path, tensors: dict[str, Any], state: TrainState, config: TrainConfig, spec: InputSpec, world_size: int,
    columns: Sequence[str],
) -> None:
    """``last.pt`` (the commit point), then ``last.json`` and ``log.csv`` derived from it."""
    sidecar = json.dumps({
        "checkpoint_version": CHECKPOINT_VERSION,
        **dataclasses.asdict(state),
        "config": config.as_dict(),
        "input_spec": spec.as_dict(),
        "world_size": world_size,  # processes that trained the last epoch (information only)
    }, indent=1) + "\n"
    pt_path = _checkpoint_paths(out_dir)[0]
    with atomic_output(pt_path) as pt_tmp, open(pt_tmp, "wb") as stream:
        torch.save({**tensors, "sidecar": sidecar}, stream)
        stream.flush()
        # The rename must not reach the disk before the data: a crash would leave an empty last.pt.
        os.fsync(stream.fileno())
    _write_copies(out_dir, sidecar, state.log, columns)


def _log_columns(task: TrainingTask) -> tuple[str, ...]:
    return LOG_COLUMNS + task.metric_names + LOG_TAIL_COLUMNS


def _write_copies(out_dir: Path, sidecar: str, log: list[dict], columns: Sequence[str]) -> None:
    """``last.json`` and ``log.csv`` from the checkpoint's sidecar and log rows.

    A kill before they are renamed leaves them one epoch behind ``last.pt``, which is harmless:
    a resume reads ``last.pt`` only and writes them again.
    """
    _, json_path, csv_path = _checkpoint_paths(out_dir)
    with atomic_outputs([json_path, csv_path]) as (json_tmp, csv_tmp):
        json_tmp.write_text(sidecar)
        with open(csv_tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(log)


def _comparable(config: dict) -> dict:
    """A config without the keys a resumed run may change (the run length, the loading processes).

    Stage-1 runs saved before configs had a ``task`` and a ``[connection]`` table compare
    equal to the same run now: a missing task is "segmentation", whose runs ignore
    ``[connection]``; a missing ``loss.tang_form`` is "printed", the only form then.
    """
    config = {**config, "schedule": {**config["schedule"], "epochs": None}}
    config["data"] = {**config["data"], "load_workers": None}
    # Runs saved before loss.tang_form existed used Tang's eq. 2 as printed; a run without
    # Tang's loss does not depend on the setting.
    loss = {"tang_form": "printed", **config["loss"]}
    if not (loss["name"] == "tang" or (loss["name"] == "deeptree" and loss.get("union", "tang") == "tang")):
        loss.pop("tang_form")
    config["loss"] = loss
    config.setdefault("task", "segmentation")
    if config["task"] == "segmentation":
        config.pop("connection", None)
    return config


def _load_checkpoint(out_dir: Path, config: TrainConfig) -> _Checkpoint | None:
    """The checkpoint in ``out_dir``, or None when there is none."""
    pt_path = _checkpoint_paths(out_dir)[0]
    if not pt_path.is_file():
        return None
    unreadable = f"The checkpoint {pt_path} cannot be read ({{}}); train with --no-resume or another --out."
    try:
        # weights_only refuses anything but tensors and plain containers (UnpicklingError): no code runs.
        tensors = torch.load(pt_path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise AirwayInputError(unreadable.format(type(error).__name__)) from None
    try:
        missing = [key for key in _CHECKPOINT_KEYS if key not in tensors] if isinstance(tensors, dict) else ["model"]
        if missing:
            raise KeyError(missing[0])
        packed_masks = [bits.numpy() for bits in tensors["miss_masks"]] if "miss_masks" in tensors else None
        sidecar = json.loads(tensors["sidecar"])
        version = sidecar["checkpoint_version"]
        same_config = _comparable(sidecar["config"]) == _comparable(config.as_dict())
        state = TrainState(**{f.name: sidecar[f.name] for f in dataclasses.fields(TrainState)})
        spec = InputSpec.from_dict(sidecar["input_spec"])
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise AirwayInputError(unreadable.format(f"{type(error).__name__} {error}")) from None
    if version != CHECKPOINT_VERSION:
        raise AirwayInputError(
            f"The checkpoint {pt_path} has format {version!r} but this version reads {CHECKPOINT_VERSION}; "
            "train with --no-resume or another --out."
        )
    if not same_config:
        raise AirwayInputError(
            f"{out_dir} holds a run with another configuration; train with --no-resume to start over or give another --out."
        )
    return _Checkpoint(tensors, state, spec, packed_masks)


def _tensorboard(out_dir: Path, purge_step: int):
    """A TensorBoard writer when ``tensorboard`` is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished run left behind.

    Attributes
    ----------
    out_dir : pathlib.Path
    best_model : pathlib.Path
        ``best.safetensors`` (its card ``best.json`` beside it).
    best_score : float or None
        Its validation score (the task's ``score_name``; None without validation data: the last model).
    best_epoch : int
        1-based epoch of the best model.
    epochs : int
        Epochs finished (all of them).
    iterations : int
        Optimizer steps done.
    final_loss : float
        Mean loss of the last epoch.
    """

    out_dir: Path
    best_model: Path
    best_score: float | None
    best_epoch: int
    epochs: int
    iterations: int
    final_loss: float


def _init_model(model: nn.Module, init: str | os.PathLike, config: TrainConfig) -> InputSpec:
    """Load fine-tuning weights into ``model``; returns the input spec they were trained with."""
    source, card = load_model(init)
    architecture = card["architecture"]
    mismatch = AirwayInputError(
        f"The model {init} is a {architecture['name']} with {architecture.get('kwargs', {})}, not the configured "
        f"{config.network.name} with {config.network.kwargs}; make [network] match it to fine-tune."
    )
    if architecture["name"] != config.network.name:
        raise mismatch
    # Same weights, not the same spelling: arguments left at their defaults, or ones that shape
    # no weight (dropout), may differ between the card and the config.
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError:  # missing, unexpected or differently shaped weights
        raise mismatch from None
    return InputSpec.from_dict(card["input_spec"]) if "input_spec" in card else DEFAULT_INPUT_SPEC


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, iteration: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule, positioned to give the learning rate of ``iteration``.

    A closed form of the iteration and the config, never restored from a checkpoint: a run
    resumed with more epochs anneals over its new length (a restored ``CosineAnnealingLR``
    would keep the old ``T_max``).  ``optimizer`` must hold ``initial_lr`` when
    ``iteration > 0`` (it does after loading a checkpoint's optimizer state).
    """
    total = config.schedule.total_iterations
    if config.optimizer.lr_schedule == "cosine":
        def factor(i: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(i, total) / total))
    else:
        def factor(i: int) -> float:
            return 1.0
    # The constructor takes one step, to last_epoch = iteration.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=iteration - 1)


def _export_best(
    model: nn.Module, out_dir: Path, config: TrainConfig, spec: InputSpec, state: TrainState,
    metrics: dict[str, float], command: str | None, task: TrainingTask,
) -> Path:
    card = {
        "architecture": {"name": config.network.name, "kwargs": config.network.kwargs},
        "input_spec": spec.as_dict(),
        **task.card(config),
        "training": {
            "data": config.data.description(),
            "command": command,
            "epoch": state.epoch,
            "iteration": state.iteration,
            "config": config.as_dict(),
        },
        "validation": metrics,
    }
    weights, _ = export_model(model, card, out_dir / "best")
    return weights


def _restore_best(
    model: nn.Module, out_dir: Path, config: TrainConfig, spec: InputSpec, state: TrainState,
    command: str | None, task: TrainingTask,
) -> None:
    """On resume: export the best model again when the checkpoint's last epoch was the best and the
    run was killed before ``best.json`` said so (``model`` holds that epoch's weights)."""
    if state.best_epoch is None or state.best_epoch != state.epoch or not state.log:
        return
    try:
        exported = json.loads((out_dir / "best.json").read_text())["training"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        exported = None
    if exported != state.best_epoch:
        metrics = {key: state.log[-1][key] for key in task.metric_names if state.log[-1].get(key, "") != ""}
        _export_best(model, out_dir, config, spec, state, metrics, command, task)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    progress: ProgressCallback | None = None,
    resume: bool = True,
    init: str | os.PathLike | None = None,
    command: str | None = None,
    task: TrainingTask | None = None,
) -> TrainResult:
    """Train a network as configured, resuming from ``out_dir/last.pt`` if there is one.

    Parameters
    ----------
    config : TrainConfig
        From :func:`load_config`.
    out_dir : str or path-like
        Checkpoints, log and the best model go here (see the module docstring).
    progress : callable, optional
        ``progress(fraction, message)``; raising :class:`~AirwaySegmentationLib.progress.Cancelled`
        stops the run (the last finished epoch stays saved, a later call resumes).
    resume : bool
        Continue the run saved in ``out_dir``; False starts over (overwriting it).
    init : path-like, optional
        A model (``.safetensors`` with its card) to fine-tune from; its architecture must be
        the configured one and its input spec is kept.  Ignored when resuming.
    command : str, optional
        The command line, recorded in the model card.
    task : TrainingTask, optional
        What is trained; default :class:`SegmentationTask` (stage 1).

    Returns
    -------
    TrainResult
    """
    out_dir = Path(out_dir)
    task = SegmentationTask() if task is None else task
    runtime = start_runtime(config.runtime)
    if not resume and runtime.is_main:
        # Starting over: the old run's resume point goes now, so that a kill before the first
        # epoch ends cannot leave it for a later run to resume.
        for path in _checkpoint_paths(out_dir):
            path.unlink(missing_ok=True)
    try:
        return _train(config, out_dir, progress if runtime.is_main else None, resume, init, command, runtime, task)
    finally:
        if runtime.owns_process_group:
            dist.destroy_process_group()


def _train(
    config: TrainConfig, out_dir: Path, progress: ProgressCallback | None, resume: bool,
    init: str | os.PathLike | None, command: str | None, runtime: Runtime, task: TrainingTask,
) -> TrainResult:
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_network(config.network.name, **config.network.kwargs)
    checkpoint = _load_checkpoint(out_dir, config) if resume else None
    spec = task.input_spec
    if checkpoint is None and init is not None:
        spec = _init_model(model, init, config)
    memory_format = torch.channels_last_3d if config.runtime.channels_last else torch.contiguous_format
    model = model.to(runtime.device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    state = TrainState()
    packed_masks: list[np.ndarray] | None = None
    if checkpoint is not None:
        tensors, state, spec, packed_masks = checkpoint
        model.load_state_dict(tensors["model"])
        optimizer.load_state_dict(tensors["optimizer"])
        scaler.load_state_dict(tensors["scaler"])
        if runtime.is_main:
            _write_copies(out_dir, tensors["sidecar"], state.log, _log_columns(task))
            _restore_best(model, out_dir, config, spec, state, command, task)
    scheduler = _lr_scheduler(optimizer, config, state.iteration)

    task.load(config, runtime, progress)
    dataset = task.dataset(config, spec, _seed(config, runtime, 0, 0))
    if packed_masks is not None:
        # The masks of the last mining pass, not new ones from the resumed model: as in the uninterrupted run.
        task.use_mined(dataset, packed_masks)
    loss_fn = TrainingLoss(config.loss, config.schedule)
    core = model
    if runtime.distributed:
        # Without group supervision WingsNet's encoder fusion gets no gradient.
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=not config.loss.group_supervision)
    writer = _tensorboard(out_dir, state.iteration) if runtime.is_main else None
    total = config.schedule.total_iterations
    every = config.sampling.hard_mining_every
    mean_loss = math.nan
    try:
        for epoch in range(state.epoch, config.schedule.epochs):
            started = time.perf_counter()
            # A resumed run has the masks of the last pass (hard_mining_every cannot change on resume).
            if every and epoch >= every and epoch % every == 0:
                report(progress, state.iteration / total, f"epoch {epoch + 1}: hard mining")
                mined = task.mine(core, config, spec, runtime)
                if mined is not None:
                    packed_masks = mined
                    task.use_mined(dataset, packed_masks)
            steps_started = time.perf_counter()
            dataset.set_epoch(epoch)
            torch.manual_seed(_seed(config, runtime, epoch, 1))
            loss_fn.reseed(_seed(config, runtime, epoch, 2))
            loader = DataLoader(dataset, batch_size=config.sampling.batch_size, num_workers=config.sampling.num_workers)
            sums = np.zeros(4)
            steps = 0
            model.train()
            for batch in loader:
                batch = {key: value.to(runtime.device) for key, value in batch.items()}
                with autocast(runtime.device, runtime.dtype):
                    output = model(batch["image"].contiguous(memory_format=memory_format))
                terms = loss_fn(output, batch, state.iteration)
                if not torch.isfinite(terms.total):
                    # Bad settings rather than a bug: the CLI reports it as one sentence (exit 2).
                    raise AirwayInputError(
                        f"The loss is {float(terms.total.detach())} at iteration {state.iteration}; lower optimizer.lr or use float32."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(terms.total).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                state.iteration += 1
                steps += 1
                sums += [float(terms.total.detach()), terms.main, terms.aux, terms.distillation]
                if writer is not None:
                    writer.add_scalar("loss/train", sums[0] / steps, state.iteration)
                report(
                    progress, state.iteration / total,
                    f"epoch {epoch + 1}/{config.schedule.epochs}, iteration {state.iteration}/{total}, "
                    f"loss {sums[0] / steps:.4f}",
                )
            train_seconds = time.perf_counter() - steps_started
            mean_loss = float(sums[0] / max(steps, 1))
            state.epoch = epoch + 1
            if runtime.is_main:
                _finish_epoch(core, out_dir, config, spec, runtime, state, task, sums / max(steps, 1),
                              steps, train_seconds, started, optimizer, scheduler, scaler, packed_masks, writer,
                              command, progress)
            _barrier(runtime)
    finally:
        if writer is not None:
            writer.close()
    return TrainResult(out_dir, out_dir / "best.safetensors", state.best_score, state.best_epoch or state.epoch,
                       state.epoch, state.iteration, mean_loss)


def _finish_epoch(
    model: nn.Module, out_dir: Path, config: TrainConfig, spec: InputSpec, runtime: Runtime, state: TrainState,
    task: TrainingTask, means: np.ndarray, steps: int, train_seconds: float, started: float,
    optimizer: torch.optim.Optimizer, scheduler, scaler, packed_masks: list[np.ndarray] | None, writer,
    command: str | None, progress: ProgressCallback | None,
) -> None:
    """Rank 0 at the end of an epoch: validate, keep the best model, log, checkpoint."""
    metrics: dict[str, float] = {}
    if task.validates:
        report(progress, state.iteration / config.schedule.total_iterations, f"epoch {state.epoch}: validating")
        metrics = task.validate(model, config, spec, runtime)
        model.train()
    improved = bool(metrics) and (state.best_score is None or metrics[task.score_name] > state.best_score)
    # Without validation data the newest model is the one to keep.
    keep = improved or not task.validates
    if keep:
        state.best_score = metrics.get(task.score_name)
        state.best_epoch = state.epoch
    row = {
        "epoch": state.epoch,
        "iteration": state.iteration,
        "phase": config.schedule.phase(state.iteration - 1),
        "loss": means[0], "loss_main": means[1], "loss_aux": means[2], "loss_distillation": means[3],
        **{key: metrics.get(key, "") for key in task.metric_names},
        "lr": scheduler.get_last_lr()[0],
        "seconds_per_iteration": train_seconds / max(steps, 1),
        "seconds": time.perf_counter() - started,
    }
    state.log.append({key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()})
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(f"validation/{key}", value, state.iteration)
        writer.add_scalar("lr", row["lr"], state.iteration)
    tensors = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
    }
    if packed_masks is not None:
        tensors["miss_masks"] = [torch.from_numpy(bits) for bits in packed_masks]
    _save_checkpoint(out_dir, tensors, state, config, spec, runtime.world_size, _log_columns(task))
    if keep:  # after the commit point: a kill in between is repaired on resume (_restore_best)
        _export_best(model, out_dir, config, spec, state, metrics, command, task)
