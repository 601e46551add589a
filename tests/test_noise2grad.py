"""Noise2Grad: update-delay schedule, options and their rules, detail destruction, the step of each variant."""

import dataclasses
import doctest
import math

import pytest
import torch

import n2g_ct.methods.destruction
import n2g_ct.methods.noise2grad
from n2g_ct.config import from_dict
from n2g_ct.errors import ConfigError
from n2g_ct.methods import Noise2Grad, Noise2GradOptions, PairedMethod, build_method
from n2g_ct.methods.destruction import detail_destruction_mask, phase_scramble
from n2g_ct.methods.losses import gradient_loss
from n2g_ct.methods.noise2grad import VARIANTS, random_noise_gain, update_delay, uses_gradient_loss
from n2g_ct.methods.noise_scale import BANDS, band_filter, band_power, own_noise_correction, self_paired
from n2g_ct.models import build_denoiser

SHAPE = (2, 1, 16, 16)
FAITHFUL = Noise2GradOptions(variant="faithful")


def faithful(**changes) -> Noise2GradOptions:
    return Noise2GradOptions(variant="faithful", **changes)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def denoiser():
    return build_denoiser(base_width=4, depth=2)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    clean_for_noisy = torch.rand(SHAPE, generator=generator)
    x = (clean_for_noisy + 0.1 * torch.randn(SHAPE, generator=generator)).clamp(0, 1)
    y = torch.rand(SHAPE, generator=generator)
    return x, y


def _method(denoiser, options=FAITHFUL) -> Noise2Grad:
    """Noise2Grad around ``denoiser``; a learned G starts as the identity so that the synthetic noise is clearly visible."""
    method = Noise2Grad(denoiser, options)
    if options.noise_scale == "learned":
        with torch.no_grad():
            method.noise_scale.conv.weight.fill_(1.0)
            method.noise_scale.conv.bias.zero_()
    return method


def _run(method, batch, step, seed=7, **extra):
    x, y = batch
    return method({"noisy": x, "clean": y, **extra}, step, torch.Generator().manual_seed(seed))


def test_docstring_examples():
    assert doctest.testmod(n2g_ct.methods.noise2grad, raise_on_error=True).attempted >= 3
    assert doctest.testmod(n2g_ct.methods.destruction, raise_on_error=True).attempted >= 2


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
    paper = dict(detail_destruction=True, update_delay=True, destruction="sign", grad_into_denoiser=True,
                 noise_scale="learned", noise_gain=1.0, self_pairs=False)
    assert all(getattr(FAITHFUL, name) == value for name, value in paper.items())
    assert FAITHFUL.period_for(10_000) == 500
    default = Noise2GradOptions()
    assert (default.variant, default.destruction, default.grad_into_denoiser, default.noise_scale,
            default.noise_gain, default.self_pairs) == ("default", "phase", False, "measured", 1.0, True)
    robust = Noise2GradOptions(variant="robust")
    assert robust == dataclasses.replace(default, variant="robust", noise_gain=3.0)
    assert Noise2GradOptions(variant="faithful", destruction="phase").destruction == "phase"  # set ones override
    assert set(VARIANTS) == {"default", "faithful", "robust"}


