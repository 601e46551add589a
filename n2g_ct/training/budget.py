"""The step budget of a run (steps, or as many as fit in a time budget) and the training progress bar."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class StepBudget:
    """How many optimiser steps the run takes: ``optim.steps``, or as many as fit in ``optim.minutes``.

    With a time budget the run times steps :data:`WARMUP_STEPS` to :data:`CALIBRATION_STEPS` (the
    first ones are slower) and fixes the total then: the steps done plus as many as fit in the rest
    of the budget at that rate, capped by ``optim.steps``. The learning rate is still constant at
    that point, so the schedule is the same as if the total had been known from the start. The
    total is saved in checkpoints: a resumed run keeps it.
    """

    total: int
    minutes: float | None = None
    fixed: bool = True
    warm: tuple[int, float] = (0, 0.0)  # (step, elapsed s) at the end of the warm-up

    @classmethod
    def from_config(cls, steps: int, minutes: float | None) -> StepBudget:
        return cls(steps, minutes, fixed=minutes is None)

    def calibrate(self, step: int, elapsed_s: float) -> None:
        """Note the warm-up time, then fix the total at the calibration step (once)."""
        if self.fixed or step < WARMUP_STEPS:
            return
        if step == WARMUP_STEPS:
            self.warm = (step, elapsed_s)
            return
        if step < CALIBRATION_STEPS:
            return
        seconds_per_step = max(elapsed_s - self.warm[1], 1e-9) / (step - self.warm[0])
        remaining_s = max(self.minutes * 60.0 - elapsed_s, 0.0)
        self.total = max(step, min(self.total, step + int(remaining_s / seconds_per_step)))
        self.fixed = True
        log.info("time budget %.1f min: %d steps (%.3f s/step over steps %d-%d)",
                 self.minutes, self.total, seconds_per_step, self.warm[0] + 1, step)


WARMUP_STEPS = 10
CALIBRATION_STEPS = 60


class TrainingBar:
    """The training progress bar, labelled with the run: steps of a step budget, or the minutes of
    a time budget (time left and the step count beside), so that its total and ETA are right from
    the first second."""

    def __init__(self, budget: StepBudget, step: int, label: str, show: bool) -> None:
        self.budget = budget
        self.by_time = not budget.fixed
        if self.by_time:
            total = round(budget.minutes * 60)
            self.bar = tqdm(total=total, unit="s", desc=label, disable=not show, dynamic_ncols=True,
                            postfix=f"{tqdm.format_interval(total)} left",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of a "
                            f"{budget.minutes:g}-minute budget" + "{postfix}")
        else:
            self.bar = tqdm(total=budget.total, initial=step, unit="step", desc=label, disable=not show,
                            dynamic_ncols=True)
        self.notes: dict[str, str] = {}

    def advance(self, step: int, elapsed_s: float) -> None:
        """After optimiser step ``step``, ``elapsed_s`` seconds of training into the run."""
        if not self.by_time:
            self.bar.update(step - self.bar.n)
            return
        done = step >= self.budget.total
        self.bar.n = self.bar.total if done else min(int(elapsed_s), self.bar.total)
        left = 0.0 if done else max(self.bar.total - elapsed_s, 0.0)
        steps = f"{step}/{self.budget.total}" if self.budget.fixed else f"{step}"
        notes = "".join(f", {k}={v}" for k, v in self.notes.items())
        self.bar.set_postfix_str(f"{tqdm.format_interval(left)} left, step {steps}{notes}")

    def note(self, **values: str) -> None:
        """Values shown beside the bar (e.g. the loss)."""
        self.notes.update(values)
        if not self.by_time:
            self.bar.set_postfix(**self.notes)

    def __enter__(self) -> TrainingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
