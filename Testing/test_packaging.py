"""Every Python package of the headless core is listed for the wheel, and the cores stay Slicer-free."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB_DIRS = {
    "AirwaySegmentationLib": ROOT / "AirwaySegmentation" / "AirwaySegmentationLib",
    "AirwayRefineLib": ROOT / "AirwayRefine" / "AirwayRefineLib",
}


def _declared_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"^packages = \[(.*?)\]", text, flags=re.M | re.S)
    assert listed, "pyproject.toml must list the packages explicitly"
    return set(re.findall(r'"([\w.]+)"', listed.group(1)))


def test_every_package_is_in_the_wheel() -> None:
    found = set()
    for name, folder in LIB_DIRS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join((name, *relative.parts)))
    assert found == _declared_packages()


def test_cores_never_import_slicer_qt_or_ctk() -> None:
    forbidden = re.compile(r"^\s*(import|from)\s+(slicer|qt|ctk)\b", flags=re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in LIB_DIRS.values()
        for path in folder.rglob("*.py")
        if forbidden.search(path.read_text())
    ]
    assert offenders == []