def test_one_period_setting_in_steps_or_as_a_share_of_the_run():
    assert Noise2GradOptions(period=40).period_for(2748) == 40
    assert Noise2GradOptions(period="10%").period_for(2748) == 275
    assert Noise2GradOptions(period="10%").period_for(3) == 1
    for bad in (0, 2.5, "0%", "150%", "ten", True):
        with pytest.raises(ValueError, match="period"):
            Noise2GradOptions(period=bad)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="detail_destruction must be true or false"):
        Noise2GradOptions(detail_destruction="yes")
    with pytest.raises(ValueError, match="variant must be one of faithful, default"):
        Noise2GradOptions(variant="paper")
    with pytest.raises(ValueError, match="destruction must be one of sign, phase, got 'blocks'$"):
        Noise2GradOptions(destruction="blocks")
    with pytest.raises(ValueError, match="noise_gain"):
        Noise2GradOptions(noise_gain=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Noise2GradOptions().period = 3


@pytest.mark.parametrize("options, message", [
    (dict(detail_destruction=False, destruction="phase"), "destruction means nothing with detail_destruction: false"),
    (dict(update_delay=False, period=100), "period means nothing with update_delay: false"),
    (dict(noise_scale="spectral", self_pairs=True), "self_pairs applies to the measured noise scale only"),
])
def test_combinations_that_mean_nothing_are_rejected_with_one_message_each(options, message):
    with pytest.raises(ValueError, match=message):
        Noise2GradOptions(**options)
    # The same options without the meaningless one are fine; a variant's own choice never conflicts.
    assert Noise2GradOptions(detail_destruction=False).destruction == "phase"
    assert Noise2GradOptions(noise_scale="spectral").self_pairs is False


@pytest.mark.parametrize("key, value, replacement", [
    ("period_fraction", 0.1, "period: 10%"),
    ("freeze_extractor", 0.25, "no variant adopted"),
    ("noise_reuse", 2, "no variant adopted"),
    ("destruction", "envelope", "no variant adopted"),
    ("noise_scale", "fitted", "no variant adopted"),
])
def test_removed_options_get_a_message_naming_what_replaces_them(key, value, replacement):
    from n2g_ct.training.config import TrainConfig

    pools = {"noisy": [{"series": "/x"}], "clean": [{"series": "/y"}]}
    with pytest.raises(ConfigError, match=f"method.noise2grad.*{key}.*{replacement}"):
        from_dict(TrainConfig, {"data": pools, "method": {"noise2grad": {key: value}}})
    with pytest.raises(ConfigError, match="model.g_init_scale: removed"):
        from_dict(TrainConfig, {"data": pools, "model": {"g_init_scale": 1.0}})


def test_a_saved_config_of_an_earlier_release_still_loads():
    """Removed keys at the values that meant "off" (as every earlier run folder's config.yaml has them) load."""
    from n2g_ct.training.config import TrainConfig

    earlier = {"variant": "default", "period": 500, "period_fraction": None, "scale_momentum": 0.1,
               "freeze_extractor": 1.0, "extend_low": True, "noise_reuse": 1, "destruction": "phase"}
    config = from_dict(TrainConfig, {"data": {"noisy": [{"series": "/x"}], "clean": [{"series": "/y"}]},
                                     "model": {"g_init_scale": None}, "method": {"noise2grad": earlier}})
    assert config.method.noise2grad == Noise2GradOptions(period=500)


def test_for_images_swaps_a_measured_scale_the_variant_chose_for_the_spectral_one():
    images = Noise2GradOptions(variant="robust", period="10%").for_images()
    assert (images.noise_scale, images.self_pairs, images.noise_gain, images.period) == ("spectral", False, 3.0, "10%")
    assert Noise2GradOptions(noise_scale="measured").for_images().noise_scale == "measured"  # explicit: kept


def test_the_method_interface_builds_each_method_around_the_denoiser(denoiser):
    assert isinstance(build_method("noise2grad", denoiser, FAITHFUL, 1), Noise2Grad)
    for name in ("supervised", "noise2noise"):
        method = build_method(name, denoiser, FAITHFUL, 1)
        assert isinstance(method, PairedMethod) and method.denoiser is denoiser
    with pytest.raises(ValueError, match="method must be one of"):
        build_method("noise2void", denoiser, FAITHFUL, 1)


def test_step_rejects_mismatched_batches(denoiser, batch):
    x, y = batch
    with pytest.raises(ValueError, match="one shape"):
        _run(_method(denoiser), (x, y[:1]), 1)


@pytest.mark.parametrize(
    "options, expected",
    [
        (faithful(period=3), {1, 2, 4, 6}),  # τ = 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5
        (faithful(update_delay=False), set(range(1, 13))),
        (FAITHFUL, set(range(1, 13))),
    ],
)
def test_gradient_loss_applied_on_exactly_the_scheduled_steps(denoiser, batch, options, expected):
    method = _method(denoiser, options)
    scheduled = set()
    for step in range(1, 13):
        result = _run(method, batch, step)
        if result.grad_loss is not None:
            scheduled.add(step)
            torch.testing.assert_close(result.loss.detach(), result.denoise_loss + result.grad_loss)
        else:
            torch.testing.assert_close(result.loss.detach(), result.denoise_loss)
    assert scheduled == expected


def test_a_period_given_as_a_share_follows_the_runs_length(denoiser, batch):
    method = _method(denoiser, faithful(period="50%"))
    method.start(6)  # period 3
    assert {step for step in range(1, 13) if _run(method, batch, step).grad_loss is not None} == {1, 2, 4, 6}


def test_synthetic_image_is_clean_plus_masked_extracted_noise(denoiser, batch):
    x, y = batch
    result = _run(_method(denoiser), batch, step=1, seed=11)
    n_tilde, x_s = result.images["n_tilde"], result.images["x_s"]
    mask = detail_destruction_mask(SHAPE, torch.Generator().manual_seed(11))
    torch.testing.assert_close(x_s, (y + n_tilde * mask).clamp(0, 1))
    assert x_s.min() >= 0 and x_s.max() <= 1 and (x_s == 0).any()  # the clamp was active
    torch.testing.assert_close(result.images["n_hat"], x - denoiser(x).detach())
    torch.testing.assert_close(result.images["n_tilde"], result.images["n_hat"])  # G = identity
    torch.testing.assert_close(result.images["x_s_denoised"], denoiser(x_s).detach())
    torch.testing.assert_close(result.denoise_loss, ((result.images["x_s_denoised"] - y) ** 2).mean())
    torch.testing.assert_close(result.grad_loss, gradient_loss(n_tilde, x))


def test_without_detail_destruction_only_the_mask_changes(denoiser, batch):
    _, y = batch
    paper = _run(_method(denoiser), batch, step=1)
    ablation = _run(_method(denoiser, faithful(detail_destruction=False)), batch, step=1)
    n_tilde = ablation.images["n_tilde"]
    torch.testing.assert_close(ablation.images["x_s"], (y + n_tilde).clamp(0, 1))
    for unchanged in ("n_hat", "n_tilde"):
        torch.testing.assert_close(ablation.images[unchanged], paper.images[unchanged])
    torch.testing.assert_close(ablation.grad_loss, paper.grad_loss)
    assert not torch.equal(ablation.images["x_s"], paper.images["x_s"])


def test_without_update_delay_only_the_schedule_changes(denoiser, batch):
    step = 501  # τ = 2 with the default period: not a scheduled step
    paper = _run(_method(denoiser), batch, step)
    ablation = _run(_method(denoiser, faithful(update_delay=False)), batch, step)
    assert paper.grad_loss is None and ablation.grad_loss is not None
    torch.testing.assert_close(ablation.denoise_loss, paper.denoise_loss)
    for name in paper.images:
        torch.testing.assert_close(ablation.images[name], paper.images[name])


def test_same_seed_gives_identical_results(denoiser, batch):
    method = _method(denoiser)
    first, second = _run(method, batch, step=2, seed=5), _run(method, batch, step=2, seed=5)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.grad_loss, second.grad_loss)
    assert all(torch.equal(first.images[k], second.images[k]) for k in first.images)
    assert not torch.equal(_run(method, batch, step=2, seed=6).images["x_s"], first.images["x_s"])


