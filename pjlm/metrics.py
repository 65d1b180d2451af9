"""Throughput accounting (FLOPs per trained token, peak chip FLOP/s, tokens/s and model FLOP
utilisation) and metric logging (metrics.jsonl, TensorBoard, Weights & Biases, a progress bar)."""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any, Optional

import numpy as np

from pjlm.config import Config, ModelConfig
from pjlm import fileio
from pjlm.fileio import write_atomic


def param_count(tree: Any) -> int:
    """Elements in a tree of (concrete or abstract) arrays: anything with a `.shape`."""
    import jax

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: every projection in every layer plus
    the output head (counted even when tied to the embedding, since the matmul still happens). The
    embedding lookup, norms and biases are not matmuls."""
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim, config.mlp_dim
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return config.n_layers * per_layer + D * config.vocab_size


def mean_attended_context(config: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends to over a causal sequence of `seq_len` tokens:
    (1/T)·Σ_{t=1..T} min(t, window), i.e. (T+1)/2 without a sliding window."""
    w = config.sliding_window or seq_len
    if w >= seq_len:
        return (seq_len + 1) / 2
    # t ≤ w contributes t; the remaining T − w tokens contribute w each.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a `seq_len` sequence.

    6·M for the weight matmuls (M = `matmul_params`: 2 FLOPs per multiply-add forward, twice that
    backward), plus the attention scores and the weighted sum of values: forward, each is 2·N·H
    FLOPs per attended key, so 4·N·H·c̄ per layer with c̄ the mean attended context
    (`mean_attended_context`, causal: (T+1)/2); backward doubles it, so 12·layers·N·H·c̄ in all.
    This is PaLM's 6N + 12·L·H·Q·T with the causal mask's half of the keys actually counted.
    """
    c = config
    attention = 12 * c.n_layers * c.n_heads * c.resolved_head_dim * mean_attended_context(c, seq_len)
    return 6.0 * matmul_params(c) + attention


# --------------------------------------------------------------------------------------------------
# Peak hardware throughput and model FLOP utilisation.

# Dense (no structured sparsity) peak bf16 FLOP/s per chip, from the vendors' datasheets, keyed by a
# lowercase substring of `jax.Device.device_kind`. Checked in order, so a key that contains another
# key comes first ("h100 pcie" before "h100", "l40s" before "l4", "tpu v5 lite" before "tpu v5").
# A chip missing here gets no MFU rather than a guessed one.
PEAK_BF16_FLOPS: dict[str, float] = {
    # NVIDIA. device_kind examples: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
    # "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA L4".
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h100": 989.4e12,  # SXM
    "h200": 989.4e12,  # also matches GH200, whose GPU has the same peak
    "a100": 312e12,  # SXM and PCIe
    "l40s": 362e12,
    "l40": 181e12,
    "l4": 121e12,
    # Google TPU. device_kind examples: "TPU v4", "TPU v5 lite" (v5e), "TPU v5p" / "TPU v5" (v5p),
    # "TPU v6 lite" (v6e, Trillium).
    "tpu v2": 45e12,
    "tpu v3": 123e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports itself as plain "TPU v5" on some runtimes
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "trillium": 918e12,
}


def peak_flops(device: Any) -> Optional[float]:
    """Dense peak bf16 FLOP/s of one chip, or None for a CPU or a chip not in `PEAK_BF16_FLOPS`.

    `device` is a `jax.Device` (its `device_kind` is looked up) or a device-kind string.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    kind = kind.lower()  # a JAX CPU device's kind is "cpu", which matches no key
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in kind:
            return flops
    return None


class Throughput:
    """Tokens per second (in all, and per device) and MFU between successive `update` calls.

    MFU = tokens_per_s · flops_per_token / (n_devices · peak_flops_per_device); it is reported only
    when the peak is known (`peak_flops` returned a number).
    """

    def __init__(self, flops_per_token: float, n_devices: int,
                 peak_flops_per_device: Optional[float]):
        if n_devices < 1:
            raise ValueError(f"n_devices must be at least 1, got {n_devices}")
        self.flops_per_token = float(flops_per_token)
        self.n_devices = int(n_devices)
        self.peak_flops_per_device = peak_flops_per_device
        self._last: Optional[tuple[int, float]] = None  # (step, time) of the previous call

    def update(self, step: int, tokens: int, now: float | None = None) -> dict[str, float]:
        """Record that `tokens` tokens were trained since the previous call, now at `step`.

        The first call only starts the clock and returns {}. Later calls return tokens_per_s,
        tokens_per_s_per_device, step_time_s (seconds per step since the previous call), and mfu
        when the peak is known. `now` (seconds, monotonic) defaults to `time.perf_counter()`.
        """
        now = time.perf_counter() if now is None else float(now)
        last, self._last = self._last, (step, now)
        if last is None:
            return {}
        elapsed = now - last[1]
        if elapsed <= 0:
            return {}
        tokens_per_s = tokens / elapsed
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.n_devices,
            "step_time_s": elapsed / max(step - last[0], 1),
        }
        if self.peak_flops_per_device:
            achieved = tokens_per_s * self.flops_per_token
            out["mfu"] = achieved / (self.n_devices * self.peak_flops_per_device)
        return out


# --------------------------------------------------------------------------------------------------
# Metric logging: metrics.jsonl, TensorBoard, Weights & Biases, and a progress bar.

