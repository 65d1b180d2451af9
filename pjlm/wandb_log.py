"""Weights & Biases logging for `pjlm.metrics.MetricWriter`, on when `train.report_to` includes "wandb"
(`pip install 'pjlm[wandb]'`).

One wandb run per work directory. Its id is kept in `workdir/wandb_id`, written before the first
`wandb.init`, so a resumed run (the same work directory) continues the same wandb run
(`resume="allow"`). Project: `train.wandb_project`, else $WANDB_PROJECT, else "pjlm"; name: the work
directory's name; files: $WANDB_DIR if set, else the work directory; config: the run's whole config
(updated on every start, so a resume's changed fields show). A run already active in the process
(`wandb.init` called by a sweep agent or a notebook) is logged into and left open.

Steps. wandb's own step (`_step`) must increase with every `log` call, and a resume logs again the
steps after its checkpoint (whose rows `truncate_metrics` moves out of metrics.jsonl). So the training
step is logged as a metric, `step`, declared every metric's x-axis with `define_metric` (what Hugging
Face's WandbCallback does with train/global_step), and wandb's `_step` only counts log calls. A
resumed run's rows at steps already logged are therefore kept next to the superseded ones; nothing
is rejected and nothing is lost.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any, Optional

from pjlm.errors import ConfigError
from pjlm.fileio import write_atomic

ID_FILE = "wandb_id"
STEP = "step"
_MISSING = ("train.report_to includes 'wandb' but wandb is not installed; pip install 'pjlm[wandb]', "
            "or drop 'wandb' from train.report_to")


def require_wandb() -> None:
    """A ConfigError naming the install command unless wandb can be imported (checked without
    importing it, which takes a second)."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(_MISSING)


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(_MISSING) from None
    return wandb


def run_id(workdir: Path) -> str:
    """The wandb run id of `workdir`: the saved one, else a new one, saved before it is used."""
    path = workdir / ID_FILE
    if path.exists():
        saved = path.read_text(encoding="utf-8").strip()
        if saved:
            return saved
    new = secrets.token_hex(6)
    write_atomic(path, new + "\n")
    return new


class WandbRun:
    """The wandb side of a `MetricWriter` on the main process: `log(step, values)` and `close()`."""

    def __init__(self, workdir: Path, config: Any, *, local_dir: Optional[Path] = None):
        """`local_dir`: where wandb keeps its files (the work directory, or its local staging copy when
        the work directory is remote); $WANDB_DIR wins."""
        from pjlm.config import to_dict

        wandb = _import_wandb()
        self._owned = wandb.run is None
        if self._owned:
            project = config.train.wandb_project or os.environ.get("WANDB_PROJECT") or "pjlm"
            self._run = wandb.init(project=project, name=workdir.name, id=run_id(workdir), resume="allow",
                                   dir=None if os.environ.get("WANDB_DIR") else str(local_dir or workdir))
        else:
            self._run = wandb.run
        # After init: on a resume wandb loads the config the run had, which this replaces.
        self._run.config.update(to_dict(config), allow_val_change=True)
        self._run.define_metric(STEP)
        self._run.define_metric("*", step_metric=STEP)

    def log(self, step: int, values: dict[str, float | int]) -> None:
        self._run.log({**values, STEP: int(step)})

    def close(self) -> None:
        if self._run is not None and self._owned:
            self._run.finish()
        self._run = None
