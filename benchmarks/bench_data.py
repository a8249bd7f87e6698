"""Training data on a real scan: the chest crop and the patch throughput.

On LIDC-IDRI-0314 (``../shared/data/realct`` beside the repository) with its automatic airway mask
(region growing at -900 HU) as the label:

- prints the :func:`crop_to_body` box and checks that the whole airway mask lies inside it;
- loads the scan as a training case (crop, binary -> three classes) and times it;
- times :class:`PatchDataset` items (crop, augmentation, network input, both skeleton-based
  loss weights) at the given patch size, split into sampling and weights.

Usage::

    python benchmarks/bench_data.py [--patch 128] [--patches 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from AirwaySegmentationLib.arrays import bounding_box
from AirwaySegmentationLib.data import AirwayCase, load_case
from AirwaySegmentationLib.preprocess import crop_to_body
from AirwaySegmentationLib.sampling import Augmentation, PatchDataset, PatchSampler
from AirwaySegmentationLib.volume import read_ct, read_label

#: The shared data folder lies beside the repository (../shared), as on the workstations and CI.
REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "lidc-idri-0314"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=128, help="patch edge in voxels")
    parser.add_argument("--patches", type=int, default=10, help="patches to time")
    args = parser.parse_args()

    ct = read_ct(REAL_DIR / "ct.nii.gz")
    label_path = REAL_DIR / "airway_auto_regiongrow_m900.nii.gz"
    airway = read_label(label_path, reference=ct).array_zyx > 0
    start = time.perf_counter()
    box = crop_to_body(ct.array_zyx, ct.spacing_zyx)
    seconds = time.perf_counter() - start
    kept = int(airway[box].sum())
    print(f"scan {ct.array_zyx.shape} zyx, spacing {ct.spacing_zyx} mm; crop_to_body {seconds:.3f} s")
    print(f"box {[(s.start, s.stop) for s in box]} = {ct.array_zyx[box].size / ct.array_zyx.size:.1%} of the voxels")
    verdict = "all inside" if kept == airway.sum() else "CUT"
    print(f"airway box {[(s.start, s.stop) for s in bounding_box(airway)]}; "
          f"airway voxels inside the crop {kept}/{int(airway.sum())} -> {verdict}")

    start = time.perf_counter()
    volume = load_case(AirwayCase("lidc-idri-0314", REAL_DIR / "ct.nii.gz", label_path))
    print(f"load_case {time.perf_counter() - start:.1f} s: crop {volume.ct.array_zyx.shape}, "
          f"class voxels {np.bincount(volume.labels3.ravel(), minlength=4)[1:].tolist()}")

    size = (args.patch,) * 3
    start = time.perf_counter()
    dataset = PatchDataset([volume], PatchSampler(size), Augmentation(), seed=0)
    print(f"small-airway targets {len(dataset.targets[0].small_airway_zyx)} in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)
    sampling = []
    for _ in range(args.patches):
        start = time.perf_counter()
        dataset.sampler.sample(volume.ct.array_zyx, volume.labels3, volume.spacing_zyx, dataset.targets[0], rng,
                               dataset.augmentation)
        sampling.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(args.patches):
        dataset.item(rng)
    per_item = (time.perf_counter() - start) / args.patches
    print(f"{args.patch}^3 patches: sampling + augmentation {np.mean(sampling):.3f} s, "
          f"full item (+ input channels, GUL and centerline weights) {per_item:.3f} s "
          f"-> {1 / per_item:.2f} patches/s per worker")


if __name__ == "__main__":
    main()
