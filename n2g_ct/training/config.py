"""The typed configuration of ``n2g-ct train`` (YAML sections ``data``, ``model``, ``method``, ``optim``, ``run``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from n2g_ct.datasets.cache import cache_location
from n2g_ct.datasets.noise_models import NoiseModel
from n2g_ct.datasets.selection import PairSelection, SliceSelection
from n2g_ct.io.hu_window import HUWindow
from n2g_ct.methods import Noise2GradOptions

RESIDUAL_VARIANTS = ("default", "robust")
"""Noise2Grad variants whose F is a residual U-Net unless ``model.residual`` says otherwise."""


def _positive(value: float, what: str) -> None:
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")


@dataclass(frozen=True)
class ImageDataConfig:
    """Natural images with a synthetic noise model, instead of CT series (the paper's experiments).

    The folder's images, sorted by name, make the pools of :mod:`n2g_ct.datasets.images`: the last
    ``validation_images`` for validation, then the first half of the rest as the noisy pool (one
    fixed noise realisation per image), the second half as the clean pool.

    Attributes:
        folder: clean images (PNG, JPEG, ...), e.g. BSD300 ``train200/``.
        noise: the noise model (`n2g_ct.datasets.noise_models.NoiseModel`).
        color: RGB (``model.channels: 3``) or grey luma (``model.channels: 1``).
        pairs: the supervised method's pairs: ``original`` (noisy-pool images and their clean
            originals) or ``superposed`` (the noisy pool's true noise added onto clean-pool images,
            the paper's Table 1 "fake" pairs).
        validation_images: images held out for validation.
        noise_seed: seed of the noise realisations.
    """

    folder: Path
    noise: NoiseModel
    color: bool = True
    pairs: Literal["original", "superposed"] = "original"
    validation_images: int = 8
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.validation_images < 1:
            raise ValueError(f"validation_images must be ≥ 1, got {self.validation_images}")


@dataclass(frozen=True)
class DataConfig:
    """Where training crops come from and how they are prepared.

    Attributes:
        manifest: a ``data_manifests`` manifest; with ``split``, fills ``noisy``/``clean`` from it.
        split: the split of ``manifest`` to use.
        data_root: root that relative paths of the manifest resolve against.
        noisy: low-dose pool (Noise2Grad), used when no manifest is given.
        clean: unrelated routine-dose pool (Noise2Grad).
        paired: aligned (low-dose, reference) training pairs for the supervised baseline, or two
            noisy realisations of the same scan for Noise2Noise.
        validation: paired slices for periodic validation (never the test split).
        validation_slices: how many slices of ``validation`` to use (evenly spaced), 0 for all.
        window_hu: HU window mapped to [0, 1] for the network.
        crop_size: side of the square training crops, pixels.
        num_workers: DataLoader worker processes (0 = in the training process).
        cache_dir: HU-array cache folder, a copy of the pools' images (default: ``$N2G_CT_CACHE``
            when set, else ``run.out_dir/cache``; see :mod:`n2g_ct.datasets.cache`).
        images: natural images with synthetic noise instead of the CT pools above (the HU window
            does not apply: images are already in [0, 1]).
    """

    manifest: Path | None = None
    split: str | None = None
    data_root: Path | None = None
    noisy: tuple[SliceSelection, ...] = ()
    clean: tuple[SliceSelection, ...] = ()
    paired: tuple[PairSelection, ...] = ()
    validation: tuple[PairSelection, ...] = ()
    validation_slices: int = 8
    window_hu: tuple[float, float] = tuple(HUWindow().as_list())
    crop_size: int = 128
    num_workers: int = 0
    cache_dir: Path | None = None
    images: ImageDataConfig | None = None

    def __post_init__(self) -> None:
        if (self.manifest is None) != (self.split is None):
            raise ValueError("manifest and split go together: give both or neither")
        try:
            HUWindow.of(self.window_hu)
        except ValueError:
            raise ValueError(f"window_hu must be [low, high] with low < high (HU), got {list(self.window_hu)}") from None
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be ≥ 16 pixels, got {self.crop_size}")
        if self.num_workers < 0 or self.validation_slices < 0:
            raise ValueError("num_workers and validation_slices must be ≥ 0")

    @property
    def window(self) -> HUWindow:
        """``window_hu`` as the HU-window type."""
        return HUWindow.of(self.window_hu)


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser F (U-Net) and the noise approximator G.

    Attributes:
        channels: image channels (1 for CT).
        base_width: channels of the first U-Net level (official: 32).
        depth: max-pool downsamplings (official: 3).
        residual: F outputs ``x + U-Net(x)``, starting close to the identity (not the paper's
            network): it keeps every CT number it does not see reason to change, so where the
            noise is weak against the anatomy (bone, a head) it cannot shift or blur what it fails
            to reproduce. ``None``: the method's choice, residual for Noise2Grad's ``default`` and
            ``robust`` variants, the paper's network for ``faithful`` and the baselines.
        local_mean_px: residual F only: σ, pixels, of the Gaussian local average taken out of F's
            residual, so that F changes detail but never the image's local mean at scales beyond
            about twice that (no CT-number shift, no flattening of large structures; see `UNet`).
            0: the plain residual.
        init_from: start F from the weights of this checkpoint or exported model (e.g. the starter
            model, to fine-tune it on one's own scanner's data); its U-Net must have these settings.
    """

    channels: int = 1
    base_width: int = 32
    depth: int = 3
    residual: bool | None = None
    local_mean_px: float = 8.0
    init_from: Path | None = None

    REMOVED: ClassVar[dict[str, tuple[str, tuple[object, ...]]]] = {
        "g_init_scale": ("a study option no variant adopted; G starts as its noise scale sets it", (None,)),
    }
    """Keys of earlier releases (see `Noise2GradOptions.REMOVED`)."""

    def __post_init__(self) -> None:
        if self.channels < 1 or self.base_width < 1 or self.depth < 1:
            raise ValueError("channels, base_width and depth must be ≥ 1")
        if self.local_mean_px < 0:
            raise ValueError(f"local_mean_px must be ≥ 0 pixels, got {self.local_mean_px}")


