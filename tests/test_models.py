"""The denoiser U-Net F."""

import pytest
import torch
from torch import nn

from n2g_ct.models import OFFICIAL_INIT_STD, UNet, build_denoiser


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def _conv_parameters(layers):
    """Parameters of 3×3 convs with bias, given (in, out) channels."""
    return sum(cin * cout * 9 + cout for cin, cout in layers)


def _official_layers(channels):
    """(in, out) of every conv of the official `denoisenet(feature_num=32)` F, in order."""
    return [
        (channels, 32), (32, 32),  # inc
        (32, 64), (64, 64),  # down1
        (64, 128), (128, 128),  # down2
        (128, 128), (128, 128),  # down3
        (128 + 128, 64), (64, 64),  # up1
        (64 + 64, 32), (32, 32),  # up2
        (32 + 32, 32), (32, 32),  # up3
        (32, channels),  # outc (3×3 in the official code)
    ]  # fmt: skip


class _OfficialDenoiser(nn.Module):
    """Independent re-statement of the official F (3 levels, widths 32-64-128-128)."""

    def __init__(self, channels):
        super().__init__()
        layers = _official_layers(channels)
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in layers)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def _double(self, index, x):
        return torch.relu(self.convs[index + 1](torch.relu(self.convs[index](x))))

    def forward(self, x):
        x1 = self._double(0, x)
        x2 = self._double(2, self.pool(x1))
        x3 = self._double(4, self.pool(x2))
        x4 = self._double(6, self.pool(x3))
        u = self._double(8, torch.cat([x3, self.up(x4)], 1))
        u = self._double(10, torch.cat([x2, self.up(u)], 1))
        u = self._double(12, torch.cat([x1, self.up(u)], 1))
        return self.convs[14](u)


@pytest.mark.parametrize("channels, expected", [(1, 840_193), (3, 841_347)])
def test_parameter_count_matches_the_official_network(channels, expected):
    model = build_denoiser(in_channels=channels)
    count = sum(p.numel() for p in model.parameters())
    assert count == _conv_parameters(_official_layers(channels)) == expected
    assert count == pytest.approx(0.84e6, rel=0.01)


def test_forward_matches_the_official_architecture():
    # PyTorch's default init (not the official N(0, 0.02²)) so that the deep path visibly matters.
    model = UNet(in_channels=3).double()
    reference = _OfficialDenoiser(channels=3).double()
    with torch.no_grad():
        for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            theirs.copy_(ours)
        image = torch.rand(2, 3, 32, 40, dtype=torch.float64)
        torch.testing.assert_close(model(image), reference(image), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "channels, height, width",
    [(1, 512, 512), (1, 97, 131), (3, 33, 17), (1, 5, 3), (3, 1, 1)],
)
def test_output_has_the_input_shape_for_any_size(channels, height, width):
    model = build_denoiser(in_channels=channels)
    with torch.no_grad():
        output = model(torch.rand(1, channels, height, width))
    assert output.shape == (1, channels, height, width)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_depth_and_width_are_configurable(depth):
    model = build_denoiser(in_channels=3, out_channels=1, base_width=4, depth=depth)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 4 * depth + 3
    with torch.no_grad():
        assert model(torch.rand(2, 3, 19, 23)).shape == (2, 1, 19, 23)


@pytest.mark.parametrize("height, width", [(16, 16), (97, 131), (7, 3)])
def test_padding_is_cropped_back_in_place(height, width):
    """A U-Net wired to pass channel 0 through its top skip returns the input pixel for pixel."""
    model = UNet(in_channels=1, base_width=4, depth=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for conv in (*model.encoder[0][::2], *model.decoder[-1][::2], model.head):
            conv.weight[0, 0, 1, 1] = 1.0  # centre tap; decoder input channel 0 is the skip
        image = torch.rand(2, 1, height, width)  # ≥ 0, so the ReLUs pass it unchanged
        torch.testing.assert_close(model(image), image)


def test_no_normalisation_layers_and_only_convolutions_learn():
    model = build_denoiser()
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in model.modules())
    learning = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert learning and all(isinstance(m, nn.Conv2d) for m in learning)


def test_builders_apply_the_official_initialisation():
    model = build_denoiser()
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert weights.std().item() == pytest.approx(OFFICIAL_INIT_STD, rel=0.01)
    assert weights.mean().abs().item() < 1e-3
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, nn.Conv2d))



@pytest.mark.parametrize(
    "build",
    [
        lambda: build_denoiser(depth=0),
        lambda: build_denoiser(base_width=0),
        lambda: build_denoiser(in_channels=1.5),
    ],
)
def test_bad_arguments_raise_clear_errors(build):
    with pytest.raises(ValueError, match=">= 1"):
        build()


def test_residual_denoiser_starts_close_to_the_identity_but_removes_something():
    torch.manual_seed(0)
    network = build_denoiser(1, 1, base_width=4, depth=2, residual=True)
    image = torch.rand(2, 1, 19, 23)
    removed = (image - network(image)).detach()
    assert 0 < removed.abs().max() < 0.01  # in [0, 1] units: under 41 HU of a 4096 HU window
    with pytest.raises(ValueError, match="residual UNet needs out_channels == in_channels"):
        build_denoiser(1, 3, residual=True)


def _residual_pair(busy: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A plain residual U-Net whose head adds 0.05 (205 HU) everywhere, and the same weights with a
    local-mean-free residual; ``busy``: random convolutions, else all-zero weights."""
    plain = build_denoiser(1, 1, base_width=4, depth=2, residual=True)
    for layer in plain.modules():
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight) if busy else torch.nn.init.zeros_(layer.weight)
    with torch.no_grad():
        plain.head.bias.fill_(0.05)
    constrained = build_denoiser(1, 1, base_width=4, depth=2, residual=True, local_mean_px=4.0)
    constrained.load_state_dict(plain.state_dict())
    return plain, constrained


def test_local_mean_residual_cannot_shift_ct_numbers_but_still_changes_detail():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        plain, constrained = _residual_pair(busy=False)
        assert torch.allclose(plain(image) - image, torch.full_like(image, 0.05), atol=1e-6)
        assert (constrained(image) - image).abs().max() < 1e-6  # the 205 HU shift is gone
        small = image[..., :8, :8]  # smaller than the Gaussian's support
        assert (constrained(small) - small).abs().max() < 1e-6
        plain, constrained = _residual_pair(busy=True)
        detail = plain(image) - image
        kept = constrained(image) - image
    assert torch.corrcoef(torch.stack([kept.flatten(), detail.flatten()]))[0, 1] > 0.8  # fine detail passes
    with pytest.raises(ValueError, match="local_mean_px"):
        build_denoiser(1, 1, residual=True, local_mean_px=-1.0)
