"""Seconds per training iteration of the stage-1 networks, to plan a training run.

One iteration is what :func:`AirwaySegmentationLib.train.train` does per step: forward under
autocast, the configured loss (DeepTree loss in its last phase, group supervision and
attention distillation as the example configs set them), backward, AdamW step.  The patch is
a real training patch of a phantom (labels and loss weights included) so the loss does its
real work; patch preparation itself runs in a DataLoader worker during training and is
timed separately.  Each network and precision is timed after ``--warmup`` iterations.

Run: ``python benchmarks/bench_train.py [--patch 128] [--iterations 3] [--networks wingsnet fr_unet]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from AirwaySegmentationLib.data import phantom_training_volume
from AirwaySegmentationLib.infer import autocast, cpu_has_native_bfloat16
from AirwaySegmentationLib.networks import build_network
from AirwaySegmentationLib.sampling import PatchDataset, PatchSampler
from AirwaySegmentationLib.train import TrainingLoss
from AirwaySegmentationLib.train_config import LossConfig, ScheduleConfig


def _kwargs(name: str, patch: int) -> dict:
    return {"patch_size": (patch,) * 3} if name == "fr_unet" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--networks", nargs="+", default=["wingsnet", "fr_unet"])
    parser.add_argument("--precisions", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()

    volume = phantom_training_volume(1, shape_zyx=(160, 192, 192))
    dataset = PatchDataset([volume], PatchSampler((args.patch,) * 3), seed=0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    item = dataset.item(rng)
    print(f"patch preparation (sampling, augmentation, loss weights): {time.perf_counter() - started:.2f} s")
    batch = {key: value[None] for key, value in item.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bfloat16()}")
    device = torch.device("cpu")
    for name in args.networks:
        for precision in args.precisions:
            torch.manual_seed(0)
            model = build_network(name, **_kwargs(name, args.patch)).to(memory_format=torch.channels_last_3d)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            loss_fn = TrainingLoss(LossConfig(distillation_weight=0.1 if name != "wingsnet" else 0.0), ScheduleConfig())
            dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[precision]
            image = batch["image"].contiguous(memory_format=torch.channels_last_3d)
            times = []
            for iteration in range(args.warmup + args.iterations):
                started = time.perf_counter()
                with autocast(device, dtype):
                    output = model(image)
                terms = loss_fn(output, batch, iteration=10_000)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                times.append(time.perf_counter() - started)
            measured = times[args.warmup :]
            print(
                f"{name:9s} {precision:9s} patch {args.patch}^3 batch 1: {np.mean(measured):6.2f} s/iteration "
                f"(min {min(measured):.2f}, loss {float(terms.total.detach()):.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
