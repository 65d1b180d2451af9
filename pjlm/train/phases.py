"""What differs between phases: the model head, the jitted step and eval functions, the reference.

pretrain / sft: `lm_step` on packed or padded rows. reward: the scalar head, `reward_step`; its
held-out accuracy and the reward mean/std (saved in the checkpoint's meta, for RL to normalise).
dpo: `dpo_step` against a frozen reference tree (`preference.reference`'s parameters, else the
`init_from` ones loaded a second time so it never aliases the donated state), or against reference
log-probs cached once in the work directory (`preference.precompute_ref`), after which the reference
tree is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from pjlm import sharding
from pjlm.fileio import atomic_file
from pjlm.train import preference, steps

PREFERENCE_PHASES = ("reward", "dpo")


def model_head(phase: str) -> str:
    return "scalar" if phase == "reward" else "lm"


@dataclasses.dataclass
class Phase:
    step: Callable[[Any, dict], tuple[Any, dict]]
    eval_batch: Callable[[Any, dict], dict]
    finalize_eval: Callable[[dict], dict]


def _batch_shardings(mesh, example: dict) -> Any:
    return jax.tree_util.tree_map(lambda x: sharding.batch_sharding(mesh, np.ndim(x)), example)


def jit_train_step(cfg, model, tx, schedule, state_shardings, batch_shardings, ref_shardings=None) -> Callable:
    """The jitted train step of `cfg.train.phase` (pretrain, sft, reward, dpo) exactly as a run
    executes it (the planner, `pjlm.plan`, compiles the same): the state donated, its shardings in
    and out; DPO takes `(state, ref_params, batch)`, the others `(state, batch)`."""
    pref, phase, chunk = cfg.preference, cfg.train.phase, cfg.train.logprob_chunk
    common = dict(model=model, tx=tx, schedule=schedule, lora_cfg=cfg.lora, grad_accum=cfg.optimizer.grad_accum)
    jit_step = functools.partial(jax.jit, out_shardings=(state_shardings, None), donate_argnums=0)
    if phase in ("pretrain", "sft"):
        return jit_step(functools.partial(steps.lm_step, logprob_chunk=chunk, **common),
                        in_shardings=(state_shardings, batch_shardings))
    if phase == "reward":
        return jit_step(functools.partial(preference.reward_step, cfg=pref, **common),
                        in_shardings=(state_shardings, batch_shardings))
    return jit_step(functools.partial(preference.dpo_step, cfg=pref, logprob_chunk=chunk,
                                      masked_chunk=cfg.train.masked_logprob_chunk, **common),
                    in_shardings=(state_shardings, ref_shardings, batch_shardings))


def build(run, state_shardings, ref_params: Optional[Any], step: Optional[Callable] = None) -> Phase:
    """The jitted step and eval for `run.config.train.phase`; `ref_params` only for DPO. `step`: the
    train step `jit_train_step` would give, already compiled ahead (`pjlm.fit`), to use instead."""
    cfg, pref = run.config, run.config.preference
    phase, chunk = cfg.train.phase, cfg.train.logprob_chunk
    batch_sh = _batch_shardings(run.mesh, run.train_batches.batch(0))
    eval_sh = _batch_shardings(run.mesh, run.eval_batches.batch(0)) if run.eval_batches is not None else batch_sh
    params_sh, frozen_sh = state_shardings.params, state_shardings.frozen
    ref_sh = None if ref_params is None else params_sh
    step = step or jit_train_step(cfg, run.model, run.tx, run.schedule, state_shardings, batch_sh, ref_sh)
    if phase in ("pretrain", "sft"):
        ev = jax.jit(functools.partial(steps.lm_eval_step, model=run.model, logprob_chunk=chunk, lora_cfg=cfg.lora),
                     in_shardings=(params_sh, frozen_sh, eval_sh))
        return Phase(step, lambda state, batch: ev(state.params, state.frozen, batch), _finalize_lm)
    if phase == "reward":
        ev = jax.jit(functools.partial(preference.reward_eval_step, model=run.model, lora_cfg=cfg.lora),
                     in_shardings=(params_sh, frozen_sh, eval_sh))
        return Phase(step, lambda state, batch: ev(state.params, state.frozen, batch), _finalize_reward)
    ev = jax.jit(functools.partial(preference.dpo_eval_step, model=run.model, cfg=pref, logprob_chunk=chunk,
                                   lora_cfg=cfg.lora, masked_chunk=cfg.train.masked_logprob_chunk),
                 in_shardings=(params_sh, frozen_sh, ref_sh, eval_sh))
    return Phase(lambda state, batch: step(state, ref_params, batch),
                 lambda state, batch: ev(state.params, state.frozen, ref_params, batch), _finalize_dpo)


def _finalize_lm(sums: dict) -> dict:
    loss = sums["loss_sum"] / max(sums["n_tokens"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _finalize_reward(sums: dict) -> dict:
    n = max(2 * sums["pairs"], 1.0)
    mean = sums["reward_sum"] / n
    std = math.sqrt(max(sums["reward_sq_sum"] / n - mean * mean, 0.0))
    return {"eval_accuracy": sums["correct"] / max(sums["pairs"], 1.0), "eval_reward_mean": mean,
            "eval_reward_std": std}


def _finalize_dpo(sums: dict) -> dict:
    pairs = max(sums["pairs"], 1.0)
    return {"eval_loss": sums["loss_sum"] / pairs, "eval_reward_accuracy": sums["correct"] / pairs}


class CachedReference:
    """Wraps a preference Batcher, adding `ref_chosen_logps` / `ref_rejected_logps` by example_id."""

    def __init__(self, batcher, chosen: np.ndarray, rejected: np.ndarray):
        self._batcher, self._chosen, self._rejected = batcher, chosen, rejected
        self.steps_per_epoch = batcher.steps_per_epoch

    def batch(self, step: int) -> dict:
        out = self._batcher.batch(step)
        ids = out["example_id"]
        return {**out, "ref_chosen_logps": self._chosen[ids], "ref_rejected_logps": self._rejected[ids]}


def reference_key(run, batcher) -> str:
    """What the cached reference log-probs depend on: the reference checkpoint (its pinned step and
    the checksums it was saved with), the tokenizer, the data and how it is cut, the compute dtype."""
    from pjlm import checkpoint as ckpt_lib

    reference = run.reference or run.init_from
    meta = ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(reference))
    d = run.config.data
    parts = {"reference": reference, "reference_checksums": meta.get("checksums", {}).get("params"),
             "tokenizer": run.tokenizer.fingerprint(), "data": run.data_fingerprint, "rows": len(batcher.ds),
             "cut": [d.seq_len, list(d.buckets), d.max_prompt_len, d.pack, d.eval_rows, d.seed],
             "dtype": run.model.config.dtype, "vocab": run.model.config.vocab_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _load_cache(path: Path, key: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    if not path.exists():
        return None
    try:
        with path.open("rb") as f, np.load(f) as data:  # path: local or remote (`pjlm.fileio.location`)
            if str(data["key"]) == key:
                return data["chosen"], data["rejected"]
            why = "it was computed for another reference, tokenizer or data"
    except Exception as e:  # a truncated or foreign file: recompute, never block the run
        why = f"it cannot be read ({type(e).__name__})"
    print(f"pjlm: recomputing the reference log-probs in {path.name}: {why}", file=sys.stderr)
    return None


def reference_cache(run, batcher, ref_params: Any, path: Path) -> CachedReference:
    """Compute (or load from `path`) the reference's log-probs for every example of `batcher`. The
    file is keyed by `reference_key` (a stale one is recomputed) and written atomically."""
    key = reference_key(run, batcher)
    cached = _load_cache(path, key)
    if cached is not None:
        return CachedReference(batcher, *cached)
    n, B = len(batcher.ds), batcher.global_batch_size
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    fn = jax.jit(lambda p, batch: preference.reference_logps(run.model, p, batch, run.config.train.logprob_chunk,
                                                             run.config.train.masked_logprob_chunk))
    b = B // batcher.process_count
    with sharding.use_mesh(run.mesh):
        for start in range(0, n, B):
            idx = np.arange(start, start + B) % n  # the last chunk wraps around; duplicates rewrite equal values
            local = idx[batcher.process_index * b:(batcher.process_index + 1) * b]
            batch = sharding.shard_batch(batcher.assemble(local, batcher.bucket_for(idx)), run.mesh)
            c, r = fn(ref_params, batch)
            chosen[idx] = np.asarray(multihost_utils.process_allgather(c, tiled=True))
            rejected[idx] = np.asarray(multihost_utils.process_allgather(r, tiled=True))
    if jax.process_index() == 0:
        with atomic_file(path) as f:
            np.savez(f, chosen=chosen, rejected=rejected, key=np.array(key))
    return CachedReference(batcher, chosen, rejected)
