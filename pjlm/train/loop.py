"""The training loop shared by every phase, proven on pre-training and SFT.

lease the work directory → check the run's record → mesh → data → create or restore the state (the
newest intact checkpoint) → for each step: dispatch step t, then read step t−1's metrics (at log
steps) → evaluate → checkpoint → on SIGTERM/SIGINT, save and raise `Preempted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import metrics as metrics_lib
from pjlm import sharding
from pjlm import lora
from pjlm.config import Config, ConfigError, LoraConfig, to_dict
from pjlm.data import pipeline
from pjlm.model import Transformer
from pjlm.train import phases, rundir
from pjlm.train.state import TrainState, make_optimizer


from pjlm.errors import NonFiniteError, Preempted  # noqa: E402  (re-exported)
from pjlm import fileio  # noqa: E402
from pjlm.fileio import write_atomic  # noqa: E402


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


NEW_HEADS = ("score_head",)  # parameters a phase adds on top of the language model it starts from


def _boxed_state(model: Transformer, tx, key: jax.Array, lora_cfg: Optional[LoraConfig] = None,
                 lora_strict: bool = True) -> TrainState:
    params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    frozen: dict = {}
    if lora_cfg is not None:  # the optimizer sees adapters and new heads; the base is frozen
        frozen = {k: v for k, v in params.items() if k not in NEW_HEADS}
        heads = {k: v for k, v in params.items() if k in NEW_HEADS}
        params = {"lora": lora.init(jax.random.fold_in(key, 2), frozen, lora_cfg, strict=lora_strict), **heads}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params),
                      rng=jax.random.fold_in(key, 1))


def init_state(model: Transformer, tx, mesh, seed: int, lora_cfg: Optional[LoraConfig] = None, *,
               lora_strict: bool = True) -> tuple[TrainState, Any]:
    """A fresh TrainState created directly sharded (optimizer moments too); returns it and its
    shardings. `lora_strict=False` lets LoRA patterns match nothing (a PPO value model)."""
    sharding.check_divides_mesh(model.config, sharding.mesh_sizes(mesh))
    return sharding.init_sharded(lambda key: _boxed_state(model, tx, key, lora_cfg, lora_strict), mesh,
                                 jax.random.PRNGKey(seed))


def abstract_state(model: Transformer, tx, mesh, lora_cfg: Optional[LoraConfig] = None, *,
                   lora_strict: bool = True) -> tuple[TrainState, Any]:
    """Shapes and shardings of the TrainState without allocating it (the restore target)."""
    with sharding.use_mesh(mesh):
        boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.PRNGKey(0), lora_cfg, lora_strict))
    return nn.unbox(boxed), sharding.tree_shardings(boxed, mesh)


class _Preemption:
    """SIGTERM or SIGINT asks the run to save and stop; `reached(step)` says when, the same step on
    every process. A second SIGINT interrupts at once, as Ctrl-C twice does.

    One process: a signal sets a flag that `reached` returns after the current step. Several
    processes (`jax.distributed`): a signal on any one of them must stop all of them at the same step,
    or the others wait forever in the step's collectives. JAX's preemption service agrees on it (the
    mechanism Orbax's `reached_preemption` uses): SIGTERM, or the platform's preemption notice, is
    caught by the service, which picks a step every process has yet to reach, and
    `multihost_utils.reached_preemption_sync_point` turns true there on all of them. So SIGTERM is
    left to the service, and SIGINT is passed on to it as a SIGTERM."""

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._previous: dict = {}
        self._agreed = jax.process_count() > 1 and _preemption_service() is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT,) if self._agreed else (signal.SIGTERM, signal.SIGINT)
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if self._agreed:
            print(f"pjlm: {signal.Signals(signum).name} received; every process saves at a step they agree on",
                  file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGTERM)  # to the preemption service, which tells the others
        else:
            print(f"pjlm: {signal.Signals(signum).name} received; saving after this step", file=sys.stderr,
                  flush=True)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (steps done). Called once per step, every step, by
        every process (the service's contract)."""
        if not self._agreed:
            return self.requested
        if not _preemption_service().reached_sync_point(step):
            return False
        if not self.requested:  # the notice came to another process (or from the platform)
            self.requested, self.signum = True, signal.SIGTERM
        print(f"pjlm: preemption: every process saves step {step} and stops", file=sys.stderr, flush=True)
        return True

    def stop(self, step: int, steps: int, workdir: Path) -> None:
        """Called after the preemption's checkpoint is on disk."""
        raise Preempted(step, steps, workdir, self.signum)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _preemption_service():
    """JAX's preemption sync manager of a `jax.distributed` run (None without one, or when
    `jax_enable_preemption_service` is off)."""
    from jax._src import distributed  # the object `multihost_utils.reached_preemption_sync_point` reads

    return distributed.global_state.preemption_sync_manager if distributed.global_state.client else None


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
    data_fingerprint: str
    """`rundir.data_fingerprint` of the run's data, hashed once per start."""
    init_from: Optional[str] = None
    """`train.init_from` pinned to the step folder it resolved to at the run's first start."""
    reference: Optional[str] = None
    """`preference.reference` (DPO), pinned likewise; None: the reference is `init_from`."""
    reward_model: Optional[str] = None
    """`ppo.reward_model`, pinned likewise."""
    reward_models: dict = dataclasses.field(default_factory=dict)
    """{"ppo.rewards[i]": pinned step folder} of the reward components that name their own checkpoint."""
    lease: Optional[rundir.Lease] = None


def setup(config: Config, workdir: Path, pins: Optional[dict] = None) -> _Run:
    """Mesh, data, tokenizer, model and optimizer of a run. `pins` (from the run's record) fix the
    checkpoints it reads; without them they are resolved now."""
    sharding.maybe_initialize_distributed()
    config.validate()
    pins = rundir.resolve_pins(config) if pins is None else pins
    init_from = rundir.check_pin("train.init_from", pins.get("train.init_from"))
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divides_mesh(config.data.batch_size, sharding.mesh_sizes(mesh), "data.batch_size")
    data = pipeline.load_data(config.data, config.train.phase, workdir, config.train.init_from)
    tokenizer = data.tokenizer
    saved_model = ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(init_from))["config"]["model"] if init_from else None
    model_cfg = config.model.replace(vocab_size=_vocab_size(init_from, saved_model, tokenizer))
    _check_shape(model_cfg, init_from, saved_model)
    reference = _pinned_reference(model_cfg, tokenizer, pins)
    config = dataclasses.replace(config, model=model_cfg)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_batches, eval_batches = data.batchers(config.data, model_cfg.vocab_size,
                                                evaluate=config.train.eval_every > 0, **where)
    config = _epochs_to_steps(config, train_batches.steps_per_epoch)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    if config.lora is not None and not config.train.init_from:
        raise ConfigError("LoRA trains adapters on a frozen base: set train.init_from to the base run's work "
                          "directory (or an imported checkpoint)")
    if config.train.phase in (*phases.PREFERENCE_PHASES, "ppo") and not config.train.init_from:
        raise ConfigError(f"train.phase={config.train.phase} starts from a fine-tuned model: set train.init_from "
                          "to the SFT run's work directory")
    model = Transformer(model_cfg, head=phases.model_head(config.train.phase))
    return _Run(config, workdir, mesh, model, tokenizer, train_batches, eval_batches, tx, schedule,
                data.stats, data.fingerprint or rundir.data_fingerprint(config.data),
                init_from, reference,
                rundir.check_pin("ppo.reward_model", pins.get("ppo.reward_model")),
                {k: rundir.check_pin(k, pin) for k, pin in pins.items() if k.startswith("ppo.rewards[")})


