"""pjlm's user-facing errors: one base class, so the CLI can tell a mistake the user can fix (one
line, exit 2) from a bug in pjlm (a traceback).

Each subclass also derives from the builtin it refines (ValueError, RuntimeError, …), so code that
caught those before keeps working. Every message names what to change.
"""

from __future__ import annotations


class PjlmError(Exception):
    """Base of every error a user can fix; its message names the field, file or flag to change."""


class ConfigError(PjlmError, ValueError):
    """A configuration value that cannot work; the message names the field to change."""


class DataError(PjlmError, ValueError):
    """Data that does not fit its schema or cannot be read; the message names file, row or byte."""


class CheckpointError(PjlmError, RuntimeError):
    """A missing, corrupt or mismatched checkpoint or work directory; the message says what to change."""


class HFFormatError(PjlmError, ValueError):
    """A Hugging Face model directory whose files are malformed, truncated or point outside it."""


class NonFiniteError(PjlmError, FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last good checkpoint."""


class RewardError(PjlmError, ValueError):
    """A reward component that failed or returned unusable scores; the message names the component
    (and, for a user's function, where it raised)."""


class WorkdirBusyError(CheckpointError):
    """Another live run holds the work directory's lease; the message names the holder."""


class Preempted(PjlmError):
    """A run stopped by SIGTERM/SIGINT after saving: not finished. Run the same command to resume.

    `step` is the step saved, `steps` the run's total, `signum` the signal received."""

    def __init__(self, step: int, steps: int, workdir, signum: int):
        self.step, self.steps, self.workdir, self.signum = step, steps, workdir, signum
        super().__init__(f"preempted at step {step} of {steps} (checkpoint saved in {workdir}); "
                         "run the same command to resume")
