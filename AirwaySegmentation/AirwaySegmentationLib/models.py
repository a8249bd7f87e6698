"""Bundled and trained models: safetensors weights + a JSON model card, and the catalogue.

A model ``NAME`` is two files side by side:

- ``NAME.safetensors``: the network's state dict (``safetensors.torch.save_file``).  Weights
  are only ever read with safetensors, which holds tensors and nothing that runs: a model
  file from a colleague or a download cannot execute code (``torch.load`` of a pickle can).
- ``NAME.json``: the model card: how to build the network (``architecture``: name and
  keyword arguments for :func:`~AirwaySegmentationLib.networks.build_network`), how to
  prepare its input (``input_spec``, :meth:`~AirwaySegmentationLib.preprocess.InputSpec.as_dict`),
  the patch size, what it was trained on and with which command, its validation metrics,
  the parameter count, the creation date, an ``interpretation`` note where the method is
  our reading of an incomplete paper, and the ``sha256`` of the weights file, checked on
  every load so a changed or truncated file is refused.

The bundled models are listed as data in ``Resources/Models/catalogue.json``, read by
:mod:`~AirwaySegmentationLib.catalogue` (without torch); :func:`bundle_model` adds one.

Examples
--------
>>> from AirwaySegmentationLib.networks import build_network
>>> net = build_network("wingsnet", base_width=2)
>>> card = {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}}
>>> paths = export_model(net, card, "out/tiny")  # doctest: +SKIP
>>> model, card = load_model("out/tiny.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .catalogue import BUNDLED_MODELS_DIR, CATALOGUE_FILE, catalogue, model_file
from .errors import AirwayInputError
from .networks import NETWORKS, build_network
from .volume import atomic_outputs, write_json

#: Version of the catalogue and model-card layout written here.
CARD_VERSION = 1
#: Networks whose method is our interpretation of a paper that is only partly available
#: (METHODS.md section 4); the note goes into every card of such a model.
INTERPRETATIONS = {
    "pwfr_unet": (
        "Interpretation: PWFR/AttdKD (Zhang 2026) is implemented from its abstract only "
        "(pointwise recalibration, spatial and channel attention distillation between stages); "
        "it is not the authors' code."
    ),
}
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    path = Path(path)
    if path.name.endswith(WEIGHTS_SUFFIX) or path.name.endswith(CARD_SUFFIX):
        path = path.with_suffix("")
    return path.with_name(path.name + WEIGHTS_SUFFIX), path.with_name(path.name + CARD_SUFFIX)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable and frozen parameters."""
    return sum(parameter.numel() for parameter in model.parameters())


def _architecture(card: Mapping) -> tuple[str, dict]:
    architecture = card.get("architecture")
    if not isinstance(architecture, Mapping) or architecture.get("name") not in NETWORKS:
        raise AirwayInputError(
            f"The model card's architecture {architecture!r} is not usable; expected "
            f"{{'name': one of {', '.join(sorted(NETWORKS))}, 'kwargs': {{...}}}}."
        )
    kwargs = architecture.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise AirwayInputError(f"The model card's architecture kwargs {kwargs!r} are not a table; expected a JSON object.")
    return architecture["name"], dict(kwargs)