def test_noise_scale_learns_only_from_the_gradient_loss(denoiser, batch):
    x, _ = batch
    method = _method(denoiser, faithful(period=3))
    g = method.noise_scale.conv

    _run(method, batch, step=3).loss.backward()  # τ = 2: no gradient loss
    assert all(p.grad is None for p in g.parameters())
    assert all(p.grad is not None for p in denoiser.parameters())

    denoiser.zero_grad(set_to_none=True)
    scheduled = _run(method, batch, step=4)
    step_gradients = torch.autograd.grad(scheduled.loss, list(g.parameters()))
    expected = torch.autograd.grad(gradient_loss(g(x - denoiser(x)), x), list(g.parameters()))
    for actual, wanted in zip(step_gradients, expected, strict=True):
        torch.testing.assert_close(actual, wanted)
    weight_gradient, bias_gradient = step_gradients
    assert weight_gradient.abs().sum() > 0
    assert bias_gradient.abs().max() < 1e-6 * weight_gradient.abs().max()  # offsets are invisible


def test_the_method_clears_gs_gradient_on_steps_without_the_gradient_loss(denoiser, batch):
    """Under DDP G's unused gradient arrives as zeros, which Adam would still turn into an update."""
    method = _method(denoiser, faithful(period=3))
    result = _run(method, batch, step=3)
    result.loss.backward()
    for parameter in method.noise_scale.parameters():
        parameter.grad = torch.zeros_like(parameter)  # what DDP leaves
    method.before_optimizer_step(result)
    assert all(p.grad is None for p in method.noise_scale.parameters())
    assert set(method.log_values(result)) == {"g_weight", "noise_std"}


