"""Training configuration: dataclasses read from a TOML file (see ``Resources/Training/``).

One TOML table per :class:`TrainConfig` field (``[network]``, ``[data]``,
``[data.phantoms]``, ``[sampling]``, ``[optimizer]``, ``[schedule]``, ``[loss]``,
``[validation]``, ``[runtime]``, and for stage 2 ``[connection]``) plus the top-level
``seed`` and ``task``; the attributes of each
dataclass below are its keys, and a key left out takes the default shown.  Unknown keys,
values of the wrong type and values out of range are refused with one sentence that names
the key (``schedule.epochs must be at least 1, got 0.``).

Examples
--------
>>> config = config_from_dict({"network": {"name": "fr_unet", "kwargs": {"patch_size": [64, 64, 64]}},
...                            "data": {"phantoms": {"train": 2}}})
>>> config.schedule.phase(0), config.loss.name
(1, 'deeptree')
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch

from .data import DEFAULT_MARGIN_MM
from .errors import AirwayInputError
from .inference_settings import BLENDINGS, DEVICES, PRECISIONS
from .losses import TANG_FORMS
from .networks import NETWORKS, build_network
from .phantom import PHANTOM_VARIANTS
from .sampling import CropMix

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (tomli; python_version < '3.11')
    import tomli as tomllib

LOSSES = ("deeptree", "gul", "tang", "dice_focal", "dice_ce")
#: What a run trains: the stage-1 segmentation network or the stage-2 breakage connection network.
TASKS = ("segmentation", "connection")
UNION_LOSSES = ("tang", "gul")
LR_SCHEDULES = ("constant", "cosine")


def _check(ok: bool, key: str, expected: str, value: object) -> None:
    if not ok:
        raise AirwayInputError(f"{key} must be {expected}, got {value!r}.")


@dataclass(frozen=True)
class NetworkConfig:
    """``[network]``: which network, built by :func:`~AirwaySegmentationLib.networks.build_network`.

    Attributes
    ----------
    name : str
        A key of :data:`~AirwaySegmentationLib.networks.NETWORKS`.
    kwargs : dict
        Constructor arguments (``[network.kwargs]``), e.g. ``base_width``; checked by
        building the network when the config is loaded.
    """

    name: str = "wingsnet"
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.name in NETWORKS, "name", f"one of {', '.join(sorted(NETWORKS))}", self.name)


@dataclass(frozen=True)
class PhantomConfig:
    """``[data.phantoms]``: synthetic chest CTs generated on the fly.

    Seeds come from :func:`~AirwaySegmentationLib.data.phantom_seeds`, so validation
    phantoms are never trained on; phantom ``i`` of a split has variant
    ``variants[i % len(variants)]``.

    Attributes
    ----------
    train, validation : int
        Number of training and validation phantoms.
    variants : tuple of str
        Scanner variants (:data:`~AirwaySegmentationLib.phantom.PHANTOM_VARIANTS`).
    shape_zyx : tuple of 3 int
        Grid of each phantom (before the crop to the chest).
    spacing_zyx : tuple of 3 float or None
        Voxel size in mm; omitted: the variant's slices and 0.8 mm in plane.
    """

    train: int = 4
    validation: int = 1
    variants: tuple[str, ...] = ("standard",)
    shape_zyx: tuple[int, int, int] = (128, 160, 160)
    spacing_zyx: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        _check(self.train >= 0, "train", "a count >= 0", self.train)
        _check(self.validation >= 0, "validation", "a count >= 0", self.validation)
        unknown = [v for v in self.variants if v not in PHANTOM_VARIANTS]
        _check(bool(self.variants) and not unknown, "variants", f"a list of {', '.join(PHANTOM_VARIANTS)}", self.variants)


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: an ATM'22-layout folder and / or phantoms.

    Attributes
    ----------
    atm_root : str or None
        Folder with ``imagesTr`` and ``labelsTr`` (:func:`~AirwaySegmentationLib.data.find_cases`);
        relative to the config file.
    atm_validation_cases : int
        The last this many cases (by name) are validation, the rest training.
    phantoms : PhantomConfig or None
        ``[data.phantoms]``.
    margin_mm : float
        Crop margin around the lungs.
    load_workers : int
        Processes that read the cases and generate the phantoms at the start of a run (1: the
        training process alone).  The volumes do not depend on it, and a resumed run may
        change it.
    """

    atm_root: str | None = None
    atm_validation_cases: int = 0
    phantoms: PhantomConfig | None = None
    margin_mm: float = DEFAULT_MARGIN_MM
    load_workers: int = 1

    def __post_init__(self) -> None:
        _check(self.atm_validation_cases >= 0, "atm_validation_cases", "a count >= 0", self.atm_validation_cases)
        _check(self.margin_mm >= 0, "margin_mm", "a size >= 0 (mm)", self.margin_mm)
        _check(self.load_workers >= 1, "load_workers", "a count >= 1", self.load_workers)
        has_phantoms = self.phantoms is not None and self.phantoms.train > 0
        _check(
            self.atm_root is not None or has_phantoms, "atm_root",
            "given, or phantoms.train > 0 (there is no training data)", self.atm_root,
        )

    def description(self) -> str:
        """One line for the model card: what the model was trained and validated on."""
        parts = []
        if self.atm_root is not None:
            parts.append(f"ATM'22-layout folder {Path(self.atm_root).name} ({self.atm_validation_cases} held out)")
        if self.phantoms is not None:
            p = self.phantoms
            spacing = "variant default" if p.spacing_zyx is None else f"{list(p.spacing_zyx)} mm"
            parts.append(
                f"{p.train} training / {p.validation} validation phantoms (variants {', '.join(p.variants)}, "
                f"shape {list(p.shape_zyx)}, spacing {spacing})"
            )
        return "; ".join(parts)


