"""The PPO loop: rollout → score → reference/old log-probs and values → advantages → epochs of
minibatch updates → KL controller → metrics and checkpoints of the whole `PPOState`.

The policy starts from `train.init_from` (with LoRA: adapters on that frozen base, which is then
also the reference); without LoRA the reference is a second, frozen copy of it. The value model is
a separate scalar-head model initialised from the reward model (`ppo.reward_model`), as in
InstructGPT, with its own optimizer; with LoRA it too trains adapters (and its head) on that frozen
trunk. One iteration = one rollout of data.batch_size prompts ×
ppo.group_size samples; train.steps counts iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import lora, metrics as metrics_lib, rewards as rewards_lib, rl, scorers, sharding
from pjlm.config import ConfigError
from pjlm.generate import generate
from pjlm.model import Transformer
from pjlm.train import loop
from pjlm.train.ppo_steps import PPOState, advantages, jit_update, rollout_statistics
from pjlm.train.state import make_optimizer


def _reward_models(r) -> list[tuple[dict, scorers.RewardModel]]:
    """(spec, loaded reward model) of every learned component of `ppo.rewards`, each from the step
    pinned at the run's first start: its own `path=`, else `ppo.reward_model`."""
    out = []
    for i, spec in enumerate(rewards_lib.parse_reward_spec(text) for text in r.config.ppo.rewards):
        if spec["kind"] != "model":
            continue
        unknown = set(spec) - {"kind", "weight", "path", "name", "clip", "normalize"}
        if unknown:
            raise ConfigError(f"ppo.rewards[{i}] = {r.config.ppo.rewards[i]!r}: a model component takes path=, "
                              f"name=, clip=, normalize=, not {', '.join(sorted(unknown))}")
        path = r.reward_models.get(f"ppo.rewards[{i}]") or r.reward_model
        name = spec.get("name") or (scorers.run_name(path) if spec.get("path") else "reward_model")
        out.append((spec, scorers.load_reward_model(path, r.mesh, name=name)))
    return out


def _learned_components(r, models, on_device: dict) -> list[tuple[Any, float]]:
    """The reward models as (component, weight); those sharing the policy's tokenizer read the scores
    the loop computes on device from the rollout's tokens, the others re-encode the texts."""
    out = []
    for spec, rm in models:
        shared = rm.fingerprint() == r.tokenizer.fingerprint()
        normalize = str(spec.get("normalize", True)).lower() not in ("false", "0", "no")
        component = scorers.LearnedReward(rm, on_device if shared else None, r.mesh, normalize=normalize)
        if spec.get("clip") is not None:
            component = rewards_lib.ClippedReward(component, float(spec["clip"]))
        out.append((component, float(spec.get("weight", 1.0))))
    return out


def _init(r, cfg, tx_policy, tx_value, value_model, checkpointer):
    """Fresh or restored PPOState and its shardings."""
    lora_cfg, mesh, seed = r.config.lora, r.mesh, r.config.train.seed
    policy, policy_sh = loop.init_state(r.model, tx_policy, mesh, seed, lora_cfg)
    value, value_sh = loop.init_state(value_model, tx_value, mesh, seed + 1, lora_cfg, lora_strict=False)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = PPOState(policy=policy, value=value, kl_beta=jax.device_put(rl.kl_init(cfg).beta, replicated),
                     rng=jax.device_put(jax.random.PRNGKey(seed + 2), replicated))
    shardings = PPOState(policy=policy_sh, value=value_sh, kl_beta=None, rng=None)
    if checkpointer.latest_step() is not None:
        target = ckpt_lib.abstract_like(state, jax.tree_util.tree_map(lambda x: x.sharding, state))
        params, train, meta = loop.restore_good(r, checkpointer, _params_item(target), _train_item(target))
        loop._check_tokenizer(meta, r.tokenizer, checkpointer.directory)
        state = _from_items(state, params, train)
        if lora_cfg is not None:  # the adapters and value head are in the checkpoint; the bases are re-read
            state = state.replace(value=state.value.replace(frozen=_value_init(r, state.value, value_sh)[0]))
    elif lora_cfg is None:
        state = state.replace(value=state.value.replace(params=_value_init(r, state.value, value_sh)[1]),
                              policy=state.policy.replace(
                                  params=loop.load_init_params(r, state.policy.params, policy_sh.params)))
    else:
        frozen, params = _value_init(r, state.value, value_sh)
        state = state.replace(value=state.value.replace(frozen=frozen, params=params))
    if lora_cfg is not None:
        state = state.replace(policy=state.policy.replace(
            frozen=loop._load_base(r, state.policy.frozen, policy_sh.frozen)))
    return state, shardings