def test_step_runs_under_autocast(denoiser, batch):
    method = _method(denoiser)
    reference = _run(method, batch, step=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _run(method, batch, step=1)
    mixed.loss.backward()
    assert torch.isfinite(mixed.loss)
    assert mixed.grad_loss is not None
    torch.testing.assert_close(mixed.denoise_loss.float(), reference.denoise_loss, rtol=0.1, atol=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in denoiser.parameters())


def test_paired_methods_are_mean_squared_errors(denoiser):
    generator = torch.Generator().manual_seed(2)
    x1, x2 = (torch.rand(SHAPE, generator=generator) for _ in range(2))
    result = PairedMethod(denoiser)({"input": x1, "target": x2}, 1, torch.Generator())
    prediction = denoiser(x1).detach()
    torch.testing.assert_close(result.loss.detach(), ((prediction - x2) ** 2).mean())
    assert result.grad_loss is None
    torch.testing.assert_close(result.images["prediction"], prediction)


def test_a_few_optimiser_steps_reduce_the_denoising_loss():
    method = Noise2Grad(build_denoiser(base_width=8, depth=2), faithful(period=10))
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-3, betas=(0.5, 0.999))
    data, masks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, 31):
        clean_for_noisy, y = torch.rand(2, 4, 1, 32, 32, generator=data)
        x = (clean_for_noisy + 0.1 * torch.randn(clean_for_noisy.shape, generator=data)).clamp(0, 1)
        result = method({"noisy": x, "clean": y}, step, masks)
        optimiser.zero_grad()
        result.loss.backward()
        method.before_optimizer_step(result)
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


def test_spectral_scale_without_grad_into_denoiser_trains_on_synthetic_pairs_only(batch):
    """With ``grad_into_denoiser`` off, F's gradient is that of the denoising loss, and G gets none."""
    denoiser = build_denoiser(base_width=4, depth=2)
    method = Noise2Grad(denoiser, Noise2GradOptions(period=3, noise_scale="spectral"))
    gain = method.noise_scale
    x, y = batch
    result = _run(method, batch, 4, seed=0)
    assert result.grad_loss is not None  # scheduled: reported, and the spectral scale was fitted
    assert int(gain.fits) == 1 and not torch.equal(gain.weight, torch.ones_like(gain.weight))
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


