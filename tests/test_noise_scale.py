"""The noise scales G of Noise2Grad: the paper's learned 1×1 conv, the spectral gain, the measured spectrum."""

import pytest
import torch

from n2g_ct.methods.noise_scale import (
    BANDS,
    LearnedNoiseScale,
    MeasuredNoiseSpectrum,
    SpectralNoiseGain,
    SyntheticPairs,
    band_filter,
    band_index,
    band_power,
    own_noise_correction,
)
from n2g_ct.models import OFFICIAL_INIT_STD


def _apply(g, n_hat, x=None, pairs=None, fit=False):
    return g(n_hat, n_hat if x is None else x, pairs or SyntheticPairs(n_hat), fit)


def test_the_learned_scale_is_the_papers_initialised_per_pixel_affine_map():
    torch.manual_seed(0)
    g = LearnedNoiseScale(channels=3)
    assert not g.conv.bias.any() and g.conv.weight.abs().max().item() < 6 * OFFICIAL_INIT_STD
    assert g.conv.kernel_size == (1, 1) and sum(p.numel() for p in g.parameters()) == 3 * 3 + 3
    noise = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        expected = torch.einsum("oc,bchw->bohw", g.conv.weight[:, :, 0, 0], noise) + g.conv.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(_apply(g, noise), expected)
    with pytest.raises(ValueError, match=">= 1"):
        LearnedNoiseScale(channels=0)


def test_a_learned_scale_saved_by_an_earlier_release_loads():
    """Earlier checkpoints hold G's weight and bias without the ``conv.`` prefix."""
    g = LearnedNoiseScale()
    g.load_state_dict({"weight": torch.full((1, 1, 1, 1), 0.7), "bias": torch.zeros(1)})
    assert float(g.conv.weight.detach()) == pytest.approx(0.7)


def _gaussian_field(spectrum: torch.Tensor, batch: int, size: int, seed: int) -> torch.Tensor:
    """(batch, 1, size, size) stationary Gaussian fields with the given ``rfft2`` power spectrum."""
    white = torch.fft.rfft2(torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)))
    return torch.fft.irfft2(white * spectrum.sqrt(), s=(size, size))


def test_spectral_gain_restores_the_noise_power_that_a_wiener_filter_leaves_in_the_image():
    """F = the exact Wiener filter of a smooth image in correlated noise: its residual ``n_hat`` is far
    weaker than the noise, in the bands where image and noise compete; the spectral G, fitted on
    ``n_hat`` and ``x`` alone, makes ``n_tilde`` as strong as the noise band by band."""
    size = 64
    radius = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
    signal_spectrum = 1e-3 / (0.01 + radius**2)
    noise_spectrum = 0.02 * torch.exp(-((radius - 0.2) ** 2) / 0.02)  # CT-like: band-pass noise
    signal, noise = (_gaussian_field(s, 64, size, seed) for s, seed in ((signal_spectrum, 1), (noise_spectrum, 2)))
    x = signal + noise
    wiener = signal_spectrum / (signal_spectrum + noise_spectrum)
    n_hat = x - torch.fft.irfft2(torch.fft.rfft2(x) * wiener, s=(size, size))

    gain = SpectralNoiseGain(1)
    torch.testing.assert_close(_apply(gain, n_hat), n_hat - n_hat.mean(dim=(2, 3), keepdim=True))  # unfitted: gain 1
    gain.fit_(n_hat, x, momentum=0.5)  # the first fit sets the averages whatever the momentum
    n_tilde = _apply(gain, n_hat)
    assert float(n_hat.std()) < 0.8 * float(noise.std())
    assert float(n_tilde.std()) == pytest.approx(float(noise.std()), rel=0.05)
    bands = band_index(size, size)
    power = {name: torch.fft.rfft2(z).abs().square().mean(0)[0] for name, z in (("noise", noise), ("n_tilde", n_tilde))}
    peak = int(0.2 / 0.5**0.5 * BANDS)  # below the noise peak each band is lifted to the peak's estimate
    for band in range(peak, BANDS):
        inside = bands == band
        if float(power["noise"][inside].mean()) > 0.1 * float(power["noise"].max()):
            ratio = float(power["n_tilde"][inside].mean() / power["noise"][inside].mean())
            assert ratio == pytest.approx(1.0, rel=0.2), (band, ratio)
    assert int(gain.fits) == 1