@dataclass(frozen=True)
class SamplingConfig:
    """``[sampling]``: training patches (:mod:`~AirwaySegmentationLib.sampling`).

    Attributes
    ----------
    patch_size_zyx : tuple of 3 int
        Patch shape, also the validation window (128^3 in Tang).
    batch_size : int
        Patches per step (per process under DDP).
    crop_mix : CropMix
        ``[sampling.crop_mix]``: shares of random, hard-mining and small-airway crops.
    augmentation : bool
        Random flips, rotation, zoom, intensity and noise (:class:`~AirwaySegmentationLib.sampling.Augmentation`).
    hard_mining_every : int
        Every this many epochs the training volumes are predicted and the misses (label and
        not prediction) become the hard-mining targets; 0: never.
    num_workers : int
        DataLoader worker processes preparing patches (0: in the training process).
    """

    patch_size_zyx: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 1
    crop_mix: CropMix = field(default_factory=CropMix)
    augmentation: bool = True
    hard_mining_every: int = 2
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(min(self.patch_size_zyx) >= 1, "patch_size_zyx", "three positive sizes", self.patch_size_zyx)
        _check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        _check(self.hard_mining_every >= 0, "hard_mining_every", "a number of epochs >= 0", self.hard_mining_every)
        _check(self.num_workers >= 0, "num_workers", "a count >= 0", self.num_workers)


@dataclass(frozen=True)
class OptimizerConfig:
    """``[optimizer]``: AdamW (Tang: lr 1e-4).

    Attributes
    ----------
    lr : float
        Learning rate.
    weight_decay : float
        Decoupled weight decay; 3e-5 as nnU-Net (Tang gives none).
    lr_schedule : {"constant", "cosine"}
        Constant (Tang) or cosine annealing to 0 over the whole run.
    """

    lr: float = 1e-4
    weight_decay: float = 3e-5
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number", self.lr)
        _check(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)