def _epochs_to_steps(config: Config, steps_per_epoch: int) -> Config:
    """`train.steps` from `train.epochs` (when set) and the tokenized data's batches per epoch."""
    epochs = config.train.epochs
    if epochs is None:
        return config
    if steps_per_epoch < 1:
        raise ConfigError(f"train.epochs={epochs} needs at least one batch of data per epoch; the training data "
                          f"has fewer rows than data.batch_size={config.data.batch_size}")
    steps = max(1, math.ceil(epochs * steps_per_epoch - 1e-9))  # 1e-9: 0.3·10 is 3.0000000000000004
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))


def _vocab_size(init_from: Optional[str], saved_model: Optional[dict], tokenizer) -> int:
    """The tokenizer's vocabulary; or `init_from`'s embedding rows when that model has more (Qwen2-style
    checkpoints pad their embeddings past the tokenizer: the extra rows are kept, never fed, and
    never sampled)."""
    if not init_from:
        return tokenizer.vocab_size
    rows = saved_model["vocab_size"]
    if rows < tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but train.init_from="
                          f"{init_from} has {rows} embedding rows; use the tokenizer it was "
                          "trained with (data.tokenizer)")
    return rows


def _check_shape(model_cfg, init_from: Optional[str], saved: Optional[dict], name: str = "train.init_from",
                 fix: str = "take the model from it (pjlm.hf.model_config_of, or `pjlm sft|dpo|… --model`)") -> None:
    """The model must have `init_from`'s shape and math (every `model.*` field a resume refuses to
    change): a mismatch is named field by field here, not deep inside Orbax. `name` and `fix` word the
    error for another checkpoint that must fit the model (`preference.reference`)."""
    if not init_from:
        return
    from pjlm.config_rules import RESUME

    ours = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
    differ = [f"model.{k}={ours[k]!r} (saved: {saved[k]!r})" for k in sorted(saved)
              if k in ours and RESUME.get(f"model.{k}") == "refuse" and k != "param_dtype" and ours[k] != saved[k]]
    if differ:
        raise ConfigError(f"the model does not have the shape of {name}={init_from}: {'; '.join(differ)}; {fix}")


