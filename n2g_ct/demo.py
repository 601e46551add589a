"""``n2g-ct demo``: the whole chain on a procedural phantom, with no downloaded data.

Writes a chest phantom series, simulates quarter dose, fine-tunes the shipped starter model with
Noise2Grad for a few minutes on the phantom's unpaired pools (as a user would on their own
scanner's data), evaluates it beside the starter model and the noisy input on held-out slices, and
denoises the low-dose series into a derived DICOM series. Everything goes under one output folder;
a re-run skips what is done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from n2g_ct.models import STARTER_MODEL
from n2g_ct.pipeline import PipelineResult, load_recipe, run_pipeline

log = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
TRAINING_RUN = "noise2grad"
"""The recipe's training run (``out/train/noise2grad``)."""
PHANTOM_SLICES = 40
PHANTOM_SIZE = 256
PHANTOM_NOISE_HU = 28.0
"""The phantom's own (routine-dose) noise: about that of the chest CT series (≈ 29 HU in soft tissue),
so the calibrated quarter dose adds about 50 HU, as it does there."""
PHANTOM_RESOLUTION_PX = 1.0
"""Std of the phantom's point-spread function, pixels: reconstructed CT edges are not one pixel sharp."""


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put things."""

    pipeline: PipelineResult
    phantom: Path
    denoised: Path

    def render(self) -> str:
        return "\n".join([
            self.pipeline.render(),
            "",
            f"phantom (routine dose): {self.phantom}",
            f"simulated quarter dose: {self.pipeline.out / 'simulated' / 'quarter_dose'}",
            f"denoised (derived DICOM series): {self.denoised}",
            f"report: {self.pipeline.out / 'evaluation' / 'report.html'}",
        ])


def _previous_minutes(out: Path) -> float | None:
    """The time budget of a demo training run already in ``out``, or None when there is none."""
    from n2g_ct.models.checkpoint import read_checkpoint
    from n2g_ct.training.run_folder import RunFolder

    checkpoint = RunFolder(out / "train" / TRAINING_RUN).last_checkpoint
    if not checkpoint.exists():
        return None
    return read_checkpoint(checkpoint).info.config["optim"].get("minutes")


def run_demo(out: Path, *, minutes: float = 3.0, device: str | None = None, progress: bool = True,
             overwrite: bool = False) -> DemoResult:
    """Run the demo into ``out`` (see the module docstring); ``minutes`` of Noise2Grad training.

    A demo already in ``out`` is reused (a re-run skips what is done); when it was trained for
    other ``minutes``, that is said, and ``overwrite`` trains, evaluates and denoises again.
    """
    import shutil

    from n2g_ct.inference.denoise import denoise_inputs
    from n2g_ct.simulation.phantom import chest_phantom, write_phantom_series
    from n2g_ct.training.config import Budget

    previous = _previous_minutes(out)
    if previous is not None and overwrite:
        log.info("--overwrite: training, evaluating and denoising again (the phantom and its simulation are kept)")
        shutil.rmtree(out / "train" / TRAINING_RUN)
    elif previous is not None and previous != minutes:
        log.warning("%s holds a demo trained for %g minute(s); it is reused and --minutes %g is not applied "
                    "(--overwrite trains again)", out, previous, minutes)
    phantom = out / "phantom"
    if not phantom.exists():
        log.info("writing the phantom series to %s", phantom)
        from n2g_ct.atomic import staged_output

        with staged_output(phantom) as staging:
            write_phantom_series(staging, chest_phantom(PHANTOM_SLICES, PHANTOM_SIZE, seed=0, noise_hu=PHANTOM_NOISE_HU,
                                                    resolution_px=PHANTOM_RESOLUTION_PX), spacing_xyz=(1.0, 1.0, 2.0))
    recipe = load_recipe(RECIPE, data_root=out, out=out,
                         overrides=(f"train.0.config.model.init_from={STARTER_MODEL}",
                                    f"evaluate.models=[starter={STARTER_MODEL}, noise2grad]"))
    result = run_pipeline(recipe, out, budget=Budget(minutes=minutes), device=device, progress=progress,
                          overwrite=overwrite)
    denoised = out / "denoised"
    summary = denoise_inputs([out / "simulated" / "quarter_dose"], denoised, result.checkpoints[TRAINING_RUN],
                             device=device or "auto", progress=progress, overwrite=overwrite)
    if not summary.ok:
        log.warning("denoising reported problems:\n%s", summary.render())
    return DemoResult(result, phantom, denoised)
