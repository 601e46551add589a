"""The Noise2Grad step: update-delay schedule, detail destruction, losses, variants and ablations."""

import dataclasses
import doctest
import math

import pytest
import torch

import n2g_ct.noise2grad
from n2g_ct.losses import gradient_loss
from n2g_ct.models import MeasuredNoiseSpectrum, SpectralNoiseGain, build_denoiser, build_noise_approximator
from n2g_ct.models.noise_approx import band_filter, band_power
from n2g_ct.noise2grad import (
    VARIANTS,
    Noise2GradOptions,
    detail_destruction_mask,
    envelope_scramble,
    fit_noise_scale_,
    noise2grad_step,
    noise2noise_step,
    own_noise_correction,
    self_paired,
    phase_scramble,
    random_noise_gain,
    split_scramble,
    supervised_step,
    update_delay,
    uses_gradient_loss,
)

SHAPE = (2, 1, 16, 16)
FAITHFUL = Noise2GradOptions(variant="faithful")


def faithful(**changes) -> Noise2GradOptions:
    return dataclasses.replace(FAITHFUL, **changes)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def models():
    """Tiny F and G; G starts as the identity so that the synthetic noise is clearly visible."""
    return build_denoiser(base_width=4, depth=2), build_noise_approximator(init_scale=1.0)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    clean_for_noisy = torch.rand(SHAPE, generator=generator)
    x = (clean_for_noisy + 0.1 * torch.randn(SHAPE, generator=generator)).clamp(0, 1)
    y = torch.rand(SHAPE, generator=generator)
    return x, y


def _run(models, batch, step, options=FAITHFUL, seed=7):
    return noise2grad_step(*models, *batch, step, options, torch.Generator().manual_seed(seed))


def test_docstring_examples():
    assert doctest.testmod(n2g_ct.noise2grad, raise_on_error=True).attempted >= 2


def test_update_delay_schedule():
    assert [update_delay(t) for t in (1, 2, 499)] == [1, 1, 1]
    assert [update_delay(t) for t in (500, 999, 1000, 1499, 1500)] == [2, 2, 3, 3, 4]
    # The period scales the schedule: τ(k·period) == τ(k·500) with the default period.
    for period in (1, 7, 40):
        assert [update_delay(k * period, period) for k in range(1, 6)] == [2, 3, 4, 5, 6]
        assert [update_delay(k * period - 1, period) for k in range(2, 6)] == [2, 3, 4, 5]


def test_gradient_loss_schedule():
    assert all(uses_gradient_loss(t) for t in range(1, 500))  # τ = 1
    assert [uses_gradient_loss(t) for t in (500, 501, 502, 999)] == [True, False, True, False]
    assert [uses_gradient_loss(t) for t in (1000, 1001, 1002)] == [False, False, True]  # τ = 3
    assert all(uses_gradient_loss(t, 500, delay_enabled=False) for t in range(1, 2001))


@pytest.mark.parametrize("bad", [0, -3, 1.0, True])
def test_schedule_rejects_bad_steps_and_periods(bad):
    with pytest.raises(ValueError, match="step .* must be an integer >= 1"):
        uses_gradient_loss(bad)
    with pytest.raises(ValueError, match="period .* must be an integer >= 1"):
        update_delay(1, bad)


def test_mask_is_balanced_signs():
    mask = detail_destruction_mask((4, 1, 500, 500), torch.Generator().manual_seed(0))
    assert mask.shape == (4, 1, 500, 500) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {-1.0, 1.0}
    # Mean of n = 10⁶ fair signs has standard deviation 1/√n = 0.001: allow 5σ.
    assert abs(mask.mean().item()) < 5 / math.sqrt(mask.numel())


def test_mask_is_independent_per_sample_and_pixel():
    mask = detail_destruction_mask((2, 1, 300, 300), torch.Generator().manual_seed(0)).flatten(1)
    bound = 5 / math.sqrt(mask.shape[1])
    assert abs((mask[0] * mask[1]).mean().item()) < bound  # samples uncorrelated
    assert abs((mask[0, 1:] * mask[0, :-1]).mean().item()) < bound  # neighbours uncorrelated


