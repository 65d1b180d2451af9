"""The training loop shared by every phase, proven on pre-training and SFT.

mesh → data → create or restore the state → for each step: dispatch step t, then read step t−1's
metrics (at log steps) → evaluate → checkpoint → on SIGTERM, save and return.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import metrics as metrics_lib
from pjlm import sharding
from pjlm.config import Config, to_dict
from pjlm.data import pipeline
from pjlm.model import Transformer
from pjlm.train import steps
from pjlm.train.state import TrainState, make_optimizer


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    workdir: Path


def git_revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _boxed_state(model: Transformer, tx, key: jax.Array) -> TrainState:
    params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={}, opt_state=tx.init(params),
                      rng=jax.random.fold_in(key, 1))


def init_state(model: Transformer, tx, mesh, seed: int) -> tuple[TrainState, Any]:
    """A fresh TrainState created directly sharded (optimizer moments too); returns it and its shardings."""
    sharding.check_divides_mesh(model.config, sharding.mesh_sizes(mesh))
    return sharding.init_sharded(lambda key: _boxed_state(model, tx, key), mesh, jax.random.PRNGKey(seed))


def abstract_state(model: Transformer, tx, mesh) -> tuple[TrainState, Any]:
    """Shapes and shardings of the TrainState without allocating it (the restore target)."""
    with sharding.use_mesh(mesh):
        boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.PRNGKey(0)))
    return nn.unbox(boxed), sharding.tree_shardings(boxed, mesh)


class _Preemption:
    """SIGTERM sets a flag the loop checks after each step (then it saves and returns)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Run:
    """Everything a run builds before its first step."""
    config: Config
    workdir: Path
    mesh: Any
    model: Transformer
    tokenizer: Any
    train_batches: Any
    eval_batches: Any
    tx: Any
    schedule: Any
    data_stats: dict


def setup(config: Config, workdir: Path) -> _Run:
    sharding.maybe_initialize_distributed()
    config.validate()
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divides_mesh(config.data.batch_size, sharding.mesh_sizes(mesh), "data.batch_size")
    rows, eval_rows, schema, stats = pipeline.load_rows(config.data, config.train.phase)
    tokenizer = pipeline.get_tokenizer(config.data, workdir, rows, schema, config.train.init_from)
    model_cfg = config.model.replace(vocab_size=tokenizer.vocab_size)
    config = dataclasses.replace(config, model=model_cfg)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_batches, tok_stats = pipeline.make_batcher(rows, schema, config.data, tokenizer, model_cfg.vocab_size,
                                                     batch_size=config.data.batch_size, seed=config.data.seed, **where)
    eval_batches = None
    if eval_rows is not None and config.train.eval_every > 0:
        eval_batches, _ = pipeline.make_batcher(eval_rows, schema, config.data, tokenizer, model_cfg.vocab_size,
                                                batch_size=config.data.batch_size, seed=0, **where)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    return _Run(config, workdir, mesh, Transformer(model_cfg), tokenizer, train_batches, eval_batches, tx, schedule,
                {**stats, **{f"tokenize_{k}": v for k, v in tok_stats.items()}})


def create_or_restore(run: _Run, checkpointer: ckpt_lib.Checkpointer) -> tuple[TrainState, Any]:
    """Resume from the work directory's latest checkpoint, else init (and maybe load `init_from`)."""
    if checkpointer.latest_step() is not None:
        abstract, shardings = abstract_state(run.model, run.tx, run.mesh)
        target = ckpt_lib.abstract_like(abstract, shardings)
        params, train, meta = checkpointer.restore(None, target.params, _train_item(target))
        _check_tokenizer(meta, run.tokenizer, checkpointer.directory)
        return TrainState(step=train["step"], params=params, frozen={}, opt_state=train["opt_state"],
                          rng=train["rng"]), shardings
    state, shardings = init_state(run.model, run.tx, run.mesh, run.config.train.seed)
    if run.config.train.init_from:
        _check_tokenizer(ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(run.config.train.init_from)),
                         run.tokenizer, run.config.train.init_from)
        params, _ = ckpt_lib.load_params(run.config.train.init_from,
                                         ckpt_lib.abstract_like(state.params, shardings.params))
        state = state.replace(params=params)
    return state, shardings


