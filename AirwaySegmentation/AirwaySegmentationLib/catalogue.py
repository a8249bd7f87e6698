"""The bundled-model catalogue: ``Resources/Models/catalogue.json``, readable without torch.

The Slicer module lists the bundled models before its first Apply installs torch, so the
catalogue lives apart from :mod:`~AirwaySegmentationLib.models` (which loads weights).

``catalogue.json`` holds its schema and version, then one entry per model: ``name``, ``file``
(``NAME.safetensors`` in the same folder, its model card ``NAME.json`` beside it),
``default`` (bool, one per task), ``task`` ("segmentation", the default, or "connection" for
stage 2), ``description`` and the expected ``cpu_seconds`` / ``gpu_seconds`` per chest CT
(null until measured).  It lists no model until one is trained: no placeholder
weights are shipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import AirwayInputError

#: Where the extension keeps its bundled models: ``Resources/Models`` of the repository, and
#: ``<lib>/Slicer-X.Y/Resources/Models`` in a Slicer install (the module's CMakeLists.txt
#: installs them there, the same place relative to this package).
BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
CATALOGUE_FILE = "catalogue.json"


def catalogue(models_dir: str | os.PathLike | None = None, task: str | None = None) -> list[dict]:
    """The bundled models listed in ``catalogue.json`` (possibly none).

    Each entry has ``name``, ``file`` (the ``.safetensors`` name, its card beside it),
    ``default`` (bool), ``task`` and ``cpu_seconds`` / ``gpu_seconds`` (expected time per CT,
    or null).  ``task`` ("segmentation" or "connection") keeps that task's models only;
    None keeps all.
    """
    path = Path(models_dir or BUNDLED_MODELS_DIR) / CATALOGUE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AirwayInputError(f"The model catalogue {path} is not valid JSON ({error}); fix or restore it.") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("file"), str)
        for entry in models
    ):
        raise AirwayInputError(
            f"The model catalogue {path} is malformed; expected {{'models': [{{'name': ..., 'file': ...}}, ...]}}."
        )
    models = [{**entry, "task": entry.get("task", "segmentation")} for entry in models]
    return models if task is None else [entry for entry in models if entry["task"] == task]


def default_model_name(models_dir: str | os.PathLike | None = None, task: str = "segmentation") -> str:
    """Name of the default model of a task (the first flagged ``default``, else the first)."""
    models = catalogue(models_dir, task)
    if not models:
        path = Path(models_dir or BUNDLED_MODELS_DIR) / CATALOGUE_FILE
        if not path.is_file():  # e.g. a wheel install: the models ship in the source tree only
            raise AirwayInputError(
                f"This installation has no bundled models ({path} does not exist); install from a source "
                "checkout (pip install -e .) or in Slicer, or give a model file with --model."
            )
        raise AirwayInputError(f"There is no bundled {task} model yet; train one with airway train.")
    return next((entry for entry in models if entry.get("default")), models[0])["name"]


def model_file(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """The weights file of the bundled model ``name``; raises :class:`AirwayInputError` if there is none."""
    entries = {entry["name"]: entry for entry in catalogue(models_dir)}
    if name not in entries:
        known = ", ".join(entries) or "none yet"
        raise AirwayInputError(f"There is no bundled model named {name!r} (bundled: {known}).")
    return Path(models_dir or BUNDLED_MODELS_DIR) / entries[name]["file"]
