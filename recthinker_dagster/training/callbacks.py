"""``transformers`` trainer callbacks shared by the SFT and GRPO runs.

This module imports transformers; import it where a trainer is built, not at package import.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback


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
    """Hand every trainer log line that has ``key`` (``loss``, ``reward``) to ``log`` as one message."""

    def __init__(self, log: Callable[[str], None], key: str = "loss"):
        self.log, self.key = log, key

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.key in logs:
            self.log(progress_message(state.global_step, state.max_steps, self.key, logs))


def progress_message(step: int, max_steps: int, key: str, logs: dict) -> str:
    return f"step {step}/{max_steps}: {key} {logs[key]:.4f}, lr {logs.get('learning_rate', 0):.2e}"