def _pinned_reference(model_cfg, tokenizer, pins: dict) -> Optional[str]:
    """`preference.reference`'s pinned step folder (None when unset: the reference is `init_from`),
    checked to be a full language model of `train.init_from`'s shape and tokenizer."""
    reference = rundir.check_pin("preference.reference", pins.get("preference.reference"))
    if reference is None:
        return None
    meta = ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(reference))
    saved = meta["config"]
    if saved.get("lora") or saved["train"]["phase"] in ("reward", "ppo"):
        raise ConfigError(f"preference.reference={reference} is a {saved['train']['phase']} run's checkpoint"
                          f"{' of LoRA adapters' if saved.get('lora') else ''}, not a policy's full parameters; "
                          "give a pretrain, sft or dpo run without LoRA (or its `pjlm export-hf` merged model, "
                          "imported)")
    _check_shape(model_cfg, reference, saved["model"], "preference.reference",
                 "give a reference of train.init_from's architecture (e.g. the SFT run it descends from)")
    if meta.get("tokenizer") and meta["tokenizer"] != tokenizer.fingerprint():
        raise ConfigError(f"preference.reference={reference} was trained with tokenizer {meta['tokenizer']}, but "
                          f"this run uses {tokenizer.fingerprint()}; give a reference with train.init_from's tokenizer")
    return reference


