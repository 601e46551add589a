"""Low-dose simulator: projector numerics and geometry, noiseless round trip, noise scaling with dose,
FBP noise texture, seeding, calibration to a known own noise, errors, and the CLI writing a derived series."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from denoise_factories import dciodvfy_errors, write_complete_ct_series

from n2g_ct.cli import main
from n2g_ct.errors import ConfigError, InputError
from n2g_ct.io import read_volume
from n2g_ct.quality.noise_estimate import estimate_noise_std
from n2g_ct.simulation.low_dose import LowDoseSimulator, hu_to_mu, simulate_low_dose, slice_generator
from n2g_ct.simulation.projector import FanBeam, ParallelBeam, ScanGeometry, _NonUniformFFT
from n2g_ct.simulation.series import simulate_series

PARALLEL = ScanGeometry("parallel")


def phantom(size: int = 64, slices: int = 1, noise_hu: float = 0.0, seed: int = 0) -> np.ndarray:
    """(slices, size, size) HU: air, a 20 HU disc with a 700 HU insert and a 200 HU block, plus white noise."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx)
    image = np.where(r < 0.4 * size, 20.0, -1000.0)
    image[np.hypot(yy, xx - 0.15 * size) < 0.06 * size] = 700.0
    image[(np.abs(yy + 0.15 * size) < 3) & (np.abs(xx) < 4)] = 200.0
    noise = np.random.default_rng(seed).normal(0, noise_hu, (slices, size, size)) * (r < 0.4 * size)
    return (image + noise).astype(np.float32)