def test_mask_is_reproducible_and_uses_only_its_generator():
    global_state = torch.get_rng_state()
    first = detail_destruction_mask(SHAPE, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first, detail_destruction_mask(SHAPE, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, detail_destruction_mask(SHAPE, torch.Generator().manual_seed(4)))


def test_faithful_variant_is_the_paper_and_default_is_the_toolkits():
    paper = dict(period=500, detail_destruction=True, update_delay=True, destruction="sign",
                 grad_into_denoiser=True, noise_scale="learned", freeze_extractor=1.0, noise_gain=1.0)
    assert all(getattr(FAITHFUL, name) == value for name, value in paper.items())
    assert not FAITHFUL.freezes_extractor
    default = Noise2GradOptions()
    assert (default.variant, default.destruction, default.grad_into_denoiser, default.noise_scale,
            default.freeze_extractor, default.noise_gain) == ("default", "phase", False, "measured", 1.0, 1.0)
    robust = Noise2GradOptions(variant="robust")
    assert robust == dataclasses.replace(default, variant="robust", noise_gain=3.0)
    assert Noise2GradOptions(variant="robust", freeze_extractor=0.25).freeze_step(100) == 25
    assert Noise2GradOptions(variant="faithful", destruction="phase").destruction == "phase"  # set ones override
    assert set(VARIANTS) == {"default", "faithful", "robust"}


def test_bad_options_raise():
    with pytest.raises(ValueError, match="period .* >= 1"):
        Noise2GradOptions(period=0)
    with pytest.raises(ValueError, match="period"):
        Noise2GradOptions(period=2.5)
    with pytest.raises(ValueError, match="detail_destruction must be true or false"):
        Noise2GradOptions(detail_destruction="yes")
    with pytest.raises(ValueError, match="variant must be one of faithful, default"):
        Noise2GradOptions(variant="paper")
    with pytest.raises(ValueError, match="destruction must be one of sign, phase, envelope, split"):
        Noise2GradOptions(destruction="blocks")
    with pytest.raises(ValueError, match="noise_reuse"):
        Noise2GradOptions(noise_reuse=0)
    with pytest.raises(ValueError, match="scale_momentum"):
        Noise2GradOptions(scale_momentum=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Noise2GradOptions().period = 3


def test_step_rejects_mismatched_batches(models, batch):
    x, y = batch
    with pytest.raises(ValueError, match="same shape|one shape"):
        noise2grad_step(*models, x, y[:1], 1, FAITHFUL, torch.Generator())


@pytest.mark.parametrize(
    "options, expected",
    [
        (faithful(period=3), {1, 2, 4, 6}),  # τ = 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5
        (faithful(period=3, update_delay=False), set(range(1, 13))),
        (FAITHFUL, set(range(1, 13))),
    ],
)
def test_gradient_loss_applied_on_exactly_the_scheduled_steps(models, batch, options, expected):
    scheduled = set()
    for step in range(1, 13):
        result = _run(models, batch, step, options)
        if result.grad_loss is not None:
            scheduled.add(step)
            torch.testing.assert_close(result.loss.detach(), result.denoise_loss + result.grad_loss)
        else:
            torch.testing.assert_close(result.loss.detach(), result.denoise_loss)
    assert scheduled == expected


def test_synthetic_image_is_clean_plus_masked_extracted_noise(models, batch):
    x, y = batch
    result = _run(models, batch, step=1, seed=11)
    n_tilde, x_s = result.images["n_tilde"], result.images["x_s"]
    mask = detail_destruction_mask(SHAPE, torch.Generator().manual_seed(11))
    torch.testing.assert_close(x_s, (y + n_tilde * mask).clamp(0, 1))
    assert x_s.min() >= 0 and x_s.max() <= 1 and (x_s == 0).any()  # the clamp was active
    denoiser = models[0]
    torch.testing.assert_close(result.images["n_hat"], x - denoiser(x).detach())
    torch.testing.assert_close(result.images["x_s_denoised"], denoiser(x_s).detach())
    torch.testing.assert_close(result.denoise_loss, ((result.images["x_s_denoised"] - y) ** 2).mean())
    torch.testing.assert_close(result.grad_loss, gradient_loss(n_tilde, x))


def test_without_detail_destruction_only_the_mask_changes(models, batch):
    _, y = batch
    paper = _run(models, batch, step=1)
    ablation = _run(models, batch, step=1, options=faithful(detail_destruction=False))
    n_tilde = ablation.images["n_tilde"]
    torch.testing.assert_close(ablation.images["x_s"], (y + n_tilde).clamp(0, 1))
    for unchanged in ("n_hat", "n_tilde"):
        torch.testing.assert_close(ablation.images[unchanged], paper.images[unchanged])
    torch.testing.assert_close(ablation.grad_loss, paper.grad_loss)
    assert not torch.equal(ablation.images["x_s"], paper.images["x_s"])


def test_without_update_delay_only_the_schedule_changes(models, batch):
    step = 501  # τ = 2 with the default period: not a scheduled step
    paper = _run(models, batch, step)
    ablation = _run(models, batch, step, faithful(update_delay=False))
    assert paper.grad_loss is None and ablation.grad_loss is not None
    torch.testing.assert_close(ablation.denoise_loss, paper.denoise_loss)
    for name in paper.images:
        torch.testing.assert_close(ablation.images[name], paper.images[name])


def test_same_seed_gives_identical_results(models, batch):
    first, second = _run(models, batch, step=2, seed=5), _run(models, batch, step=2, seed=5)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.grad_loss, second.grad_loss)
    assert all(torch.equal(first.images[k], second.images[k]) for k in first.images)
    assert not torch.equal(_run(models, batch, step=2, seed=6).images["x_s"], first.images["x_s"])


def test_noise_approximator_learns_only_from_the_gradient_loss(models, batch):
    denoiser, approximator = models
    x, _ = batch
    options = faithful(period=3)

    _run(models, batch, step=3, options=options).loss.backward()  # τ = 2: no gradient loss
    assert all(p.grad is None for p in approximator.parameters())
    assert all(p.grad is not None for p in denoiser.parameters())

    denoiser.zero_grad(set_to_none=True)
    scheduled = _run(models, batch, step=4, options=options)
    step_gradients = torch.autograd.grad(scheduled.loss, approximator.parameters())
    grad_only = gradient_loss(approximator(x - denoiser(x)), x)
    expected = torch.autograd.grad(grad_only, approximator.parameters())
    for actual, wanted in zip(step_gradients, expected, strict=True):
        torch.testing.assert_close(actual, wanted)
    weight_gradient, bias_gradient = step_gradients
    assert weight_gradient.abs().sum() > 0
    assert bias_gradient.abs().max() < 1e-6 * weight_gradient.abs().max()  # offsets are invisible


def test_step_runs_under_autocast(models, batch):
    reference = _run(models, batch, step=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _run(models, batch, step=1)
    mixed.loss.backward()
    assert torch.isfinite(mixed.loss)
    assert mixed.grad_loss is not None
    torch.testing.assert_close(mixed.denoise_loss.float(), reference.denoise_loss, rtol=0.1, atol=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in models[0].parameters())


def test_baseline_steps_are_paired_mean_squared_errors(models):
    denoiser, _ = models
    generator = torch.Generator().manual_seed(2)
    x1, x2, y = (torch.rand(SHAPE, generator=generator) for _ in range(3))
    supervised, noise2noise = supervised_step(denoiser, x1, y), noise2noise_step(denoiser, x1, x2)
    prediction = denoiser(x1).detach()
    torch.testing.assert_close(supervised.loss.detach(), ((prediction - y) ** 2).mean())
    torch.testing.assert_close(noise2noise.loss.detach(), ((prediction - x2) ** 2).mean())
    assert supervised.grad_loss is None and noise2noise.grad_loss is None
    torch.testing.assert_close(supervised.images["prediction"], prediction)


def test_a_few_optimiser_steps_reduce_the_denoising_loss():
    denoiser, approximator = build_denoiser(base_width=8, depth=2), build_noise_approximator()
    parameters = [*denoiser.parameters(), *approximator.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=1e-3, betas=(0.5, 0.999))
    data, masks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    options = faithful(period=10)
    losses = []
    for step in range(1, 31):
        clean_for_noisy, y = torch.rand(2, 4, 1, 32, 32, generator=data)
        x = (clean_for_noisy + 0.1 * torch.randn(clean_for_noisy.shape, generator=data)).clamp(0, 1)
        result = noise2grad_step(denoiser, approximator, x, y, step, options, masks)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
        losses.append(float(result.denoise_loss))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def _correlated(shape, seed, correlation_px=1.5):
    """Gaussian noise blurred in-plane (unit std), like CT noise; torch only."""
    generator = torch.Generator().manual_seed(seed)
    white = torch.randn(shape, generator=generator)
    radius = 4
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * correlation_px**2))
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2)[None, None]
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(white, (radius,) * 4, mode="circular"), kernel)
    return blurred / blurred.std()


