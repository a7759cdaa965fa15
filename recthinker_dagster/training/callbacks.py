"""``transformers`` trainer callbacks shared by the SFT and GRPO runs.

This module imports transformers; import it where a trainer is built, not at package import.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback

from recthinker_dagster.progress import eta_text


class StepClock(TrainerCallback):
    """Wall time of every optimizer step of this run (a resumed run counts its own steps only)."""

    def __init__(self):
        self.start_step, self.step_seconds, self._last = 0, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self._last = state.global_step, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self._last = now


class LogProgress(TrainerCallback):
    """Hand every trainer log line that has ``key`` (``loss``, ``reward``) to ``log`` as one
    message: the step, ``key`` and ``extra`` figures, the learning rate, seconds per step of
    this run and the time left at that pace."""

    def __init__(self, log: Callable[[str], None], key: str = "loss", extra: tuple[str, ...] = ()):
        self.log, self.key, self.extra = log, key, extra
        self._started: float | None = None
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.key not in logs:
            return
        pace = None
        done = state.global_step - self._first_step
        if self._started is not None and done > 0:
            pace = (time.perf_counter() - self._started) / done
        self.log(progress_message(state.global_step, state.max_steps, self.key, logs, self.extra, pace))


def progress_message(step: int, max_steps: int, key: str, logs: dict, extra: tuple[str, ...] = (),
                     seconds_per_step: float | None = None) -> str:
    parts = [f"{key} {logs[key]:.4f}"] + [f"{name} {logs[name]:.3f}" for name in extra if name in logs]
    message = f"step {step}/{max_steps}: " + ", ".join(parts) + f", lr {logs.get('learning_rate', 0):.2e}"
    if seconds_per_step is not None:
        left = max(max_steps - step, 0) * seconds_per_step
        message += f", {seconds_per_step:.0f} s/step, {eta_text(left)}"
    return message
