"""Speed, memory and accuracy of the breakage attention (METHODS.md section 2).

Builds a 512 x 512 x 400 (x, y, z) stage-1-like mask at 0.8 x 0.7 x 0.7 mm (z, y, x): a 9-generation
synthetic tree (511 capsule branches, trachea 60 mm long) whose 256 leaves are each cut by a
1-3 mm gap, plus small random tube fragments, trimmed to exactly 300 connected components
(26-connected).  Times :func:`breakage_attention` in a fresh process (so its peak RSS is the
mask, the result and the work in between), then compares it with the brute force of
``Testing/test_attention.py`` (one full scipy distance transform per component) on a small
case.

Run: ``python benchmarks/bench_attention.py [--repeat 2]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import cc3d
import numpy as np
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from synthetic_trees import binary_tree, capsule_mask, place  # noqa: E402
from test_attention import SPACING as SMALL_SPACING  # noqa: E402
from test_attention import brute_force_second_distance, fragments_mask  # noqa: E402

from AirwayRefineLib.attention import breakage_attention, find_attention_blobs  # noqa: E402

SHAPE = (400, 512, 512)
SPACING = (0.8, 0.7, 0.7)
COMPONENTS = 300


def stage1_like_mask(seed: int = 0) -> np.ndarray:
    """A tree with every leaf cut once, plus stray fragments, with exactly COMPONENTS components."""
    rng = np.random.default_rng(seed)
    segments = binary_tree(generations=9, trachea_length_mm=60.0, trachea_radius_mm=9.0)
    tree_shape, segments = place(segments, SPACING)
    # Centre the tree in the volume.
    shift = (np.asarray(SHAPE) - np.asarray(tree_shape)) // 2 * np.asarray(SPACING)
    capsules = []
    for s in segments:
        p0, p1 = np.asarray(s.p0_mm) + shift, np.asarray(s.p1_mm) + shift
        if s.generation < 8:
            capsules.append((p0, p1, s.radius_mm))
            continue
        # Leaf: leave a gap of 1-3 mm between the two caps (the caps add one radius each).
        axis = (p1 - p0) / np.linalg.norm(p1 - p0)
        start = rng.uniform(0.3, 0.4) * s.length_mm
        stop = start + 2 * s.radius_mm + rng.uniform(1.0, 3.0)
        capsules += [(p0, p0 + start * axis, s.radius_mm), (p0 + stop * axis, p1, s.radius_mm)]
    low, high = np.min([c[0] for c in capsules], axis=0), np.max([c[0] for c in capsules], axis=0)
    while True:
        mask = capsule_mask(SHAPE, SPACING, capsules)
        labels, count = cc3d.connected_components(mask, connectivity=26, return_N=True)
        if count >= COMPONENTS:
            break
        # Stray fragments: short thin tubes inside the tree's extent.
        for _ in range(COMPONENTS - count):
            p0 = rng.uniform(low, high)
            capsules.append((p0, p0 + rng.normal(0.0, 3.0, 3), rng.uniform(0.7, 1.5)))
    # Drop the smallest extra components so that exactly COMPONENTS remain.
    sizes = np.bincount(labels.ravel())
    sizes[0] = np.iinfo(sizes.dtype).max
    dropped = np.argsort(sizes)[: count - COMPONENTS]
    mask[np.isin(labels, dropped)] = False
    return mask


def _timed_attention(path: str, repeat: int, queue) -> None:
    mask = np.load(path)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        attention = breakage_attention(mask, SPACING)
        seconds.append(time.perf_counter() - start)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    blobs = find_attention_blobs(attention)
    blob_seconds = time.perf_counter() - start
    queue.put((seconds, peak_rss_mib, float(attention.max()), int((attention > 0.5).sum()), len(blobs), blob_seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    start = time.perf_counter()
    mask = stage1_like_mask()
    count = cc3d.connected_components(mask, connectivity=26, return_N=True)[1]
    print(f"mask {SHAPE} at {SPACING} mm: {count} components, {int(mask.sum())} voxels "
          f"(built in {time.perf_counter() - start:.1f} s)")
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "mask.npy")
        np.save(path, mask)
        del mask
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_timed_attention, args=(path, args.repeat, queue))
        child.start()
        seconds, peak_rss_mib, peak, above, n_blobs, blob_seconds = queue.get()
        child.join()
    print(f"breakage_attention: {', '.join(f'{s:.2f}' for s in seconds)} s (best {min(seconds):.2f} s); "
          f"peak RSS {peak_rss_mib:.0f} MiB (mask {np.prod(SHAPE) / 2**20:.0f} MiB + float32 result "
          f"{4 * np.prod(SHAPE) / 2**20:.0f} MiB included); max attention {peak:.3f}, {above} voxels > 0.5")
    print(f"find_attention_blobs: {n_blobs} blobs in {blob_seconds:.2f} s")

    worst = 0.0
    for seed in range(3):
        small = fragments_mask(seed)
        exact = brute_force_second_distance(small, SMALL_SPACING, 26)
        defined = exact < 15.0
        difference = np.abs(breakage_attention(small, SMALL_SPACING) - expit(5.0 - exact))
        worst = max(worst, float(difference[defined].max()))
        overall = float(difference.max())
    print(f"brute force (3 small cases, {small.shape} at {SMALL_SPACING} mm): max |difference| {worst:.2e} "
          f"where H < cutoff, {overall:.2e} everywhere (bound sigmoid(-10) = {expit(-10.0):.2e})")


if __name__ == "__main__":
    main()