def _neighbour_correlation(noise):
    return float(torch.corrcoef(torch.stack([noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()]))[0, 1])


def test_phase_scramble_keeps_the_noise_spectrum_that_sign_flips_whiten():
    noise = _correlated((4, 1, 64, 64), seed=0)
    generator = torch.Generator().manual_seed(1)
    scrambled = phase_scramble(noise, generator)
    flipped = noise * detail_destruction_mask(noise.shape, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.fft.rfft2(scrambled).abs(), torch.fft.rfft2(noise).abs(), atol=1e-3, rtol=1e-4)
    assert _neighbour_correlation(noise) > 0.7
    assert abs(_neighbour_correlation(scrambled) - _neighbour_correlation(noise)) < 0.05
    assert abs(_neighbour_correlation(flipped)) < 0.05  # the paper's per-pixel signs make it white
    # Structure is destroyed: the scrambled field is uncorrelated with its input.
    assert abs(float(torch.corrcoef(torch.stack([scrambled.flatten(), noise.flatten()]))[0, 1])) < 0.1
    assert not torch.equal(scrambled, phase_scramble(noise, torch.Generator().manual_seed(2)))


def test_an_edge_becomes_texture_under_phase_scrambling():
    edge = torch.zeros(1, 1, 32, 32)
    edge[..., 16:] = 1.0
    scrambled = phase_scramble(edge - edge.mean(), torch.Generator().manual_seed(0))
    column_means = scrambled[0, 0].mean(dim=0)
    assert column_means[16:].mean() - column_means[:16].mean() < 0.25  # no step left at the edge


