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
