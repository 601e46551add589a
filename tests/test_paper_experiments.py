"""The paper's natural-image experiments end to end on tiny images; budgets and the relative update delay."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from n2g_ct.config import from_dict
from n2g_ct.methods import Noise2Grad, Noise2GradOptions
from n2g_ct.pipeline import load_recipe, run_pipeline
from n2g_ct.training.config import Budget, TrainConfig

RECIPE = """
n2g_ct_pipeline: 1
name: tiny
paper:
  title: Tiny table
  train_folder: "{data_root}/train"
  test_folder: "{data_root}/test"
  validation_images: 2
  bm3d: true
  settings:
    - {name: gaussian_25, noise: {kind: gaussian, level: 25}, paper: {n2g: 31.71, bm3d: 30.9, noisy: 20.2}}
    - {name: speckle_01, noise: {kind: speckle, level: 0.1}}
  methods:
    - {name: n2g, description: Noise2Grad, config: {method: {name: noise2grad, noise2grad: {period: 50%}}}}
    - {name: fake, description: superposed pairs, config: {method: {name: supervised}, images: {pairs: superposed}}}
  train:
    data: {crop_size: 32}
    model: {base_width: 4, depth: 2}
    optim: {batch_size: 2, steps: 1000}
    run: {validate_every: 3, checkpoint_every: 3, log_every: 1}
"""


def write_images(folder, count, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:48] / 40
    for i in range(count):
        phase = rng.uniform(0, 6, 3)
        image = 0.5 + 0.35 * np.sin(4 * xx[..., None] + 3 * yy[..., None] + phase)
        matplotlib.image.imsave(folder / f"img_{i:02d}.png", np.clip(image, 0, 1))


@pytest.fixture
def experiment(tmp_path):
    write_images(tmp_path / "data" / "train", 8, 0)
    write_images(tmp_path / "data" / "test", 3, 1)
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    return load_recipe(tmp_path / "tiny.yaml", data_root=tmp_path / "data", out=tmp_path / "out"), tmp_path / "out"


def test_a_paper_recipe_trains_every_setting_and_method_and_reports_beside_the_paper(experiment):
    recipe, out = experiment
    result = run_pipeline(recipe, out, budget=Budget(steps=3), progress=False)
    assert set(result.checkpoints) == {"gaussian_25/n2g", "gaussian_25/fake", "speckle_01/n2g", "speckle_01/fake"}
    for path in result.checkpoints.values():
        assert torch.load(path, weights_only=False)["step"] == 3  # the budget replaced optim.steps
    evaluation = out / "evaluation"
    summary = json.loads((evaluation / "summary.json").read_text())
    gaussian = summary["settings"]["gaussian_25"]["methods"]
    assert set(gaussian) == {"noisy", "n2g", "fake", "bm3d"}  # BM3D with the true σ: Gaussian only
    assert set(summary["settings"]["speckle_01"]["methods"]) == {"noisy", "n2g", "fake"}
    assert gaussian["n2g"]["paper_psnr"] == 31.71 and gaussian["fake"]["paper_psnr"] is None
    assert gaussian["bm3d"]["psnr"] > gaussian["noisy"]["psnr"] + 3  # BM3D denoises these smooth images
    assert gaussian["noisy"]["images"] == 3
    rows = (evaluation / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * (4 + 3)
    report = (evaluation / "report.md").read_text()
    assert "| gaussian σ=25 |" in report and "(31.71)" in report and "(30.90)" in report
    for figure in ("versus_paper.png", "learning_curves_gaussian_25.png", "example_speckle_01.png"):
        assert (evaluation / "figures" / figure).read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64" in (evaluation / "report.html").read_text()
    assert "(31.71)" in result.render()
    setting = summary["settings"]["gaussian_25"]
    assert setting["paper_order"] == ["n2g", "bm3d", "noisy"]
    assert setting["run_order"] == sorted(setting["paper_order"], key=lambda n: -gaussian[n]["psnr"])
    assert "paper n2g > bm3d > noisy; this run " in report


def test_a_rerun_skips_finished_runs_and_keeps_the_evaluation(experiment):
    recipe, out = experiment
    run_pipeline(recipe, out, budget=Budget(steps=3), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} | {
        out / "evaluation" / "summary.json": (out / "evaluation" / "summary.json").stat().st_mtime_ns}
    run_pipeline(recipe, out, budget=Budget(steps=3), progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_natural_image_validation_of_the_identity_scores_the_noisy_input(experiment):
    from n2g_ct.datasets.images import ImagePools
    from n2g_ct.quality.metrics import IMAGE_RANGE, psnr
    from n2g_ct.research.paper_experiments import train_configs
    from n2g_ct.training.data import build_validation

    recipe, out = experiment
    config = next(iter(train_configs(recipe.paper, out).values()))
    validation = build_validation(config.data, torch.device("cpu"))
    images = config.data.images
    pools = ImagePools.from_folder(images.folder, images.noise, color=True, validation_images=2, seed=0)
    expected = np.mean([float(psnr(torch.from_numpy(n)[None], torch.from_numpy(c)[None], IMAGE_RANGE)[0])
                        for n, c in zip(pools.validation_noisy, pools.validation_clean)])
    assert validation.primary == "psnr"
    assert validation.score(nn.Identity())["psnr"] == pytest.approx(expected, abs=1e-4)


def test_image_training_configs_check_channels_and_exclusive_data(tmp_path):
    images = {"folder": str(tmp_path), "noise": {"kind": "gaussian", "level": 25}}
    with pytest.raises(Exception, match="model.channels must be 3"):
        from_dict(TrainConfig, {"data": {"images": images}})
    with pytest.raises(Exception, match="replaces the CT pools"):
        from_dict(TrainConfig, {"data": {"images": images, "noisy": [{"series": "x"}]}, "model": {"channels": 3}})
    assert from_dict(TrainConfig, {"data": {"images": {**images, "color": False}}}).data.images.color is False


@pytest.mark.parametrize(("text", "budget"), [("20", Budget(minutes=20)), ("2.5min", Budget(minutes=2.5)),
                                              ("3000steps", Budget(steps=3000))])
def test_budgets_are_minutes_or_steps(text, budget):
    assert Budget.parse(text) == budget


@pytest.mark.parametrize("text", ["", "fast", "0steps", "-3", "2.5steps"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(text)


def test_a_relative_update_delay_scales_with_the_run_length():
    method = Noise2Grad(nn.Conv2d(1, 1, 1), Noise2GradOptions(variant="faithful", period="10%"))
    batch = {"noisy": torch.rand(1, 1, 8, 8), "clean": torch.rand(1, 1, 8, 8)}

    def grad_steps(total):
        method.start(total)
        return [t for t in range(1, total + 1) if method(batch, t, torch.Generator()).grad_loss is not None]

    def spacing(steps, low, high):
        return set(np.diff([t for t in steps if low <= t < high]).tolist())

    short, long = grad_steps(200), grad_steps(2000)  # periods 20 and 200
    assert short[:22] == list(range(1, 20)) + [20, 22, 24]  # tau = 1 until step 19, then 2
    for fraction in (0.3, 0.6, 0.9):  # the same delay tau at the same point of either run
        tau = round(fraction * 10) + 1
        assert spacing(short, fraction * 200, fraction * 200 + 20) == spacing(long, fraction * 2000, fraction * 2000 + 200) == {tau}
