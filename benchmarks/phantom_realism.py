"""How real does the synthetic chest CT look, and how fast is it made?

Measures the same statistics with the same code on the phantom and on the real scan
LIDC-IDRI-0314 (``../shared/data/realct`` beside the repository):

- lung parenchyma median: voxels below -400 HU, minus the air connected to the in-plane border,
  the two largest components, eroded by 3 mm (drops the airways' walls and the pleura);
- soft-tissue noise: local SD in 7 x 7 x 3 (x, y, z) windows, median over voxels whose
  smoothed value lies in [0, 100] HU and whose whole neighbourhood is tissue.

It times :func:`generate_phantom` at 256^3 / 0.8 mm and 512 x 512 x 400 / 0.8 mm, each in its
own process so that the peak RSS belongs to that size, and writes a side-by-side PNG (real
axial + coronal, phantom axial + coronal, lung window).

Resolvability of the ground truth: for 256^3 / 0.8 mm phantoms (seeds 0-3 by default) it
compares tree.json (generations = deepest generation + 1, branches, end branches) with what
:func:`~AirwaySegmentationLib.tree.parse_airway_tree` finds in the ``airway`` mask
(26-connected; the 6-connected branch count alongside), checks that class 1 + 2 of
``airway3`` is one 26-connected tree, and gives the voxel Dice of each class between the
parse's class labels and ``airway3``.  The imaging variant does not change the tree at a
given spacing, so one variant stands for all.

Usage::

    python benchmarks/phantom_realism.py [--out out/phantom_vs_real.png] [--skip-large] [--seeds 0 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage

from AirwaySegmentationLib.phantom import Phantom, generate_phantom
from AirwaySegmentationLib.tree import parse_airway_tree
from AirwaySegmentationLib.volume import read_volume

#: The shared data folder lies beside the repository (../shared), as on the workstations and CI.
REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "lidc-idri-0314" / "ct.nii.gz"
LUNG_MEDIAN_TOLERANCE_HU = 30.0
NOISE_SD_TOLERANCE = 0.30


def lung_mask(ct: np.ndarray) -> np.ndarray:
    """The two largest air components inside the body: the lungs with their airways."""
    air = ct < -400
    labels = cc3d.connected_components(air, connectivity=6)
    # Only the in-plane faces: the trachea leaves through the top slice and must stay.
    border = np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    counts = np.bincount(labels.ravel())
    counts[border] = 0
    counts[0] = 0
    largest = np.argsort(counts)[::-1][:2]
    return np.isin(labels, largest[counts[largest] > 0])


def lung_parenchyma_median(ct: np.ndarray, spacing_zyx) -> float:
    """Median HU of the eroded lungs found by threshold (same code for real and phantom)."""
    lungs = lung_mask(ct)
    radius = np.maximum(np.rint(3.0 / np.asarray(spacing_zyx)).astype(int), 1)
    structure = np.ones(2 * radius + 1, dtype=bool)
    lungs = ndimage.binary_erosion(lungs, structure=structure)
    return float(np.median(ct[lungs]))


def soft_tissue_local_sd(ct: np.ndarray) -> float:
    """Median local SD (7x7x3 window) over voxels well inside soft tissue (same code for both)."""
    values = ct.astype(np.float32)
    window = (3, 7, 7)
    mean = ndimage.uniform_filter(values, window)
    mean_sq = ndimage.uniform_filter(values * values, window)
    local_sd = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    smooth = ndimage.gaussian_filter(values, 2.0)
    tissue = (smooth >= 0) & (smooth <= 100)
    tissue = ndimage.binary_erosion(tissue, structure=np.ones((5, 11, 11), dtype=bool))
    return float(np.median(local_sd[tissue]))


def tree_counts(phantom: Phantom) -> tuple[int, int, int]:
    """tree.json's (branches, generations = deepest generation + 1, end branches)."""
    parents = {branch.parent for branch in phantom.branches}
    ends = sum(1 for branch in phantom.branches if branch.id not in parents)
    return len(phantom.branches), 1 + max(branch.generation for branch in phantom.branches), ends


def parse_agreement(phantom: Phantom) -> dict:
    """What the tree parser sees in the phantom's airway mask, against the phantom's own tree and classes."""
    airway, airway3 = phantom.airway.array_zyx, phantom.airway3.array_zyx
    spacing = phantom.airway.spacing_zyx
    parsed = parse_airway_tree(airway, spacing, connectivity=26)
    labels = parsed.class_labels_zyx()
    dice = []
    for airway_class in (1, 2, 3):
        a, b = labels == airway_class, airway3 == airway_class
        dice.append(2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))
    upper = ((airway3 == 1) | (airway3 == 2)).astype(np.uint8)
    return {
        "tree_json": tree_counts(phantom),
        "parse": (len(parsed.branches), parsed.n_generations, len(parsed.end_branches())),
        "parse_6_branches": len(parse_airway_tree(airway, spacing, connectivity=6).branches),
        "class12_components": cc3d.connected_components(upper, connectivity=26, return_N=True)[1],
        "dice": dice,
    }


def time_one(shape: tuple[int, int, int]) -> dict:
    start = time.perf_counter()
    phantom = generate_phantom(seed=0, shape_zyx=shape, spacing_zyx=(0.8, 0.8, 0.8))
    seconds = time.perf_counter() - start
    branches, generations, ends = tree_counts(phantom)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
    return {"shape": shape, "seconds": seconds, "peak_rss_gb": peak_gb, "branches": branches,
            "generations": generations, "end_branches": ends}


