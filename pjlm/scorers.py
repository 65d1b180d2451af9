"""Learned scorers a run reads from other runs' checkpoints: reward models, full or LoRA.

A reward model keeps its own run's architecture (from its checkpoint's config, so it may differ from
the policy's in size and family), its own tokenizer (saved in its work directory) and its own saved
score statistics. `load_reward_model(checkpoint, mesh)` gives a `RewardModel`:

- `score_tokens(tokens, prompt_mask, response_mask)`: raw scores [B] of a rollout already in its
  tokens (the policy's tokenizer is its own), jitted, on device;
- `score_texts(prompts, responses)`: the same from text, re-encoded with its own tokenizer (prompt
  and response encoded as the preference data was: the response as a continuation), for a reward
  model whose tokenizer differs from the policy's.

A LoRA reward model's checkpoint holds only its adapters and score head; the base is read from the
checkpoint its run was pinned to (`train.init_from`), and the adapters are merged once, here.

This module sits below the training loops: `pjlm.train.ppo` loads its reward components and its
value model's start through it, and `pjlm.evaluate` scores policies with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import lora, sharding
from pjlm.config import Config, from_dict
from pjlm.errors import CheckpointError, ConfigError
from pjlm.fileio import location
from pjlm.model import Transformer
from pjlm.rewards import RewardInput
from pjlm.train.ppo_steps import sequence_layout
from pjlm.train.preference import sequence_scores

NEW_HEADS = ("score_head",)


def score_rows(model: Transformer, params: Any, tokens_BS: jax.Array, prompt_mask_BP: jax.Array,
               response_mask_BT: jax.Array) -> jax.Array:
    """Raw scores [B] of [left-padded prompt | right-padded response] rows (S = P + T)."""
    positions_BS, segments_BS = sequence_layout(prompt_mask_BP, response_mask_BT)
    return sequence_scores(model, params, {"tokens": tokens_BS, "positions": positions_BS,
                                           "segment_ids": segments_BS})


# The parameters are an argument, never a closure: on several processes they are global arrays
# spanning devices this process cannot address, which jit refuses to embed as constants. Compiled
# once per model and shapes.
_score_rows = jax.jit(score_rows, static_argnames="model")


@dataclasses.dataclass
class RewardModel:
    """One reward-model run, loaded: see the module docstring."""
    name: str
    path: str
    """The step folder the parameters came from."""
    config: Config
    """Its run's config (its model's architecture)."""
    model: Transformer
    params: Any
    """All its parameters (LoRA adapters merged), replicated or sharded over the mesh given."""
    tokenizer: Any
    """Its run's tokenizer, or None when its work directory holds none."""
    mean: float
    std: float

    def fingerprint(self) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.fingerprint()

    def score_tokens(self, tokens, prompt_mask, response_mask) -> jax.Array:
        """Raw scores [B] of [left-padded prompt | right-padded response] rows in this model's tokens."""
        return _score_rows(self.model, self.params, tokens, prompt_mask, response_mask)

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str], mesh=None) -> np.ndarray:
        """Raw scores [B] of prompt/response texts, encoded with this model's own tokenizer (prompts
        left-padded, responses right-padded, each side to its longest row; rows longer than the
        model's max_len keep the prompt's end)."""
        if self.tokenizer is None:
            raise CheckpointError(f"reward model {self.name!r} ({self.path}) has no saved tokenizer, so it cannot "
                                  "score text from another tokenizer")
        tok, max_len = self.tokenizer, self.config.model.max_len
        prompt_ids = [tok.encode(p) for p in prompts]
        response_ids = [tok.encode(r, continuation=True) for r in responses]
        longest = np.array([max(1, max(len(p) for p in prompt_ids)), max(1, max(len(r) for r in response_ids))])
        if mesh is not None:  # one global array: every process pads to the longest rows of all
            longest = sharding.all_rows(longest[None]).max(axis=0)
        T = min(int(longest[1]), max_len - 1)
        P = max(1, min(int(longest[0]), max_len - T))
        B = len(prompts)
        tokens = np.full((B, P + T), tok.pad_id if getattr(tok, "pad_id", None) is not None else 0, np.int32)
        prompt_mask, response_mask = np.zeros((B, P), np.int32), np.zeros((B, T), np.int32)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            p, r = p[-P:], r[:T]
            tokens[i, P - len(p):P], prompt_mask[i, P - len(p):] = p, 1
            tokens[i, P:P + len(r)], response_mask[i, :len(r)] = r, 1
        arrays = (tokens, prompt_mask, response_mask)
        if mesh is None:
            return np.asarray(jax.device_get(self.score_tokens(*arrays)), np.float64)
        # This process's rows, padded (with copies of its first) to its share of data×fsdp, then one
        # global array; its own rows of the scores come back.
        sizes = sharding.mesh_sizes(mesh)
        pad = -B % max(1, sizes.get("data", 1) * sizes.get("fsdp", 1) // jax.process_count())
        arrays = tuple(sharding.shard_batch(np.concatenate([a, np.repeat(a[:1], pad, axis=0)]), mesh) for a in arrays)
        return sharding.local_rows(self.score_tokens(*arrays), mesh).astype(np.float64)[:B]


def _workdir_of(directory: Path) -> Path:
    """The run's work directory from its checkpoints folder."""
    return directory.parent if directory.name == "checkpoints" else directory


def _saved_tokenizer(workdir: Path):
    from pjlm.data.pipeline import saved_tokenizer
    from pjlm.data.tokenizer import load_tokenizer

    return load_tokenizer(workdir) if saved_tokenizer(workdir) else None


def abstract_saved(model: Transformer, config: Config, mesh, *, strict: bool = True) -> Any:
    """What a run of `config` saved for `model`: all its parameters, or under LoRA the adapters and any
    new head, as a restore target on `mesh` (`strict` as in `lora.targeted_paths`: False for a PPO
    value model)."""
    abstract, shardings = sharding.abstract_params(model, mesh)
    if config.lora is None:
        return ckpt_lib.abstract_like(abstract, shardings)

    def boxed_adapters():
        boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        frozen = {k: v for k, v in boxed.items() if k not in NEW_HEADS}
        return {"lora": lora.init(jax.random.key(0), frozen, config.lora, strict=strict),
                **{k: v for k, v in boxed.items() if k in NEW_HEADS}}

    with sharding.use_mesh(mesh):
        boxed = jax.eval_shape(boxed_adapters)
    return ckpt_lib.abstract_like(nn.unbox(boxed), sharding.tree_shardings(boxed, mesh))


def load_params(checkpoint: str | Path, model: Transformer, config: Config, mesh) -> tuple[Any, str]:
    """All of `model`'s parameters from a checkpoint of a run with `config`: the params item as saved,
    or under LoRA its adapters merged into the base that run was pinned to. Returns them and the step
    folder read."""
    directory, step = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(directory, step)
    saved, _ = ckpt_lib.load_params(directory / str(step), abstract_saved(model, config, mesh))
    if config.lora is None:
        return saved, str(directory / str(step))
    base_path = (meta.get("pinned") or {}).get("train.init_from") or config.train.init_from
    if not base_path:
        raise CheckpointError(f"the LoRA checkpoint {directory / str(step)} names no base (train.init_from)")
    abstract, shardings = sharding.abstract_params(model, mesh)
    trunk = {k: v for k, v in ckpt_lib.abstract_like(abstract, shardings).items() if k not in NEW_HEADS}
    base, _ = ckpt_lib.load_params(base_path, trunk)
    params = jax.jit(lambda p, f: lora.merged_params(p, f, config.lora))(saved, base)
    return params, str(directory / str(step))


def load_reward_model(checkpoint: str | Path, mesh, *, name: str = "reward_model") -> RewardModel:
    """A reward-model run's checkpoint (its work directory → newest step, or one step's folder) as a
    `RewardModel` on `mesh`, with its saved mean/std (0/1 when it saved none)."""
    directory, step = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(directory, step)
    config = from_dict(Config, meta["config"])
    if config.train.phase != "reward":
        raise CheckpointError(f"reward model {name!r} at {checkpoint} is a {config.train.phase} run, not a reward "
                              "model (train.phase=reward)")
    model = Transformer(config.model, head="scalar")
    params, path = load_params(directory / str(step), model, config, mesh)
    stats = meta.get("reward_stats") or {"mean": 0.0, "std": 1.0}
    return RewardModel(name=name, path=path, config=config, model=model, params=params,
                       tokenizer=_saved_tokenizer(_workdir_of(directory)), mean=float(stats["mean"]),
                       std=max(float(stats["std"]), 1e-6))


def run_name(path: str | Path) -> str:
    """The work directory's name of a checkpoint path (a work directory, its checkpoints/ or a step)."""
    path = location(path, "checkpoint")
    if path.name.isdigit():
        path = path.parent
    return _workdir_of(path).name


def read_run_config(checkpoint: str | Path) -> Config:
    directory, step = ckpt_lib.resolve_checkpoint(checkpoint)
    return from_dict(Config, ckpt_lib.read_meta(directory, step)["config"])


_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "mlp_dim",
                 "tie_embeddings", "qkv_bias", "qk_norm", "post_norms")


