"""The trainer: learning on an unpaired problem, exact resume, schedules, checkpoints, DDP, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from denoise_factories import identity_checkpoint
from factories import correlated_noise, smooth_images, write_ct_series

import n2g_ct.training.loop as train_module
from n2g_ct.config import from_dict
from n2g_ct.errors import ConfigError, InputError
from n2g_ct.methods.noise2grad import uses_gradient_loss
from n2g_ct.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint
from n2g_ct.quality.metrics import DISPLAY_WINDOW, psnr
from n2g_ct.quality.self_check import SelfCheckResult
from n2g_ct.training.config import TrainConfig
from n2g_ct.training.data import build_self_check
from n2g_ct.training.loop import HarmfulModel, TrainingInterrupted, train

SIZE = 48
NOISE_HU = 120.0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """An unpaired problem: noisy pool (smooth images + correlated noise), unrelated clean pool, paired test."""
    root = tmp_path_factory.mktemp("synthetic")
    noisy_pool = smooth_images(6, SIZE, seed=1) + correlated_noise((6, SIZE, SIZE), NOISE_HU, seed=4)
    test_reference = smooth_images(3, SIZE, seed=3)
    test_low = test_reference + correlated_noise((3, SIZE, SIZE), NOISE_HU, seed=5)
    for name, hu in [("noisy", noisy_pool), ("clean", smooth_images(6, SIZE, seed=2)),
                     ("test_low", test_low), ("test_ref", test_reference)]:
        write_ct_series(root / name, np.round(hu))
    return root


def make_config(root: Path, out: Path, **sections) -> TrainConfig:
    data = {
        "data": {
            "noisy": [{"series": str(root / "noisy")}],
            "clean": [{"series": str(root / "clean")}],
            "paired": [{"low_dose": str(root / "test_low"), "reference": str(root / "test_ref")}],
            "validation": [{"low_dose": str(root / "test_low"), "reference": str(root / "test_ref")}],
            "window_hu": [-500, 500],
            "crop_size": 32,
            "cache_dir": str(root / "cache"),
        },
        "model": {"base_width": 8},
        "method": {"noise2grad": {"period": 4}},
        "optim": {"steps": 12, "batch_size": 2},
        "run": {"out_dir": str(out), "log_every": 1, "checkpoint_every": 100, "validate_every": 0},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return from_dict(TrainConfig, data)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_noise2grad_raises_psnr_over_the_noisy_input(synthetic, tmp_path):
    config = make_config(synthetic, tmp_path / "run", optim={"steps": 300, "batch_size": 8, "lr": 1e-3},
                         method={"noise2grad": {"period": 50}}, run={"validate_every": 300, "log_every": 50})
    train(config, progress=False)
    from n2g_ct.io import read_volume

    low = torch.from_numpy(read_volume(synthetic / "test_low").hu)[:, None]
    reference = torch.from_numpy(read_volume(synthetic / "test_ref").hu)[:, None]
    noisy_psnr = float(psnr(low, reference, DISPLAY_WINDOW).mean())
    trained_psnr = float(read_rows(tmp_path / "run" / "validation.csv")[-1]["psnr_display"])
    assert trained_psnr > noisy_psnr + 1.0, (noisy_psnr, trained_psnr)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("variant", ["default", "faithful"])
def test_synthesised_noise_reaches_the_true_noise_level_only_with_the_default_variant(synthetic, tmp_path, variant):
    """The fitted noise scale makes ``n_tilde`` as strong as the real noise within 100 steps; the
    paper's G, learned from ~0 at Adam's step size, stays far weaker (the slow convergence the
    default variant fixes)."""
    config = make_config(synthetic, tmp_path / "run", optim={"steps": 100, "batch_size": 8, "lr": 1e-3},
                         method={"noise2grad": {"period": 50, "variant": variant}}, run={"log_every": 10})
    train(config, progress=False)
    true_std = NOISE_HU / 1000.0  # window [-500, 500] HU → [0, 1]
    late = [float(r["noise_std"]) for r in read_rows(tmp_path / "run" / "train_log.csv")[-5:]]
    ratio = float(np.median(late)) / true_std
    if variant == "default":
        assert 0.75 < ratio < 1.35, ratio
    else:
        assert ratio < 0.3, ratio


def test_gradient_loss_is_logged_on_exactly_the_scheduled_steps(synthetic, tmp_path):
    config = make_config(synthetic, tmp_path / "run", optim={"steps": 20})
    train(config, progress=False)
    rows = read_rows(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    with_grad = [int(r["step"]) for r in rows if r["grad_loss"]]
    assert with_grad == [t for t in range(1, 21) if uses_gradient_loss(t, 4)]
    assert with_grad != list(range(1, 21))  # the delay really skips steps here


def test_learning_rate_is_constant_then_decays_linearly_to_zero(synthetic, tmp_path):
    train(make_config(synthetic, tmp_path / "run", optim={"steps": 10, "lr": 1e-3}), progress=False)
    lrs = [float(r["lr"]) for r in read_rows(tmp_path / "run" / "train_log.csv")]
    # the lr each of steps 1..10 used: constant over the first half, then falling by lr/5 per step
    np.testing.assert_allclose(lrs, [1e-3] * 6 + [8e-4, 6e-4, 4e-4, 2e-4], atol=1e-12)


def test_resume_after_sigint_reproduces_the_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    settings = {"validate_every": 4}
    train(make_config(synthetic, tmp_path / "straight", run=settings), progress=False)

    interrupted = make_config(synthetic, tmp_path / "resumed", run=settings)
    original_step = train_module._train_step

    def step_then_interrupt(trainer, batch):
        result = original_step(trainer, batch)
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # caught: the loop saves and stops after this step
        return result

    monkeypatch.setattr(train_module, "_train_step", step_then_interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        train(interrupted, progress=False)
    assert info.value.step == 5 and info.value.signum == signal.SIGINT
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 5
    monkeypatch.setattr(train_module, "_train_step", original_step)
    train(interrupted, resume=True, progress=False)

    def losses(run, log):
        return [(r["step"], r.get("loss"), r.get("grad_loss"), r.get("psnr_display"))
                for r in read_rows(tmp_path / run / log)]

    for log in ("train_log.csv", "validation.csv"):
        assert losses("resumed", log) == losses("straight", log)
    final = [load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["denoiser"] for run in ("straight", "resumed")]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key])


def test_checkpoint_is_safe_to_load_and_complete(synthetic, tmp_path):
    train(make_config(synthetic, tmp_path / "run", optim={"steps": 3}), progress=False)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 3
    for key in ("denoiser", "optimizer", "scheduler", "config", "versions"):
        assert state[key], key
    assert state["noise_approximator"] == {}, "the measured noise scale has no state to save"
    assert state["config"]["model"]["base_width"] == 8
    assert not list(path.parent.glob(".*.tmp"))  # no temp file left behind


def test_exported_model_is_small_path_free_and_denoises_identically(synthetic, tmp_path):
    from n2g_ct.inference.denoiser import denoise_volume, denoiser_from_checkpoint
    from n2g_ct.io import read_volume
    from n2g_ct.models.checkpoint import export_model

    checkpoint = train(make_config(synthetic, tmp_path / "run", optim={"steps": 3}), progress=False)
    exported = tmp_path / "model.pt"
    export_model(checkpoint, exported)
    assert exported.stat().st_size < 0.6 * checkpoint.stat().st_size  # no optimiser state
    state = load_checkpoint(exported)
    assert "optimizer" not in state and "noise_approximator" not in state
    assert str(synthetic) not in repr(state["config"])  # no training data paths
    hu = read_volume(synthetic / "test_low").hu
    outputs = [denoise_volume(denoiser_from_checkpoint(read_checkpoint(path), device="cpu"), hu)
               for path in (checkpoint, exported)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    before = checkpoint.read_bytes()
    with pytest.raises(InputError, match="would replace the checkpoint"):
        export_model(checkpoint, checkpoint)
    assert checkpoint.read_bytes() == before


def test_fine_tuning_starts_from_the_given_models_weights(synthetic, tmp_path):
    from n2g_ct.models.checkpoint import export_model

    first = train(make_config(synthetic, tmp_path / "first", optim={"steps": 3}), progress=False)
    exported = tmp_path / "model.pt"
    export_model(first, exported)
    tuned = train(make_config(synthetic, tmp_path / "tuned", model={"base_width": 8, "init_from": str(exported)},
                              optim={"steps": 1, "lr": 1e-12}), progress=False)
    start, after = load_checkpoint(first)["denoiser"], load_checkpoint(tuned)["denoiser"]
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)
    assert read_checkpoint(tuned).network().local_mean_px == 8.0  # the default, carried to inference
    fresh = load_checkpoint(train(make_config(synthetic, tmp_path / "fresh", optim={"steps": 1, "lr": 1e-12}),
                                  progress=False))["denoiser"]
    assert not all(torch.allclose(start[k], fresh[k], atol=1e-6) for k in start)
    with pytest.raises(InputError, match="model.pt: its denoiser does not fit"):
        train(make_config(synthetic, tmp_path / "wide", model={"base_width": 16, "init_from": str(exported)}),
              progress=False)
    with pytest.raises(InputError, match="model.pt: its denoiser is a residual U-Net; set model.residual: true"):
        train(make_config(synthetic, tmp_path / "paper", model={"base_width": 8, "residual": False,
                                                                 "init_from": str(exported)}), progress=False)


def test_damaged_foreign_or_missing_checkpoints_get_clear_errors(synthetic, tmp_path):
    config = make_config(synthetic, tmp_path / "run", optim={"steps": 2})
    with pytest.raises(InputError, match="checkpoint not found"):
        train(config, resume=True, progress=False)
    train(config, progress=False)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(config, progress=False)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="not a readable n2g-ct checkpoint"):
        train(config, resume=True, progress=False)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(InputError, match="not an n2g-ct checkpoint"):
        train(config, resume=True, progress=False)


@pytest.mark.parametrize("method", ["supervised", "noise2noise"])
def test_baselines_train_the_same_denoiser_on_pairs(synthetic, tmp_path, method):
    config = make_config(synthetic, tmp_path / "run", method={"name": method}, optim={"steps": 4})
    train(config, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["noise_approximator"] is None
    rows = read_rows(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 4 and all(r["grad_loss"] == "" for r in rows) and "g_weight" not in rows[0]


def write_yaml(config: TrainConfig, path: Path) -> Path:
    from n2g_ct.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def test_two_cpu_processes_train_with_ddp_and_gloo(synthetic, tmp_path):
    config_path = write_yaml(make_config(synthetic, tmp_path / "run", optim={"steps": 6}), tmp_path / "train.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "n2g_ct.cli", "train", str(config_path), "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))  # one writer: rank 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["world_size"] == 2


def test_cli_reports_config_errors_without_traceback(synthetic, tmp_path):
    config_path = write_yaml(make_config(synthetic, tmp_path / "run"), tmp_path / "train.yaml")
    result = subprocess.run([sys.executable, "-m", "n2g_ct.cli", "train", str(config_path), "optim.steps=0",
                             "data.crop_size=huge"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "data.crop_size: expected int, got 'huge'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing ran


def test_a_time_budget_fixes_the_step_count_after_calibration(synthetic, tmp_path):
    from n2g_ct.training.budget import CALIBRATION_STEPS, WARMUP_STEPS

    config = make_config(synthetic, tmp_path / "run", optim={"steps": 100_000, "minutes": 0.05})
    train(config, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    rows = read_rows(tmp_path / "run" / "train_log.csv")
    assert CALIBRATION_STEPS <= state["total_steps"] < 100_000
    assert int(rows[-1]["step"]) == state["total_steps"] == state["step"]
    warm, calibrated = (float(rows[s - 1]["time_s"]) for s in (WARMUP_STEPS, CALIBRATION_STEPS))
    rate = (calibrated - warm) / (CALIBRATION_STEPS - WARMUP_STEPS)
    expected = CALIBRATION_STEPS + max(0.05 * 60 - calibrated, 0) / rate  # a slow machine may spend it all
    assert state["total_steps"] == pytest.approx(expected, rel=0.05)


def test_a_time_budget_is_shown_as_time_from_the_start_and_a_step_budget_as_steps(synthetic, tmp_path, capsys):
    train(make_config(synthetic, tmp_path / "timed", optim={"steps": 100_000, "minutes": 0.02}), progress=True)
    err = capsys.readouterr().err
    assert "train timed:" in err and "of a 0.02-minute budget" in err and "10000" not in err.split("\n")[0]
    assert "of a 0.02-minute budget, 00:01 left" in err, "the time left is right before the first step"
    train(make_config(synthetic, tmp_path / "stepped", optim={"steps": 6}), progress=True)
    err = capsys.readouterr().err
    assert "train stepped:" in err and "6/6" in err and "step/s" in err


def test_tensorboard_events_mirror_the_csv_log(synthetic, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_config(synthetic, tmp_path / "run", optim={"steps": 4}, run={"tensorboard": True, "validate_every": 2}),
          progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [round(e.value, 5) for e in events.Scalars("train/loss")]
    assert losses == [round(float(r["loss"]), 5) for r in read_rows(tmp_path / "run" / "train_log.csv")]
    assert [e.step for e in events.Scalars("validation/psnr_display")] == [0, 2, 4]  # curves start at step 0


def test_noise_scale_benchmark_compares_synthesised_and_true_noise(synthetic, tmp_path, capsys):
    from n2g_ct.research.benchmarks.noise_scale import main as noise_scale_main
    from n2g_ct.research.benchmarks.noise_scale import true_noise_spectrum, true_noise_std_hu

    reference = np.zeros((4, 40, 40), np.float32)
    noise = np.random.default_rng(0).normal(0, 30.0, reference.shape).astype(np.float32)
    assert true_noise_std_hu(reference + noise, reference, crop=16) == pytest.approx(30.0, rel=0.05)
    # white noise: the same power, σ² per coefficient, in every band (those a 16² crop has)
    reference = np.zeros((32, 64, 64), np.float32)  # many independent crops: every band is well sampled
    noise = np.random.default_rng(1).normal(0, 30.0, reference.shape).astype(np.float32)
    spectrum = true_noise_spectrum(reference + noise, reference, crop=16, crops=2048)
    np.testing.assert_allclose(spectrum[~np.isnan(spectrum)], 900.0, rtol=0.2)

    run, measured = tmp_path / "run", tmp_path / "measured"
    train(make_config(synthetic, run, optim={"steps": 6}, method={"noise2grad": {"period": 4, "noise_scale": "spectral"}},
                      run={"validate_every": 3}), progress=False)
    train(make_config(synthetic, measured, optim={"steps": 6}), progress=False)
    figure = tmp_path / "noise.png"
    pair = ["--pair", str(synthetic / "test_low"), str(synthetic / "test_ref")]
    noise_scale_main(["--run", f"spectral={run}", "--run", f"measured={measured}", *pair, "0:2", *pair, "2:",
                      "--out", str(figure)])
    printed = capsys.readouterr().out
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "| spectral | 6 |" in printed and "| measured | 6 | – |" in printed
    assert "true noise std on slices 0:2, 2:" in printed
    with pytest.raises(SystemExit):
        noise_scale_main(["--run", f"spectral={run}", *pair, "first:last", "--out", str(figure)])
    assert "slices 'first:last' are not START:STOP" in capsys.readouterr().err


def test_an_interrupted_robust_run_resumes_identically_to_a_straight_one(synthetic, tmp_path, monkeypatch):
    """Interrupted twice, a ``robust`` run (random noise gains drawn per step) logs the same losses and
    noise levels as a straight run and ends with the same weights."""
    sections = {"method": {"noise2grad": {"variant": "robust", "period": 4}}}
    train(make_config(synthetic, tmp_path / "straight", **sections), progress=False)
    interrupted = make_config(synthetic, tmp_path / "resumed", **sections)
    original_step = train_module._train_step
    stop_after = []

    def step_then_interrupt(trainer, batch):
        result = original_step(trainer, batch)
        if stop_after and trainer.step == stop_after[0]:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_module, "_train_step", step_then_interrupt)
    stop_after.append(5)
    with pytest.raises(TrainingInterrupted):
        train(interrupted, progress=False)
    stop_after[0] = 8
    with pytest.raises(TrainingInterrupted):
        train(interrupted, resume=True, progress=False)
    train(interrupted, resume=True, progress=False)

    rows = {run: [(r["step"], r["loss"], r["noise_std"]) for r in read_rows(tmp_path / run / "train_log.csv")]
            for run in ("straight", "resumed")}
    assert rows["resumed"] == rows["straight"]
    final = {run: load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "resumed")}
    assert all(torch.equal(final["resumed"]["denoiser"][k], v) for k, v in final["straight"]["denoiser"].items())


def test_noise_left_measures_the_share_of_noise_each_band_keeps():
    from n2g_ct.research.benchmarks.noise_left import BAND_EDGES, noise_left_by_band

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 100, (2, 64, 64))
    noise = rng.normal(0, 30, reference.shape)
    left, power = noise_left_by_band(reference + noise, reference, reference + 0.5 * noise)
    assert len(left) == len(BAND_EDGES) - 1
    np.testing.assert_allclose(left, 0.5, atol=1e-9)  # half the noise left, in every band
    assert power.sum() == pytest.approx(float(np.mean((0.5 * noise) ** 2)), rel=1e-9)  # Parseval
    untouched, _ = noise_left_by_band(reference + noise, reference, reference + noise)
    np.testing.assert_allclose(untouched, 1.0)


def test_resuming_as_a_method_whose_g_the_checkpoint_lacks_is_a_clear_error(synthetic, tmp_path):
    """A ``default`` run (measured noise scale: G has no state) cannot resume as ``faithful`` (a learned G)."""
    train(make_config(synthetic, tmp_path / "run", optim={"steps": 4}), progress=False)
    other = make_config(synthetic, tmp_path / "run", optim={"steps": 8},
                        method={"noise2grad": {"variant": "faithful", "period": 4}}, model={"residual": True})
    with pytest.raises(InputError, match="does not match this run's model or method"):
        train(other, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4  # left as it was


def test_step_time_benchmark_times_each_variant_against_the_first(synthetic, tmp_path, monkeypatch, capsys):
    from n2g_ct.research.benchmarks.step_time import main as step_time_main

    config = write_yaml(make_config(synthetic, tmp_path / "run"), tmp_path / "config.yaml")
    monkeypatch.setattr(sys, "argv", ["step_time", str(config), "--variant", "",
                                      "--variant", "model.base_width=4;optim.batch_size=4",
                                      "--steps", "3", "--warmup", "1"])
    step_time_main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("as configured: median ") and lines[0].endswith("12 steps in the time of 12 of the first")
    assert lines[1].startswith("model.base_width=4;optim.batch_size=4: median ")
    assert not (tmp_path / "run").exists()  # timing writes no run directory
    monkeypatch.setattr(sys, "argv", ["step_time", str(config), "--variant", "method.noise2grad.noise_reuse=2"])
    with pytest.raises(ConfigError, match="noise_reuse: removed"):
        step_time_main()


def test_the_training_self_check_catches_a_biased_network_on_the_noisy_pool(synthetic, tmp_path):
    config = make_config(synthetic, tmp_path / "run", run={"self_check_slices": 4}, data={"window_hu": [-1024, 3072]})
    check = build_self_check(config, torch.device("cpu"))
    fine = check(read_checkpoint(identity_checkpoint(tmp_path / "same.pt")).network())
    biased = check(read_checkpoint(identity_checkpoint(tmp_path / "biased.pt", -30.0)).network())
    assert fine.passed and fine.slices == 4
    assert not biased.passed and biased.hu_shift_hu == pytest.approx(-30.0, abs=1.5)


def test_training_logs_self_checks_and_stops_after_failing_ones_in_a_row(synthetic, tmp_path, monkeypatch):
    verdicts = iter([True, False, False, False])

    def fake_build(config, device):
        def check(network):
            passed = next(verdicts)
            return SelfCheckResult(4, 0.0 if passed else -40.0, 9, (0.1,), (1.0,), (1.0,), 10.0, 10.0, 1.0, 1.0,
                                   () if passed else ("HU shift -40.0 HU in uniform soft tissue (limit ±5 HU)",))
        return check

    monkeypatch.setattr(train_module, "build_self_check", fake_build)
    config = make_config(synthetic, tmp_path / "run", optim={"steps": 12},
                         run={"self_check_every": 2, "stop_on_harm": 3})
    with pytest.raises(HarmfulModel, match="failed 3 self-checks in a row .*HU shift -40"):
        train(config, progress=False)
    rows = read_rows(tmp_path / "run" / "self_check.csv")
    assert [(int(r["step"]), int(r["passed"])) for r in rows] == [(2, 1), (4, 0), (6, 0), (8, 0)]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["failed_checks"] == 3 and not state["self_check"]["passed"]


def _torchrun_worker(config_path: Path, out: Path, *extra: str) -> dict:
    """Train under ``torchrun`` with 2 CPU processes (gloo) through ``tests/ddp_worker.py``; its record."""
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(config_path), str(out), *extra],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_with_two_processes_is_deterministic_keeps_ranks_identical_and_resumes_exactly(synthetic, tmp_path):
    """After every step both ranks hold the same F and the same fitted (spectral) noise scale; two runs
    log the same losses and end with the same weights; a run interrupted after step 3 and resumed ends
    as the straight one."""
    spectral_every_step = {"noise_scale": "spectral", "update_delay": False, "period": None}
    sections = {"optim": {"steps": 6}, "method": {"noise2grad": spectral_every_step}}
    paths = {}
    for name in ("first", "second", "resumed"):
        paths[name] = write_yaml(make_config(synthetic, tmp_path / name, **sections), tmp_path / f"{name}.yaml")
    first = _torchrun_worker(paths["first"], tmp_path / "first.json")
    second = _torchrun_worker(paths["second"], tmp_path / "second.json")
    assert first["ranks_agree"] and second["ranks_agree"]
    assert [step for step, _ in first["digests"]] == list(range(1, 7))
    assert first["fits"] == 6, "the noise scale was fitted at every step"
    assert first["digests"] == second["digests"], "deterministic: the same weights after every step"
    logged = {name: [(r["step"], r["loss"], r["g_weight"]) for r in read_rows(tmp_path / name / "train_log.csv")]
              for name in ("first", "second")}
    assert logged["first"] == logged["second"]

    interrupted = _torchrun_worker(paths["resumed"], tmp_path / "interrupted.json", "--interrupt-after", "3")
    assert [step for step, _ in interrupted["digests"]] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    resumed = _torchrun_worker(paths["resumed"], tmp_path / "resumed.json", "--resume")
    assert resumed["ranks_agree"] and [step for step, _ in resumed["digests"]] == [4, 5, 6]
    assert resumed["digests"] == first["digests"][3:], "the resumed run continues exactly"
    assert ([(r["step"], r["loss"]) for r in read_rows(tmp_path / "resumed" / "train_log.csv")]
            == [(step, loss) for step, loss, _ in logged["first"]])