def test_nufft_matches_the_direct_fourier_sums():
    ny, nx = 12, 10
    image = torch.randn(2, ny, nx)
    k = torch.rand(50, 2, dtype=torch.float64) - 0.5
    nufft = _NonUniformFFT((ny, nx), k)
    n = [torch.arange(size) - size // 2 for size in (ny, nx)]
    kernel = torch.exp(-2j * math.pi * (k[:, 0, None, None] * n[0][:, None] + k[:, 1, None, None] * n[1]))
    exact = (image.to(torch.complex128)[:, None] * kernel).sum((-2, -1))
    assert (nufft.forward(image) - exact).abs().max() / exact.abs().max() < 2e-3
    values = torch.randn(2, 50, dtype=torch.complex64)
    exact = (values.to(torch.complex128)[:, :, None, None] * kernel.conj()).sum(1)
    assert (nufft.adjoint(values) - exact).abs().max() / exact.abs().max() < 2e-3


def test_a_pixel_projects_onto_its_rays_with_its_area():
    spacing = 0.7
    projector = ParallelBeam((32, 32), (spacing, spacing), views=8)
    mu = torch.zeros(1, 32, 32)
    mu[0, 10, 22] = 1.0
    sinogram = projector.project(mu)[0]
    x, y = (22 - 15.5) * spacing, (10 - 15.5) * spacing  # columns → x, rows → y, mm from the isocentre
    for view, theta in enumerate(projector.angles.tolist()):
        peak_mm = (int(sinogram[view].argmax()) - projector.channels / 2) * projector.bin_mm
        assert abs(peak_mm - (x * math.cos(theta) + y * math.sin(theta))) <= projector.bin_mm
        assert float(sinogram[view].sum()) * projector.bin_mm == pytest.approx(spacing**2, rel=1e-3)


def test_fan_rays_are_the_parallel_rays_they_lie_on():
    projector = ParallelBeam((32, 32), (1.0, 1.0), views=180)
    fan = FanBeam(projector, source_to_isocentre_mm=100.0)
    sinogram = projector.project(hu_to_mu(torch.from_numpy(phantom(32))))
    # Line integrals are invariant to the parametrisation: fan → parallel → fan gives the same sinogram.
    back = fan.to_parallel(fan.from_parallel(sinogram))
    assert (back - sinogram).abs().max() < 0.02 * sinogram.max()
    # The central channel of view β is the parallel ray θ = β + π/2 through the isocentre (u = 0).
    central = fan.from_parallel(sinogram)[0, :, fan.channels // 2]
    parallel_views = torch.cat([sinogram[0, :, projector.channels // 2]] * 2)
    np.testing.assert_allclose(central.roll(90).numpy(), parallel_views.numpy(), atol=1e-3 * float(sinogram.max()))


def test_noiseless_round_trip_reproduces_the_image(device):
    hu = torch.from_numpy(phantom()).to(device)
    for geometry, bound_hu in (("parallel", 3.0), ("fan", 15.0)):
        simulator = LowDoseSimulator((64, 64), (0.7, 0.7), ScanGeometry(geometry), device)
        error = (simulator.round_trip(hu) - hu).cpu().numpy()
        assert np.sqrt(np.mean(error**2)) < bound_hu, geometry


def test_zero_noise_limit_returns_the_source_and_keeps_padding():
    hu = phantom(slices=2, noise_hu=10.0)
    padding = np.zeros(hu.shape, bool)
    padding[:, :3] = True
    hu[padding] = -2000.0
    result = simulate_low_dose(hu, (0.7, 0.7), 1.0, geometry=PARALLEL, i0=1e13, electronic_noise=0.0,
                               padding_mask=padding)
    np.testing.assert_array_equal(result.hu[padding], hu[padding])
    assert np.abs(result.hu - hu)[~padding].max() < 0.5


def test_added_noise_std_scales_as_one_over_root_dose():
    hu = phantom(slices=2)
    stds = [
        np.std(simulate_low_dose(hu, (0.7, 0.7), dose, geometry=PARALLEL, i0=1e5, electronic_noise=0.0).hu - hu)
        for dose in (0.5, 0.125)
    ]
    assert stds[1] / stds[0] == pytest.approx(2.0, rel=0.08)


def radial_nps(noise: np.ndarray) -> np.ndarray:
    """Mean radial noise power spectrum of (n, s, s) noise in 10 bins of 0.05 cycles/pixel, peak = 1."""
    noise = noise - noise.mean(axis=(1, 2), keepdims=True)
    nps = np.mean(np.abs(np.fft.fft2(noise)) ** 2, axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(noise.shape[1]), np.fft.fftfreq(noise.shape[2]), indexing="ij"))
    profile = np.array([nps[(f > low) & (f <= low + 0.05)].mean() for low in np.arange(0, 0.5, 0.05)])
    return profile / profile.max()


@pytest.mark.parametrize("filter", ["ramp", "hann"])
def test_fbp_noise_is_not_white(filter):
    """Measured on water: ramp noise has NPS ∝ |f| (low frequencies ~10 % of Nyquist's) and anticorrelated
    neighbours; Hann noise peaks at mid frequencies (~0.2 cycles/pixel) with correlated neighbours."""
    size = 96
    water = np.where(np.hypot(*(np.mgrid[:size, :size] - (size - 1) / 2)) < 45, 0.0, -1000.0).astype(np.float32)
    simulator = LowDoseSimulator((size, size), (1.0, 1.0), ScanGeometry("parallel", filter=filter))
    hu = torch.from_numpy(water).repeat(4, 1, 1)
    noise = simulator.added_noise(hu, 1.0, 1e5, [slice_generator(0, k) for k in range(4)]).numpy()[:, 24:72, 24:72]
    nps = radial_nps(noise)
    neighbour = np.mean(noise[:, :, 1:] * noise[:, :, :-1]) / np.mean(noise**2)
    if filter == "ramp":
        assert nps[0] < 0.2 * nps[-1] and np.argmax(nps) >= 8
        assert neighbour < -0.1
    else:
        assert nps[0] < 0.5 and nps[-1] < 0.5 and 2 <= np.argmax(nps) <= 5
        assert neighbour > 0.15


def test_same_seed_same_output_whatever_the_batch_size_other_seed_differs():
    hu = phantom(slices=3)

    def run(seed: int, batch: int) -> np.ndarray:
        return simulate_low_dose(hu, (0.7, 0.7), 0.25, i0=1e5, seed=seed, batch_size=batch).hu

    first = run(7, 1)
    np.testing.assert_array_equal(first, run(7, 1))
    np.testing.assert_allclose(first, run(7, 3), atol=1e-3)  # same draws; batched arithmetic rounds differently
    assert np.abs(first - run(8, 1)).mean() > 1.0


def test_calibration_hits_the_target_added_noise_of_a_known_own_noise():
    own, size = 20.0, 128
    hu = phantom(size, slices=2, noise_hu=own, seed=1)
    estimate = estimate_noise_std(hu, (1.0, 1.0))
    assert estimate.std_hu == pytest.approx(own, rel=0.08)
    assert np.all(estimate.slice_std_hu == pytest.approx(own, rel=0.1))
    result = simulate_low_dose(hu, (1.0, 1.0), 0.25, seed=3)
    target = own * math.sqrt(1 / 0.25 - 1)
    assert result.target_added_noise_hu == pytest.approx(target, rel=0.08)
    assert result.added_noise_hu == pytest.approx(target, rel=0.15)
    disc = np.hypot(*(np.mgrid[:size, :size] - (size - 1) / 2)) < 0.3 * size
    assert np.std((result.hu - hu)[:, disc]) == pytest.approx(target, rel=0.15)
    assert result.i0.shape == (2,) and np.all(result.i0 > 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dose": 0.0}, ConfigError, "dose"),
        ({"dose": 1.0}, ConfigError, "dose"),
        ({"dose": 0.5, "i0": -1.0}, ConfigError, "I0"),
        ({"dose": 0.5, "electronic_noise": -1.0}, ConfigError, "electronic"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate_low_dose(phantom(), (0.7, 0.7), **kwargs)


def test_bad_geometry_and_unmeasurable_noise_raise_clear_errors():
    with pytest.raises(ConfigError, match="views"):
        ScanGeometry("fan", views=721)
    with pytest.raises(ConfigError, match="geometry"):
        ScanGeometry("cone")  # type: ignore[arg-type]
    air = np.full((1, 32, 32), -1000.0, np.float32)
    with pytest.raises(InputError, match="--i0"):
        simulate_low_dose(air, (0.7, 0.7), 0.25)


def test_cli_writes_a_valid_derived_series_and_refuses_a_used_output(tmp_path):
    source = tmp_path / "routine"
    hu = np.round(phantom(48, slices=3, noise_hu=10.0))
    write_complete_ct_series(source, hu, spacing_xyz=(0.8, 0.8, 1.0))
    out = tmp_path / "quarter"
    args = ["simulate", str(source), "--dose", "0.25", "--out", str(out), "--i0", "2e5", "--seed", "5"]
    assert main(["-q", *args]) == 0
    files = sorted(out.iterdir())
    assert len(files) == 3
    ds, src = pydicom.dcmread(files[0]), pydicom.dcmread(min(source.iterdir()))
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    for text in ("Simulated lower dose", "dose 0.25", "I0 2e+05", "seed 5", "fan beam"):
        assert text in ds.DerivationDescription
    assert dciodvfy_errors(files[0]) == []
    simulated = read_volume(out)
    noise = (simulated.hu - hu)[:, 14:34, 14:34]
    assert 1.0 < noise.std() < 200.0 and abs(noise.mean()) < 10.0
    assert main(["-q", *args]) == 2  # the output is now in use
    assert main(["-q", "simulate", str(source), "--dose", "0.25", "--out", str(source / "sim")]) == 2


def test_nifti_in_nifti_out_keeps_the_header(tmp_path):
    hu = phantom(40, slices=2)
    affine = np.diag([-0.9, -0.9, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), tmp_path / "ct.nii.gz")
    result, written = simulate_series(tmp_path / "ct.nii.gz", tmp_path / "out", 0.5, i0=1e5, device="cpu")
    assert written == tmp_path / "out" / "ct.nii.gz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "out"]  # no partial output left
    image = nib.load(written)
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), result.hu)
    assert 1.0 < np.std(result.hu - hu) < 100.0