def test_envelope_scramble_keeps_where_correlated_noise_is_strong_and_destroys_structure():
    """Noise 3 times stronger on the left: ``envelope`` keeps that and the correlation; ``phase`` spreads it."""
    noise = _correlated((4, 1, 128, 128), seed=5)
    noise[..., :64] *= 3
    left, right = (..., slice(0, 48)), (..., slice(80, 128))
    scrambled = envelope_scramble(noise, torch.Generator().manual_seed(1))
    spread = phase_scramble(noise, torch.Generator().manual_seed(1))
    assert float(scrambled[left].std() / scrambled[right].std()) == pytest.approx(3.0, rel=0.15)
    assert float(spread[left].std() / spread[right].std()) == pytest.approx(1.0, rel=0.15)
    assert float(scrambled.std() / noise.std()) == pytest.approx(1.0, rel=0.1)
    assert abs(_neighbour_correlation(scrambled) - _neighbour_correlation(noise)) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([scrambled.flatten(), noise.flatten()]))[0, 1])) < 0.1
    edge = torch.zeros(1, 1, 64, 64)
    edge[..., 32:] = 1.0
    column_means = envelope_scramble(edge - edge.mean(), torch.Generator().manual_seed(0))[0, 0].mean(dim=0)
    assert column_means[32:].mean() - column_means[:32].mean() < 0.25  # no step left at the edge
    assert envelope_scramble(noise.double(), torch.Generator().manual_seed(1)).dtype == torch.float64