METRICS_FILE = "metrics.jsonl"
TEXT_FILE = "text.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> float | int:
    """A metric value as a plain Python number (ints stay ints; arrays and numpy scalars become
    Python floats)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return float(value)


class MetricWriter:
    """Writes training metrics on the main process: one JSON object per `write` appended to
    `workdir/metrics.jsonl` (the durable record: flushed every call, appended to on resume),
    TensorBoard scalars under `workdir/tensorboard`, and a tqdm progress bar (`tqdm.auto`, so it
    renders in terminals and notebooks) showing step/total_steps, loss, tokens/s and tqdm's ETA.

    Given the run's `config`, its `train.report_to` picks the backends beside metrics.jsonl (always
    written): "tensorboard", "wandb" (`pjlm.wandb_log`: one wandb run per work directory, the training
    step as its x-axis); without one, TensorBoard only. `tensorboard=False` turns TensorBoard off either way.

    With `is_main=False` every method is a no-op and no file or directory is created. TensorBoard
    events go through tensorboardX's writer thread, so they are flushed as soon as it has written
    them; `close()` (or leaving the `with` block) guarantees all of them are on disk.

    A remote work directory (gs://) cannot be appended to: the files are written in a local staging
    directory (`pjlm.fileio.Staging`; metrics.jsonl and text.jsonl pulled from the work directory
    first) and uploaded by `sync()`, which the loop calls after each checkpoint, and at `close()`. A
    crash loses the rows logged since the last checkpoint, which a resume logs again anyway.
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, is_main: bool = True,
                 tensorboard: bool = True, progress: bool = True, config: Optional[Config] = None):
        self.workdir = fileio.location(workdir, "workdir")
        self.total_steps = int(total_steps)
        self.is_main = is_main
        self._progress = progress and is_main
        self._bar: Any = None
        self._file: Optional[IO[str]] = None
        self._text_file: Optional[IO[str]] = None
        self._tb: Any = None
        self._wandb: Any = None
        self._staging: Optional[fileio.Staging] = None
        if not is_main:
            return
        report_to = ("tensorboard",) if config is None else config.train.report_to
        self.workdir.mkdir(parents=True, exist_ok=True)
        if "wandb" in report_to:  # first: nothing else is open yet if it fails
            from pjlm.wandb_log import require_wandb

            require_wandb()
        self._staging = fileio.Staging(self.workdir, pull=(METRICS_FILE, TEXT_FILE), exclude=("wandb",))
        local = self._staging.local
        if "wandb" in report_to:  # wandb keeps its own files beside the staged ones, never uploaded
            from pjlm.wandb_log import WandbRun

            self._wandb = WandbRun(self.workdir, config, local_dir=local)
        self._file = open(local / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard and "tensorboard" in report_to:
            from tensorboardX import SummaryWriter  # imported here: pulls in protobuf

            # tensorboardX names event files by the second and the host, so a writer reopened
            # within the same second (a fast resume) would truncate the last one: add a suffix.
            suffix = f".{os.getpid()}.{time.time_ns()}"
            self._tb = SummaryWriter(str(local / TENSORBOARD_DIR), filename_suffix=suffix)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log `metrics` (name → scalar) at `step`."""
        if not self.is_main:
            return
        values = {name: _plain(v) for name, v in metrics.items()}
        if self._file is not None:
            self._file.write(json.dumps({"step": int(step), **values}) + "\n")
            self._file.flush()
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, v, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(int(step), values)
        self._update_bar(int(step), values)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Log a piece of text (e.g. a generated sample) at `step`: appended to
        `workdir/text.jsonl` and, if enabled, written to TensorBoard's text tab."""
        if not self.is_main:
            return
        if self._text_file is None:
            self._text_file = open(self._staging.local / TEXT_FILE, "a", encoding="utf-8")
        self._text_file.write(json.dumps({"step": int(step), "tag": tag, "text": text}) + "\n")
        self._text_file.flush()
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))
            self._tb.flush()

    def _update_bar(self, step: int, values: dict[str, float | int]) -> None:
        """Move the progress bar to `step`, showing loss and tokens/s when present."""
        if not self._progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            # Start at the first logged step, so a resumed run's ETA is not skewed by a jump from 0.
            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)
        postfix = {}
        for key in ("loss", "reward", "kl"):  # PPO logs a reward and a KL instead of one loss
            if key in values:
                postfix[key] = f"{values[key]:.4f}"
        if "tokens_per_s" in values:
            postfix["tok/s"] = f"{values['tokens_per_s']:.4g}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        else:
            self._bar.refresh()

    def sync(self) -> None:
        """Make what was logged so far durable in the work directory: for a remote one, upload the
        staged files that changed (locally the files are flushed at every write already)."""
        if self._staging is None or not fileio.is_remote(self.workdir):
            return
        if self._tb is not None:
            self._tb.flush()
        self._staging.push()

    def close(self) -> None:
        """Flush and close every output; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        for f in (self._file, self._text_file):
            if f is not None:
                f.close()
        self._file = self._text_file = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SUPERSEDED_FILE = "metrics.superseded.jsonl"


def truncate_metrics(workdir: str | os.PathLike, step: int) -> int:
    """Before a resume from checkpoint `step`: drop the rows of `metrics.jsonl` logged after it (the
    resumed run logs those steps again), moving them to `metrics.superseded.jsonl` so nothing is lost;
    a truncated last line goes with them. Returns how many rows were moved."""
    path = fileio.location(workdir, "workdir") / METRICS_FILE
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            later = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            later = True
        (moved if later else keep).append(line)
    if moved:
        fileio.append_text(path.parent / SUPERSEDED_FILE,
                           "".join(json.dumps({"resumed_from": step, "row": row}) + "\n" for row in moved))
        write_atomic(path, "".join(row + "\n" for row in keep))
    return len(moved)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `workdir/metrics.jsonl`, in order. A truncated last line (a crash in the
    middle of a write) is skipped; a malformed line anywhere else raises."""
    lines = (fileio.location(workdir, "workdir") / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return records
