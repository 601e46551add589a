"""Loss functions of Noise2Grad: the image gradient, the gradient loss and the denoising loss."""

import doctest

import pytest
import torch
import torch.nn.functional as F

import n2g_ct.methods.losses
from n2g_ct.methods.losses import denoise_loss, gradient_loss, image_gradient


def _paper_gradient_by_convolution(z: torch.Tensor) -> torch.Tensor:
    """Eq. 2 written as two 2×2 difference kernels, applied per channel without padding."""
    horizontal = torch.tensor([[-1.0, 1.0], [0.0, 0.0]])  # z[i, j+1] − z[i, j]
    vertical = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # z[i+1, j] − z[i, j]
    kernel = (0.5 * (horizontal + vertical)).to(z).expand(z.shape[1], 1, 2, 2)
    return F.conv2d(z, kernel, groups=z.shape[1])


def test_docstring_examples():
    assert doctest.testmod(n2g_ct.methods.losses, raise_on_error=True).attempted >= 3


@pytest.mark.parametrize("shape", [(2, 1, 9, 7), (1, 3, 2, 2), (3, 2, 16, 5)])
def test_image_gradient_equals_convolution_with_the_paper_kernels(shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gradient = image_gradient(z)
    assert gradient.shape == (shape[0], shape[1], shape[2] - 1, shape[3] - 1)
    torch.testing.assert_close(gradient, _paper_gradient_by_convolution(z), rtol=0, atol=1e-12)


def test_image_gradient_of_a_plane_is_the_mean_slope():
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    plane = (0.2 * rows - 0.6 * cols + 1.0)[None, None]
    torch.testing.assert_close(image_gradient(plane), torch.full((1, 1, 5, 7), 0.5 * (0.2 - 0.6)))


def test_image_gradient_rejects_inputs_without_two_spatial_pixels():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        image_gradient(torch.zeros(1, 1, 1, 5))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        image_gradient(torch.zeros(4, 4))


def test_gradient_loss_is_the_mse_of_gradients_and_ignores_offsets():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 12, 10, generator=generator, dtype=torch.float64)
    n_tilde = torch.randn(2, 1, 12, 10, generator=generator, dtype=torch.float64)
    expected = ((image_gradient(n_tilde) - image_gradient(x)) ** 2).mean()
    torch.testing.assert_close(gradient_loss(n_tilde, x), expected)
    torch.testing.assert_close(gradient_loss(n_tilde + 0.7, x), expected)
    assert gradient_loss(x - 0.25, x) < 1e-24


def test_gradient_loss_treats_the_noisy_input_as_a_constant_target():
    x = torch.rand(1, 1, 6, 6, requires_grad=True)
    n_tilde = torch.rand(1, 1, 6, 6, requires_grad=True)
    gradient_loss(n_tilde, x).backward()
    assert x.grad is None
    assert n_tilde.grad is not None and n_tilde.grad.abs().sum() > 0


def test_denoise_loss_is_the_mean_squared_error():
    prediction = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    assert float(denoise_loss(prediction, target)) == pytest.approx((1 + 0.25 + 0.25) / 4)
    assert float(denoise_loss(target, target)) == 0.0


@pytest.mark.parametrize("loss", [gradient_loss, denoise_loss])
def test_losses_reject_mismatched_shapes_instead_of_broadcasting(loss):
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8))