def test_split_scramble_keeps_fine_noise_where_it_is_strong_up_to_a_flip_and_scrambles_coarse_structure():
    """Fine noise 3 times stronger on one side stays so (on either side); coarse structure is scrambled."""
    noise = torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    noise[..., :32] *= 3
    scrambled = split_scramble(noise, torch.Generator().manual_seed(1))
    left_over_right = scrambled[..., 4:28].std(dim=(1, 2, 3)) / scrambled[..., 36:60].std(dim=(1, 2, 3))
    assert bool(((left_over_right > 2.2) | (left_over_right < 1 / 2.2)).all())
    assert bool((left_over_right > 1).any()) and bool((left_over_right < 1).any())  # flipped at random
    spread = phase_scramble(noise, torch.Generator().manual_seed(1))
    assert float(spread[..., 4:28].std() / spread[..., 36:60].std()) == pytest.approx(1.0, rel=0.15)
    torch.testing.assert_close(scrambled.std(dim=(1, 2, 3)), noise.std(dim=(1, 2, 3)), rtol=1e-3, atol=0)
    edge = torch.zeros(1, 1, 64, 64)
    edge[..., 32:] = 1.0
    column_means = split_scramble(edge - edge.mean(), torch.Generator().manual_seed(0))[0, 0].mean(dim=0)
    assert column_means[32:].mean() - column_means[:32].mean() < 0.25  # no step left at the edge
    assert split_scramble(noise.double(), torch.Generator().manual_seed(1)).dtype == torch.float64


def test_fitted_scale_recovers_the_amplitude_of_partially_removed_noise():
    """G's least-squares scale turns ``n_hat = c·n`` back into ``n``: a = 1/c."""
    generator = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(2, 1, 72, 72, generator=generator), 9, stride=1)
    noise = 0.1 * _correlated(smooth.shape, seed=4)
    x = smooth + noise
    approximator = build_noise_approximator(init_scale=1.0)
    scale = fit_noise_scale_(approximator, 0.25 * noise, x, momentum=1.0)
    assert scale.shape == (1,)
    assert float(scale) == pytest.approx(4.0, rel=0.05)
    assert float(approximator.weight.detach()) == pytest.approx(float(scale))
    fit_noise_scale_(approximator, 0.5 * noise, x, momentum=0.25)  # a moving average towards 2
    assert float(approximator.weight.detach()) == pytest.approx(0.75 * float(scale) + 0.25 * 2.0, rel=0.03)
    assert float(approximator.bias.detach()) == 0.0


def test_spectral_scale_without_grad_into_denoiser_trains_on_synthetic_pairs_only(batch):
    """With ``grad_into_denoiser`` off, F's gradient is that of the denoising loss, and G gets none."""
    options = Noise2GradOptions(period=3, noise_scale="spectral")
    denoiser, approximator = build_denoiser(base_width=4, depth=2), SpectralNoiseGain(1)
    x, y = batch
    result = noise2grad_step(denoiser, approximator, x, y, 4, options, torch.Generator().manual_seed(0))
    assert result.grad_loss is not None  # scheduled: reported, and the spectral scale was fitted
    assert int(approximator.fits) == 1 and not torch.equal(approximator.weight, torch.ones_like(approximator.weight))
    step_gradients = torch.autograd.grad(result.loss, list(denoiser.parameters()))
    denoise_only = torch.autograd.grad(((denoiser(result.images["x_s"]) - y) ** 2).mean(), list(denoiser.parameters()))
    for actual, wanted in zip(step_gradients, denoise_only, strict=True):
        torch.testing.assert_close(actual, wanted)
    torch.testing.assert_close(result.loss.detach(), result.denoise_loss)
    # The synthetic image carries the phase-scrambled extracted noise.
    noise = phase_scramble(result.images["n_tilde"], torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.images["x_s"], (y + noise).clamp(0, 1))