def create_or_restore(run: _Run, checkpointer: ckpt_lib.Checkpointer) -> tuple[TrainState, Any]:
    """Resume from the work directory's latest checkpoint, else init (and load `init_from`). Under
    LoRA the frozen base is always re-read from `init_from`; checkpoints hold only what trains."""
    lora_cfg = run.config.lora
    if checkpointer.latest_step() is not None:
        abstract, shardings = abstract_state(run.model, run.tx, run.mesh, lora_cfg)
        target = ckpt_lib.abstract_like(abstract, shardings)
        params, train, meta = restore_good(run, checkpointer, target.params, _train_item(target))
        _check_tokenizer(meta, run.tokenizer, checkpointer.directory)
        state = TrainState(step=train["step"], params=params, frozen=target.frozen, opt_state=train["opt_state"],
                           rng=train["rng"])
        if lora_cfg is not None:
            state = state.replace(frozen=_load_base(run, target.frozen, shardings.frozen))
        return state, shardings
    state, shardings = init_state(run.model, run.tx, run.mesh, run.config.train.seed, lora_cfg)
    if lora_cfg is not None:
        state = state.replace(frozen=_load_base(run, state.frozen, shardings.frozen))
    elif run.config.train.init_from:
        state = state.replace(params=load_init_params(run, state.params, shardings.params))
    return state, shardings


def restore_good(run: _Run, checkpointer: ckpt_lib.Checkpointer, params_target: Any, train_target: Any):
    """The newest intact checkpoint (or `train.resume_step`), saying which were skipped and why."""
    def skipped(line: str) -> None:
        print(f"pjlm: {line}", file=sys.stderr, flush=True)

    params, train, meta = checkpointer.restore_good(params_target, train_target, step=run.config.train.resume_step,
                                                    on_skip=skipped)
    if jax.process_index() == 0:
        moved = metrics_lib.truncate_metrics(run.workdir, int(meta["step"]))
        if moved:
            skipped(f"resuming at step {meta['step']}: {moved} metric rows logged after it moved to "
                    f"{metrics_lib.SUPERSEDED_FILE}")
    return params, train, meta


def _load_base(run: _Run, frozen: Any, frozen_shardings: Any) -> Any:
    """The LoRA base: `init_from`'s parameters for every non-head entry."""
    try:
        return load_init_params(run, frozen, frozen_shardings)
    except ckpt_lib.CheckpointError as e:
        raise ckpt_lib.CheckpointError(f"the LoRA base at train.init_from={run.init_from} does not "
                                       f"fit this model (adapters are trained on one base): {e}") from e


def load_init_params(run: _Run, fresh: Any, fresh_shardings: Any) -> Any:
    """`init_from`'s parameters onto the current mesh for every entry of `fresh` the language model
    has; new heads (e.g. a reward model's `score_head`) keep their fresh values."""
    source = run.init_from
    _check_tokenizer(ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(source)), run.tokenizer, source)
    if not any(k in fresh for k in NEW_HEADS):
        params, _ = ckpt_lib.load_params(source, ckpt_lib.abstract_like(fresh, fresh_shardings))
        return params
    lm = Transformer(run.model.config, head="lm")
    abstract, lm_shardings = sharding.abstract_params(lm, run.mesh)
    loaded, _ = ckpt_lib.load_params(source, ckpt_lib.abstract_like(abstract, lm_shardings))
    return {**fresh, **{k: loaded[k] for k in fresh if k not in NEW_HEADS}}


