"""ATM'22 metrics of hand-made cases whose answers can be checked by hand.

The reference is the 7-branch capsule tree of ``Testing/test_metrics.py``; each case edits a
copy of it.  Prints one row per case: TD, BD, DSC, precision, ATM'22 score, clDice, Betti-0
error, component count and FPR (all rates in percent).

Usage::

    python benchmarks/metrics_cases.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from synthetic_trees import capsule_mask  # noqa: E402
from test_metrics import SEGMENTS, SHAPE, _a_leaf, _cut_left_bronchus  # noqa: E402

from AirwaySegmentationLib.metrics import evaluate_airway  # noqa: E402
from AirwaySegmentationLib.tree import parse_airway_tree  # noqa: E402


def cases(reference: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    tree = parse_airway_tree(reference)
    without_leaf = reference & (tree.branch_labels_zyx != _a_leaf(tree) + 1)
    cut = _cut_left_bronchus(reference)
    bridged = cut.copy()
    bridged[30, 32, 23] = bridged[31, 32, 22] = True  # an edge-only (26-, not 6-connected) bridge
    shifted = np.roll(reference, 1, axis=2)
    blobs = reference.copy()
    blobs[10:14, 30:34, 34:40] = True  # attached false positive
    blobs[5:8, 5:8, 46:58] = True  # detached false positive
    return [
        ("reference against itself", reference, "atm22"),
        ("one leaf branch removed", without_leaf, "atm22"),
        ("slab cut across the left main bronchus", cut, "atm22"),
        ("cut + edge-only bridge, atm22", bridged, "atm22"),
        ("cut + edge-only bridge, atm26", bridged, "atm26"),
        ("whole tree shifted by one voxel in x", shifted, "atm22"),
        ("attached + detached false-positive blobs", blobs, "atm22"),
    ]


def main() -> None:
    reference = capsule_mask(SHAPE, (1.0, 1.0, 1.0), SEGMENTS)
    tree = parse_airway_tree(reference)
    print(f"reference: {reference.sum()} voxels, {tree.skeleton_zyx.sum()} skeleton voxels, {len(tree.branches)} branches")
    print(f"{'case':<42}{'TD':>8}{'BD':>8}{'DSC':>8}{'prec':>8}{'score':>8}{'clDice':>8}{'b0err':>7}{'comp':>6}{'FPR':>8}")
    for name, prediction, mode in cases(reference):
        m = evaluate_airway(prediction, reference, mode=mode)
        print(
            f"{name:<42}{m.td:8.2f}{m.bd:8.2f}{m.dsc:8.2f}{m.precision:8.2f}{m.atm22_score:8.2f}"
            f"{m.cldice:8.2f}{m.betti0_error:7d}{m.n_components:6d}{m.fpr:8.4f}"
        )


if __name__ == "__main__":
    main()
