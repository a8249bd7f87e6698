"""Stage-1 inference speed and memory on whole CTs, against the machine's conv3d peak and nnU-Net v2.

For each CT (a 512 x 512 x 400 phantom, a 512 x 512 x 600 phantom for the memory bound, and
the real scan ``../shared/data/realct/lidc-idri-0314/ct.nii.gz``) it prints:

- wall time per step of ``airway segment`` (read, crop, input, network, post-processing,
  write) and end to end, peak RSS and megavoxels per second of CT; each CT runs in a fresh
  process, so the peak RSS is that run's alone;
- the conv3d throughput the network reaches: the FLOPs of its convolutions (counted with
  ``torch.utils.flop_counter`` on one window) over the network time, and over the time the
  profiler puts in the convolution kernels alone, against the machine's conv3d peak measured
  in the same run (the best of 3x3x3 convolutions at 16, 32 and 64 channels, same precision
  and layout);
- nnU-Net v2's own predictor (``nnunet_baseline.py``, needs ``nnunetv2``: run this script in
  the environment described there) with an airway-sized 3d_fullres plan and random weights,
  in its default setting (tile step 0.5, mirroring), without mirroring, and at its fastest
  (step 1.0, no mirroring).  A full nnU-Net run takes hours here, so it is timed on one
  window-sized central crop (128 x 160 x 112) and scaled by the number of windows nnU-Net
  uses on the whole CT (nnU-Net predicts every voxel: air around the body is not 0 HU, so its
  crop to non-zero keeps the whole volume); the per-voxel scaling is printed beside it.

The network's speed does not depend on its weights: without ``--model`` (and no bundled model)
a randomly initialised WingsNet of the bundled size is timed.

Run::

    python benchmarks/bench_inference.py [--model NAME_OR_PATH] [--cases phantom lidc] [--no-nnunet]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from AirwaySegmentationLib.data import phantom_seeds
from AirwaySegmentationLib.infer import autocast, cpu_has_native_bfloat16, physical_cpu_cores, resolve_precision
from AirwaySegmentationLib.inference_settings import InferenceSettings
from AirwaySegmentationLib.catalogue import catalogue, default_model_name
from AirwaySegmentationLib.models import export_model
from AirwaySegmentationLib.networks import build_network
from AirwaySegmentationLib.preprocess import DEFAULT_INPUT_SPEC
from AirwaySegmentationLib.segment import load_segmentation_model, segment_file
from AirwaySegmentationLib.volume import read_volume

REPOSITORY = Path(__file__).resolve().parents[1]
REAL_CT = REPOSITORY.parent / "shared" / "data" / "realct" / "lidc-idri-0314" / "ct.nii.gz"
#: The phantoms timed: the issue's 512 x 512 x 400 case and its 512 x 512 x 600 memory case.
PHANTOM_SHAPES_ZYX = {"phantom": (400, 512, 512), "phantom600": (600, 512, 512)}
NNUNET_CROP_ZYX = (128, 160, 112)


def _random_model(folder: Path) -> str:
    """A randomly initialised WingsNet of the bundled size, exported like a trained one."""
    torch.manual_seed(0)
    network = build_network("wingsnet", base_width=16)
    card = {
        "architecture": {"name": "wingsnet", "kwargs": {"base_width": 16}},
        "input_spec": DEFAULT_INPUT_SPEC.as_dict(),
        "patch_size_zyx": [128, 128, 128],
        "training": "none: random weights, for timing only",
    }
    weights, _ = export_model(network, card, folder / "random_wingsnet")
    return str(weights)


def _phantom_file(folder: Path, shape_zyx: tuple[int, int, int]) -> Path:
    """A held-out phantom CT (test-split seed) written as NIfTI, so reading it is timed too."""
    from AirwaySegmentationLib.phantom import generate_phantom
    from AirwaySegmentationLib.volume import write_volume

    phantom = generate_phantom(seed=phantom_seeds("test", 1)[0], shape_zyx=shape_zyx, variant="standard")
    return write_volume(phantom.ct, folder / f"phantom_{'x'.join(map(str, shape_zyx))}.nii.gz")


def conv3d_peak(dtype: torch.dtype, channels_last: bool, edge: int = 96) -> float:
    """Best GFLOP/s of a 3x3x3 convolution (16, 32 or 64 channels in and out) on this machine."""
    best = 0.0
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    for channels in (16, 32, 64):
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(memory_format=layout)
        x = torch.rand(1, channels, edge, edge, edge).contiguous(memory_format=layout)
        flops = 2 * 27 * channels * channels * edge**3
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            conv(x)
            start = time.perf_counter()
            for _ in range(3):
                conv(x)
            seconds = (time.perf_counter() - start) / 3
        best = max(best, flops / seconds / 1e9)
    return best


def conv_flops_and_kernel_share(network: torch.nn.Module, window_zyx: tuple[int, int, int], dtype: torch.dtype) -> tuple[float, float]:
    """Convolution FLOPs of one window and the seconds the profiler puts in convolution kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    network = network.eval().to(memory_format=torch.channels_last_3d)
    x = torch.rand(1, 2, *window_zyx).contiguous(memory_format=torch.channels_last_3d)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode():
        with counter:
            network(x)
        conv_flops = sum(
            count for op, count in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)
        )
        with autocast(torch.device("cpu"), dtype):
            network(x)
            with torch.profiler.profile() as profile:
                network(x)
    kernel_us = sum(e.self_cpu_time_total for e in profile.key_averages() if "convolution" in e.key and "mkldnn" in e.key)
    return float(conv_flops), kernel_us / 1e6


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` of its own address space.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``exec`` from the parent, so a
    child started by a parent that held a 512 x 512 x 600 phantom would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _one_case(ct_path: str, model: str, out_dir: str) -> None:
    """Child process: segment one CT and print its timings, info and peak RSS as JSON."""
    start = time.perf_counter()
    info = segment_file(ct_path, out_dir, model, InferenceSettings())
    info["end_to_end_s"] = time.perf_counter() - start
    info["peak_rss_gb"] = _peak_rss_bytes() / 2**30
    print("RESULT " + json.dumps(info))


def _run_case(ct_path: Path, model: str, out_dir: Path) -> dict:
    command = [sys.executable, __file__, "--one-case", str(ct_path), model, str(out_dir)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in finished.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _nnunet(ct_path: Path) -> list[dict] | str:
    try:
        import nnunet_baseline
    except ModuleNotFoundError as error:
        return f"skipped ({error.name} is not installed; see benchmarks/nnunet_baseline.py)"
    ct = read_volume(ct_path)
    results = []
    for setting in ("fastest", "no_mirroring", "default"):
        result = nnunet_baseline.time_nnunet(ct.array_zyx.astype(np.float32), ct.spacing_zyx, setting, NNUNET_CROP_ZYX)
        result.pop("labels_zyx")
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: bundled default, else random WingsNet)")
    parser.add_argument("--cases", nargs="+", choices=(*PHANTOM_SHAPES_ZYX, "lidc"), default=[*PHANTOM_SHAPES_ZYX, "lidc"])
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnU-Net comparison")
    parser.add_argument("--one-case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_case:
        _one_case(*args.one_case)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    threads = physical_cpu_cores()
    torch.set_num_threads(threads)
    dtype = resolve_precision("auto", torch.device("cpu"))
    print(f"CPU: {threads} physical cores, native bfloat16: {cpu_has_native_bfloat16()}, precision {dtype}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or (default_model_name() if catalogue() else _random_model(tmp))
        print(f"model: {model}")
        network = load_segmentation_model(model).network
        peak = conv3d_peak(dtype, channels_last=True)
        print(f"conv3d peak ({dtype}, channels-last, 3x3x3): {peak:.0f} GFLOP/s")
        cases = {}
        for case, shape in PHANTOM_SHAPES_ZYX.items():
            if case in args.cases:
                cases[f"phantom {'x'.join(map(str, shape))}"] = _phantom_file(tmp, shape)
        if "lidc" in args.cases:
            cases["LIDC-0314"] = REAL_CT
        for name, path in cases.items():
            result = _run_case(path, model, tmp / "out" / name.replace(" ", "_"))
            timings = result["timings_s"]
            voxels = int(np.prod(result["shape_zyx"]))
            window = tuple(result["window_zyx"])
            conv_flops, kernel_s = conv_flops_and_kernel_share(network, window, dtype)
            network_gflops = conv_flops * result["windows"] / timings["network"] / 1e9
            kernel_gflops = conv_flops / kernel_s / 1e9
            print(f"\n{name}: {'x'.join(map(str, result['shape_zyx']))} zyx, crop {result['crop_box_zyx']}, "
                  f"{result['windows']} windows of {'x'.join(map(str, window))}, device {result['device']}, {result['precision']}")
            print("  " + ", ".join(f"{step} {seconds:.2f} s" for step, seconds in timings.items()))
            print(f"  end to end {result['end_to_end_s']:.1f} s, {voxels / 1e6 / result['end_to_end_s']:.2f} Mvox/s of CT, "
                  f"network {result['network_voxels'] / 1e6 / timings['network']:.2f} Mvox/s of windows, "
                  f"peak RSS {result['peak_rss_gb']:.2f} GB")
            print(f"  conv3d: {network_gflops:.0f} GFLOP/s over the network time ({100 * network_gflops / peak:.0f}% of peak), "
                  f"{kernel_gflops:.0f} GFLOP/s in the convolution kernels ({100 * kernel_gflops / peak:.0f}% of peak)")
            if args.no_nnunet:
                continue
            nnunet = _nnunet(path)
            if isinstance(nnunet, str):
                print(f"  nnU-Net: {nnunet}")
                continue
            for r in nnunet:
                print(f"  nnU-Net {r['setting']:<13} step {r['tile_step_size']}, mirroring {r['mirroring']}: "
                      f"{r['seconds_measured']:.1f} s on a {'x'.join(map(str, r['measured_shape_zyx']))} crop "
                      f"({r['windows_measured']} window) -> {r['windows_full']} windows on the CT: "
                      f"{r['seconds_full_estimate'] / 60:.1f} min (per voxel: {r['seconds_full_estimate_per_voxel'] / 60:.1f} min); "
                      f"ours is {r['seconds_full_estimate'] / result['end_to_end_s']:.1f}x faster")


if __name__ == "__main__":
    main()