def _train_item(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _check_tokenizer(meta: dict, tokenizer, where) -> None:
    saved = meta.get("tokenizer")
    if saved and saved != tokenizer.fingerprint():
        raise ckpt_lib.CheckpointError(
            f"the checkpoint at {where} was trained with tokenizer {saved}, but this run uses "
            f"{tokenizer.fingerprint()} (vocabulary {tokenizer.vocab_size}); set data.tokenizer to the "
            "checkpoint's tokenizer")


def _meta(run: _Run, step: int, last_eval: Optional[dict] = None) -> dict:
    meta = {"config": to_dict(run.config), "step": step, "phase": run.config.train.phase,
            "tokenizer": run.tokenizer.fingerprint(), "git_revision": git_revision(), "eval": last_eval or {},
            "pinned": {"train.init_from": run.init_from, "preference.reference": run.reference,
                       "ppo.reward_model": run.reward_model, **run.reward_models}}
    if last_eval and "eval_reward_mean" in last_eval:  # RL normalises the reward model's scores with these
        meta["reward_stats"] = {"mean": last_eval["eval_reward_mean"], "std": last_eval["eval_reward_std"]}
    return meta


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
    """Means over the window; counts ("tokens", "n_tokens") are summed; the learning rate is the last."""
    out = {k: float(np.mean([m[k] for _, m in pulled])) for k in pulled[-1][1]}
    for k in ("tokens", "n_tokens"):
        if k in out:
            out[k] = float(np.sum([m[k] for _, m in pulled]))
    out["learning_rate"] = pulled[-1][1]["learning_rate"]
    return out


def evaluate(run: _Run, phase: phases.Phase, state: TrainState) -> dict:
    """Held-out metrics over `eval_batches` batches: per-batch sums added up, then finalised once."""
    sums: dict[str, float] = {}
    for i in range(run.config.train.eval_batches):
        out = phase.eval_batch(state, sharding.shard_batch(run.eval_batches.batch(i), run.mesh))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return phase.finalize_eval(sums)


@contextlib.contextmanager
def open_run(config: Config, workdir: str | Path, *, allow_config_change: bool = False):
    """`with open_run(config, workdir) as (run, checkpointer):` — the work directory leased to this
    run, its record (`run.json`) created or checked against `config`, the run set up with the pinned
    checkpoints, `config.json` and `data_stats.json` written. Every phase's loop starts here. `workdir`
    is a local path, a file:// URL or a gs:// URL (`pjlm.fileio.location`)."""
    workdir = fileio.location(workdir, "workdir")
    fileio.orbax_path(workdir, "workdir")  # refuses storage Orbax cannot write before anything is written
    sharding.maybe_initialize_distributed()
    config.validate()
    is_main = jax.process_index() == 0
    if not is_main:  # one progress bar per run: process 0's (pjlm's own are already main-only)
        import datasets

        datasets.disable_progress_bars()
    with rundir.Lease(workdir, config.train.lease_timeout_s, enabled=is_main) as lease:
        has_checkpoint = bool(ckpt_lib.checkpoint_steps(workdir / "checkpoints"))
        record = rundir.RunRecord.open(workdir, config, has_checkpoint=has_checkpoint,
                                       allow_config_change=allow_config_change, is_main=is_main)
        r = setup(config, workdir, record.pins)
        r.lease = lease
        record.check_fingerprints(rundir.tokenizer_identity(r.tokenizer), r.data_fingerprint, allow_config_change)
        if is_main:
            record.save()
            rundir.write_config(workdir, _meta(r, 0))
            write_atomic(workdir / "data_stats.json", json.dumps(r.data_stats, indent=2, default=str))
        checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=r.config.train.keep_checkpoints)
        try:
            yield r, checkpointer
        finally:
            checkpointer.close()


def run(config: Config, workdir: str | Path, *, allow_config_change: bool = False) -> RunResult:
    """Run one phase in `workdir`, resuming from its newest intact checkpoint; returns the final state
    and the logged metrics. Safe to call more than once in a process (e.g. from a notebook).

    Raises `Preempted` after saving when SIGTERM/SIGINT stopped the run before `train.steps` (call
    again to resume), `WorkdirBusyError` when another live run holds `workdir`, and `ConfigError`
    when `config` changes what defines the run in `workdir` (unless `allow_config_change`)."""
    with open_run(config, workdir, allow_config_change=allow_config_change) as (r, checkpointer):
        return _train(r, checkpointer, jax.process_index() == 0)