def test_spectral_gain_follows_its_moving_average():
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    gain = SpectralNoiseGain(1)
    gain.fit_(0.5 * x, x, momentum=0.1)  # n_hat = x/2: cross/power = 2 in every band with coefficients
    empty = torch.bincount(band_index(16, 16).flatten()[1:], minlength=16) == 0
    assert empty.tolist() == [True] + [False] * 15  # 16² crops: only the zero frequency is that low
    torch.testing.assert_close(gain.cross[0] / gain.power[0], torch.where(empty, 1.0, 2.0))  # an empty band keeps 1
    cross, power = gain.cross.clone(), gain.power.clone()
    gain.fit_(x, x, momentum=0.1)
    torch.testing.assert_close(gain.cross[0, 1:], 0.9 * cross[0, 1:] + 0.1 * (cross[0, 1:] * 2))
    torch.testing.assert_close(gain.power[0, 1:], 0.9 * power[0, 1:] + 0.1 * (power[0, 1:] * 4))


def test_extending_to_low_frequencies_lifts_each_band_to_the_largest_estimate_above_it():
    gain = SpectralNoiseGain(1)
    estimate = [-5.0, -1.0, 2.0, 4.0, 6.0, 5.0, 3.0] + [1.0] * 9  # unreliable (negative) at the lowest bands
    gain.cross.copy_(torch.tensor([estimate]))
    gain.power.fill_(2.0)
    assert (gain.weight**2 * 2.0).squeeze().tolist() == pytest.approx([6.0] * 5 + [5.0, 3.0] + [1.0] * 9)
    assert (SpectralNoiseGain(1).weight == 1).all()  # until the first fit


def _fit_on_rank(rank: int, world_size: int, init_file: str, batches: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gain = SpectralNoiseGain(1)
        gain.fit_(0.5 * batches[rank], batches[rank], momentum=1.0)
        torch.save({"cross": gain.cross, "power": gain.power}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_spectral_gain_fits_the_mean_over_processes_under_ddp(tmp_path):
    batches = torch.randn(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    batches[1] *= 3  # the ranks see batches of different power
    torch.multiprocessing.spawn(_fit_on_rank, args=(2, str(tmp_path / "init"), batches, str(tmp_path / "fit")),
                                nprocs=2)
    alone = [SpectralNoiseGain(1) for _ in range(2)]
    for gain, x in zip(alone, batches, strict=True):
        gain.fit_(0.5 * x, x, momentum=1.0)
    for rank in range(2):
        fitted = torch.load(tmp_path / f"fit.{rank}")
        for name in ("cross", "power"):
            expected = (getattr(alone[0], name) + getattr(alone[1], name)) / 2
            torch.testing.assert_close(fitted[name][0, 1:], expected[0, 1:])  # band 0 of 16² crops is empty


def test_measured_spectrum_gives_each_crop_its_target_power_per_band():
    generator = torch.Generator().manual_seed(0)
    n_hat = torch.randn(3, 1, 64, 64, generator=generator) * torch.tensor([1.0, 0.1, 5.0]).view(3, 1, 1, 1)
    target = torch.rand(3, BANDS, generator=generator) * 1e-4
    shaped = _apply(MeasuredNoiseSpectrum(), n_hat, pairs=SyntheticPairs(n_hat, target))
    torch.testing.assert_close(band_power(shaped)[:, 0], target, rtol=1e-3, atol=1e-9)
    assert shaped.mean(dim=(-2, -1)).abs().max() < 1e-6, "no mean: the zero frequency gets no power"


def test_own_noise_correction_makes_the_target_uncorrelated_with_the_noise_in_the_input():
    """With y = s + e (own noise, power E_e) and z = y + n (power E_n), the corrected target
    y − (E_e/E_n)·n differs from s by noise uncorrelated with z, so F fitted to it estimates s; the
    plain target y keeps a share of the input's noise."""
    generator = torch.Generator().manual_seed(1)
    shape = (64, 1, 32, 32)
    e = torch.randn(shape, generator=generator) * 0.03
    n = torch.randn(shape, generator=generator) * 0.05
    bands = BANDS
    power, correction = own_noise_correction(torch.full((64, bands), 0.05**2 + 0.03**2), torch.full((64, bands), 0.03**2))
    torch.testing.assert_close(power, torch.full_like(power, 0.05**2))
    target_noise = e - band_filter(n, correction)  # t − s
    input_noise = e + n  # z − s
    def correlation(a, b):
        return float((a * b).mean() / (a.std() * b.std()))
    assert abs(correlation(target_noise, input_noise)) < 0.02
    assert correlation(e, input_noise) > 0.4, "the plain target's noise follows the input's"


def test_own_noise_correction_leaves_bands_the_clean_image_is_too_noisy_for():
    power, correction = own_noise_correction(torch.tensor([[1.0, 1.2, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
    assert power.tolist() == [[0.0, 0.0, 2.0]] and correction.tolist() == [[0.0, 0.0, 0.5]]