def _value_init(r, value, value_sh) -> tuple[Any, Any]:
    """The value model's starting (frozen, params): the reward model (or else the policy's trunk with a
    fresh head). Without LoRA all of it is trained (frozen stays empty); with LoRA the trunk is the
    frozen base of fresh adapters and only the value head is trained beside them."""
    if not value.frozen:
        return value.frozen, _value_params(r, value.params, value_sh.params)
    heads = {k: v for k, v in value.params.items() if k != "lora"}
    head_sh = {k: v for k, v in value_sh.params.items() if k != "lora"}
    full = _value_params(r, {**value.frozen, **heads}, {**value_sh.frozen, **head_sh})
    frozen = {k: v for k, v in full.items() if k not in heads}
    return frozen, {**value.params, **{k: full[k] for k in heads}}


def _value_params(r, fresh, fresh_sh):
    if r.reward_model:  # a full or LoRA reward model of the policy's architecture
        loop._check_tokenizer(ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(r.reward_model)), r.tokenizer,
                              r.reward_model)
        params = scorers.value_start(r.reward_model, Transformer(r.model.config, head="scalar"), r.mesh, fresh)
        return jax.device_put(params, fresh_sh)
    return loop.load_init_params(r, fresh, fresh_sh)  # the policy's trunk and a fresh value head


def _params_item(s: PPOState) -> dict:
    return {"policy": s.policy.params, "value": s.value.params}


def _train_item(s: PPOState) -> dict:
    return {"step": s.policy.step, "value_step": s.value.step, "policy_opt": s.policy.opt_state,
            "value_opt": s.value.opt_state, "kl_beta": s.kl_beta, "rng": s.rng}


def _from_items(s: PPOState, params: dict, train: dict) -> PPOState:
    return s.replace(policy=s.policy.replace(params=params["policy"], opt_state=train["policy_opt"], step=train["step"]),
                     value=s.value.replace(params=params["value"], opt_state=train["value_opt"],
                                           step=train["value_step"]),
                     kl_beta=train["kl_beta"], rng=train["rng"])


def _score(r, reward_fn, rollout: dict) -> tuple[jax.Array, dict, dict]:
    """Decode this process's rows of the rollout and score them with every reward component (host
    side); returns the global scores [B] (sharded like the rollout) and the global batch's means of
    each component, response length and finished fraction, for the metrics."""
    inp = rewards_lib.RewardInput.from_rollout(r.tokenizer, *(sharding.local_rows(rollout[k], r.mesh)
                                                               for k in ("tokens", "prompt_mask", "response_mask")))
    total, parts = reward_fn(inp)
    means = {f"reward_{k}": float(sharding.all_rows(v).mean()) for k, v in parts.items()}
    info = {"reward": float(sharding.all_rows(total).mean()),
            "response_length": float(sharding.all_rows(inp.lengths.astype(np.float32)).mean()),
            "finished_fraction": float(sharding.all_rows(inp.finished.astype(np.float32)).mean()), **means}
    return sharding.shard_batch(np.asarray(total, np.float32), r.mesh), info


def _updates(state: PPOState, buffer: dict, update, cfg, key, iteration: int) -> tuple[PPOState, dict]:
    """ppo.epochs passes of ppo.minibatches shuffled minibatches; returns the mean of their metrics."""
    B = buffer["tokens"].shape[0]
    size = B // cfg.minibatches
    collected = []
    for epoch in range(cfg.epochs):
        perm = jax.random.permutation(jax.random.fold_in(key, 1000 + epoch), B)
        for m in range(cfg.minibatches):
            state, metrics = update(state, buffer, perm[m * size:(m + 1) * size])
            collected.append(metrics)
    means = {k: float(np.mean([float(c[k]) for c in collected])) for k in collected[0]}
    bad = [k for k, v in means.items() if not np.isfinite(v)]
    if bad:
        raise loop.NonFiniteError(f"non-finite {', '.join(bad)} at PPO iteration {iteration}; lower "
                                  "optimizer.learning_rate or check the rewards")
    return state, means