class _Grey(torch.nn.Module):
    """A "denoiser" that outputs mid-grey, 0.5, everywhere."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full_like(image, 0.5)


@pytest.mark.parametrize("max_gain", [2.0, 3.0])
def test_noise_gain_raises_the_mean_noise_power_by_the_log_uniform_second_moment(max_gain):
    """E[g²] = (r² − r⁻²) / (4 ln r): ``robust``'s gain 3 trains on twice the pool's noise power on average."""
    gains = random_noise_gain(200_000, max_gain, torch.Generator().manual_seed(0))
    expected = (max_gain**2 - max_gain**-2) / (4 * math.log(max_gain))
    assert float((gains**2).mean()) == pytest.approx(expected, rel=0.01)


def test_noise_gain_scales_each_samples_synthetic_noise_by_its_own_factor(models):
    """With ``noise_gain`` r, sample i's synthetic noise is g_i·n_tilde_i, g_i log-uniform in [1/r, r]."""
    generator = torch.Generator().manual_seed(2)
    x = 0.5 + 0.02 * torch.randn(64, 1, 16, 16, generator=generator)  # small noise: the clamp stays off
    y = torch.full_like(x, 0.5)
    options = faithful(detail_destruction=False, noise_gain=2.0)
    extractor = _Grey()  # n_hat = x − 0.5, the added noise
    result = noise2grad_step(*models, x, y, 1, options, torch.Generator().manual_seed(0), extractor=extractor)
    noise, n_tilde = result.images["x_s"] - y, result.images["n_tilde"]
    gains = (noise * n_tilde).sum(dim=(1, 2, 3)) / (n_tilde * n_tilde).sum(dim=(1, 2, 3))
    torch.testing.assert_close(noise, gains.view(-1, 1, 1, 1) * n_tilde)  # one factor per sample
    assert gains.min() >= 0.5 - 1e-5 and gains.max() <= 2.0 + 1e-5
    assert gains.min() < 0.7 and gains.max() > 1.4  # spread over the range
    assert float(gains.log().mean()) == pytest.approx(0.0, abs=0.15)  # log-uniform: centred on 1
    plain = noise2grad_step(*models, x, y, 1, faithful(detail_destruction=False), torch.Generator().manual_seed(0),
                            extractor=extractor)
    torch.testing.assert_close(plain.images["x_s"] - y, n_tilde)  # noise_gain 1: no factor


