"""Training loop: seeding, device and mixed precision, LR schedule, checkpoints, resume, logging, DDP.

One loop serves every method (:mod:`n2g_ct.methods`): the loop calls the method's step through
`TrainingMethod` and knows nothing of what it computes. Under ``torchrun`` each process trains on its
own crops with ``DistributedDataParallel`` (NCCL on GPU, gloo on CPU); rank 0 writes logs and
checkpoints. Resume is exact: the crops and detail-destruction masks of step ``t`` depend only on
(seed, rank, t), and the checkpoint holds the model, optimiser, schedule and step budget, so a
resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.contrib.logging import logging_redirect_tqdm

from n2g_ct.config import to_dict
from n2g_ct.devices import Processes, init_processes, select_device
from n2g_ct.errors import ConfigError, InputError
from n2g_ct.methods import StepResult, TrainingMethod, build_method
from n2g_ct.models import build_denoiser
from n2g_ct.models.checkpoint import load_weights, read_checkpoint, save_checkpoint
from n2g_ct.quality.self_check import SelfCheckResult
from n2g_ct.training.budget import StepBudget, TrainingBar
from n2g_ct.training.config import TrainConfig
from n2g_ct.training.data import Validation, build_self_check, build_training_batches, build_validation
from n2g_ct.training.run_folder import RunFolder
from n2g_ct.training.run_log import RunLog

log = logging.getLogger(__name__)


class HarmfulModel(Exception):
    """F failed ``run.stop_on_harm`` self-checks in a row; a checkpoint of the last step was saved."""

    def __init__(self, step: int, failures: str) -> None:
        super().__init__(f"stopped after step {step}: the model failed {failures}; checkpoint saved, see "
                         "self_check.csv")
        self.step = step


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was saved."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.step = step
        self.signum = signum


def build_training_method(config: TrainConfig) -> TrainingMethod:
    """F (a fresh U-Net of ``config.model``) inside the configured method, which adds what it owns (G)."""
    model = config.model
    denoiser = build_denoiser(model.channels, model.channels, model.base_width, model.depth, model.residual,
                              model.local_mean_px)
    return build_method(config.method.name, denoiser, config.method.noise2grad, model.channels)


def lr_factor(step: int, total_steps: int, decay_start: float) -> float:
    """Learning-rate multiplier before optimiser step ``step`` (from 0): 1, then linear to 0.

    >>> [round(lr_factor(s, 10, 0.5), 2) for s in (0, 4, 5, 7, 9)]
    [1.0, 1.0, 1.0, 0.6, 0.2]
    """
    start = int(total_steps * decay_start)
    if step < start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / max(1, total_steps - start))


def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


_MASK_STREAM = 1  # tells the mask seeds apart from the crop seeds of the data streams


def mask_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the detail-destruction masks at (``seed``, ``rank``, ``step``).

    Like the crops (:mod:`n2g_ct.datasets.slices`), masks are derived per step rather than drawn from a
    carried RNG state, which makes resume exact on every rank.
    """
    return int(np.random.SeedSequence([seed, rank, step, _MASK_STREAM]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class _Trainer:
    """The mutable state of one run; :func:`train` drives it."""

    config: TrainConfig
    processes: Processes
    device: torch.device
    method: TrainingMethod
    model: nn.Module  # the method, DDP-wrapped when several processes train
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    budget: StepBudget
    step: int = 0
    best_psnr: float = -math.inf
    self_check: dict[str, Any] | None = None  # the last self-check's values (SelfCheckResult.as_dict)
    failed_checks: int = 0  # failing self-checks in a row
    lr: float = 0.0  # learning rate of the last step
    elapsed_before_s: float = 0.0  # training time of the run before this process resumed it
    started: float = field(default_factory=time.perf_counter)

    def elapsed_s(self) -> float:
        """Training wall time of the whole run so far, seconds (continues across resumes)."""
        return self.elapsed_before_s + time.perf_counter() - self.started

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.config.run.out_dir)

    def save(self, path: Path | None = None) -> None:
        """Everything needed to resume (and, for inference, to rebuild F), to ``path`` (default: last)."""
        if self.processes.is_main:
            save_checkpoint(
                path or self.folder.last_checkpoint, config=to_dict(self.config),
                denoiser=self.method.denoiser.state_dict(), step=self.step,
                total_steps=self.budget.total if self.budget.fixed else None, self_check=self.self_check,
                noise_approximator=self.method.auxiliary_state(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), best_psnr=self.best_psnr,
                failed_checks=self.failed_checks, elapsed_s=self.elapsed_s(), world_size=self.processes.world_size,
            )

    def restore(self, path: Path) -> None:
        checkpoint = read_checkpoint(path, map_location=self.device)
        state, info = checkpoint.state, checkpoint.info
        if state.get("world_size", 1) != self.processes.world_size:
            raise InputError(
                f"{path}: saved by a run of {state.get('world_size')} process(es); resume it with the same "
                f"number (now {self.processes.world_size}) so that every rank draws the same crops"
            )
        try:
            mismatch = f"{path}: does not match this run's model or method"
            load_weights(self.method.denoiser, state.get("denoiser"), f"{mismatch} (denoiser)")
            self.method.load_auxiliary_state(state.get("noise_approximator"), mismatch)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: does not match this run's model or method ({exc})") from None
        self.step = info.step
        self.best_psnr = float(state["best_psnr"])
        self.self_check = info.self_check
        self.failed_checks = int(state.get("failed_checks", 0))
        self.elapsed_before_s = float(state["elapsed_s"])
        if info.total_steps is not None:
            self.budget.total, self.budget.fixed = info.total_steps, True
        changed = _changed_keys(info.config, to_dict(self.config))
        if changed:
            log.warning("resuming with a changed configuration (%s): the run is no longer identical to an "
                        "uninterrupted one", ", ".join(changed))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _initial_weights(method: TrainingMethod, path: Path) -> None:
    """Load F's weights from a checkpoint or exported model (``model.init_from``)."""
    source = read_checkpoint(path)
    residual = source.info.unet.residual
    if residual != method.denoiser.residual:
        kind = "a residual U-Net" if residual else "the paper's U-Net (not residual)"
        raise InputError(f"{path}: its denoiser is {kind}; set model.residual: {str(residual).lower()} to start "
                         "from it, or train from scratch")
    load_weights(method.denoiser, source.state.get("denoiser"),
                 f"{path}: its denoiser does not fit this run's model settings (model.channels, base_width, depth)")
    log.info("F starts from the weights of %s", path)


def _build_trainer(config: TrainConfig, processes: Processes, device: torch.device) -> _Trainer:
    torch.manual_seed(config.run.seed)  # the same initial weights on every rank
    method = build_training_method(config)
    if config.model.init_from is not None:
        _initial_weights(method, config.model.init_from)
    method = method.to(device)
    if device.type == "cpu" and processes.world_size == 1:
        # oneDNN's fast layout: 1.4x the steps per minute of the default one (BENCHMARKS.md). Not under
        # DDP, whose start-up broadcast of the parameters refuses channels-last ones.
        method = method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if processes.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(method, device_ids=ids, find_unused_parameters=True)
    optim = config.optim
    budget = StepBudget.from_config(optim.steps, optim.minutes)
    optimizer = torch.optim.Adam(method.parameters(), lr=optim.lr, betas=optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, budget.total, optim.decay_start)
    )
    use_scaler = device.type == "cuda" and config.run.amp and not torch.cuda.is_bf16_supported()
    return _Trainer(
        config, processes, device, method, model, optimizer, scheduler,
        torch.amp.GradScaler(device.type, enabled=use_scaler), budget,
    )