def _reference(r: _Run, state: TrainState, state_shardings: Any) -> Optional[Any]:
    """DPO's frozen reference: `preference.reference`'s parameters, else `init_from`'s read again (never
    aliasing the donated state); with `precompute_ref`, used once to cache log-probs for every example
    and then dropped."""
    if r.config.train.phase != "dpo" or r.config.preference.loss_type == "simpo":
        return None
    if r.config.lora is not None:  # the reference is the frozen base itself, inside the step
        ref = state.frozen
    else:
        ref, _ = ckpt_lib.load_params(r.reference or r.init_from,
                                      ckpt_lib.abstract_like(state.params, state_shardings.params))
    if not r.config.preference.precompute_ref:
        return None if r.config.lora is not None else ref
    r.train_batches = phases.reference_cache(r, r.train_batches, ref, r.workdir / "ref_logps_train.npz")
    if r.eval_batches is not None:
        r.eval_batches = phases.reference_cache(r, r.eval_batches, ref, r.workdir / "ref_logps_eval.npz")
    return None


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def startup_summary(r: _Run, start: int, trained: Any, frozen: Any = None) -> list[str]:
    """What a run is about to do, as lines: where it runs (backend, processes, devices, mesh), the
    model (parameters trained and frozen, attention kernel), the data (rows and tokens per step, steps
    per epoch), where checkpoints go, and DPO's reference checkpoint. Process 0 prints it at the start
    of every phase."""
    from pjlm.model import resolve_attention

    c, t, d = r.config, r.config.train, r.config.data
    devices = jax.devices()
    kinds = sorted({dev.device_kind for dev in devices})
    mesh = " ".join(f"{k}={v}" for k, v in sharding.mesh_sizes(r.mesh).items())
    params = f"{_millions(metrics_lib.param_count(trained))} parameters trained"
    if frozen is not None and metrics_lib.param_count(frozen):
        params += f", {_millions(metrics_lib.param_count(frozen))} frozen"
    m = r.model.config
    unit = {"pretrain": "packed rows", "sft": "rows", "reward": "pairs", "dpo": "pairs",
            "ppo": f"prompts × {c.ppo.group_size} samples"}[t.phase]
    length = d.seq_len if t.phase == "pretrain" or d.pack else max(d.buckets or (d.seq_len,))
    per_epoch = r.train_batches.steps_per_epoch
    epochs = f" ({t.steps / per_epoch:.2f} epochs)" if per_epoch else ""
    resume = f", resuming at step {start}" if start else ""
    reference = []
    if t.phase == "dpo" and c.preference.loss_type != "simpo":
        source = "preference.reference" if r.reference else "train.init_from"
        reference = [f"reference: {r.reference or r.init_from} ({source}{', the frozen LoRA base' if c.lora else ''})"]
    return [
        f"{t.phase} on {jax.default_backend()}: {jax.process_count()} process(es), {len(devices)} device(s) "
        f"({', '.join(kinds)}), mesh {mesh}",
        f"model: {params}; {m.n_layers} layers, d_model {m.d_model}, vocabulary {m.vocab_size}, dtype {m.dtype}, "
        f"attention {resolve_attention(m)}, remat {m.remat}",
        f"data: {d.batch_size} {unit} × ≤ {length} tokens per step (≤ {d.batch_size * length * (2 if unit == 'pairs' else 1)} "
        f"tokens); {per_epoch} steps per epoch; {t.steps} steps{epochs}{resume}",
        f"checkpoints: {r.workdir / 'checkpoints'} every {t.checkpoint_every} steps (keeping {t.keep_checkpoints}); "
        f"metrics: {r.workdir / metrics_lib.METRICS_FILE}",
        *reference,
    ]


def print_summary(lines: list[str]) -> None:
    if jax.process_index() == 0:
        for line in lines:
            print(f"pjlm: {line}", file=sys.stderr, flush=True)


def longest_row(r: _Run) -> int:
    """The longest row the run's training batches reach (packed rows: data.seq_len)."""
    d, phase = r.config.data, r.config.train.phase
    if phase == "pretrain" or (phase == "sft" and d.pack):
        return d.seq_len
    return r.train_batches.longest_row()


