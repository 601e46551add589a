"""The Noise2Grad paper's natural-image experiments (Tables 1-3), run by ``n2g-ct run pipelines/paper_*.yaml``.

A recipe's ``paper`` section names a folder of clean training images (BSD300 ``train200/``), a
test folder (``test100_480x320/``), noise settings (each a :class:`~n2g_ct.datasets.noise_models.NoiseModel`
with the paper's figures beside it) and methods (each a set of ``n2g-ct train`` options merged
onto the shared ``train`` section). For every setting and method this trains one run on the pools
of :mod:`n2g_ct.datasets.images` (skipping finished runs, resuming interrupted ones), then denoises the
test images (one fixed noise realisation each, the same for every method), optionally runs CBM3D with
the true σ on Gaussian settings, and writes ``OUT/evaluation``: ``per_image.csv``, ``summary.json``,
``report.md``/``report.html`` with the table beside the paper's, learning curves, example images.

PSNR as the paper reports it: per test image, ``10·log10(1 / MSE)`` with the output clipped to
[0, 1] and the MSE over all pixels and colour channels (data range 1, i.e. 255 on 8-bit values,
without rounding), averaged over the test images. SSIM: Gaussian window 11, σ 1.5, channel mean.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from n2g_ct.config import apply_overrides, from_dict
from n2g_ct.datasets.noise_models import NoiseModel
from n2g_ct.training.config import Budget

log = logging.getLogger(__name__)

NOISY = "noisy"
BM3D = "bm3d"


@dataclass(frozen=True)
class PaperSetting:
    """One noise setting (a column group of the paper's table).

    Attributes:
        name: folder-safe name, e.g. ``gaussian_25``.
        noise: the noise model of the pools and the test images.
        paper: the paper's PSNR (dB) by method name, shown beside this toolkit's.
    """

    name: str
    noise: NoiseModel
    paper: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"setting name must be letters, digits, - and _, got {self.name!r}")
        bad = {k: v for k, v in self.paper.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ValueError(f"paper figures must be numbers (PSNR dB), got {bad}")


@dataclass(frozen=True)
class PaperMethod:
    """One trained method: ``config`` holds ``n2g-ct train`` options merged onto the shared ``train`` section.

    Attributes:
        name: e.g. ``noise2grad``, ``supervised``, ``n2g_d``.
        description: what it is, for the report.
        config: e.g. ``{method: {name: noise2grad, noise2grad: {variant: faithful}}}``; the pairing
            of the supervised method goes in ``{images: {pairs: superposed}}``.
    """

    name: str
    description: str = ""
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PaperExperiment:
    """The ``paper`` section of a recipe (see the module docstring).

    Attributes:
        title: the table, e.g. ``Table 2: Gaussian noise``.
        train_folder: clean training images (pools and validation are made from them).
        test_folder: clean test images.
        settings: noise settings.
        methods: trained methods.
        train: shared ``n2g-ct train`` configuration (``model``, ``optim``, ``run``, ``data.crop_size``).
        color: RGB images (``False``: grey luma).
        bm3d: add CBM3D (BM3D for grey) with each image's true σ on Gaussian settings (``bm3d`` extra).
        test_images: evaluate this many evenly spaced test images; all when None.
        validation_images: training images held out for validation.
        noise_seed: seed of every noise realisation.
    """

    title: str
    train_folder: Path
    test_folder: Path
    settings: tuple[PaperSetting, ...]
    methods: tuple[PaperMethod, ...]
    train: dict = field(default_factory=dict)
    color: bool = True
    bm3d: bool = False
    test_images: int | None = None
    validation_images: int = 8
    noise_seed: int = 0

    def __post_init__(self) -> None:
        for what, names in (("setting", [s.name for s in self.settings]), ("method", [m.name for m in self.methods])):
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{what} names must be given and unique, got {names}")
        reserved = {NOISY, BM3D} & {m.name for m in self.methods}
        if reserved:
            raise ValueError(f"method names {sorted(reserved)} are reserved for the noisy input and BM3D")
        if self.test_images is not None and self.test_images < 1:
            raise ValueError(f"test_images must be ≥ 1, got {self.test_images}")


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """``base`` with ``extra`` merged in, recursively for nested mappings."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) else value
    return merged


def train_configs(experiment: PaperExperiment, out: Path, budget: Budget | None = None,
                  device: str | None = None) -> dict[tuple[str, str], Any]:
    """A validated :class:`~n2g_ct.training.config.TrainConfig` per (setting, method), run folder ``OUT/SETTING/METHOD``."""
    from n2g_ct.training.config import TrainConfig

    configs = {}
    for setting in experiment.settings:
        for method in experiment.methods:
            extra = dict(method.config)
            images = {"folder": str(experiment.train_folder), "noise": dataclasses.asdict(setting.noise),
                      "color": experiment.color, "validation_images": experiment.validation_images,
                      "noise_seed": experiment.noise_seed, **extra.pop("images", {})}
            data = _merge(_merge(experiment.train, extra), {"data": {"images": images}})
            overrides = [f"run.out_dir={out / setting.name / method.name}",
                         f"model.channels={3 if experiment.color else 1}"]
            overrides += budget.overrides() if budget is not None else []
            overrides += [f"run.device={device}"] if device is not None else []
            configs[setting.name, method.name] = from_dict(
                TrainConfig, apply_overrides(data, overrides), source=f"{setting.name}/{method.name}")
    return configs


def _bm3d(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """CBM3D (BM3D for one channel) of a (C, H, W) image in [0, 1] with noise std ``sigma`` (same scale)."""
    from n2g_ct.evaluation.bm3d import import_bm3d

    bm3d = import_bm3d()
    if noisy.shape[0] == 3:
        return np.moveaxis(bm3d.bm3d_rgb(np.moveaxis(noisy, 0, -1), sigma), -1, 0).astype(np.float32)
    return bm3d.bm3d(noisy[0], sigma)[None].astype(np.float32)


@dataclass
class _SettingResult:
    rows: list[dict[str, Any]]
    example: dict[str, np.ndarray]  # method → (C, H, W) of the first test image, plus "clean"


def _evaluate_setting(experiment: PaperExperiment, setting: PaperSetting, checkpoints: Mapping[str, Path],
                      device: torch.device, progress: bool) -> _SettingResult:
    from tqdm import tqdm

    from n2g_ct.datasets.images import TEST, add_noise, image_files, load_image
    from n2g_ct.datasets.selection import evenly_spaced
    from n2g_ct.inference.denoiser import denoise_image
    from n2g_ct.models.checkpoint import read_checkpoint
    from n2g_ct.quality.metrics import IMAGE_RANGE, psnr, ssim

    files = image_files(experiment.test_folder)
    picked = evenly_spaced(len(files), experiment.test_images).tolist()
    clean = [load_image(files[i], experiment.color) for i in picked]
    noisy, levels = add_noise(clean, setting.noise, experiment.noise_seed, TEST)
    networks = {name: read_checkpoint(path).network().to(device)
                for name, path in checkpoints.items()}
    use_bm3d = experiment.bm3d and setting.noise.kind == "gaussian"
    rows, example = [], {}
    with torch.inference_mode():
        for k in tqdm(range(len(clean)), desc=f"evaluate {setting.name}", unit="image", disable=not progress):
            outputs = {NOISY: torch.from_numpy(noisy[k])[None]}
            outputs |= {name: denoise_image(network, noisy[k], device) for name, network in networks.items()}
            if use_bm3d:
                outputs[BM3D] = torch.from_numpy(np.clip(_bm3d(noisy[k], levels[k] / 255.0), 0, 1))[None]
            reference = torch.from_numpy(clean[k])[None]
            for name, output in outputs.items():
                rows.append({"setting": setting.name, "image": files[picked[k]].name, "noise_level": levels[k],
                             "method": name, "psnr": float(psnr(output, reference, IMAGE_RANGE)[0]),
                             "ssim": float(ssim(output, reference, IMAGE_RANGE)[0])})
            if k == 0:
                example = {name: output[0].numpy() for name, output in outputs.items()} | {"clean": clean[0]}
    return _SettingResult(rows, example)


def _summary(experiment: PaperExperiment, results: Mapping[str, _SettingResult], budget_note: str) -> dict[str, Any]:
    from n2g_ct import __version__

    table = {}
    for setting in experiment.settings:
        by_method: dict[str, dict[str, list[float]]] = {}
        for row in results[setting.name].rows:
            scores = by_method.setdefault(row["method"], {"psnr": [], "ssim": []})
            scores["psnr"].append(row["psnr"])
            scores["ssim"].append(row["ssim"])
        methods = {name: {"psnr": float(np.mean(s["psnr"])), "ssim": float(np.mean(s["ssim"])),
                          "images": len(s["psnr"]), "paper_psnr": setting.paper.get(name)}
                   for name, s in by_method.items()}
        compared = [name for name in methods if methods[name]["paper_psnr"] is not None]
        table[setting.name] = {
            "noise": setting.noise.name,
            "methods": methods,
            "paper_order": sorted(compared, key=lambda n: -methods[n]["paper_psnr"]),
            "run_order": sorted(compared, key=lambda n: -methods[n]["psnr"]),
        }
    return {
        "n2g_ct_version": __version__,
        "title": experiment.title,
        "settings": table,
        "methods": [{"name": m.name, "description": m.description} for m in experiment.methods],
        "protocol": {
            "psnr": "per image 10·log10(1/MSE), output clipped to [0, 1], MSE over all pixels and channels "
                    "(data range 1 = 255 on 8-bit values, no rounding); mean over the test images",
            "ssim": "Gaussian window 11, σ 1.5, population covariance, mean over the channels and the image",
            "images": f"{'RGB' if experiment.color else 'grey (BT.601 luma)'}; test folder {experiment.test_folder.name}, "
                      f"{_image_count(results)} image(s) per setting; one noise realisation per image, seed "
                      f"{experiment.noise_seed}, the same for every method",
            "pools": f"training folder {experiment.train_folder.name}: the last {experiment.validation_images} images "
                     "for validation; of the rest, the first half is the noisy pool (one fixed noise realisation "
                     "each), the second half the clean pool",
            "bm3d": "CBM3D (bm3d package, bm3d_rgb) with each image's true σ, Gaussian settings only"
                    if experiment.bm3d else "not run",
            "budget": budget_note,
        },
    }


def _image_count(results: Mapping[str, _SettingResult]) -> int:
    return max((len({r["image"] for r in result.rows}) for result in results.values()), default=0)


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "–"
    paper = entry.get("paper_psnr")
    return f"{entry['psnr']:.2f}" + (f" ({paper:.2f})" if paper is not None else "")


def summary_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per setting, per method "this run (paper)" mean PSNR in dB."""
    names = [NOISY, *(m["name"] for m in summary["methods"])]
    if any(BM3D in s["methods"] for s in summary["settings"].values()):
        names.append(BM3D)
    rows = [[s["noise"], *(_cell(s["methods"].get(name)) for name in names)] for s in summary["settings"].values()]
    return ["noise", *names], rows


def ordering_lines(summary: Mapping[str, Any]) -> list[str]:
    """Per setting: the methods the paper reports, ranked by the paper and by this run."""
    lines = []
    for setting in summary["settings"].values():
        paper, run = setting["paper_order"], setting["run_order"]
        if len(paper) > 1:
            verdict = "holds" if paper == run else "differs"
            lines.append(f"{setting['noise']}: paper {' > '.join(paper)}; this run {' > '.join(run)} ({verdict})")
    return lines


def _budget_note(configs: Mapping[tuple[str, str], Any], device: torch.device) -> str:
    """Steps, batch, crops and training minutes of the runs, as run (from their last checkpoints)."""
    from n2g_ct.models.checkpoint import load_checkpoint
    from n2g_ct.training.run_folder import RunFolder

    states = [load_checkpoint(RunFolder(c.run.out_dir).last_checkpoint) for c in configs.values()]
    steps = [s["step"] for s in states]
    minutes = [s["elapsed_s"] / 60 for s in states]
    first = next(iter(configs.values()))
    step_range = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"
    return (f"{step_range} steps per run, batch {first.optim.batch_size}, {first.data.crop_size}² crops; "
            f"{min(minutes):.1f}-{max(minutes):.1f} min of training per run; evaluated on {device}")


def _example_png(example: Mapping[str, np.ndarray], title: str) -> bytes:
    from n2g_ct.evaluation.reports import figure, png

    names = list(example)
    fig = figure(3.2 * len(names), 3.4)
    for axis, name in zip(fig.subplots(1, len(names)), names):
        image = np.moveaxis(example[name], 0, -1)
        height, width = image.shape[:2]
        crop = image[height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2]
        axis.imshow(crop.squeeze(), cmap="gray" if crop.shape[-1] == 1 else None, vmin=0, vmax=1)
        axis.set_title(name)
        axis.axis("off")
    fig.suptitle(title, y=1.03)
    return png(fig)


def _versus_paper_png(summary: Mapping[str, Any]) -> bytes:
    from n2g_ct.evaluation.reports import figure, png

    settings = list(summary["settings"].values())
    fig = figure(4.0 * len(settings), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(settings)))
    for axis, setting in zip(axes, settings):
        names = [n for n in setting["methods"] if n != NOISY]
        x = np.arange(len(names))
        axis.bar(x - 0.2, [setting["methods"][n]["psnr"] for n in names], 0.4, label="this run")
        axis.bar(x + 0.2, [setting["methods"][n]["paper_psnr"] or math.nan for n in names], 0.4, label="paper")
        axis.axhline(setting["methods"][NOISY]["psnr"], color="grey", linestyle="--", label="noisy input")
        axis.set_xticks(x, names, rotation=30, ha="right")
        axis.set_title(setting["noise"])
        axis.set_ylabel("PSNR (dB)")
        axis.legend(fontsize=8, loc="lower center")
    return png(fig)


def write_report(out_dir: Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 results: Mapping[str, _SettingResult], curves: Mapping[str, bytes]) -> None:
    """``per_image.csv``, ``summary.json``, ``figures/``, ``report.md`` and ``report.html`` into ``out_dir``."""
    from n2g_ct.atomic import write_text_atomic
    from n2g_ct.evaluation.reports import (
        FIGURES_DIR,
        Section,
        html_document,
        markdown_document,
        write_csv,
        write_json,
    )

    header, table_rows = summary_table(summary)
    protocol = summary["protocol"]
    sections = [
        Section("PSNR (dB): this run (the paper)", header, table_rows),
        Section("Orderings", lines=ordering_lines(summary)),
        Section("Methods", lines=[f"{m['name']}: {m['description']}" for m in summary["methods"]]),
        Section("Protocol", lines=[f"{key}: {value}" for key, value in protocol.items()]),
    ]
    figures = [("versus_paper.png", "PSNR of this run beside the paper's", _versus_paper_png(summary))]
    figures += [(f"learning_curves_{name}.png", f"Learning curves, {name}", data) for name, data in curves.items()]
    figures += [(f"example_{name}.png", f"Test image {i + 1} (centre crop), {name}",
                 _example_png(result.example, summary["settings"][name]["noise"]))
                for i, (name, result) in enumerate(results.items())]
    (out_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    for name, _, data in figures:
        (out_dir / FIGURES_DIR / name).write_bytes(data)
    write_csv(out_dir / "per_image.csv", rows, ["setting", "image", "noise_level", "method", "psnr", "ssim"])
    write_json(out_dir / "summary.json", summary)
    intro = f"n2g-ct {summary['n2g_ct_version']}: {summary['title']}."
    write_text_atomic(out_dir / "report.md", markdown_document(summary["title"], intro, sections,
                                                               [(n, c) for n, c, _ in figures]))
    write_text_atomic(out_dir / "report.html", html_document(summary["title"], intro, sections, figures))


def render_text(summary: Mapping[str, Any]) -> str:
    """The PSNR table as aligned text."""
    header, rows = summary_table(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


@dataclass(frozen=True)
class PaperResult:
    """A finished experiment: its checkpoints by ``SETTING/METHOD`` and the evaluation."""

    out_dir: Path  # the evaluation folder
    summary: dict[str, Any]
    checkpoints: dict[str, Path]

    def render(self) -> str:
        return "\n".join([f"report: {self.out_dir / 'report.html'}", "", "PSNR (dB): this run (paper)",
                          render_text(self.summary), "", *ordering_lines(self.summary)])


def run_paper_experiment(experiment: PaperExperiment, out: Path, *, budget: Budget | None = None,
                         device: str | None = None, progress: bool = True, overwrite: bool = False) -> PaperResult:
    """Train every (setting, method), evaluate on the test images and write ``OUT/evaluation``.

    Finished runs are skipped and interrupted ones resume; an existing evaluation is kept unless
    ``overwrite``.
    """
    import json

    from n2g_ct.atomic import staged_output
    from n2g_ct.devices import Processes, select_device
    from n2g_ct.evaluation.reports import learning_curves_png
    from n2g_ct.training.loop import train_to_completion

    configs = train_configs(experiment, out, budget, device)
    checkpoints = {key: train_to_completion(config, "/".join(key), progress) for key, config in configs.items()}
    named = {"/".join(key): path for key, path in checkpoints.items()}
    evaluation = out / "evaluation"
    if (evaluation / "summary.json").exists() and not overwrite:
        log.info("evaluation %s exists; skipping (overwrite to redo it)", evaluation)
        return PaperResult(evaluation, json.loads((evaluation / "summary.json").read_text()), named)
    torch_device = select_device(device or "auto", Processes())
    results = {
        setting.name: _evaluate_setting(
            experiment, setting, {m.name: checkpoints[setting.name, m.name] for m in experiment.methods},
            torch_device, progress)
        for setting in experiment.settings
    }
    curves = {}
    for setting in experiment.settings:
        runs = {m.name: configs[setting.name, m.name].run.out_dir for m in experiment.methods}
        data = learning_curves_png(runs, "psnr", "validation PSNR (dB), images in [0, 1]")
        if data is not None:
            curves[setting.name] = data
    summary = _summary(experiment, results, _budget_note(configs, torch_device))
    rows = [row for result in results.values() for row in result.rows]
    with staged_output(evaluation) as staging:
        staging.mkdir(parents=True)
        write_report(staging, summary, rows, results, curves)
    return PaperResult(evaluation, summary, named)