def test_noise_gain_scales_each_samples_synthetic_noise_by_its_own_factor():
    """With ``noise_gain`` r, sample i's synthetic noise is g_i·n_tilde_i, g_i log-uniform in [1/r, r]."""
    generator = torch.Generator().manual_seed(2)
    x = 0.5 + 0.02 * torch.randn(64, 1, 16, 16, generator=generator)  # small noise: the clamp stays off
    y = torch.full_like(x, 0.5)
    grey = _Grey()  # n_hat = x − 0.5, the added noise
    result = _run(_method(grey, faithful(detail_destruction=False, noise_gain=2.0)), (x, y), 1, seed=0)
    noise, n_tilde = result.images["x_s"] - y, result.images["n_tilde"]
    gains = (noise * n_tilde).sum(dim=(1, 2, 3)) / (n_tilde * n_tilde).sum(dim=(1, 2, 3))
    torch.testing.assert_close(noise, gains.view(-1, 1, 1, 1) * n_tilde)  # one factor per sample
    assert gains.min() >= 0.5 - 1e-5 and gains.max() <= 2.0 + 1e-5
    assert gains.min() < 0.7 and gains.max() > 1.4  # spread over the range
    assert float(gains.log().mean()) == pytest.approx(0.0, abs=0.15)  # log-uniform: centred on 1
    plain = _run(_method(grey, faithful(detail_destruction=False)), (x, y), 1, seed=0)
    torch.testing.assert_close(plain.images["x_s"] - y, n_tilde)  # noise_gain 1: no factor


def test_the_measured_step_trains_on_corrected_targets_and_needs_the_noise_powers(batch):
    x, y = batch
    y = 0.2 + 0.6 * y  # away from 0 and 1, so that the synthetic image is not clipped
    denoiser = build_denoiser(base_width=4, depth=2, residual=True)
    method = Noise2Grad(denoiser, Noise2GradOptions())
    noisy_power, clean_power = torch.full((2, BANDS), 4e-4), torch.full((2, BANDS), 1e-4)
    with pytest.raises(ValueError, match="needs noise_power and clean_power"):
        _run(method, (x, y), 1, seed=0)
    result = _run(method, (x, y), 1, seed=0, noise_power=noisy_power, clean_power=clean_power)
    torch.testing.assert_close(band_power(result.images["n_tilde"])[:, 0, 1:], torch.full((2, BANDS - 1), 3e-4),
                               rtol=1e-3, atol=1e-9)
    noise = result.images["x_s"] - y
    target = y - band_filter(noise, torch.full((2, BANDS), 1 / 3))
    expected = ((denoiser(result.images["x_s"]) - target) ** 2).mean()
    torch.testing.assert_close(result.denoise_loss, expected.detach())


def test_a_clean_pool_noisier_than_the_noisy_crop_gives_recorrupted_pairs_of_the_noisy_crop(batch):
    x, y = batch
    x = 0.2 + 0.6 * x
    counts = torch.ones(BANDS)
    weak, strong = torch.full((2, BANDS), 1e-4), torch.full((2, BANDS), 9e-4)
    assert self_paired(weak, own_noise_correction(weak, strong)[0], counts).all()
    assert not self_paired(strong, own_noise_correction(strong, weak)[0], counts).any()
    denoiser = build_denoiser(base_width=4, depth=2, residual=True)
    result = _run(Noise2Grad(denoiser, Noise2GradOptions(self_pairs=True)), (x, y), 1, seed=0,
                  noise_power=weak, clean_power=strong)
    noise = result.images["x_s"] - x  # the noisy crop itself, recorrupted
    torch.testing.assert_close(band_power(noise)[:, 0, 1:], weak[:, 1:], rtol=1e-3, atol=1e-9)
    expected = ((denoiser(result.images["x_s"]) - (x - noise)) ** 2).mean()
    torch.testing.assert_close(result.denoise_loss, expected.detach(), rtol=1e-4, atol=1e-7)