def _train_item(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _check_tokenizer(meta: dict, tokenizer, where) -> None:
    saved = meta.get("tokenizer")
    if saved and saved != tokenizer.fingerprint():
        raise ckpt_lib.CheckpointError(
            f"the checkpoint at {where} was trained with tokenizer {saved}, but this run uses "
            f"{tokenizer.fingerprint()} (vocabulary {tokenizer.vocab_size}); set data.tokenizer to the "
            "checkpoint's tokenizer")


def _meta(run: _Run, step: int) -> dict:
    return {"config": to_dict(run.config), "step": step, "phase": run.config.train.phase,
            "tokenizer": run.tokenizer.fingerprint(), "git_revision": git_revision()}


def _check_finite(window: list[tuple[int, dict]], last_good: Optional[int]) -> list[tuple[int, dict]]:
    """Pull a window of step metrics to the host; the first non-finite loss or grad-norm stops the run."""
    pulled = [(s, {k: float(v) for k, v in m.items()}) for s, m in window]
    for s, m in pulled:
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise NonFiniteError(f"non-finite loss ({m['loss']}) or grad-norm ({m['grad_norm']}) at step {s}; "
                                 f"the last good checkpoint is step {last_good}. Lower optimizer.learning_rate or "
                                 "check the data around this step")
    return pulled


def _mean(pulled: list[tuple[int, dict]]) -> dict:
    out = {k: float(np.mean([m[k] for _, m in pulled])) for k in pulled[-1][1]}
    out["n_tokens"] = float(np.sum([m["n_tokens"] for _, m in pulled]))
    out["tokens"] = float(np.sum([m["tokens"] for _, m in pulled]))
    out["learning_rate"] = pulled[-1][1]["learning_rate"]
    return out


def evaluate(run: _Run, eval_fn, params) -> dict:
    loss_sum, n = 0.0, 0.0
    for i in range(run.config.train.eval_batches):
        out = eval_fn(params, sharding.shard_batch(run.eval_batches.batch(i), run.mesh))
        loss_sum, n = loss_sum + float(out["loss_sum"]), n + float(out["n_tokens"])
    loss = loss_sum / max(n, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def run(config: Config, workdir: str | Path) -> RunResult:
    """Run one phase in `workdir`, resuming from its latest checkpoint; returns the final state and
    the logged metrics. Safe to call more than once in a process (e.g. from a notebook)."""
    workdir = Path(workdir).absolute()
    r = setup(config, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(_meta(r, 0), indent=2, default=str))
        (workdir / "data_stats.json").write_text(json.dumps(r.data_stats, indent=2, default=str))
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=r.config.train.keep_checkpoints)
    try:
        return _train(r, checkpointer, is_main)
    finally:
        checkpointer.close()


def _train(r: _Run, checkpointer: ckpt_lib.Checkpointer, is_main: bool) -> RunResult:
    cfg = r.config.train
    state, state_shardings = create_or_restore(r, checkpointer)
    start = int(state.step)
    batch_sharding = sharding.batch_sharding(r.mesh)
    step_fn = jax.jit(
        functools.partial(steps.lm_step, model=r.model, tx=r.tx, schedule=r.schedule,
                          grad_accum=r.config.optimizer.grad_accum, logprob_chunk=cfg.logprob_chunk),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(steps.lm_eval_step, model=r.model, logprob_chunk=cfg.logprob_chunk),
                      in_shardings=(state_shardings.params, batch_sharding))
    seq_len = r.config.data.seq_len
    throughput = metrics_lib.Throughput(metrics_lib.flops_per_token(r.model.config, seq_len), jax.device_count(),
                                        metrics_lib.peak_flops(jax.devices()[0]))
    history: list[dict] = []
    window: list[tuple[int, dict]] = []
    pending = None
    with metrics_lib.MetricWriter(r.workdir, total_steps=cfg.steps, is_main=is_main) as writer, \
            _Preemption() as preemption, sharding.use_mesh(r.mesh):
        if start == 0 and cfg.eval_every and r.eval_batches is not None:  # the starting point, e.g. for SFT
            result = evaluate(r, eval_fn, state.params)
            writer.write(0, result)
            history.append({"step": 0, **result})
        throughput.update(start, 0)
        for step in range(start, cfg.steps):
            batch = sharding.shard_batch(r.train_batches.batch(step), r.mesh)
            state, metrics = step_fn(state, batch)
            done = step + 1
            window.append((done, metrics))
            if pending is not None:  # step t is dispatched: now read t−1's window
                history.append(_log(pending, writer, throughput, checkpointer))
                pending = None
            last = done == cfg.steps
            if done % cfg.log_every == 0 or last:
                pending, window = window, []
            if cfg.eval_every and r.eval_batches is not None and (done % cfg.eval_every == 0 or last):
                if pending is not None:
                    history.append(_log(pending, writer, throughput, checkpointer))
                    pending = None
                result = evaluate(r, eval_fn, state.params)
                writer.write(done, result)
                history.append({"step": done, **result})
            if done % cfg.checkpoint_every == 0 or last or preemption.requested:
                _check_finite(window + (pending or []), checkpointer.latest_step())
                checkpointer.save(done, state.params, _train_item(state), _meta(r, done))
            if preemption.requested:
                break
        if pending is not None:
            history.append(_log(pending, writer, throughput, checkpointer))
        checkpointer.wait()
    return RunResult(state, history, r.workdir)


def _log(window, writer, throughput, checkpointer) -> dict:
    pulled = _check_finite(window, checkpointer.latest_step())
    step = pulled[-1][0]
    out = _mean(pulled)
    out.update(throughput.update(step, int(out["tokens"])))
    writer.write(step, out)
    return {"step": step, **out}