def export_model(model: nn.Module, card: Mapping, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` and its model card ``NAME.json``, both or neither.

    Parameters
    ----------
    model : torch.nn.Module
        The network (unwrapped from DDP); its state dict is saved on the CPU.
    card : mapping
        At least ``architecture`` (``{"name": ..., "kwargs": {...}}``, as given to
        :func:`~AirwaySegmentationLib.networks.build_network`); usually also ``input_spec``,
        ``patch_size_zyx``, ``training`` (data description, command) and ``validation``
        (metrics).  Added here: ``card_version``, ``weights_file``, ``parameter_count``,
        ``sha256``, ``created`` (UTC, ISO 8601) and ``interpretation`` (null unless the
        architecture is an interpretation, see :data:`INTERPRETATIONS`).
    path : str or path-like
        ``NAME`` (with or without ``.safetensors``); the folder is created.

    Returns
    -------
    tuple of pathlib.Path
        The weights and card paths.
    """
    name, _ = _architecture(card)
    weights_path, card_path = model_paths(path)
    # Channels-last weights are strided views; safetensors stores plain contiguous tensors.
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_outputs([weights_path, card_path]) as (weights_tmp, card_tmp):
        save_file(state, str(weights_tmp))
        full_card = {
            "card_version": CARD_VERSION,
            **card,
            "weights_file": weights_path.name,
            "parameter_count": parameter_count(model),
            "sha256": sha256_of_file(weights_tmp),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "interpretation": INTERPRETATIONS.get(name),
        }
        card_tmp.write_text(json.dumps(full_card, indent=2) + "\n")
    return weights_path, card_path


def read_model_card(path: str | os.PathLike) -> dict:
    """The model card of ``NAME`` / ``NAME.safetensors`` / ``NAME.json`` (no weights read)."""
    _, card_path = model_paths(path)
    if not card_path.is_file():
        raise AirwayInputError(f"Model card {card_path} not found; a model is NAME.safetensors with NAME.json beside it.")
    try:
        card = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AirwayInputError(f"Model card {card_path} is not valid JSON ({error}); re-export the model.") from None
    if not isinstance(card, dict):
        raise AirwayInputError(f"Model card {card_path} is not a JSON object; re-export the model.")
    return card


def load_model(
    path_or_name: str | os.PathLike, device: torch.device | str = "cpu", models_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, dict]:
    """Build a network from its card and load its weights, after checking their SHA-256.

    Parameters
    ----------
    path_or_name : str or path-like
        A bundled model's name (see :func:`catalogue`) or a path to ``NAME``,
        ``NAME.safetensors`` or ``NAME.json``.
    device : torch.device or str
        Where the model is put.
    models_dir : path-like, optional
        Folder of the catalogue (default: the bundled models).

    Returns
    -------
    model : torch.nn.Module
        In eval mode, on ``device``.
    card : dict
        The model card.

    Raises
    ------
    AirwayInputError
        A missing file, a card that does not describe a known network, weights whose
        SHA-256 differs from the card's, a file that is not safetensors, or weights that do
        not fit the architecture.
    """
    path = Path(path_or_name)
    if not path.suffix and str(path_or_name) in {entry["name"] for entry in catalogue(models_dir)}:
        path = model_file(str(path_or_name), models_dir)
    weights_path, _ = model_paths(path)
    card = read_model_card(path)
    if not weights_path.is_file():
        raise AirwayInputError(f"Model weights {weights_path} not found; copy the .safetensors file beside its card.")
    if sha256_of_file(weights_path) != card.get("sha256"):
        raise AirwayInputError(
            f"The weights {weights_path} do not match the SHA-256 in their model card; the file is changed or "
            "incomplete, copy or download it again."
        )
    name, kwargs = _architecture(card)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise AirwayInputError(
            f"{weights_path} is not a safetensors file ({error}); only safetensors weights are loaded."
        ) from None
    try:
        model = build_network(name, **kwargs)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise AirwayInputError(
            f"The weights {weights_path} do not fit the card's architecture {name} ({first_line}); re-export the model."
        ) from None
    return model.to(device).eval(), card


#: Largest weights file the extension bundles (an extension package must stay small).
MAX_BUNDLED_BYTES = 20 * 2**20
#: Card fields :func:`export_model` writes itself; a re-export must not copy them over.
_EXPORT_FIELDS = ("card_version", "weights_file", "parameter_count", "sha256", "created", "interpretation")


def bundle_model(
    source: str | os.PathLike,
    name: str,
    description: str,
    *,
    default: bool = False,
    cpu_seconds: float | None = None,
    gpu_seconds: float | None = None,
    card_additions: Mapping | None = None,
    models_dir: str | os.PathLike | None = None,
) -> Path:
    """Copy a trained model into the catalogue folder as ``NAME`` and list it in ``catalogue.json``.

    The weights are loaded (SHA-256 checked) and re-exported under the new name, so the card's
    ``weights_file`` and ``sha256`` describe the bundled file; the training section of the card
    is kept, ``card_additions`` (e.g. held-out test metrics) are merged in.  An entry of the
    same name is replaced; ``default=True`` takes the default flag from every other entry of
    the same task (the card's ``task``: "segmentation" when it has none, or "connection").

    Parameters
    ----------
    source : str or path-like
        The trained model (``best.safetensors`` of a run, or its card).
    name : str
        Catalogue name and file stem.
    description : str
        One line: network and training data.
    default : bool
        Make it the model used when none is named.
    cpu_seconds, gpu_seconds : float, optional
        Measured seconds per chest CT on a 2-core CPU and on one GPU.
    card_additions : mapping, optional
        Extra card fields.
    models_dir : path-like, optional
        The catalogue folder (default: the bundled models).

    Returns
    -------
    pathlib.Path
        The bundled weights file.
    """
    folder = Path(models_dir or BUNDLED_MODELS_DIR)
    network, card = load_model(source)
    card = {key: value for key, value in card.items() if key not in _EXPORT_FIELDS}
    card.update(card_additions or {})
    weights, _ = export_model(network, card, folder / name)
    size = weights.stat().st_size
    if size > MAX_BUNDLED_BYTES:
        for path in model_paths(weights):
            path.unlink()
        raise AirwayInputError(
            f"The model {name} is {size / 2**20:.1f} MiB; bundled models must stay under {MAX_BUNDLED_BYTES // 2**20} MiB."
        )
    path = folder / CATALOGUE_FILE
    entries = [entry for entry in catalogue(folder) if entry["name"] != name]  # checks the file's form
    data = json.loads(path.read_text()) if path.is_file() else {"catalogue_version": CARD_VERSION, "models": []}
    task = card.get("task", "segmentation")
    if default:
        entries = [{**entry, "default": False} if entry["task"] == task else entry for entry in entries]
    entries.append(
        {"name": name, "file": weights.name, "default": default, "task": task, "description": description,
         "cpu_seconds": cpu_seconds, "gpu_seconds": gpu_seconds}
    )
    data["models"] = entries
    write_json(data, path)
    return weights