def fit_step(r: _Run) -> Optional[Any]:
    """`pjlm.fit.fitted` for the run, before anything is allocated: the run's config (and model) with
    the memory savers `train.fit=adjust` turned on, and the train step compiled ahead, or None."""
    from pjlm import fit

    r.config, planned = fit.fitted(r.config, r.mesh, longest_row(r))
    if r.config.model != r.model.config:
        r.model = Transformer(r.config.model, head=phases.model_head(r.config.train.phase))
    return planned.steps[0].fn if planned is not None and planned.steps else None


def explaining_out_of_memory(r: _Run, train: Callable[[], RunResult]) -> RunResult:
    """`train()`, with XLA's RESOURCE_EXHAUSTED turned into `pjlm.fit.FitError`'s one line: the
    figure, the limit and the settings that fit."""
    from pjlm import fit

    try:
        return train()
    except Exception as e:
        if fit.out_of_memory(e):
            raise fit.explain_out_of_memory(r.config, r.mesh, longest_row(r)) from e
        raise


def _train(r: _Run, checkpointer: ckpt_lib.Checkpointer, is_main: bool) -> RunResult:
    return explaining_out_of_memory(r, lambda: _train_fitted(r, checkpointer, is_main, fit_step(r)))


def _train_fitted(r: _Run, checkpointer: ckpt_lib.Checkpointer, is_main: bool, compiled: Optional[Any]) -> RunResult:
    cfg = r.config.train
    state, state_shardings = create_or_restore(r, checkpointer)
    start = int(state.step)
    print_summary(startup_summary(r, start, state.params, state.frozen))
    phase = phases.build(r, state_shardings, _reference(r, state, state_shardings), compiled)
    seq_len = r.config.data.seq_len
    throughput = metrics_lib.Throughput(metrics_lib.flops_per_token(r.model.config, seq_len), jax.device_count(),
                                        metrics_lib.peak_flops(jax.devices()[0]))
    history: list[dict] = []
    window: list[tuple[int, dict]] = []
    pending, last_eval = None, {}
    with metrics_lib.MetricWriter(r.workdir, total_steps=cfg.steps, is_main=is_main, config=r.config) as writer, \
            _Preemption() as preemption, sharding.use_mesh(r.mesh):
        if start == 0 and cfg.eval_every and r.eval_batches is not None:  # the starting point, e.g. for SFT
            last_eval = evaluate(r, phase, state)
            writer.write(0, last_eval)
            history.append({"step": 0, **last_eval})
        throughput.update(start, 0)
        done, stop = start, False
        for step in range(start, cfg.steps):
            batch = sharding.shard_batch(r.train_batches.batch(step), r.mesh)
            state, metrics = phase.step(state, batch)
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
                last_eval = evaluate(r, phase, state)
                writer.write(done, last_eval)
                history.append({"step": done, **last_eval})
            stop = preemption.reached(done)
            if stop and window:  # the partial window before a preemption is logged too
                pending, window = (pending or []) + window, []
            if done % cfg.checkpoint_every == 0 or last or stop:
                _check_finite(window + (pending or []), checkpointer.latest_step())
                save(r, checkpointer, done, state.params, _train_item(state), _meta(r, done, last_eval))
                writer.sync()
            if stop:
                break
        if pending is not None:
            history.append(_log(pending, writer, throughput, checkpointer))
        checkpointer.wait()
        if stop and done < cfg.steps:
            preemption.stop(done, cfg.steps, r.workdir)
    return RunResult(state, history, r.workdir)


def save(r: _Run, checkpointer: ckpt_lib.Checkpointer, step: int, params: Any, train: Any, meta: dict) -> None:
    """A checkpoint, unless another run has taken the work directory over (then nothing is written)."""
    if r.lease is not None:
        r.lease.check()
    checkpointer.save(step, params, train, meta)


def _log(window, writer, throughput, checkpointer) -> dict:
    pulled = _check_finite(window, checkpointer.latest_step())
    step = pulled[-1][0]
    out = _mean(pulled)
    out.update(throughput.update(step, int(out["tokens"])))
    writer.write(step, out)
    return {"step": step, **out}