def value_start(checkpoint: str | Path, value_model: Transformer, mesh, fresh: Any) -> Any:
    """A PPO value model's starting parameters from a reward-model run (full or LoRA, adapters merged),
    cast to `fresh`'s dtypes. Per-token values are read on the policy's own tokens, so the reward
    model must have the policy's architecture; one that differs is a ConfigError that says how to use
    it as a reward component only."""
    config = read_run_config(checkpoint)
    mine, theirs = value_model.config, config.model
    differs = [f for f in _SHAPE_FIELDS if getattr(mine, f) != getattr(theirs, f)]
    if differs:
        raise ConfigError(f"ppo.reward_model={checkpoint} starts the value model, which needs the policy's "
                          f"architecture, but its {', '.join(f'{f}={getattr(theirs, f)}' for f in differs)} differ "
                          f"from the policy's ({', '.join(str(getattr(mine, f)) for f in differs)}); leave "
                          "ppo.reward_model unset (the value model then starts from the policy) and name the reward "
                          "model in ppo.rewards as model:W:path=…")
    params, _ = load_params(checkpoint, Transformer(theirs, head="scalar"), config, mesh)
    return jax.tree_util.tree_map(lambda p, f: p.astype(f.dtype), params, fresh)


class LearnedReward:
    """A reward model as a reward component: its raw scores, normalised as (s − mean)/std with its
    saved statistics unless `normalize=False`. With `on_device` (a dict the PPO loop fills with this
    model's scores of the rollout's tokens, when the model shares the policy's tokenizer) it reads
    them from there; otherwise it scores the decoded texts with its own tokenizer."""

    def __init__(self, model: RewardModel, on_device: Optional[dict] = None, mesh=None, normalize: bool = True):
        self.model, self.on_device, self.mesh, self.normalize = model, on_device, mesh, normalize
        self.name = model.name

    def __call__(self, batch: RewardInput) -> np.ndarray:
        if self.on_device is not None:
            raw = np.asarray(self.on_device[self.name], np.float64)
        else:
            raw = self.model.score_texts(batch.prompts, batch.responses, self.mesh)
        if not self.normalize:
            return raw.astype(np.float32)
        return ((raw - self.model.mean) / self.model.std).astype(np.float32)

