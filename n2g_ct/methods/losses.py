"""Loss functions of Noise2Grad (Lin et al., "Noise2Grad: Extract Image Noise to Denoise", IJCAI 2021).

Pure tensor functions on (B, C, H, W) batches; images are in the network domain ([0, 1]).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _check_same_shape(first: Tensor, second: Tensor, names: str) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"{names} must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}"
        )


def image_gradient(z: Tensor) -> Tensor:
    r"""Image gradient of Noise2Grad: mean of the forward differences along x and y.

    :math:`\nabla z_{i,j} = \tfrac12\big((z_{i,j+1} - z_{i,j}) + (z_{i+1,j} - z_{i,j})\big)` on every
    pixel with a right and a lower neighbour (the paper's gradient, Eq. 2, as in the official code):
    a correlation without padding with the 2×2 kernel ½·[[−2, 1], [1, 0]].

    Args:
        z: (B, C, H, W) with H, W ≥ 2.

    Returns:
        (B, C, H−1, W−1), in the units of ``z`` per pixel.

    Example:
        >>> import torch
        >>> ramp = torch.arange(4.0).repeat(3, 1)[None, None]  # z[i, j] = j
        >>> image_gradient(ramp)
        tensor([[[[0.5000, 0.5000, 0.5000],
                  [0.5000, 0.5000, 0.5000]]]])
    """
    if z.ndim != 4 or z.shape[-2] < 2 or z.shape[-1] < 2:
        raise ValueError(f"image_gradient expects (B, C, H, W) with H, W >= 2, got {tuple(z.shape)}")
    corner = z[:, :, :-1, :-1]
    return 0.5 * ((z[:, :, :-1, 1:] - corner) + (z[:, :, 1:, :-1] - corner))


def gradient_loss(n_tilde: Tensor, x: Tensor) -> Tensor:
    r"""Gradient loss :math:`\mathcal{L}_{grad} = \mathrm{MSE}(\nabla\tilde n, \nabla x)` of Noise2Grad.

    Trains the noise approximator G (and, through :math:`\hat n = x - F(x)`, the denoiser F) so
    that the extracted noise has the image gradient of the noisy input. It is blind to a constant
    offset of ``n_tilde``. The noisy input is a constant target (detached).

    Args:
        n_tilde: extracted noise G(x − F(x)), (B, C, H, W).
        x: noisy input, (B, C, H, W).

    Returns:
        Scalar mean over all gradient pixels.

    Example:
        >>> import torch
        >>> x = torch.arange(64.0).view(1, 1, 8, 8) ** 2
        >>> float(gradient_loss(x + 3.0, x))  # a constant offset costs nothing
        0.0
    """
    _check_same_shape(n_tilde, x, "n_tilde and x")
    return F.mse_loss(image_gradient(n_tilde), image_gradient(x).detach())


def denoise_loss(prediction: Tensor, target: Tensor) -> Tensor:
    r"""Denoising loss :math:`\mathcal{L}_{denoise} = \mathrm{MSE}(F(x_s), y)` (mean over all elements).

    Args:
        prediction: network output, (B, C, H, W).
        target: clean (or, for Noise2Noise, second noisy) image, same shape.

    Returns:
        Scalar, in squared image units.

    Example:
        >>> import torch
        >>> float(denoise_loss(torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2)))
        0.25
    """
    _check_same_shape(prediction, target, "prediction and target")
    return F.mse_loss(prediction, target)