@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: run length and the loss phases (Tang 2.2; METHODS section 5).

    Phase 1 (iterations ``[0, local_imbalance_from)``): plain Dice on the airway union;
    phase 2 (``[local_imbalance_from, centerline_from)``): + local-imbalance weight;
    phase 3 (from ``centerline_from``): + centerline-distance weight.

    Attributes
    ----------
    epochs, iterations_per_epoch : int
        Run length; an epoch ends with validation and a checkpoint.
    local_imbalance_from, centerline_from : int
        First iteration of phases 2 and 3 (0 skips a phase; ``centerline_from >=
        local_imbalance_from``).
    """

    epochs: int = 10
    iterations_per_epoch: int = 100
    local_imbalance_from: int = 300
    centerline_from: int = 600

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "at least 1", self.epochs)
        _check(self.iterations_per_epoch >= 1, "iterations_per_epoch", "at least 1", self.iterations_per_epoch)
        _check(self.local_imbalance_from >= 0, "local_imbalance_from", "an iteration >= 0", self.local_imbalance_from)
        _check(
            self.centerline_from >= self.local_imbalance_from, "centerline_from",
            f"an iteration >= local_imbalance_from ({self.local_imbalance_from})", self.centerline_from,
        )

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def phase(self, iteration: int) -> int:
        """Loss phase (1, 2 or 3) of a (0-based) iteration."""
        return 1 + int(iteration >= self.local_imbalance_from) + int(iteration >= self.centerline_from)


@dataclass(frozen=True)
class LossConfig:
    """``[loss]``.

    Attributes
    ----------
    name : {"deeptree", "gul", "tang", "dice_focal", "dice_ce"}
        ``deeptree``: Dice + CE per class plus the union loss (DeepTree eq. 1; METHODS 1);
        ``gul`` / ``tang``: the union loss alone; ``dice_focal``: Qin's eq. 7 per class (no
        phases); ``dice_ce``: Dice + CE per class (no phases; DeepTree's stage-2 loss).
    union : {"tang", "gul"}
        Union loss of ``deeptree``.  Tang phases: plain Dice, Tang's weighted union with
        ``w_p``, then ``w_p + w_d``.  GUL phases: root Tversky (``w = 1``, a = 0.1), GUL with
        ``dist``, then GUL with a = 0.2 (Zheng's later stage).
    group_supervision : bool
        Apply the loss to ``aux`` outputs too (WingsNet), each with weight 1.
    distillation_weight : float
        ``alpha`` of attention distillation (Qin eq. 6: 0.1) for networks giving
        ``features``; 0: off.
    distillation_channel : bool
        Also distil channel attention (the AttdKD interpretation, for ``pwfr_unet``).
    batch_dice : bool
        The Dice terms of ``dice_ce``, ``dice_focal`` and DeepTree's per-class term: one ratio
        over the batch (True) or one per sample, averaged (False, nnU-Net's ``batch_dice``).
        The union losses always sum over the batch.
    tang_form : {"printed", "gul"}
        How Tang's eq. 2 is read (:class:`~AirwaySegmentationLib.losses.TangUnionLoss`):
        ``printed`` (default) takes the probability's square and weights every voxel, as
        printed (its gradient pushes missed airway voxels further down, yet it measured the
        better BD; the bundled stage-1 models were trained with it); ``gul`` takes the root
        and weights background 1, as the General Union loss the paper names.
    """

    name: str = "deeptree"
    union: str = "tang"
    group_supervision: bool = True
    distillation_weight: float = 0.1
    distillation_channel: bool = False
    batch_dice: bool = True
    tang_form: str = "printed"

    def __post_init__(self) -> None:
        _check(self.name in LOSSES, "name", f"one of {', '.join(LOSSES)}", self.name)
        _check(self.tang_form in TANG_FORMS, "tang_form", f"one of {', '.join(TANG_FORMS)}", self.tang_form)
        _check(self.union in UNION_LOSSES, "union", f"one of {', '.join(UNION_LOSSES)}", self.union)
        _check(self.distillation_weight >= 0, "distillation_weight", "a number >= 0", self.distillation_weight)


@dataclass(frozen=True)
class ValidationConfig:
    """``[validation]``: sliding-window prediction of the validation volumes each epoch.

    Attributes
    ----------
    overlap_zyx : tuple of 3 int
        Window overlap in voxels (smaller than the patch).
    blending : {"gaussian", "mean"}
        How overlapping windows are averaged (:func:`~AirwaySegmentationLib.infer.predict_volume`).
    """

    overlap_zyx: tuple[int, int, int] = (32, 32, 32)
    blending: str = "gaussian"

    def __post_init__(self) -> None:
        _check(min(self.overlap_zyx) >= 0, "overlap_zyx", "three sizes >= 0", self.overlap_zyx)
        _check(self.blending in BLENDINGS, "blending", f"one of {', '.join(BLENDINGS)}", self.blending)


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``.

    Attributes
    ----------
    device : {"auto", "cpu", "cuda"}
        ``auto``: CUDA when available.
    precision : {"auto", "float32", "bfloat16", "float16"}
        Autocast dtype (see the module docstring); float16 only on CUDA.
    channels_last : bool
        Channels-last 3D weights and inputs.
    """

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True

    def __post_init__(self) -> None:
        _check(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}", self.device)
        _check(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)


@dataclass(frozen=True)
class ConnectionConfig:
    """``[connection]``: training data of the stage-2 breakage connection network (``task = "connection"``).

    Every epoch each training volume gets a new breakage simulation (DeepTree 2.3); patches
    are cropped at the breakage-attention blobs of the broken label with a random shift.  A
    share of the patches comes instead from the real breaks of a stage-1 model's output on
    the training volumes (METHODS.md section 2: hard examples), blobs without a real break
    included (their target is empty: where not to bridge).

    Attributes
    ----------
    real_breaks_model : str
        Stage-1 model (bundled name or path) whose outputs give the real breaks; "default":
        the catalogue's default; "none": simulated breaks only.
    real_break_share : float
        Share of patches from real breaks, in [0, 1].
    peripheral_fraction : float
        Share of the leaves broken per simulation (DeepTree: 0.5).
    break_fraction : tuple of 2 float
        Range of the share of a branch's skeleton removed (DeepTree: 0.1-0.3).
    max_shift_zyx : tuple of 3 int
        Largest random shift (voxels) of a patch from its blob's centre.  DeepTree gives no
        value; a quarter of the 64^3 patch keeps the break in its central half.
    alpha_mm : float
        Breakage attention range (DeepTree: 5 mm).
    break_centres : bool
        Also centre patches on each simulated break (its middle skeleton voxel), drawn
        alongside the blob centres.  A crowded periphery's breaks share one wide blob whose
        centroid leaves a thin branch's few-voxel gap near the patch edge, where the loss
        barely sees it; centring on every break trains those gaps as often as wide ones.
        DeepTree names only blob centres; this is our choice (off by default).
    real_break_centres : bool
        Also centre patches on each real break of the stage-1 output (its narrowest gap
        voxel), alongside the blobs of that output's attention: the same reason as
        ``break_centres``, for the hard examples (ours, off by default).
    validation_simulations : int
        Fixed simulations per validation volume scored every epoch.
    """

    real_breaks_model: str = "default"
    real_break_share: float = 0.3
    peripheral_fraction: float = 0.5
    break_fraction: tuple[float, float] = (0.1, 0.3)
    max_shift_zyx: tuple[int, int, int] = (16, 16, 16)
    alpha_mm: float = 5.0
    break_centres: bool = False
    real_break_centres: bool = False
    validation_simulations: int = 1

    def __post_init__(self) -> None:
        _check(0.0 <= self.real_break_share <= 1.0, "real_break_share", "a share in [0, 1]", self.real_break_share)
        _check(0.0 <= self.peripheral_fraction <= 1.0, "peripheral_fraction", "a share in [0, 1]", self.peripheral_fraction)
        low, high = self.break_fraction
        _check(0.0 < low <= high < 1.0, "break_fraction", "a range 0 < low <= high < 1", self.break_fraction)
        _check(min(self.max_shift_zyx) >= 0, "max_shift_zyx", "three shifts >= 0", self.max_shift_zyx)
        _check(self.alpha_mm > 0 and math.isfinite(self.alpha_mm), "alpha_mm", "a positive distance", self.alpha_mm)
        _check(self.validation_simulations >= 1, "validation_simulations", "at least 1", self.validation_simulations)


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run; one TOML table per field (see ``Resources/Training/*.toml``).

    ``task`` is "segmentation" (stage 1) or "connection" (the stage-2 breakage connection
    network, trained by ``AirwayRefineLib.connect_training``; ``[connection]`` holds its data).
    """

    seed: int = 0
    task: str = "segmentation"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(phantoms=PhantomConfig()))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)

    def __post_init__(self) -> None:
        _check(self.task in TASKS, "task", f"one of {', '.join(TASKS)}", self.task)
        if self.task == "connection":
            # The connection task has no hard mining (its patches sit at breaks) and one output.
            _check(self.sampling.hard_mining_every == 0, "sampling.hard_mining_every", "0 for task connection",
                   self.sampling.hard_mining_every)
            # dice_ce is the loss that leaves the broken mask out (AirwayRefineLib.connect_training).
            _check(self.loss.name == "dice_ce", "loss.name", "dice_ce for task connection", self.loss.name)
        # SeedSequence takes any integer >= 0; TOML integers are signed 64-bit.
        _check(0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)", self.seed)
        overlap, patch = self.validation.overlap_zyx, self.sampling.patch_size_zyx
        _check(all(o < p for o, p in zip(overlap, patch)), "validation.overlap_zyx", f"smaller than the patch {patch}", overlap)

    def as_dict(self) -> dict:
        """JSON-ready nested dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like in TOML, for error messages."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return _describe(next(a for a in args if a is not type(None)))
    if origin is tuple:
        item = _describe(args[0])
        return f"a list of {item}s" if args[-1] is Ellipsis else f"a list of {len(args)} {item}s"
    if dataclasses.is_dataclass(hint) or hint is dict or origin is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _convert(value: object, hint: Any, key: str) -> object:
    """``value`` from TOML as the type ``hint`` (a field of a config dataclass)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):  # "X | None": TOML has no null, None means "key left out"
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(hint):
        return _from_table(hint, value, key)
    if origin is tuple and isinstance(value, list):
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) == len(value):
            return tuple(_convert(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    else:
        plain = dict if origin is dict else hint
        # bool is an int subclass in Python, but `epochs = true` is a mistake in TOML.
        if plain in (dict, bool, str, int) and isinstance(value, plain) and not (plain is int and isinstance(value, bool)):
            return value
    raise AirwayInputError(f"{key} must be {_describe(hint)}, got {value!r}.")


def _from_table(cls: type, table: object, where: str) -> Any:
    """Build config dataclass ``cls`` from a TOML table, naming the key of any error."""
    name = where or "the top level"
    if not isinstance(table, dict):
        raise AirwayInputError(f"[{name}] must be a table, got {table!r}.")
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(known))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise AirwayInputError(f"unknown key {key}; expected one of {', '.join(known)} in [{name}].")
    values = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in table.items()}
    try:
        return cls(**values)
    except AirwayInputError as error:
        text = str(error)
        if not where:
            raise
        # Our checks start with the field's name; other classes' (CropMix) with a sentence.
        raise AirwayInputError(f"[{where}] {text}" if text[:1].isupper() else f"{where}.{text}") from None


def config_from_dict(table: Mapping) -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts as read from TOML; errors name the key."""
    config = _from_table(TrainConfig, dict(table), "")
    try:
        network = build_network(config.network.name, **config.network.kwargs)
    except (TypeError, ValueError) as error:
        raise AirwayInputError(f"network.kwargs do not build {config.network.name}: {error}.") from None
    # Checked here rather than at the first forward pass, after the training data were loaded.
    divisor = network.input_divisor
    if config.task == "connection":
        # Early fusion of the CT and the attention in, background and breakage out.
        try:
            with torch.no_grad():
                channels = network.eval()(torch.zeros((1, 2) + (2 * divisor,) * 3)).main.shape[1]
        except (ValueError, RuntimeError):
            channels = None  # not 2 input channels
        _check(channels == 2, "network.kwargs", "a network with 2 input and 2 output channels for task connection",
               config.network.kwargs)
    patch = config.sampling.patch_size_zyx
    _check(
        not any(size % divisor for size in patch), "sampling.patch_size_zyx",
        f"three sizes divisible by {divisor} for {config.network.name}", patch,
    )
    return config


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training configuration from a TOML file.

    Relative paths in it (``data.atm_root``) are taken relative to the file's folder.

    Raises
    ------
    AirwayInputError
        A missing or unparsable file, an unknown key, a value of the wrong type or out of
        range; the message names the key.
    """
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AirwayInputError(f"The training config {path} does not exist; give a TOML file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise AirwayInputError(f"The training config {path} is not valid TOML ({error}); fix its syntax.") from None
    try:
        config = config_from_dict(table)
    except AirwayInputError as error:
        raise AirwayInputError(f"In the training config {path}, {error}") from None
    root = config.data.atm_root
    if root is not None and not Path(root).is_absolute():
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, atm_root=str((path.parent / root).resolve()))
        )
    return config