def run(config, workdir, *, allow_config_change: bool = False, rewards=()) -> loop.RunResult:
    """Run PPO in `workdir`, resuming from its newest intact checkpoint (see `pjlm.train.loop.run`
    for the work directory's guarantees and what it raises); `rewards` as in `pjlm.train.run`."""
    extra = rewards_lib.extra_components(rewards)  # a bad item fails before anything is built
    with loop.open_run(config, workdir, allow_config_change=allow_config_change) as (r, checkpointer):
        return loop.explaining_out_of_memory(r, lambda: _run(r, checkpointer, extra))


def _run(r, checkpointer, extra=()) -> loop.RunResult:
    cfg = r.config.ppo
    specs = [rewards_lib.parse_reward_spec(text) for text in cfg.rewards]
    rules = [s for s in specs if s["kind"] != "model"]
    if rules or extra:  # fail before any model is built: imports of python rewards, spec keys, names
        rewards_lib.build_reward(rules, extra=extra)
    if cfg.advantage != "gae" and cfg.group_size < 2:
        raise ConfigError(f"ppo.advantage={cfg.advantage} needs ppo.group_size ≥ 2 samples per prompt")
    B = r.config.data.batch_size * cfg.group_size
    if B % cfg.minibatches:
        raise ConfigError(f"the rollout of {B} samples does not split into ppo.minibatches={cfg.minibatches}")
    loop.fit_step(r)  # PPO compiles its own steps; the check may turn remat on (train.fit=adjust)
    updates = r.config.train.steps * cfg.epochs * cfg.minibatches
    tx_policy, _ = make_optimizer(r.config.optimizer, updates)
    tx_value, _ = make_optimizer(r.config.optimizer, updates)
    value_model = Transformer(r.model.config, head="scalar")
    state, _ = _init(r, cfg, tx_policy, tx_value, value_model, checkpointer)
    loop.print_summary(loop.startup_summary(r, int(state.policy.step) // (cfg.epochs * cfg.minibatches),
                                            {"policy": state.policy.params, "value": state.value.params},
                                            {"policy": state.policy.frozen, "value": state.value.frozen}))
    # Without LoRA the reference is init_from read a second time (the policy's arrays serve only as
    # the shape/sharding template; nothing is copied). With LoRA it is the frozen base.
    ref = None if r.config.lora is not None else loop.load_init_params(
        r, state.policy.params, jax.tree_util.tree_map(lambda x: x.sharding, state.policy.params))
    return _iterate(r, state, ref, tx_policy, tx_value, value_model, checkpointer, extra)


@dataclasses.dataclass
class _Compiled:
    """What every iteration calls: the reward, the reward models scored on device, and the jitted pieces."""
    reward_fn: rewards_lib.CompositeReward
    on_device: list
    """The reward models that share the policy's tokenizer: scored from the rollout's tokens on device."""
    current: dict
    merged: Any
    stats_fn: Any
    adv_fn: Any
    summary_fn: Any
    """The rollout's sequence KL and the critic's explained variance, as one program: reductions over a
    batch that spans processes run as collectives, and two independent eager ones in flight at once
    can meet in a different order on each process and wait for each other forever."""
    update: Any


def _compile(r, tx_policy, tx_value, value_model, extra=()) -> _Compiled:
    cfg, lora_cfg = r.config.ppo, r.config.lora
    specs = [rewards_lib.parse_reward_spec(text) for text in cfg.rewards]
    models = _reward_models(r)
    current: dict = {}  # the learned scores of the current rollout, computed on device before decoding
    learned = _learned_components(r, models, current)
    update = jit_update(policy_model=r.model, value_model=value_model, tx_policy=tx_policy, tx_value=tx_value,
                        cfg=cfg, lora_cfg=lora_cfg)
    return _Compiled(
        reward_fn=rewards_lib.build_reward([s for s in specs if s["kind"] != "model"], extra=[*learned, *extra]),
        on_device=[rm for _, rm in models if rm.fingerprint() == r.tokenizer.fingerprint()], current=current,
        merged=jax.jit(lambda p, f: lora.merged_params(p, f, lora_cfg)),
        stats_fn=jax.jit(functools.partial(rollout_statistics, policy_model=r.model, value_model=value_model,
                                           cfg=cfg, lora_cfg=lora_cfg)),
        adv_fn=jax.jit(functools.partial(advantages, cfg=cfg)), summary_fn=jax.jit(_summary), update=update)


