"""Stage-1 accuracy of a model on held-out phantoms and the real scan, with the issue's targets.

Held-out phantoms: seeds of the ``test`` split (never used in training or validation), one
scanner variant after another (all six for 6 phantoms), at the training grid.  Each is
segmented with ``airway segment``'s defaults (bfloat16 on CPUs with native bfloat16, grown
windows, overlap 0.25) and scored in ATM'22 mode (TD, BD, precision, DSC, class-1 Dice); the
same run in float32 gives the Dice of the fast path against float32.  With ``--nnunet-way``
the same network also runs the way nnU-Net runs a model (training-size windows, tile step 0.5,
Gaussian blending, mirroring over three axes, float32) for the comparison of issue 8.
``--split validation`` scores the validation phantoms instead, for choosing a setting such as
``--threshold`` (the airway threshold of stage 1) without looking at the test phantoms.

``--real`` segments ``../shared/data/realct/lidc-idri-0314/ct.nii.gz`` and checks it against
the region-growing lower-bound mask beside it: the share of that mask inside the prediction
and the end-branch counts of both; ``--figure PNG`` draws a coronal minimum-intensity
projection with the prediction and a 3-D surface view of the predicted tree.

Run::

    python benchmarks/stage1_accuracy.py [--model NAME_OR_PATH] [--phantoms 6] [--split test|validation]
        [--threshold 0.5] [--nnunet-way] [--real] [--figure out.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from AirwaySegmentationLib.data import phantom_seeds
from AirwaySegmentationLib.infer import AIRWAY_THRESHOLD
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.metrics import evaluate_airway
from AirwaySegmentationLib.phantom import PHANTOM_VARIANTS, generate_phantom
from AirwaySegmentationLib.segment import load_segmentation_model, segment_ct
from AirwaySegmentationLib.tree import parse_airway_tree
from AirwaySegmentationLib.volume import read_ct, read_label

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "lidc-idri-0314"
#: nnU-Net's way of running a network: its windows, tile step 0.5, mirroring, float32.
NNUNET_WAY = InferenceSettings(overlap=0.5, max_window_zyx=None, mirror=True, precision="float32", accumulator="float32")
#: The reference of the CPU fast path: the same run in float32 throughout.
FLOAT32 = InferenceSettings(precision="float32", accumulator="float32")
#: Issue 4's targets for stage 1 alone on held-out phantoms (ATM'22 mode).
TARGETS = {"td": 90.0, "bd": 88.0, "precision": 90.0, "dsc": 88.0, "class1_dice": 90.0}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 100.0 if total == 0 else 200.0 * int(np.count_nonzero(a & b)) / total


def _score(labels: np.ndarray, truth: np.ndarray, spacing_zyx) -> dict:
    metrics = evaluate_airway(labels > 0, truth > 0, spacing_zyx, "atm22", gt_classes_zyx=truth, pred_classes_zyx=labels)
    return {
        "td": metrics.td, "bd": metrics.bd, "precision": metrics.precision, "dsc": metrics.dsc,
        "class1_dice": metrics.dice_per_class.get(1, float("nan")),
    }


def phantoms(model, count: int, shape_zyx: tuple[int, int, int], nnunet_way: bool, split: str = "test",
             threshold: float = AIRWAY_THRESHOLD) -> None:
    """Print per-phantom and mean metrics, fast path vs float32, and optionally the nnU-Net way."""
    rows = []
    print(f"{'phantom':<26} {'TD':>6} {'BD':>6} {'prec':>6} {'DSC':>6} {'c1 Dice':>7} {'s':>5} {'bf16~fp32':>9}"
          + (f" | {'nnU-Net way: TD':>15} {'BD':>6} {'prec':>6} {'DSC':>6} {'s':>5}" if nnunet_way else ""))
    for i, seed in enumerate(phantom_seeds(split, count)):
        variant = list(PHANTOM_VARIANTS)[i % len(PHANTOM_VARIANTS)]
        phantom = generate_phantom(seed, shape_zyx, variant=variant)
        ct, truth = phantom.ct, phantom.airway3.array_zyx
        start = time.perf_counter()
        ours = segment_ct(ct.array_zyx, ct.geometry, model, threshold=threshold).labels.array_zyx
        seconds = time.perf_counter() - start
        full = segment_ct(ct.array_zyx, ct.geometry, model, FLOAT32, threshold=threshold).labels.array_zyx
        row = {**_score(ours, truth, ct.spacing_zyx), "seconds": seconds, "fp32_dice": _dice(ours > 0, full > 0)}
        line = (f"{variant + ' ' + str(seed):<26} {row['td']:>6.2f} {row['bd']:>6.2f} {row['precision']:>6.2f} "
                f"{row['dsc']:>6.2f} {row['class1_dice']:>7.2f} {seconds:>5.1f} {row['fp32_dice'] / 100:>9.4f}")
        if nnunet_way:
            start = time.perf_counter()
            way = segment_ct(ct.array_zyx, ct.geometry, model, NNUNET_WAY, threshold=threshold).labels.array_zyx
            way_row = {f"nnunet_{k}": v for k, v in _score(way, truth, ct.spacing_zyx).items()}
            way_row["nnunet_seconds"] = time.perf_counter() - start
            row.update(way_row)
            line += (f" | {row['nnunet_td']:>15.2f} {row['nnunet_bd']:>6.2f} {row['nnunet_precision']:>6.2f} "
                     f"{row['nnunet_dsc']:>6.2f} {row['nnunet_seconds']:>5.0f}")
        print(line, flush=True)
        rows.append(row)
    mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    print(f"{'mean':<26} {mean['td']:>6.2f} {mean['bd']:>6.2f} {mean['precision']:>6.2f} {mean['dsc']:>6.2f} "
          f"{mean['class1_dice']:>7.2f} {mean['seconds']:>5.1f} {mean['fp32_dice'] / 100:>9.4f}"
          + (f" | {mean['nnunet_td']:>15.2f} {mean['nnunet_bd']:>6.2f} {mean['nnunet_precision']:>6.2f} "
             f"{mean['nnunet_dsc']:>6.2f} {mean['nnunet_seconds']:>5.0f}" if nnunet_way else ""))
    verdicts = [f"{key} {mean[key]:.2f} {'>=' if mean[key] >= target else '<'} {target}" for key, target in TARGETS.items()]
    print("targets (mean): " + "; ".join(verdicts))
    print(f"fast path vs float32: binary Dice {min(row['fp32_dice'] for row in rows) / 100:.4f} at worst (target >= 0.995)")


def real_scan(model, figure: Path | None, threshold: float = AIRWAY_THRESHOLD) -> None:
    """Containment of the region-growing lower bound and end branches on the real scan."""
    ct = read_ct(REAL_DIR / "ct.nii.gz")
    lower_bound = read_label(REAL_DIR / "airway_auto_regiongrow_m900.nii.gz", ct).array_zyx > 0
    start = time.perf_counter()
    labels = segment_ct(ct.array_zyx, ct.geometry, model, threshold=threshold).labels.array_zyx
    seconds = time.perf_counter() - start
    airway = labels > 0
    contained = 100.0 * np.count_nonzero(airway & lower_bound) / np.count_nonzero(lower_bound)
    ends_pred = len(parse_airway_tree(airway, ct.spacing_zyx, connectivity=26).end_branches())
    ends_bound = len(parse_airway_tree(lower_bound, ct.spacing_zyx, connectivity=26).end_branches())
    print(f"\nLIDC-0314 ({seconds:.1f} s): prediction {np.count_nonzero(airway) * np.prod(ct.spacing_zyx) / 1000:.1f} ml, "
          f"region-growing mask {np.count_nonzero(lower_bound) * np.prod(ct.spacing_zyx) / 1000:.1f} ml")
    print(f"  lower bound inside the prediction: {contained:.1f}% (target >= 95%)")
    print(f"  end branches: prediction {ends_pred}, lower bound {ends_bound} (target: more)")
    if figure is not None:
        _figure(ct.array_zyx, labels, ct.spacing_zyx, figure)
        print(f"  figure: {figure}")


def _figure(ct_zyx: np.ndarray, labels: np.ndarray, spacing_zyx, path: Path) -> None:
    """Coronal minIP of the chest with the labels, and a 3-D surface view of the labelled tree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from skimage.measure import marching_cubes

    from AirwaySegmentationLib.preprocess import crop_to_body

    colours = np.array([[0, 0, 0, 0], [0.85, 0.2, 0.2, 1], [0.2, 0.6, 0.9, 1], [0.3, 0.8, 0.3, 1]])
    box = crop_to_body(ct_zyx, spacing_zyx)
    # The minimum along y inside the lung box: air outside the body would hide everything.
    minip = np.clip(ct_zyx[:, box[1]].min(axis=1), -1000, -600)
    coronal = labels[:, box[1]].max(axis=1)
    aspect = spacing_zyx[0] / spacing_zyx[2]
    fig = plt.figure(figsize=(14, 6.5), facecolor="black")
    axis = fig.add_subplot(1, 2, 1)
    axis.imshow(minip, cmap="gray", aspect=aspect, origin="lower")
    axis.imshow(colours[coronal], aspect=aspect, origin="lower", alpha=0.55)
    axis.set_title("coronal minIP (lung box) with stage-1 labels", color="white")
    axis.set_axis_off()
    view = fig.add_subplot(1, 2, 2, projection="3d", facecolor="black")
    step = 2  # every other voxel: enough for a picture, and quick
    for label in (1, 2, 3):
        mask = labels[::step, ::step, ::step] == label
        if mask.sum() < 8:
            continue
        vertices, faces, _, _ = marching_cubes(mask.astype(np.float32), 0.5, spacing=tuple(step * s for s in spacing_zyx))
        # (z, y, x) mm -> plotted as x right, y towards the viewer's back, z up
        xyz = vertices[:, [2, 1, 0]]
        view.add_collection3d(Poly3DCollection(xyz[faces], facecolor=colours[label][:3], linewidth=0, alpha=0.9))
    extent = np.asarray(labels.shape)[[2, 1, 0]] * np.asarray(spacing_zyx)[[2, 1, 0]]
    view.set_xlim(0, extent[0]), view.set_ylim(extent[1], 0), view.set_zlim(0, extent[2])
    view.set_box_aspect(tuple(extent))
    view.view_init(elev=5, azim=-90)
    view.set_axis_off()
    view.set_title("3-D view (red: trachea + main bronchi, blue: lobar-segmental, green: smaller)", color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled default)")
    parser.add_argument("--phantoms", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 192), metavar=("Z", "Y", "X"),
                        help="phantom grid (default: the training configs' grid)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="phantom split: the held-out test phantoms, or the validation ones (for choosing settings)")
    parser.add_argument("--threshold", type=float, default=AIRWAY_THRESHOLD, help="airway threshold of stage 1 (every run of the benchmark)")
    parser.add_argument("--nnunet-way", action="store_true", help="also run the network the nnU-Net way")
    parser.add_argument("--real", action="store_true", help="also check the real scan")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the real-scan result")
    args = parser.parse_args()
    model = load_segmentation_model(args.model)
    print(f"model: {model.source} ({model.card.get('architecture')})")
    if args.phantoms:
        phantoms(model, args.phantoms, tuple(args.shape), args.nnunet_way, args.split, args.threshold)
    if args.real:
        real_scan(model, args.figure, args.threshold)


if __name__ == "__main__":
    main()