class _CountingGrey(_Grey):
    """`_Grey` that records how many crops it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.crops = 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.crops += len(image)
        return super().forward(image)


@pytest.mark.parametrize("batch_size, reuse, extracted", [(4, 2, 2), (5, 2, 3), (4, 4, 1), (3, 1, 3)])
def test_noise_reuse_extracts_from_fewer_crops_and_feeds_each_noise_to_several_pairs(models, batch_size, reuse, extracted):
    """With ``noise_reuse`` k, F extracts the noise of the first ⌈B/k⌉ crops only, and synthetic
    pair i carries the noise of crop ⌊i/k⌋ (without detail destruction: exactly that noise)."""
    generator = torch.Generator().manual_seed(3)
    x = 0.5 + 0.02 * torch.randn(batch_size, 1, 16, 16, generator=generator)
    y = torch.full_like(x, 0.5)
    extractor = _CountingGrey()
    options = faithful(detail_destruction=False, noise_reuse=reuse)
    result = noise2grad_step(*models, x, y, 2, options, torch.Generator().manual_seed(0), extractor=extractor)
    assert extractor.crops == extracted and len(result.images["n_hat"]) == extracted
    torch.testing.assert_close(result.images["n_hat"], x[:extracted] - 0.5)
    owner = torch.arange(batch_size) // reuse
    torch.testing.assert_close(result.images["x_s"] - y, result.images["n_tilde"][owner])
    # With detail destruction every pair gets its own scrambling of the shared noise.
    scrambled = noise2grad_step(*models, x, y, 2, faithful(noise_reuse=reuse), torch.Generator().manual_seed(0),
                                extractor=extractor).images["x_s"] - y
    if reuse > 1:
        assert not torch.allclose(scrambled[0], scrambled[1])


def test_a_frozen_extractor_supplies_the_noise_and_receives_no_gradient(models, batch):
    """With an extractor, ``n_hat = x − extractor(x)``; even the paper's gradient loss then leaves F
    learning from the synthetic pairs alone, and the extractor gets no gradient."""
    denoiser, approximator = models
    extractor = build_denoiser(base_width=4, depth=2).requires_grad_(False)
    x, y = batch
    result = noise2grad_step(denoiser, approximator, x, y, 1, FAITHFUL, torch.Generator().manual_seed(0),
                             extractor=extractor)
    assert result.grad_loss is not None
    torch.testing.assert_close(result.images["n_hat"], x - extractor(x))
    step_gradients = torch.autograd.grad(result.loss, list(denoiser.parameters()))
    denoise_only = torch.autograd.grad(((denoiser(result.images["x_s"]) - y) ** 2).mean(), list(denoiser.parameters()))
    for actual, wanted in zip(step_gradients, denoise_only, strict=True):
        torch.testing.assert_close(actual, wanted)


def test_freeze_step_is_a_fraction_of_the_run():
    options = Noise2GradOptions(freeze_extractor=0.3)
    assert [options.freeze_step(total) for total in (10, 2748, 1)] == [3, 825, 1]
    with pytest.raises(ValueError, match="total_steps"):
        options.freeze_step(None)
    assert Noise2GradOptions(freeze_extractor=1.0).freeze_step(2748) is None  # 1: F extracts throughout
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="freeze_extractor"):
            Noise2GradOptions(freeze_extractor=bad)


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

    gain = SpectralNoiseGain(1, extend_low=False)  # the estimate itself, band by band
    torch.testing.assert_close(gain(n_hat), n_hat - n_hat.mean(dim=(2, 3), keepdim=True))  # unfitted: gain 1
    gain.fit_(n_hat, x, momentum=0.5)  # the first fit sets the averages whatever the momentum
    n_tilde = gain(n_hat)
    assert float(n_hat.std()) < 0.8 * float(noise.std())
    assert float(n_tilde.std()) == pytest.approx(float(noise.std()), rel=0.05)
    bands = SpectralNoiseGain.band_index(size, size, torch.device("cpu"))
    power = {name: torch.fft.rfft2(z).abs().square().mean(0)[0] for name, z in (("noise", noise), ("n_tilde", n_tilde))}
    for band in range(SpectralNoiseGain.BANDS):
        inside = bands == band
        if float(power["noise"][inside].mean()) > 0.1 * float(power["noise"].max()):
            ratio = float(power["n_tilde"][inside].mean() / power["noise"][inside].mean())
            assert ratio == pytest.approx(1.0, rel=0.2), (band, ratio)
    assert int(gain.fits) == 1


def test_spectral_gain_follows_its_moving_average():
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    gain = SpectralNoiseGain(1, extend_low=False)
    gain.fit_(0.5 * x, x, momentum=0.1)  # n_hat = x/2: cross/power = 2 in every band with coefficients
    empty = torch.bincount(SpectralNoiseGain.band_index(16, 16, x.device).flatten()[1:], minlength=16) == 0
    assert empty.tolist() == [True] + [False] * 15  # 16² crops: only the zero frequency is that low
    torch.testing.assert_close(gain.weight[0], torch.where(empty, 1.0, 2**0.5))  # an empty band keeps gain 1
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
    assert (SpectralNoiseGain(1, extend_low=False).weight == 1).all()
    gain.extend_low = False
    assert (gain.weight**2 * 2.0).squeeze().tolist() == pytest.approx([0.0, 0.0] + estimate[2:])


def _fit_on_rank(rank: int, world_size: int, init_file: str, batches: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gain = SpectralNoiseGain(1, extend_low=False)
        gain.fit_(0.5 * batches[rank], batches[rank], momentum=1.0)
        torch.save({"cross": gain.cross, "power": gain.power}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_spectral_gain_fits_the_mean_over_processes_under_ddp(tmp_path):
    batches = torch.randn(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    batches[1] *= 3  # the ranks see batches of different power
    torch.multiprocessing.spawn(_fit_on_rank, args=(2, str(tmp_path / "init"), batches, str(tmp_path / "fit")),
                                nprocs=2)
    alone = [SpectralNoiseGain(1, extend_low=False) for _ in range(2)]
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
    target = torch.rand(3, SpectralNoiseGain.BANDS, generator=generator) * 1e-4
    shaped = MeasuredNoiseSpectrum()(n_hat, target)
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
    bands = SpectralNoiseGain.BANDS
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


def test_the_measured_step_trains_on_corrected_targets_and_needs_the_noise_powers(batch):
    x, y = batch
    y = 0.2 + 0.6 * y  # away from 0 and 1, so that the synthetic image is not clipped
    options = Noise2GradOptions()
    denoiser, approximator = build_denoiser(base_width=4, depth=2, residual=True), MeasuredNoiseSpectrum()
    bands = SpectralNoiseGain.BANDS
    noisy_power, clean_power = torch.full((2, bands), 4e-4), torch.full((2, bands), 1e-4)
    with pytest.raises(ValueError, match="needs noise_power and clean_power"):
        noise2grad_step(denoiser, approximator, x, y, 1, options, torch.Generator().manual_seed(0))
    result = noise2grad_step(denoiser, approximator, x, y, 1, options, torch.Generator().manual_seed(0),
                             noise_power=noisy_power, clean_power=clean_power)
    torch.testing.assert_close(band_power(result.images["n_tilde"])[:, 0, 1:], torch.full((2, bands - 1), 3e-4),
                               rtol=1e-3, atol=1e-9)
    noise = result.images["x_s"] - y
    target = y - band_filter(noise, torch.full((2, bands), 1 / 3))
    expected = ((denoiser(result.images["x_s"]) - target) ** 2).mean()
    torch.testing.assert_close(result.denoise_loss, expected.detach())


def test_a_clean_pool_noisier_than_the_noisy_crop_gives_recorrupted_pairs_of_the_noisy_crop(batch):
    x, y = batch
    x = 0.2 + 0.6 * x
    bands = SpectralNoiseGain.BANDS
    counts = torch.ones(bands)
    weak, strong = torch.full((2, bands), 1e-4), torch.full((2, bands), 9e-4)
    assert self_paired(weak, own_noise_correction(weak, strong)[0], counts).all()
    assert not self_paired(strong, own_noise_correction(strong, weak)[0], counts).any()
    options = Noise2GradOptions(self_pairs=True)
    denoiser = build_denoiser(base_width=4, depth=2, residual=True)
    result = noise2grad_step(denoiser, MeasuredNoiseSpectrum(), x, y, 1, options, torch.Generator().manual_seed(0),
                             noise_power=weak, clean_power=strong)
    noise = result.images["x_s"] - x  # the noisy crop itself, recorrupted
    torch.testing.assert_close(band_power(noise)[:, 0, 1:], weak[:, 1:], rtol=1e-3, atol=1e-9)
    expected = ((denoiser(result.images["x_s"]) - (x - noise)) ** 2).mean()
    torch.testing.assert_close(result.denoise_loss, expected.detach(), rtol=1e-4, atol=1e-7)