@dataclass(frozen=True)
class MethodConfig:
    """Which method trains F (:mod:`n2g_ct.methods`).

    Attributes:
        name: ``noise2grad`` (unpaired pools), ``supervised`` or ``noise2noise`` (``data.paired``).
        noise2grad: options of the Noise2Grad step: ``variant`` (``default``, the paper's
            ``faithful`` or ``robust``), update-delay period, ablation switches (`Noise2GradOptions`).
    """

    name: Literal["noise2grad", "supervised", "noise2noise"] = "noise2grad"
    noise2grad: Noise2GradOptions = field(default_factory=Noise2GradOptions)


@dataclass(frozen=True)
class OptimConfig:
    """Adam with a constant learning rate, then linear decay to 0 (the paper's schedule).

    Attributes:
        steps: total optimiser steps (with ``minutes``: the most steps).
        minutes: a time budget instead: as many steps as fit in this many minutes of training,
            measured on the first steps of the run (validation and checkpoints come on top).
        batch_size: crops per step and per process.
        lr: learning rate (paper: 2e-4).
        betas: Adam betas (paper: 0.5, 0.999).
        decay_start: fraction of ``steps`` after which the learning rate decays linearly to 0.
    """

    steps: int = 10000
    minutes: float | None = None
    batch_size: int = 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    decay_start: float = 0.5

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be ≥ 1")
        _positive(self.lr, "lr")
        if self.minutes is not None:
            _positive(self.minutes, "minutes")
        if not 0.0 <= self.decay_start <= 1.0:
            raise ValueError(f"decay_start is a fraction of the steps in [0, 1], got {self.decay_start}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class RunConfig:
    """Bookkeeping of a run.

    Attributes:
        out_dir: run folder (checkpoints, logs).
        seed: base seed (model init, crops, masks); ranks derive their own from it.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling).
        threads: CPU threads for torch (0 = torch's default).
        log_every: steps between log rows.
        checkpoint_every: steps between checkpoints (``last.pt``).
        validate_every: steps between validations (keeps ``best.pt``); 0 disables.
        self_check_every: steps between the reference-free self-checks of F (:mod:`n2g_ct.quality.self_check`)
            on slices of the noisy pool (the paired low-dose inputs for the baselines), written to
            ``self_check.csv`` and warned about when one fails; 0 disables (CT runs only).
        self_check_slices: slices checked, evenly spaced over the pool.
        stop_on_harm: stop the run (exit status 1, checkpoint kept) after this many failing
            self-checks in a row; 0: only warn.
        tensorboard: also write TensorBoard event files (``pip install n2g-ct[tensorboard]``).
    """

    out_dir: Path = Path("runs/train")
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    validate_every: int = 500
    self_check_every: int = 500
    self_check_slices: int = 8
    stop_on_harm: int = 3
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.checkpoint_every < 1 or self.validate_every < 0 or self.threads < 0:
            raise ValueError("log_every and checkpoint_every must be ≥ 1; validate_every and threads ≥ 0")
        if self.self_check_every < 0 or self.self_check_slices < 1 or self.stop_on_harm < 0:
            raise ValueError("self_check_every and stop_on_harm must be ≥ 0, self_check_slices ≥ 1")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``n2g-ct train`` needs; see the section classes for the fields."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.data.cache_dir is None:
            object.__setattr__(self, "data", dataclasses.replace(self.data, cache_dir=cache_location(self.run.out_dir)))
        data, name = self.data, self.method.name
        if self.model.residual is None:
            residual = name == "noise2grad" and self.method.noise2grad.variant in RESIDUAL_VARIANTS
            object.__setattr__(self, "model", dataclasses.replace(self.model, residual=residual))
        if data.images is not None:
            channels = 3 if data.images.color else 1
            if self.model.channels != channels:
                raise ValueError(f"data.images.color is {data.images.color}: model.channels must be {channels}")
            if data.noisy or data.clean or data.paired or data.validation or data.manifest is not None:
                raise ValueError("data.images replaces the CT pools: drop data.noisy/clean/paired/validation/manifest")
            options = self.method.noise2grad.for_images()
            if name == "noise2grad" and options.noise_scale == "measured":
                raise ValueError("the measured noise scale reads the noise in CT slices' uniform soft tissue; for "
                                 "natural images set method.noise2grad.noise_scale: spectral (or learned)")
            object.__setattr__(self, "method", dataclasses.replace(self.method, noise2grad=options))
            return
        if name == "noise2grad" and data.manifest is None and not (data.noisy and data.clean):
            raise ValueError("noise2grad needs data.noisy and data.clean pools (or data.manifest + data.split)")
        if name in ("supervised", "noise2noise") and not data.paired:
            raise ValueError(f"{name} needs data.paired training pairs")


@dataclass(frozen=True)
class Budget:
    """One training budget for every run of a recipe (``n2g-ct run --budget``): minutes or steps.

    The learning-rate schedule is relative to the run's total steps, and so is a Noise2Grad update
    delay given as a share (``method.noise2grad.period: 10%``): both scale with the budget.
    """

    minutes: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if (self.minutes is None) == (self.steps is None):
            raise ValueError("a budget is minutes or steps")
        if (self.minutes is not None and self.minutes <= 0) or (self.steps is not None and self.steps < 1):
            raise ValueError(f"a budget must be positive, got {self}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``20`` or ``20min`` (minutes of training per model), or ``3000steps``.

        >>> Budget.parse("2.5min"), Budget.parse("3000steps")
        (Budget(minutes=2.5, steps=None), Budget(minutes=None, steps=3000))
        """
        value = text.strip().lower()
        try:
            if value.endswith("steps"):
                return cls(steps=int(value[: -len("steps")]))
            return cls(minutes=float(value.removesuffix("min")))
        except ValueError:
            raise ValueError(f"budget must be minutes (20, 20min) or steps (3000steps), got {text!r}") from None

    def overrides(self) -> list[str]:
        """The ``optim`` overrides that set this budget on a training configuration."""
        if self.steps is not None:
            return [f"optim.steps={self.steps}", "optim.minutes=null"]
        return [f"optim.minutes={self.minutes}"]
