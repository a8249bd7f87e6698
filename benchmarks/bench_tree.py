"""Tree parsing: lumen-diameter accuracy on synthetic cylinders, and speed on a 256^3 tree.

Prints two tables:

1. the diameter error (measured - true, mm) of straight cylinders of known radius at random
   orientations and sub-voxel positions, per spacing and radius (mean and worst over the
   orientations), after the half-voxel bias correction of ``tree.LUMEN_RADIUS_BIAS_VOXELS``;
2. the wall time of ``parse_airway_tree`` and ``evaluate_airway`` on a 256^3 volume holding a
   dichotomous tree of 9 generations, and on a phantom if ``--phantom DIR`` is given (with
   the parsed branch count against the phantom's ``tree.json``).

Usage::

    python benchmarks/bench_tree.py [--orientations 8] [--phantom out/phantom]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from synthetic_trees import TreeSegment, binary_tree, capsule_mask, place  # noqa: E402

from AirwaySegmentationLib.metrics import evaluate_airway  # noqa: E402
from AirwaySegmentationLib.tree import parse_airway_tree  # noqa: E402
from AirwaySegmentationLib.volume import read_label  # noqa: E402

SPACINGS_ZYX = [(0.5, 0.5, 0.5), (0.7, 0.7, 0.7), (1.0, 1.0, 1.0), (1.0, 0.6, 0.6), (0.8, 0.5, 0.5)]
RADII_MM = [0.75, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0]


def cylinder_diameter_errors(spacing_zyx, radius_mm: float, orientations: int, rng) -> np.ndarray:
    """Measured minus true diameter (mm) of one straight cylinder per random orientation."""
    errors = []
    for _ in range(orientations):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = max(8 * radius_mm, 25 * max(spacing_zyx))
        shape, segments = place([TreeSegment((0.0, 0.0, 0.0), tuple(length * direction), radius_mm)], spacing_zyx, 2.0)
        shift = rng.random(3) * np.asarray(spacing_zyx)
        segments = [
            s._replace(p0_mm=tuple(np.add(s.p0_mm, shift)), p1_mm=tuple(np.add(s.p1_mm, shift))) for s in segments
        ]
        mask = capsule_mask(tuple(np.add(shape, 1)), spacing_zyx, segments)
        branches = parse_airway_tree(mask, spacing_zyx).branches
        errors.append(branches[0].diameter_mm - 2 * radius_mm)
    return np.asarray(errors)


def diameter_table(orientations: int) -> None:
    rng = np.random.default_rng(0)
    print("Lumen diameter error after bias correction (mm): mean / worst |error| over", orientations, "orientations")
    print(f"{'spacing zyx (mm)':<18}" + "".join(f"{f'r={r:g}':>14}" for r in RADII_MM))
    every = []
    for spacing in SPACINGS_ZYX:
        cells = []
        for radius in RADII_MM:
            errors = cylinder_diameter_errors(spacing, radius, orientations, rng)
            every.append(errors)
            cells.append(f"{errors.mean():+.2f}/{np.abs(errors).max():.2f}")
        print(f"{'/'.join(f'{s:g}' for s in spacing):<18}" + "".join(f"{c:>14}" for c in cells))
    every = np.concatenate(every)
    print(
        f"all: mean {every.mean():+.3f} mm, mean |error| {np.abs(every).mean():.3f} mm, "
        f"95th percentile |error| {np.percentile(np.abs(every), 95):.3f} mm"
    )


def speed_256() -> None:
    spacing = (0.6, 0.6, 0.6)
    segments = binary_tree(9, trachea_length_mm=32, trachea_radius_mm=6, length_ratio=0.8, radius_ratio=0.82, branch_angle_deg=50)
    shape, segments = place(segments, spacing)
    tree_mask = capsule_mask(shape, spacing, segments)[:256, :256, :256]
    mask = np.zeros((256, 256, 256), bool)
    mask[: tree_mask.shape[0], : tree_mask.shape[1], : tree_mask.shape[2]] = tree_mask
    for connectivity in (6, 26):
        start = time.perf_counter()
        tree = parse_airway_tree(mask, spacing, connectivity=connectivity)
        print(
            f"256^3 synthetic tree ({mask.sum()} voxels), connectivity {connectivity}: parse "
            f"{time.perf_counter() - start:.2f} s, {len(tree.branches)} branches, {tree.n_generations} generations"
        )
    start = time.perf_counter()
    evaluate_airway(mask, mask, spacing)
    print(f"evaluate_airway (parse included): {time.perf_counter() - start:.2f} s")


def phantom_check(folder: Path) -> None:
    airway = read_label(folder / "airway.nii.gz")
    truth = json.loads((folder / "tree.json").read_text())["branches"]
    start = time.perf_counter()
    tree = parse_airway_tree(airway.array_zyx, airway.spacing_zyx, connectivity=26)
    seconds = time.perf_counter() - start
    true_generations = max(b["generation"] for b in truth) + 1
    true_ends = sum(1 for b in truth if not any(c["parent"] == b["id"] for c in truth))
    print(
        f"phantom {folder} {airway.array_zyx.shape}: parse {seconds:.2f} s; parsed {len(tree.branches)} branches, "
        f"{tree.n_generations} generations, {len(tree.end_branches())} end branches; truth {len(truth)} branches, "
        f"{true_generations} generations, {true_ends} end branches"
    )
    classes_path = folder / "airway3.nii.gz"
    if classes_path.exists():
        truth3 = read_label(classes_path).array_zyx
        metrics = evaluate_airway(airway.array_zyx, airway.array_zyx, airway.spacing_zyx, mode="atm26",
                                  gt_classes_zyx=truth3, pred_classes_zyx=tree.class_labels_zyx())
        print("class agreement of the parse with the phantom's true classes (voxel Dice %):",
              {k: round(v, 2) for k, v in metrics.dice_per_class.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orientations", type=int, default=8)
    parser.add_argument("--phantom", type=Path, default=None, help="a folder written by `airway phantom`")
    args = parser.parse_args()
    diameter_table(args.orientations)
    speed_256()
    if args.phantom is not None:
        phantom_check(args.phantom)


if __name__ == "__main__":
    main()
