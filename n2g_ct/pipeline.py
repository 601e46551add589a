"""Run a ``pipelines/*.yaml`` recipe end to end: simulate → train → evaluate (each step resumable).

A recipe is YAML with these sections (schema: ``pipelines/README.md``):

- ``manifest``: scan a two-dose dataset tree (e.g. Mayo 2016) into ``OUT/manifest.yaml``.
- ``simulate``: low-dose series to make from routine-dose ones (``name``, ``input``, ``dose``, ...);
  written to ``OUT/simulated/NAME``.
- ``train``: named training runs, each a ``n2g-ct train`` configuration (``data``, ``model``,
  ``method``, ``optim``, ``run``); written to ``OUT/train/NAME``.
- ``paper``: instead of the CT sections, one of the Noise2Grad paper's natural-image experiments
  (:mod:`n2g_ct.research.paper_experiments`): noise settings × methods, trained and evaluated on image folders.
- ``evaluate``: paired evaluation of the noisy input, the trained models (by run name, last
  checkpoint) and optional BM3D, on given pairs or a manifest split's test pairs; written to
  ``OUT/evaluation``.

Strings may use ``{data_root}``, ``{out}``, ``{simulated}`` (= ``OUT/simulated``) and ``{manifest}``
(= ``OUT/manifest.yaml``). A budget
(``--budget``: minutes, or ``3000steps``) sets every training run's ``optim``. Finished steps are skipped on a
re-run; an interrupted training run resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from n2g_ct.config import apply_overrides, from_dict, load_yaml
from n2g_ct.datasets.selection import PairSelection
from n2g_ct.errors import ConfigError
from n2g_ct.research.paper_experiments import PaperExperiment
from n2g_ct.training.config import Budget

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
_VARIABLE = re.compile(r"\{(data_root|out|simulated|manifest)\}")
MANIFEST = "manifest.yaml"
CACHE = "cache"  # the evaluation's HU cache, OUT/cache (recipes point their training cache_dir there too)


@dataclass(frozen=True)
class ManifestStep:
    """Scan a dataset tree into ``OUT/manifest.yaml`` (see ``n2g-ct manifest scan``).

    Attributes:
        dataset: dataset definition name in ``data_manifests/`` (``mayo2016``) or its YAML path.
        root: the dataset folder.
        splits: splits to build (default: all of the definition's).
    """

    dataset: str
    root: Path
    splits: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SimulateStep:
    """One simulated low-dose series.

    Attributes:
        name: output folder name under ``OUT/simulated``.
        input: routine-dose series (folder, DICOM file or NIfTI).
        dose: fraction of the source dose, in (0, 1).
        geometry: ``fan`` or ``parallel`` beam.
        seed: noise seed.
        i0: explicit incident photons per ray; default: calibrated to the source's own noise.
    """

    name: str
    input: Path
    dose: float
    geometry: Literal["fan", "parallel"] = "fan"
    seed: int = 0
    i0: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.dose < 1.0:
            raise ValueError(f"dose must be in (0, 1), got {self.dose}")


@dataclass(frozen=True)
class TrainStep:
    """One named training run; ``config`` is a ``n2g-ct train`` configuration mapping."""

    name: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateStep:
    """The paired evaluation.

    Attributes:
        pairs: (low-dose, reference) series and slices to evaluate; or
        split: the test pairs of this split of the recipe's manifest.
        models: training runs to evaluate (their last checkpoints), by name; or ``NAME=CHECKPOINT``
            for a model trained elsewhere (e.g. the starter model).
        bm3d: add BM3D with an estimated noise PSD (and the oracle PSD as an upper bound).
        max_slices: evaluate at most this many slices (evenly spaced); all when None.
    """

    pairs: tuple[PairSelection, ...] = ()
    split: str | None = None
    models: tuple[str, ...] = ()
    bm3d: bool = False
    max_slices: int | None = None

    def __post_init__(self) -> None:
        if bool(self.pairs) == (self.split is not None):
            raise ValueError("give either pairs or split")


@dataclass(frozen=True)
class Recipe:
    """A pipeline recipe (see the module docstring)."""

    n2g_ct_pipeline: int
    name: str
    description: str = ""
    data_root: Path | None = None
    manifest: ManifestStep | None = None
    simulate: tuple[SimulateStep, ...] = ()
    train: tuple[TrainStep, ...] = ()
    evaluate: EvaluateStep | None = None
    paper: PaperExperiment | None = None

    def __post_init__(self) -> None:
        if self.n2g_ct_pipeline != RECIPE_VERSION:
            raise ValueError(f"n2g_ct_pipeline must be {RECIPE_VERSION}, got {self.n2g_ct_pipeline}")
        if self.paper is not None and (self.manifest or self.simulate or self.train or self.evaluate):
            raise ValueError("a paper section stands alone: drop manifest, simulate, train and evaluate")
        names = [s.name for s in self.train]
        if len(set(names)) != len(names):
            raise ValueError(f"training run names must be unique, got {names}")
        if self.evaluate is not None and self.evaluate.split is not None and self.manifest is None:
            raise ValueError("evaluate.split needs a manifest section")
        if self.evaluate is not None:
            unknown = sorted({m for m in self.evaluate.models if "=" not in m} - set(names))
            if unknown:
                raise ValueError(f"evaluate.models names unknown training runs: {', '.join(unknown)}")


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: variables[m.group(1)], value)
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def load_recipe(path: Path, *, data_root: Path | None = None, out: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read a recipe, substitute ``{data_root}``/``{out}``/``{simulated}`` and validate it.

    Raises:
        ConfigError: unreadable YAML, unknown keys, bad values, or no data root where one is needed.
    """
    raw = apply_overrides(load_yaml(path), overrides)
    root = data_root or (Path(path).parent / raw["data_root"] if raw.get("data_root") else None)
    if root is None and "{data_root}" in str(raw):
        raise ConfigError(f"{path}: uses {{data_root}}; pass --data-root")
    variables = {"data_root": str(root), "out": str(out), "simulated": str(out / "simulated"),
                 "manifest": str(out / MANIFEST)}
    recipe = from_dict(Recipe, _substitute(raw, variables), source=str(path))
    return dataclasses.replace(recipe, data_root=root)


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run produced."""

    out: Path
    checkpoints: dict[str, Path]
    evaluation: Any = None  # n2g_ct.evaluation.evaluate.EvaluationResult when the recipe evaluates

    def render(self) -> str:
        """Where everything is, and the evaluation table."""
        lines = [f"pipeline outputs in {self.out}"]
        lines += [f"  model {name}: {path}" for name, path in self.checkpoints.items()]
        if (self.out / LEARNING_CURVES).exists():
            lines.append(f"  learning curves: {self.out / LEARNING_CURVES}")
        if self.evaluation is not None:
            lines += ["", self.evaluation.render()]
        return "\n".join(lines)


LEARNING_CURVES = "learning_curves.png"


def _train_configs(recipe: Recipe, out: Path, budget: Budget | None, device: str | None) -> dict:
    """A validated TrainConfig per run (all checked before anything runs)."""
    from n2g_ct.training.config import TrainConfig

    configs = {}
    for step in recipe.train:
        data = apply_overrides(step.config, [f"run.out_dir={out / 'train' / step.name}"])
        if budget is not None:
            data = apply_overrides(data, budget.overrides())
        if device is not None:
            data = apply_overrides(data, [f"run.device={device}"])
        configs[step.name] = from_dict(TrainConfig, data, source=f"train run {step.name!r}")
    return configs


def _scan(step: ManifestStep, out: Path) -> None:
    from n2g_ct.datasets.scan import scan_dataset

    target = out / MANIFEST
    if target.exists():
        log.info("manifest %s exists; skipping the scan", target)
        return
    log.info("%s", scan_dataset(step.dataset, step.root, target, splits=step.splits).render())


def _simulate(step: SimulateStep, out: Path, device: str | None, progress: bool) -> None:
    from n2g_ct.simulation.projector import ScanGeometry
    from n2g_ct.simulation.series import simulate_series

    target = out / "simulated" / step.name
    if target.exists():
        log.info("simulated series %s exists; skipping", target)
        return
    result, _ = simulate_series(step.input, target, step.dose, geometry=ScanGeometry(kind=step.geometry),
                                i0=step.i0, seed=step.seed, device=device or "auto", progress=progress)
    log.info("simulated %s: %s", target, result.describe())


def run_pipeline(recipe: Recipe, out: Path, *, budget: Budget | None = None, device: str | None = None,
                 progress: bool = True, overwrite: bool = False) -> PipelineResult:
    """Run every step of ``recipe`` into ``out``; finished steps are skipped, training resumes.

    Args:
        recipe: from :func:`load_recipe`.
        out: output folder.
        budget: training minutes or steps of every run (overrides the recipe's ``optim``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for every step.
        progress: progress bars.
        overwrite: redo the evaluation even when its output exists.
    """
    from n2g_ct.atomic import atomic_file
    from n2g_ct.datasets.cache import VolumeCache
    from n2g_ct.evaluation.evaluate import EvaluationResult, ModelSpec, evaluate, evaluate_split
    from n2g_ct.evaluation.reports import learning_curves_png
    from n2g_ct.training.loop import train_to_completion

    if recipe.paper is not None:
        from n2g_ct.research.paper_experiments import run_paper_experiment

        result = run_paper_experiment(recipe.paper, out, budget=budget, device=device, progress=progress,
                                      overwrite=overwrite)
        return PipelineResult(out, result.checkpoints, result)
    configs = _train_configs(recipe, out, budget, device)
    out.mkdir(parents=True, exist_ok=True)
    if recipe.manifest is not None:
        _scan(recipe.manifest, out)
    for step in recipe.simulate:
        _simulate(step, out, device, progress)
    checkpoints = {name: train_to_completion(config, name, progress) for name, config in configs.items()}
    curves = learning_curves_png({name: config.run.out_dir for name, config in configs.items()})
    if curves is not None:
        with atomic_file(out / LEARNING_CURVES) as tmp:
            tmp.write_bytes(curves)
    evaluation = None
    summary = out / "evaluation" / "summary.json"
    if recipe.evaluate is not None and summary.exists() and not overwrite:
        log.info("evaluation %s exists; skipping (overwrite to redo it)", summary.parent)
        evaluation = EvaluationResult(summary.parent, json.loads(summary.read_text()))
    elif recipe.evaluate is not None:
        spec = recipe.evaluate
        models = [ModelSpec.parse(m) if "=" in m else ModelSpec(m, checkpoints[m]) for m in spec.models]
        options = dict(models=models, bm3d=spec.bm3d,
                       max_slices=spec.max_slices, device=device or "auto", overwrite=overwrite, progress=progress,
                       cache=VolumeCache(out / CACHE))
        if spec.split is not None:
            evaluation = evaluate_split(out / MANIFEST, spec.split, out / "evaluation",
                                        data_root=recipe.manifest.root, **options)
        else:
            evaluation = evaluate(spec.pairs, out / "evaluation", split=recipe.name, **options)
    return PipelineResult(out, checkpoints, evaluation)
