"""Stage-1 networks: registry, shapes, outputs, size, bf16/channels-last, determinism, overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from AirwaySegmentationLib.losses import (
    AttentionDistillationLoss,
    DeepTreeLoss,
    DiceFocalLoss,
)
from AirwaySegmentationLib.networks import NETWORKS, SegmentationOutput, build_network
from AirwaySegmentationLib.networks.fr_unet import FeatureRecalibration
from AirwaySegmentationLib.networks.pwfr_unet import PointwiseRecalibration
from AirwaySegmentationLib.networks.wingsnet import SideOutputFusion

#: Tiny configurations so the whole file runs in seconds on two cores.
TINY = {
    "wingsnet": {"base_width": 4},
    "fr_unet": {"base_width": 4, "max_width": 16, "patch_size": (32, 32, 32)},
    "pwfr_unet": {"base_width": 4, "max_width": 16},
    # Stage 2's U-Net, here with the stage-1 shape (4 classes, 4 poolings) so the shared checks
    # apply; its own shape (2 channels in and out, 3 poolings) is tested in test_connect.py.
    "unet": {"base_width": 4, "max_width": 16, "out_channels": 4, "depth": 4},
}
MAX_PARAMETERS = 5_000_000  # <= ~20 MB of float32 weights


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(name, **TINY[name])


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_registry_builds_every_network_and_names_the_known_ones():
    assert set(NETWORKS) == set(TINY)
    with pytest.raises(ValueError, match="fr_unet, pwfr_unet, unet, wingsnet"):
        build_network("vnet")


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_default_network_size(name):
    count = parameter_count(build_network(name))
    print(f"{name}: {count:,} parameters ({4 * count / 2**20:.1f} MiB float32)")
    assert 100_000 < count <= MAX_PARAMETERS


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 32, 64)])
def test_output_shapes(name, shape):
    net = tiny(name)
    out = net.eval()(torch.randn(2, 2, *shape))
    assert isinstance(out, SegmentationOutput)
    assert out.main.shape == (2, 4, *shape)
    if name == "wingsnet":  # group supervision: output 0 (encoder) beside output 1 (decoder), in training only
        assert out.aux == () and out.features == ()
        training = net.train()(torch.randn(2, 2, *shape))
        assert len(training.aux) == 1 and training.aux[0].shape == (2, 4, *shape)
    else:  # four decoder scales, coarse to fine, for attention distillation
        assert out.aux == ()
        assert [f.shape[2:] for f in out.features] == [
            tuple(s // 2**level for s in shape) for level in (3, 2, 1, 0)
        ]


def test_out_channels_and_in_channels_are_configurable():
    net = build_network("wingsnet", in_channels=1, out_channels=2, base_width=4).eval()
    assert net(torch.zeros(1, 1, 16, 16, 16)).main.shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_bfloat16_autocast_channels_last_forward(name):
    net = tiny(name).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        reference = net(x).main
        net = net.to(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            fast = net(x.to(memory_format=torch.channels_last_3d)).main
    assert fast.dtype == torch.bfloat16 and torch.isfinite(fast).all()
    assert (fast.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_eval_mode_is_deterministic(name):
    net = tiny(name).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x).main, net(x).main)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_networks_reject_bad_input(name):
    net = tiny(name)
    with pytest.raises(ValueError, match="input of shape"):
        net(torch.zeros(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.zeros(1, 2, 32, 32, 36))


def test_network_arguments_are_validated():
    with pytest.raises(ValueError, match="base_width"):
        build_network("wingsnet", base_width=0)
    with pytest.raises(ValueError, match="patch_size"):
        build_network("fr_unet", patch_size=(100, 128, 128))
    with pytest.raises(ValueError, match="dropout"):
        build_network("wingsnet", dropout=1.0)


def test_side_output_fusion_equals_upsample_concatenate_convolve():
    torch.manual_seed(0)
    fusion = SideOutputFusion(side_channels=10, out_channels=2, dropout=0.3).eval()
    sides = [
        [torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 8, 8, 8)],
        [torch.randn(1, 2, 4, 4, 4)],
        [torch.randn(1, 2, 2, 2, 2), torch.randn(1, 2, 2, 2, 2)],
    ]
    upsampled = [
        torch.nn.functional.interpolate(side, size=(8, 8, 8), mode="trilinear", align_corners=False)
        for scale in sides
        for side in scale
    ]
    expected = fusion.conv(torch.cat(upsampled, dim=1))
    torch.testing.assert_close(fusion(sides, (8, 8, 8)), expected)


def test_feature_recalibration_follows_qin_eqs_1_to_5():
    torch.manual_seed(0)
    module = FeatureRecalibration(channels=4, slice_counts=(3, 4, 5))
    with torch.no_grad():
        for weight in (module.depth_weight, module.height_weight, module.width_weight):
            weight.normal_()
    a = torch.randn(2, 4, 3, 4, 5)
    d, h, w = module.depth_weight, module.height_weight, module.width_weight
    spatial = (
        torch.einsum("ncdhw,h,w->ncd", a, h, w)[:, :, :, None, None]  # eq. 2
        + torch.einsum("ncdhw,d,w->nch", a, d, w)[:, :, None, :, None]  # eq. 3
        + torch.einsum("ncdhw,d,h->ncw", a, d, h)[:, :, None, None, :]  # eq. 4
    )  # eq. 1
    excitation = module.excitation
    expected = a * torch.sigmoid(excitation[2](torch.relu(excitation[0](spatial))))  # eq. 5
    torch.testing.assert_close(module(a), expected)


def test_feature_recalibration_interpolates_its_slice_weights_for_other_sizes():
    torch.manual_seed(0)
    module = FeatureRecalibration(channels=4, slice_counts=(8, 8, 8)).eval()
    # The slice weights start as means, so a constant feature gives the same gate at any size.
    small = module(torch.ones(1, 4, 8, 8, 8))
    large = module(torch.ones(1, 4, 12, 16, 8))
    torch.testing.assert_close(small[..., :1, :1, :1], large[..., :1, :1, :1])
    assert len(list(module.parameters())) == 3 + 4  # d, h, w + two 1x1x1 convs


def test_pointwise_recalibration_gates_by_competition_between_channels():
    module = PointwiseRecalibration(channels=4)
    last = module.excitation[2]
    torch.nn.init.zeros_(last.weight)
    # Equal excitation for all channels: none is competitive, every gate is sigmoid(0).
    torch.nn.init.constant_(last.bias, 3.0)
    x = torch.randn(1, 4, 4, 4, 4)
    torch.testing.assert_close(module(x), 0.5 * x)
    # One channel above the others is kept, the others suppressed.
    with torch.no_grad():
        last.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    gate = module(torch.ones(1, 4, 2, 2, 2))[0, :, 0, 0, 0]
    assert gate[0] > 0.9 and torch.all(gate[1:] < 0.5)


def synthetic_tube_case() -> tuple[torch.Tensor, torch.Tensor]:
    """A 32^3 two-channel 'CT' with a bright tube of three classes along x, and its labels."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices((32, 32, 32))
    radius = np.hypot(z - 16, y - 16)
    label = np.zeros((32, 32, 32), dtype=np.int64)
    label[radius <= 4] = 1
    label[(radius <= 2.5) & (x >= 12)] = 2
    label[(radius <= 1.5) & (x >= 22)] = 3
    label[(x < 3) | (x > 28)] = 0
    image = np.where(label > 0, 1.0, -1.0) + rng.normal(0, 0.3, label.shape)
    image = torch.from_numpy(np.stack([image, np.tanh(image)])).float()[None]
    return image, torch.from_numpy(label)[None]


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_few_steps_on_one_tube_reduce_the_loss(name):
    image, label = synthetic_tube_case()
    net = tiny(name).train()
    segmentation = DeepTreeLoss() if name == "wingsnet" else DiceFocalLoss()
    distillation = AttentionDistillationLoss(channel=name == "pwfr_unet")
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)

    def total_loss() -> torch.Tensor:
        out = net(image)
        loss = segmentation(out.main, label) + sum(segmentation(aux, label) for aux in out.aux)
        distilled = out.features and name != "unet"  # stage 2's U-Net is trained without distillation
        return loss + (distillation(out.features) if distilled else 0.0)

    torch.manual_seed(0)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = total_loss()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.95 * losses[0], losses
