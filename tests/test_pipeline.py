"""Pipeline recipes end to end on a tiny phantom; the phantom itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from n2g_ct.errors import ConfigError
from n2g_ct.io import read_volume
from n2g_ct.pipeline import load_recipe
from n2g_ct.simulation.phantom import chest_phantom, write_phantom_series


def test_phantom_has_ct_tissues_and_is_seeded():
    volume = chest_phantom(3, 64, seed=1)
    assert volume.shape == (3, 64, 64) and volume.dtype == np.float32
    assert (volume <= -990).mean() > 0.2  # air around the body
    assert ((volume > -950) & (volume < -700)).mean() > 0.05  # lungs
    assert ((volume > -150) & (volume < 100)).mean() > 0.2  # fat and soft tissue
    assert (volume > 500).any()  # bone
    np.testing.assert_array_equal(volume, chest_phantom(3, 64, seed=1))
    assert not np.array_equal(volume, chest_phantom(3, 64, seed=2))


def test_phantom_resolution_blurs_edges_without_moving_ct_numbers():
    sharp = chest_phantom(2, 96, seed=1, noise_hu=0.0)
    blurred = chest_phantom(2, 96, seed=1, noise_hu=0.0, resolution_px=1.0)
    step = lambda v: np.abs(np.diff(v, axis=-1)).max()  # noqa: E731 - steepest edge, HU per pixel
    assert step(blurred) < 0.6 * step(sharp)
    assert abs(float(blurred.mean() - sharp.mean())) < 1.0


def test_phantom_series_reads_back_exactly(tmp_path):
    hu = chest_phantom(3, 32)
    write_phantom_series(tmp_path / "ph", hu, spacing_xyz=(0.8, 0.8, 2.5))
    volume = read_volume(tmp_path / "ph")
    np.testing.assert_array_equal(volume.hu, np.clip(hu, -1024, 3071))
    assert volume.spacing_xyz == pytest.approx((0.8, 0.8, 2.5))


def recipe(steps: int = 4) -> dict:
    pairs = [{"low_dose": "{simulated}/low", "reference": "{data_root}/phantom", "slices": [4, 5]}]
    return {
        "n2g_ct_pipeline": 1,
        "name": "tiny",
        "simulate": [{"name": "low", "input": "{data_root}/phantom", "dose": 0.25, "geometry": "parallel", "i0": 100000}],
        "train": [
            {"name": "n2g", "config": {
                "data": {"noisy": [{"series": "{simulated}/low", "slices": [0, 1]}],
                         "clean": [{"series": "{data_root}/phantom", "slices": [2, 3]}],
                         "validation": pairs, "crop_size": 32, "cache_dir": "{out}/cache"},
                "model": {"base_width": 4},
                # a 64-pixel phantom holds no uniform soft tissue to measure the noise in
                "method": {"noise2grad": {"noise_scale": "spectral"}},
                "optim": {"steps": steps, "batch_size": 2},
                "run": {"log_every": 1, "validate_every": 2, "checkpoint_every": 2}}},
        ],
        "evaluate": {"pairs": pairs, "models": ["n2g"]},
    }


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    write_phantom_series(root / "phantom", chest_phantom(6, 64, seed=3))
    return root


def test_recipe_runs_end_to_end_and_a_rerun_skips_finished_steps(tmp_path, data_root):
    from n2g_ct.models import STARTER_MODEL

    spec = recipe()
    spec["evaluate"]["models"] = ["n2g", f"starter={STARTER_MODEL}"]  # a run, and a model trained elsewhere
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "n2g_ct.cli", "run", str(path), "--data-root", str(data_root),
               "--out", str(out), "--device", "cpu", "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_volume(out / "simulated" / "low").shape == (6, 64, 64)
    assert (out / "train" / "n2g" / "checkpoints" / "last.pt").exists()
    assert (out / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert {m["name"] for m in summary["methods"]} >= {"noisy", "n2g", "starter"}
    times = {p: p.stat().st_mtime_ns for p in (out / "simulated" / "low").iterdir()}
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "complete" in again.stderr and "exists; skipping" in again.stderr
    assert times == {p: p.stat().st_mtime_ns for p in (out / "simulated" / "low").iterdir()}


def test_recipes_are_validated_before_anything_runs(tmp_path, data_root):
    bad = recipe()
    bad["evaluate"]["models"] = ["missing"]
    bad["train"][0]["config"]["optim"]["steps"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="evaluate.models names unknown training runs: missing"):
        load_recipe(path, data_root=data_root, out=tmp_path / "out")
    path.write_text(yaml.safe_dump(recipe()))
    with pytest.raises(ConfigError, match=r"uses \{data_root\}; pass --data-root"):
        load_recipe(path, out=tmp_path / "out")
    result = subprocess.run([sys.executable, "-m", "n2g_ct.cli", "run", str(path), "--data-root", str(data_root),
                             "--out", str(tmp_path / "out"), "train.0.config.optim.steps=0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "steps and batch_size must be ≥ 1" in result.stderr
    assert not (tmp_path / "out" / "simulated").exists()


def test_shipped_recipes_load(tmp_path):
    from n2g_ct.demo import RECIPE

    loaded = load_recipe(RECIPE, data_root=tmp_path, out=tmp_path / "out")
    assert loaded.name == "demo" and [t.name for t in loaded.train] == ["noise2grad"]


@pytest.mark.parametrize("split", ["paper", "patient"])
def test_mayo_recipes_run_end_to_end_on_a_fake_mayo_tree(tmp_path, split):
    from fake_mayo import build_fake_mayo

    from n2g_ct.demo import RECIPE

    root = build_fake_mayo(tmp_path / "mayo", "by_dose", size=32)
    recipe_path = RECIPE.parent / f"mayo2016_{split}.yaml"
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "n2g_ct.cli", "run", str(recipe_path), "--data-root", str(root), "--out", str(out),
         "--device", "cpu", "--no-progress", "train.0.config.optim.steps=3", "train.0.config.model.base_width=4",
         "train.0.config.data.crop_size=16",
         "train.0.config.method.noise2grad.noise_scale=spectral"],  # 32-pixel slices: no soft tissue to measure
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["data"]["split"] == split
    assert {m["name"] for m in summary["methods"]} >= {"noisy", "noise2grad"}
    report = (out / "evaluation" / "report.md").read_text()
    assert split in report


PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize("recipe_path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_and_its_training_runs_validate(recipe_path, tmp_path):
    from n2g_ct.config import from_dict
    from n2g_ct.training.config import Budget, TrainConfig

    recipe = load_recipe(recipe_path, data_root=tmp_path / "data", out=tmp_path / "out")
    if recipe.paper is not None:
        from n2g_ct.research.paper_experiments import train_configs

        configs = train_configs(recipe.paper, tmp_path / "out", Budget.parse("50steps"))
        assert len(configs) == len(recipe.paper.settings) * len(recipe.paper.methods)
        assert all(c.optim.steps == 50 and c.optim.minutes is None for c in configs.values())
        return
    assert recipe.train
    for step in recipe.train:
        from_dict(TrainConfig, step.config, source=f"{recipe_path.name}: {step.name}")


def _fake_demo(tmp_path, monkeypatch, minutes: float):
    """A demo folder whose training run was made with ``minutes``; the pipeline and denoise stubbed."""
    import n2g_ct.demo as demo
    from n2g_ct.models.checkpoint import save_checkpoint

    out = tmp_path / "demo"
    config = {"data": {"window_hu": [-1024, 3072]}, "model": {"channels": 1, "base_width": 4, "depth": 2},
              "method": {"name": "noise2grad"}, "optim": {"minutes": minutes}}
    save_checkpoint(out / "train" / demo.TRAINING_RUN / "checkpoints" / "last.pt", config=config, denoiser={}, step=1,
                    total_steps=None, self_check=None)
    (out / "phantom").mkdir(parents=True)
    calls = {}

    class Done:
        checkpoints = {demo.TRAINING_RUN: out / "model.pt"}
        ok = True

    def recorder(name):
        def record(*args, **kwargs):
            calls[name] = kwargs
            return Done()
        return record

    monkeypatch.setattr(demo, "run_pipeline", recorder("pipeline"))
    monkeypatch.setattr("n2g_ct.inference.denoise.denoise_inputs", recorder("denoise"))
    monkeypatch.setattr(demo, "load_recipe", lambda *a, **k: None)
    return demo, out, calls


def test_a_demo_rerun_with_other_minutes_says_so_and_overwrite_trains_again(tmp_path, monkeypatch, caplog):
    demo, out, calls = _fake_demo(tmp_path, monkeypatch, minutes=3.0)
    demo.run_demo(out, minutes=5.0)
    assert "trained for 3 minute(s); it is reused and --minutes 5 is not applied (--overwrite" in caplog.text
    assert not calls["pipeline"]["overwrite"] and (out / "train" / demo.TRAINING_RUN).exists()
    caplog.clear()
    demo.run_demo(out, minutes=5.0, overwrite=True)
    assert "not applied" not in caplog.text and not (out / "train" / demo.TRAINING_RUN).exists()
    assert calls["pipeline"]["overwrite"] and calls["denoise"]["overwrite"]


def test_long_commands_keep_a_timestamped_log_beside_their_outputs_and_nothing_before(tmp_path, caplog):
    import logging

    from factories import phantom_hu, write_ct_series

    from n2g_ct.cli import main

    caplog.set_level(logging.INFO)  # as the command line sets it
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    assert main(["denoise", "--no-progress", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--force"]) == 0
    lines = (tmp_path / "out" / "denoise.log").read_text().splitlines()
    assert lines and all(line[:4].isdigit() and line[10] == " " and line[13] == ":" for line in lines)
    assert any("self-check" in line for line in lines)
    assert main(["denoise", str(tmp_path / "missing"), "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()
