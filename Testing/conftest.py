"""Fixtures shared by several test files: a loadable tiny model and Slicer's segmentation converters."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Model card of the tiny test model (a 16^3 patch, the two default input channels).
TINY_PATCH_ZYX = (16, 16, 16)


def tiny_card(**extra) -> dict:
    """The card of a base-width-2 WingsNet with the default input spec, plus ``extra`` fields."""
    from AirwaySegmentationLib.preprocess import DEFAULT_INPUT_SPEC

    card = {
        "architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}},
        "input_spec": DEFAULT_INPUT_SPEC.as_dict(),
        "patch_size_zyx": list(TINY_PATCH_ZYX),
    }
    card.update(extra)
    return card


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A loadable WingsNet (base width 2, seeded random weights): NAME.safetensors + NAME.json."""
    import torch
    from AirwaySegmentationLib.models import export_model
    from AirwaySegmentationLib.networks import build_network

    torch.manual_seed(0)
    weights, _ = export_model(build_network("wingsnet", base_width=2), tiny_card(), tmp_path_factory.mktemp("model") / "tiny")
    return weights


@pytest.fixture(scope="session")
def converter_rules() -> None:
    """Register the labelmap <-> closed surface converters, as Slicer's Segmentations module does at startup."""
    slicer_core = pytest.importorskip("slicer_core", reason="the slicer-core wheel (Slicer's MRML libraries) is not installed")
    factory = slicer_core.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (
        slicer_core.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer_core.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def broken_tube_arrays():
    """A CT with an air tube along x (-1000 HU in -850 HU tissue) and stage-1 labels of it with a 6-voxel gap.

    The labels hold class 2 before the gap (x < 28), class 3 after it (x >= 34) and a class-3
    false-positive ball in the tissue 4 voxels beside the tube: three pieces.  Returns the CT
    (int16, shape (32, 32, 64)), the labels (uint8) and the gap's lumen voxels (bool).
    """
    import numpy as np

    shape = (32, 32, 64)
    z, y, x = np.indices(shape)
    lumen = ((z - 16) ** 2 + (y - 12) ** 2 <= 9) & (x >= 4) & (x < 60)
    ct = np.full(shape, -850, dtype=np.int16)
    ct[lumen] = -1000
    labels = np.zeros(shape, dtype=np.uint8)
    labels[lumen & (x < 28)] = 2
    labels[lumen & (x >= 34)] = 3
    labels[(z - 16) ** 2 + (y - 23) ** 2 + (x - 50) ** 2 <= 4] = 3
    return ct, labels, lumen & (x >= 28) & (x < 34)
