"""Baseline timing: nnU-Net v2's own predictor on a CT volume, with random weights.

Environment (a virtual environment of its own, so nnU-Net's dependencies stay out of the
project's)::

    python3 -m venv /work/bench-venv
    . /work/bench-venv/bin/activate
    pip install -q torch==2.13.0          # the local CPU build
    pip install -q -e /work/main
    echo torch==2.13.0 > /tmp/torch-pin.txt
    pip install -q nnunetv2 -c /tmp/torch-pin.txt   # keeps torch at 2.13.0

Written against nnunetv2 2.8.1 (with dynamic_network_architectures 0.4.4, torch 2.13.0+cpu).

What runs is nnU-Net's inference code path, not a re-implementation:
``nnUNetPredictor.predict_single_npy_array`` (preprocessing with ``DefaultPreprocessor``:
``crop_to_nonzero``, ``CTNormalization``, resampling to the target spacing; Gaussian-weighted
sliding window with optional mirroring over all three axes; resampling back and argmax).  The
plans are built in memory the way nnU-Net's ``ExperimentPlanner`` writes them for a
``3d_fullres`` configuration like the ATM nnU-Net airway baseline:

- patch 128 x 160 x 112 (z, y, x), topology from nnU-Net's own ``get_pool_and_conv_props``:
  ``PlainConvUNet``, 6 stages, features 32-64-128-256-320-320, 3x3x3 kernels, 2 convs per
  stage in encoder and decoder, InstanceNorm3d, LeakyReLU; strides (1,1,1), then (2,2,2) four
  times and (2,2,1) last: x = 112 allows only four halvings down to nnU-Net's minimum edge of
  4 (112 / 2**5 is not whole), so the sixth stage does not pool x;
- 4 output classes (background + our 3 airway classes; ATM'22 itself has 2), which only
  changes the last 1x1x1 convolution and the size of the logits buffer;
- ``CTNormalization`` with foreground properties mean -600, std 300, clip [-1000, 200] HU;
- target spacing = the input spacing, so resampling runs but does not change the shape.

The network comes from ``nnUNetTrainer.build_network_architecture`` (what nnU-Net's own
``initialize_from_trained_model_folder`` calls) with seeded He initialisation; its weights are
random, so the labels are meaningless and only the time counts.  On CPU nnU-Net always sets
``perform_everything_on_device=False`` (and prints so), and caps torch threads at 8 during
prediction (``nnUNet_def_n_proc``).

Usage::

    python benchmarks/nnunet_baseline.py --ct case.nii.gz [--setting default] [--crop 128 160 112]
    python benchmarks/nnunet_baseline.py --phantom-shape 300 512 512 --setting fastest --crop 128 160 112
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# nnU-Net reads these at import time and warns when they are missing; inference needs none of
# them, so an empty temporary folder stands in.
for _name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(_name, tempfile.gettempdir())

import torch  # noqa: E402
from AirwaySegmentationLib.infer import physical_cpu_cores  # noqa: E402
from nnunetv2.experiment_planning.experiment_planners.network_topology import (  # noqa: E402
    get_pool_and_conv_props,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

#: The ``3d_fullres`` patch of the ATM nnU-Net airway baseline, (z, y, x) voxels.
PATCH_ZYX: tuple[int, int, int] = (128, 160, 112)

#: Settings to time: nnU-Net's defaults, the same without test-time mirroring, and the
#: fewest windows (no overlap, no mirroring).
NNUNET_SETTINGS: dict[str, dict[str, float | bool]] = {
    "default": {"tile_step_size": 0.5, "use_mirroring": True},
    "no_mirroring": {"tile_step_size": 0.5, "use_mirroring": False},
    "fastest": {"tile_step_size": 1.0, "use_mirroring": False},
}

#: Labels of the dataset.json: background + the project's three airway classes.
LABELS: dict[str, int] = {
    "background": 0,
    "trachea_main_bronchi": 1,
    "lobar_to_segmental_bronchi": 2,
    "small_bronchi": 3,
}

#: Foreground intensity statistics (HU) that ``CTNormalization`` reads from the plans.
CT_INTENSITY_PROPERTIES: dict[str, float] = {
    "mean": -600.0,
    "median": -650.0,
    "std": 300.0,
    "min": -1024.0,
    "max": 1500.0,
    "percentile_00_5": -1000.0,
    "percentile_99_5": 200.0,
}

#: Spacing (mm, z y x) the network topology is planned at: near-isotropic chest CT (z 0.5-1.0 mm
#: and xy 0.7-1.0 mm all give the same topology for this patch).  It is fixed so that every
#: input is timed with the same network, whatever its own spacing.
TOPOLOGY_SPACING_ZYX: tuple[float, float, float] = (1.0, 0.78, 0.78)

#: nnU-Net's planner settings for a 3-D U-Net (``ExperimentPlanner.__init__``).
_BASE_FEATURES = 32
_MAX_FEATURES_3D = 320
_CONVS_PER_STAGE = 2
_FEATUREMAP_MIN_EDGE = 4


def _plans(spacing_zyx: Sequence[float]) -> dict:
    """Return an nnU-Net plans dict with one ``3d_fullres`` configuration at ``spacing_zyx``."""
    _, strides, kernels, patch, _ = get_pool_and_conv_props(
        list(TOPOLOGY_SPACING_ZYX), PATCH_ZYX, _FEATUREMAP_MIN_EDGE, 999999
    )
    patch = [int(edge) for edge in patch]
    if tuple(patch) != PATCH_ZYX:
        raise ValueError(f"nnU-Net's topology changed the patch {PATCH_ZYX} to {patch}")
    n_stages = len(strides)
    resampling = {"order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": patch,
        "spacing": [float(s) for s in spacing_zyx],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": [min(_MAX_FEATURES_3D, _BASE_FEATURES * 2**i) for i in range(n_stages)],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [list(k) for k in kernels],
                "strides": [list(s) for s in strides],
                "n_conv_per_stage": [_CONVS_PER_STAGE] * n_stages,
                "n_conv_per_stage_decoder": [_CONVS_PER_STAGE] * (n_stages - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset900_AirwayBaseline",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in spacing_zyx],
        "original_median_shape_after_transp": patch,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITY_PROPERTIES)},
    }


def _dataset_json() -> dict:
    """Return the dataset.json of a one-channel CT airway dataset."""
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }


def count_windows(
    shape_zyx: Sequence[int], patch_zyx: Sequence[int] = PATCH_ZYX, tile_step_size: float = 0.5
) -> int:
    """Return the number of sliding windows nnU-Net predicts for a volume.

    nnU-Net first pads every axis shorter than the patch up to the patch edge
    (``pad_nd_image`` in ``predict_sliding_window_return_logits``), then places windows with
    ``compute_steps_for_sliding_window``.  Each window costs 8 forward passes with mirroring.

    Parameters
    ----------
    shape_zyx : sequence of int
        Shape of the preprocessed volume (the input shape when the target spacing is the
        input spacing and ``crop_to_nonzero`` keeps everything, as for CT).
    patch_zyx : sequence of int
        Patch size.
    tile_step_size : float
        Window step as a fraction of the patch, in (0, 1].

    Returns
    -------
    int
        Number of windows.
    """
    padded = [max(int(s), int(p)) for s, p in zip(shape_zyx, patch_zyx)]
    steps = compute_steps_for_sliding_window(tuple(padded), tuple(patch_zyx), tile_step_size)
    return int(np.prod([len(axis_steps) for axis_steps in steps]))


def build_predictor(
    tile_step_size: float,
    use_mirroring: bool,
    spacing_zyx: Sequence[float],
    num_threads: int | None = None,
    seed: int = 0,
) -> nnUNetPredictor:
    """Return an nnU-Net predictor for the airway ``3d_fullres`` configuration with random weights.

    Parameters
    ----------
    tile_step_size : float
        Sliding-window step as a fraction of the patch (nnU-Net's default is 0.5).
    use_mirroring : bool
        Test-time mirroring over all three axes (8 forward passes per window).
    spacing_zyx : sequence of float
        Target spacing of the plans (mm, z y x); give the input's spacing so nnU-Net's
        resampling keeps the shape.
    num_threads : int, optional
        ``torch.set_num_threads`` value; the number of physical cores when omitted.
    seed : int
        Seed of the weight initialisation.

    Returns
    -------
    nnUNetPredictor
        Initialised on the CPU with ``use_gaussian=True`` and ``allow_tqdm=False``.
    """
    torch.set_num_threads(num_threads or physical_cpu_cores())
    plans_manager = PlansManager(_plans(spacing_zyx))
    configuration_manager = plans_manager.get_configuration("3d_fullres")
    dataset_json = _dataset_json()
    torch.manual_seed(seed)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager,
        configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    predictor = nnUNetPredictor(
        tile_step_size=tile_step_size,
        use_gaussian=True,
        use_mirroring=use_mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        [network.state_dict()],
        dataset_json,
        "nnUNetTrainer",
        inference_allowed_mirroring_axes=(0, 1, 2),
    )
    return predictor


def _central_crop(shape_zyx: Sequence[int], crop_zyx: Sequence[int]) -> tuple[slice, ...]:
    """Return the slices of a central crop, each edge clipped to the volume."""
    slices = []
    for size, want in zip(shape_zyx, crop_zyx):
        edge = min(int(size), int(want))
        start = (int(size) - edge) // 2
        slices.append(slice(start, start + edge))
    return tuple(slices)


def time_nnunet(
    ct_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    setting: str,
    crop_zyx: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] | None = None,
    num_threads: int | None = None,
) -> dict:
    """Time nnU-Net's ``predict_single_npy_array`` on a CT or a central crop of it.

    The time covers nnU-Net's whole in-memory path (preprocessing, sliding window, export to a
    label map at the input shape), not building the predictor.  With a crop, the full-volume
    time is estimated from the window counts of crop and volume.

    Parameters
    ----------
    ct_zyx : numpy.ndarray
        CT in HU, axes (z, y, x).
    spacing_zyx : sequence of float
        Voxel spacing (mm, z y x); also nnU-Net's target spacing.
    setting : str
        A key of :data:`NNUNET_SETTINGS`.
    crop_zyx : tuple of int, optional
        Edge lengths of a central crop to run instead of the whole volume (clipped to it).
    progress : callable, optional
        Called with a short message before and after the prediction.
    num_threads : int, optional
        Torch threads; the number of physical cores when omitted.

    Returns
    -------
    dict
        ``setting``, ``tile_step_size``, ``mirroring``, ``seconds_measured``,
        ``measured_shape_zyx``, ``windows_measured``, ``windows_full``,
        ``seconds_full_estimate`` (scaled by windows), ``seconds_full_estimate_per_voxel``
        (scaled by voxels), ``scaled`` (whether only a crop ran) and ``labels_zyx`` (uint8
        labels of the part that ran).
    """
    if setting not in NNUNET_SETTINGS:
        raise ValueError(f"Unknown setting {setting!r}; choose one of {sorted(NNUNET_SETTINGS)}.")
    if ct_zyx.ndim != 3:
        raise ValueError(f"Expected a 3-D CT (z, y, x) but got shape {ct_zyx.shape}.")
    step = float(NNUNET_SETTINGS[setting]["tile_step_size"])
    mirroring = bool(NNUNET_SETTINGS[setting]["use_mirroring"])
    spacing = [float(s) for s in spacing_zyx]
    part = ct_zyx[_central_crop(ct_zyx.shape, crop_zyx)] if crop_zyx is not None else ct_zyx
    predictor = build_predictor(step, mirroring, spacing, num_threads=num_threads)
    windows_measured = count_windows(part.shape, PATCH_ZYX, step)
    windows_full = count_windows(ct_zyx.shape, PATCH_ZYX, step)
    if progress is not None:
        progress(f"nnU-Net {setting}: {part.shape} zyx, {windows_measured} windows")
    image = np.ascontiguousarray(part, dtype=np.float32)[None]
    start = time.perf_counter()
    labels = predictor.predict_single_npy_array(image, {"spacing": spacing}, None, None, False)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(f"nnU-Net {setting}: {seconds:.1f} s")
    return {
        "setting": setting,
        "tile_step_size": step,
        "mirroring": mirroring,
        "seconds_measured": seconds,
        "measured_shape_zyx": tuple(int(s) for s in part.shape),
        "windows_measured": windows_measured,
        "windows_full": windows_full,
        "seconds_full_estimate": seconds * windows_full / windows_measured,
        "seconds_full_estimate_per_voxel": seconds * ct_zyx.size / part.size,
        "scaled": part.shape != ct_zyx.shape,
        "labels_zyx": np.asarray(labels, dtype=np.uint8),
    }


def _phantom(shape_zyx: Sequence[int], seed: int = 0) -> np.ndarray:
    """Return lung-like noise: -800 HU plus Gaussian noise of 50 HU."""
    rng = np.random.default_rng(seed)
    return (-800.0 + 50.0 * rng.standard_normal(tuple(shape_zyx))).astype(np.float32)


def main() -> None:
    """Time nnU-Net on a CT file or a phantom and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ct", type=Path, help="CT file SimpleITK can read (HU)")
    source.add_argument("--phantom-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="noise volume shape")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.78, 0.78), metavar=("Z", "Y", "X"),
                        help="phantom spacing in mm (default 1.0 0.78 0.78)")
    parser.add_argument("--setting", choices=[*NNUNET_SETTINGS, "all"], default="default")
    parser.add_argument("--crop", type=int, nargs=3, metavar=("Z", "Y", "X"), help="time a central crop only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    args = parser.parse_args()

    if args.ct is not None:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(args.ct))
        ct = sitk.GetArrayFromImage(image).astype(np.float32)
        spacing = tuple(round(float(s), 6) for s in reversed(image.GetSpacing()))
    else:
        ct = _phantom(args.phantom_shape)
        spacing = tuple(args.spacing)
    settings = list(NNUNET_SETTINGS) if args.setting == "all" else [args.setting]
    threads = args.threads or physical_cpu_cores()
    print(f"CT {ct.shape} zyx, spacing {spacing} mm, patch {PATCH_ZYX}, {threads} torch threads")
    print(f"{'setting':<13} {'step':>4} {'mirror':>6} {'measured':>16} {'win':>4} {'s':>8} "
          f"{'win full':>8} {'full s (win)':>12} {'full s (vox)':>12}")
    for setting in settings:
        r = time_nnunet(ct, spacing, setting, tuple(args.crop) if args.crop else None, num_threads=threads)
        print(f"{r['setting']:<13} {r['tile_step_size']:>4} {str(r['mirroring']):>6} "
              f"{'x'.join(map(str, r['measured_shape_zyx'])):>16} {r['windows_measured']:>4} "
              f"{r['seconds_measured']:>8.1f} {r['windows_full']:>8} {r['seconds_full_estimate']:>12.1f} "
              f"{r['seconds_full_estimate_per_voxel']:>12.1f}")


if __name__ == "__main__":
    main()