def _summary(stats: dict, adv: dict, response_mask: jax.Array) -> dict:
    out = {"kl": jnp.mean(jnp.sum(adv["kl"], axis=1))}
    if "old_values" in stats:  # a critic (GAE)
        out["value_explained_variance"] = rl.explained_variance(stats["old_values"], adv["returns"],
                                                                response_mask.astype(jnp.float32))
    return out


def _iteration(r, fns: _Compiled, state: PPOState, ref, it: int) -> tuple[PPOState, dict]:
    """One rollout → scores → statistics and advantages → minibatch updates → KL controller."""
    cfg = r.config.ppo
    host = r.train_batches.batch(it)
    prompts = {k: np.repeat(host[k], cfg.group_size, axis=0) for k in ("tokens", "prompt_mask")}
    prompts = sharding.shard_batch(prompts, r.mesh)
    key = jax.random.fold_in(state.rng, it)
    t0 = time.perf_counter()
    out = generate(r.model, fns.merged(state.policy.params, state.policy.frozen), prompts["tokens"],
                   prompts["prompt_mask"], key=key, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   eos_id=r.tokenizer.stop_ids, pad_id=r.tokenizer.pad_id, vocab_limit=r.tokenizer.vocab_size)
    rollout = {"tokens": out["tokens"], "prompt_mask": prompts["prompt_mask"], "response_mask": out["response_mask"]}
    jax.block_until_ready(out)
    t1 = time.perf_counter()
    for rm in fns.on_device:  # this process's rows of each on-device reward model's scores
        fns.current[rm.name] = sharding.local_rows(rm.score_tokens(
            rollout["tokens"], rollout["prompt_mask"], rollout["response_mask"]), r.mesh)
    scores, info = _score(r, fns.reward_fn, rollout)
    t2 = time.perf_counter()
    stats = fns.stats_fn(state, ref, rollout)
    adv = fns.adv_fn(stats, scores, rollout["response_mask"], state.kl_beta)
    state, step_metrics = _updates(state, {**rollout, **stats, **adv}, fns.update, cfg, key, it + 1)
    t3 = time.perf_counter()
    rows, length = rollout["tokens"].shape
    new_tokens = info["response_length"] * rows  # decoded through EOS
    step_metrics.update(time_generate_s=t1 - t0, time_score_s=t2 - t1, time_update_s=t3 - t2,
                        samples_per_s=rows / (t3 - t0), generate_tokens_per_s=new_tokens / (t1 - t0),
                        update_tokens_per_s=cfg.epochs * rows * length / (t3 - t2))
    summary = jax.device_get(fns.summary_fn(stats, adv, rollout["response_mask"]))
    seq_kl = float(summary["kl"])
    state = state.replace(kl_beta=rl.kl_controller(cfg).update(rl.KLState(beta=state.kl_beta), seq_kl, rows).beta)
    if cfg.advantage == "gae":
        step_metrics["value_explained_variance"] = float(summary["value_explained_variance"])
    record = {"step": it + 1, "kl": seq_kl, "kl_beta": float(state.kl_beta), **info, **step_metrics}
    return state, record


def _iterate(r, state: PPOState, ref, tx_policy, tx_value, value_model, checkpointer, extra=()) -> loop.RunResult:
    cfg, tcfg = r.config.ppo, r.config.train
    fns = _compile(r, tx_policy, tx_value, value_model, extra)
    history = []
    start = int(state.policy.step) // (cfg.epochs * cfg.minibatches)
    with metrics_lib.MetricWriter(r.workdir, total_steps=tcfg.steps, is_main=jax.process_index() == 0, config=r.config) as writer, \
            loop._Preemption() as preemption, sharding.use_mesh(r.mesh):
        done, stop = start, False
        for it in range(start, tcfg.steps):
            state, record = _iteration(r, fns, state, ref, it)
            writer.write(it + 1, {k: v for k, v in record.items() if k != "step"})
            history.append(record)
            done = it + 1
            stop = preemption.reached(done)
            if done % tcfg.checkpoint_every == 0 or done == tcfg.steps or stop:
                loop.save(r, checkpointer, done, _params_item(state), _train_item(state), loop._meta(r, done))
                writer.sync()
            if stop:
                break
        checkpointer.wait()
        if stop and done < tcfg.steps:
            preemption.stop(done, tcfg.steps, r.workdir)
    return loop.RunResult(state.policy, history, r.workdir)
