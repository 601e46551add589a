"""Inference: HU windowing and back-mapping, batching that never holds more than a batch on the device,
any in-plane size, padding kept, checkpoints rebuilt or refused with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from denoise_factories import WINDOW_HU, tiny_checkpoint
from factories import phantom_hu
from torch import nn

from n2g_ct.errors import ConfigError, InputError, N2GError
from n2g_ct.inference.denoiser import Denoiser, denoise_volume, denoiser_from_checkpoint
from n2g_ct.inference.precision import cpu_flags, resolve_precision
from n2g_ct.io.hu_window import HUWindow
from n2g_ct.models.checkpoint import load_checkpoint, read_checkpoint


class Recorder(nn.Module):
    """Identity network that records the batch shapes it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x


def test_identity_network_returns_the_input_clipped_to_the_window():
    denoiser = Denoiser(Recorder(), HUWindow(-1000.0, 1000.0), "test", torch.device("cpu"))
    hu = np.array([[[-3000.0, -1000.0, -250.5, 0.0, 999.0, 1500.0]]], np.float32)
    out = denoise_volume(denoiser, hu)
    np.testing.assert_allclose(out, np.clip(hu, -1000, 1000), atol=1e-3)
    assert out.dtype == np.float32 and hu[0, 0, 0] == -3000.0, "the input is not modified"


def test_never_more_than_one_batch_on_the_device_for_a_1000_slice_series():
    network = Recorder()
    denoiser = Denoiser(network, HUWindow(*WINDOW_HU), "test", torch.device("cpu"))
    hu = np.random.default_rng(0).uniform(-1000, 2000, (1000, 6, 5)).astype(np.float32)
    progress = []
    out = denoise_volume(denoiser, hu, batch_size=7, on_batch=progress.append)
    assert max(s[0] for s in network.shapes) == 7 and len(network.shapes) == 143
    assert all(s[1:] == (1, 6, 5) for s in network.shapes)
    assert sum(progress) == 1000
    np.testing.assert_allclose(out, hu, atol=1e-3)  # slice order kept


def test_in_place_output_and_padding_kept():
    denoiser = Denoiser(lambda x: torch.full_like(x, 0.5), HUWindow(*WINDOW_HU), "test", torch.device("cpu"))
    hu = phantom_hu((3, 9, 11))
    keep = np.zeros(hu.shape, bool)
    keep[:, :2] = True
    expected_kept = hu[keep].copy()
    out = denoise_volume(denoiser, hu, batch_size=2, keep=keep, out=hu)
    assert out is hu
    np.testing.assert_array_equal(out[keep], expected_kept)
    np.testing.assert_allclose(out[~keep], 0.5 * 4096 - 1024)


def test_unet_result_does_not_depend_on_batch_size_and_takes_odd_sizes(tmp_path, device):
    denoiser = denoiser_from_checkpoint(read_checkpoint(tiny_checkpoint(tmp_path / "m.pt")), device=str(device))
    hu = phantom_hu((5, 37, 23))
    outputs = [denoise_volume(denoiser, hu, batch_size=b) for b in (1, 2, 5)]
    assert outputs[0].shape == hu.shape
    tolerance = 1e-2 if denoiser.precision == "fp32" else 2.0  # HU
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], atol=tolerance)
    assert not np.allclose(outputs[0], hu, atol=1.0), "an untrained U-Net changes the image"


def test_checkpoint_rebuilds_the_trained_network(tmp_path):
    path = tiny_checkpoint(tmp_path / "m.pt", base_width=4, depth=2, method="supervised", window_hu=(-500, 1500))
    checkpoint = read_checkpoint(path)
    denoiser = denoiser_from_checkpoint(checkpoint, device="cpu")
    assert denoiser.window == HUWindow(-500.0, 1500.0) and denoiser.method == "supervised" and denoiser.precision == "fp32"
    for name, tensor in denoiser.network.state_dict().items():
        assert torch.equal(tensor, checkpoint.state["denoiser"][name]), name
    assert checkpoint.info.describe() == "supervised denoiser, step 0" and len(checkpoint.sha256) == 64
    assert not denoiser.network.training


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["config"]["model"].update(channels=3), "1-channel"),
        (lambda s: s["config"]["model"].update(base_width=8), "do not fit"),
        (lambda s: s["config"].pop("data"), "lacks"),
        (lambda s: s["config"]["data"].update(window_hu=[100, 100]), "low < high"),
    ],
    ids=["rgb", "wrong-width", "no-window", "empty-window"],
)
def test_bad_checkpoints_are_refused_clearly(tmp_path, change, message):
    state = load_checkpoint(tiny_checkpoint(tmp_path / "m.pt"))
    change(state)
    torch.save(state, tmp_path / "changed.pt")
    with pytest.raises(InputError, match=f"changed.pt.*{message}"):
        denoiser_from_checkpoint(read_checkpoint(tmp_path / "changed.pt"), device="cpu")


def test_non_finite_output_is_an_error():
    denoiser = Denoiser(lambda x: x * float("nan"), HUWindow(*WINDOW_HU), "test", torch.device("cpu"))
    with pytest.raises(N2GError, match="NaN"):
        denoise_volume(denoiser, phantom_hu((1, 4, 4)))


def test_precision_is_chosen_by_the_cpus_instructions(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, frozenset({"avx2", "avx512f"}))[0] == "fp32"
    assert resolve_precision("auto", cpu, frozenset({"avx512f", "avx512_bf16"}))[0] == "bf16"
    assert resolve_precision("auto", torch.device("cuda"), frozenset())[0] == "fp16"
    assert "emulated" in resolve_precision("fp16", cpu, frozenset({"avx512f"}))[1]
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    (tmp_path / "cpuinfo").write_text("processor : 0\nflags : fpu avx2 amx_bf16\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_fp32_on_the_cpu_runs_channels_last_with_the_same_output(tmp_path):
    checkpoint = read_checkpoint(tiny_checkpoint(tmp_path / "m.pt", base_width=8))
    denoiser = denoiser_from_checkpoint(checkpoint, device="cpu", precision="fp32")
    weight = denoiser.network.encoder[0][2].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    hu = phantom_hu((2, 40, 36))
    plain = Denoiser(checkpoint.network(), checkpoint.info.window, "test", torch.device("cpu"))
    np.testing.assert_allclose(denoise_volume(denoiser, hu), denoise_volume(plain, hu), atol=1e-3)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_keeps_the_full_resolution_level_and_the_residual_in_float32(tmp_path, precision, dtype):
    checkpoint = read_checkpoint(tiny_checkpoint(tmp_path / "m.pt", base_width=8))
    denoiser = denoiser_from_checkpoint(checkpoint, device="cpu", precision=precision)
    seen = {}
    network = denoiser.network
    for name, module in (("level 0", network.encoder[0]), ("level 1", network.encoder[1]),
                         ("last block", network.decoder[-1]), ("head", network.head)):
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out.dtype) and None)
    hu = phantom_hu((2, 40, 36))
    low = denoise_volume(denoiser, hu)
    assert seen == {"level 0": torch.float32, "level 1": dtype, "last block": torch.float32, "head": torch.float32}
    reference = denoise_volume(denoiser_from_checkpoint(checkpoint, device="cpu", precision="fp32"), hu)
    assert low.dtype == np.float32 and 0 < np.abs(low - reference).max() < 20.0  # HU; the contract is benchmarked
    assert denoiser.precision == precision