def timed_in_subprocess(shape: tuple[int, int, int]) -> dict:
    output = subprocess.run([sys.executable, __file__, "--time-only", *map(str, shape)], check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def lung_window(image: np.ndarray) -> np.ndarray:
    return np.clip((image.astype(np.float32) + 1350.0) / 1500.0, 0.0, 1.0)


def save_side_by_side(real, phantom_ct, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 11))
    for row, (name, volume) in enumerate((("real LIDC-IDRI-0314", real), ("phantom seed 0", phantom_ct))):
        array = volume.array_zyx
        sz, sy, sx = volume.spacing_zyx
        # Axial slice at 60% of the lungs' height.
        lungs = lung_mask(array)
        per_slice = lungs.sum(axis=(1, 2))
        lung_slices = np.flatnonzero(per_slice > 0.05 * per_slice.max())
        axial = array[int(lung_slices[0] + 0.6 * (lung_slices[-1] - lung_slices[0]))]
        # Coronal slice through the trachea: the darkest row of the lungs' top tenth.
        top = slice(int(lung_slices[-1] - 0.1 * (lung_slices[-1] - lung_slices[0])), int(lung_slices[-1]))
        column = np.where(lungs[top], array[top], 0).sum(axis=(0, 2))
        coronal = array[:, int(np.argmin(column))]
        axes[row, 0].imshow(lung_window(axial), cmap="gray", aspect=sy / sx)
        axes[row, 0].set_title(f"{name}: axial")
        axes[row, 1].imshow(lung_window(coronal), cmap="gray", origin="lower", aspect=sz / sx)
        axes[row, 1].set_title(f"{name}: coronal")
    for axis in axes.ravel():
        axis.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/phantom_vs_real.png"))
    parser.add_argument("--skip-large", action="store_true", help="do not time 512 x 512 x 400")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="seeds of the 256^3 phantoms whose parse is compared with tree.json")
    parser.add_argument("--time-only", nargs=3, type=int, metavar=("Z", "Y", "X"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_only:
        print(json.dumps(time_one(tuple(args.time_only))))
        return

    real = read_volume(REAL_CT)
    phantom = generate_phantom(seed=0, shape_zyx=(256, 256, 256), spacing_zyx=(0.8, 0.8, 0.8))
    rows = []
    real_lung = lung_parenchyma_median(real.array_zyx, real.spacing_zyx)
    phantom_lung = lung_parenchyma_median(phantom.ct.array_zyx, phantom.ct.spacing_zyx)
    rows.append(("lung parenchyma median (HU)", real_lung, phantom_lung,
                 abs(phantom_lung - real_lung) <= LUNG_MEDIAN_TOLERANCE_HU))
    real_sd = soft_tissue_local_sd(real.array_zyx)
    phantom_sd = soft_tissue_local_sd(phantom.ct.array_zyx)
    rows.append(("soft-tissue local SD 7x7x3 (HU)", real_sd, phantom_sd,
                 abs(phantom_sd - real_sd) <= NOISE_SD_TOLERANCE * real_sd))
    print(f"{'measure':34s} {'real':>8s} {'phantom':>8s}  result")
    for name, real_value, phantom_value, passed in rows:
        print(f"{name:34s} {real_value:8.1f} {phantom_value:8.1f}  {'pass' if passed else 'FAIL'}")

    sizes = [(256, 256, 256)] + ([] if args.skip_large else [(400, 512, 512)])
    print(f"\n{'shape zyx @0.8 mm':20s} {'seconds':>8s} {'peak RSS GB':>12s} {'branches':>9s} {'generations':>12s} {'end branches':>13s}")
    for shape in sizes:
        timing = timed_in_subprocess(shape)
        print(f"{'x'.join(map(str, shape)):20s} {timing['seconds']:8.1f} {timing['peak_rss_gb']:12.2f} "
              f"{timing['branches']:9d} {timing['generations']:12d} {timing['end_branches']:13d}")

    print("\n256^3 / 0.8 mm: tree.json against parse_airway_tree(airway, connectivity=26)")
    print(f"{'seed':>4s} {'json br':>8s} {'gen':>4s} {'ends':>5s} | {'parse br':>8s} {'gen':>4s} {'ends':>5s} "
          f"{'br %':>5s} {'6-conn br':>9s} | {'cls 1+2 parts':>13s} | {'Dice 1':>6s} {'Dice 2':>6s} {'Dice 3':>6s}")
    for seed in args.seeds:
        # The calibration phantom is reused for its own seed.
        result = parse_agreement(phantom if seed == phantom.seed else
                                 generate_phantom(seed=seed, shape_zyx=(256, 256, 256), spacing_zyx=(0.8, 0.8, 0.8)))
        json_branches, json_generations, json_ends = result["tree_json"]
        branches, generations, ends = result["parse"]
        dice = result["dice"]
        print(f"{seed:4d} {json_branches:8d} {json_generations:4d} {json_ends:5d} | {branches:8d} {generations:4d} "
              f"{ends:5d} {100.0 * branches / json_branches:5.0f} {result['parse_6_branches']:9d} | "
              f"{result['class12_components']:13d} | {dice[0]:6.3f} {dice[1]:6.3f} {dice[2]:6.3f}")

    save_side_by_side(real, phantom.ct, args.out)
    print(f"\nside-by-side image: {args.out}")


if __name__ == "__main__":
    main()