def _train_step(trainer: _Trainer, batch: dict[str, Tensor]) -> StepResult:
    """One optimiser step (``trainer.step`` already counts it)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(mask_seed(trainer.config.run.seed, trainer.processes.rank, trainer.step))
    with _autocast(trainer.device, trainer.config.run.amp):
        result = trainer.model(batch, trainer.step, generator)
    trainer.scaler.scale(result.loss).backward()
    trainer.method.before_optimizer_step(result)
    trainer.lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    return result


def _log_row(trainer: _Trainer, result: StepResult) -> dict[str, float | int | str]:
    row: dict[str, float | int | str] = {
        "step": trainer.step,
        "time_s": round(trainer.elapsed_s(), 3),
        "lr": trainer.lr,
        "loss": float(result.loss.detach()),
        "denoise_loss": float(result.denoise_loss),
        "grad_loss": "" if result.grad_loss is None else float(result.grad_loss),
    }
    return {**row, **trainer.method.log_values(result)}


@contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """Collect SIGINT/SIGTERM instead of dying mid-step; the loop checks the list after each step."""
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def _self_check(trainer: _Trainer, check: Any, run_log: RunLog) -> str | None:
    """Run the self-check of F, log it, count failures in a row; what failed once the limit is reached."""
    result: SelfCheckResult = check(trainer.method.denoiser)
    trainer.method.train()
    trainer.self_check = result.as_dict()
    trainer.failed_checks = 0 if result.passed else trainer.failed_checks + 1
    run_log.self_check_row({"step": trainer.step, "passed": int(result.passed), "hu_shift_hu": result.hu_shift_hu,
                            "removed_noise_ratio": result.removed_noise_ratio, "edge_ratio": result.edge_ratio,
                            "noise_std_hu": result.noise_std_hu, "removed_std_hu": result.removed_std_hu,
                            "failures": "; ".join(result.failures)})
    if result.passed:
        log.info("step %d self-check passed: %s", trainer.step, result.describe())
        return None
    log.warning("step %d self-check FAILED on the noisy pool (%d in a row): %s", trainer.step,
                trainer.failed_checks, "; ".join(result.failures))
    limit = trainer.config.run.stop_on_harm
    if limit and trainer.failed_checks >= limit:
        return f"{trainer.failed_checks} self-checks in a row on the noisy pool ({'; '.join(result.failures)})"
    return None


def _loop(trainer: _Trainer, batches: Iterator[dict[str, Tensor]], validation: Validation | None,
          self_check: Any, run_log: RunLog, bar: TrainingBar, stop: list[int]) -> None:
    """Steps until the budget: train, log, validate (keeping the best), self-check, checkpoint, obey signals."""
    run, budget = trainer.config.run, trainer.budget
    trainer.started = time.perf_counter()
    trainer.method.train()
    while trainer.step < budget.total:
        trainer.step += 1
        batch = {k: v.to(trainer.device, non_blocking=True) for k, v in next(batches).items()}
        trainer.method.start(budget.total)  # provisional until a time budget is calibrated
        result = _train_step(trainer, batch)
        if not budget.fixed:
            budget.calibrate(trainer.step, _all_ranks_max(trainer.elapsed_s(), trainer.device, trainer.processes))
        bar.advance(trainer.step, trainer.elapsed_s())
        last = budget.total
        if _due(trainer.step, run.log_every, last):
            row = _log_row(trainer, result)
            run_log.train_row(row)
            bar.note(loss=f"{row['loss']:.4g}")
        if validation is not None and _due(trainer.step, run.validate_every, last):
            scores = validation.score(trainer.method.denoiser)
            trainer.method.train()
            run_log.validation_row({"step": trainer.step, **scores})
            if scores[validation.primary] > trainer.best_psnr:
                trainer.best_psnr = scores[validation.primary]
                trainer.save(trainer.folder.best_checkpoint)
        if trainer.config.data.images is None and _due(trainer.step, run.self_check_every, last):
            harmful = _self_check(trainer, self_check, run_log) if self_check is not None else None
            if _any_rank_flag(harmful is not None, trainer.device, trainer.processes):
                trainer.save()
                raise HarmfulModel(trainer.step, harmful or "the self-checks on rank 0")
        if _due(trainer.step, run.checkpoint_every, last):
            trainer.save()
        if _any_rank_stopped(stop, trainer.device, trainer.processes):
            trainer.save()
            raise TrainingInterrupted(trainer.step, stop[0] if stop else signal.SIGTERM)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a denoiser as configured; returns the path of the last checkpoint.

    Args:
        config: validated training configuration.
        resume: continue from ``run.out_dir/checkpoints/last.pt``.
        progress: show a progress bar (rank 0 only).

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM, after saving a checkpoint.
        HarmfulModel: F failed ``run.stop_on_harm`` self-checks in a row, after saving a checkpoint.
        InputError / ConfigError: bad data, checkpoint or device.
    """
    processes = init_processes(config.run.device)
    device = select_device(config.run.device, processes)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    trainer = _build_trainer(config, processes, device)
    checkpoint = trainer.folder.last_checkpoint
    if resume:
        trainer.restore(checkpoint)
        log.info("resuming %s at step %d", checkpoint, trainer.step)
    elif checkpoint.exists():
        raise ConfigError(
            f"{trainer.folder.root} already holds a run ({checkpoint}); pass --resume to continue it "
            "or choose another run.out_dir"
        )
    validation = build_validation(config.data, device) if processes.is_main else None
    self_check = build_self_check(config, device) if processes.is_main else None
    batches = build_training_batches(config, processes.rank, processes.world_size, first_step=trainer.step + 1)
    show = progress and processes.is_main
    with ExitStack() as stack:
        stop = stack.enter_context(_stop_signals())
        run_log = stack.enter_context(closing(RunLog(
            trainer.folder, to_dict(config), enabled=processes.is_main,
            tensorboard=config.run.tensorboard, truncate_after=trainer.step,
        )))
        stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(TrainingBar(trainer.budget, trainer.step, f"train {trainer.folder.root.name}", show))
        if validation is not None and trainer.step == 0 and config.run.validate_every:
            run_log.validation_row({"step": 0, **validation.score(trainer.method.denoiser)})  # curves start at 0
        _loop(trainer, batches, validation, self_check, run_log, bar, stop)
    return checkpoint


def train_to_completion(config: TrainConfig, name: str, progress: bool = True) -> Path:
    """Train ``config`` to the end of its budget: start, resume from ``last.pt``, or skip a finished run.

    Returns:
        the last checkpoint.
    """
    checkpoint = RunFolder(config.run.out_dir).last_checkpoint
    if checkpoint.exists():
        info = read_checkpoint(checkpoint).info
        if info.complete:
            log.info("training run %s is complete (%d steps); skipping", name, info.step)
            return checkpoint
        log.info("training run %s: resuming at step %d", name, info.step)
    else:
        log.info("training run %s", name)
    return train(config, resume=checkpoint.exists(), progress=progress)


def _all_ranks_max(value: float, device: torch.device, processes: Processes) -> float:
    """The largest ``value`` over all processes (so that every rank fixes the same step budget)."""
    if processes.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _any_rank_flag(flag: bool, device: torch.device, processes: Processes) -> bool:
    """Whether ``flag`` is set on any process (all ranks must leave the loop together)."""
    if processes.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return bool(value.item())


def _any_rank_stopped(stop: list[int], device: torch.device, processes: Processes) -> bool:
    """Whether a stop signal reached any process (all ranks must leave the loop together)."""
    return _any_rank_flag(bool(stop), device, processes)
