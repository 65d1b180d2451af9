"""Where a policy sits on the reward–KL plane: the quantity the controlled-sentiment study plots.

`reward_and_kl` samples responses to held-out prompts from a policy, scores them with a reward
function (e.g. VADER, the ground truth of the built-in corpus), and estimates the sequence-level
KL(π ‖ π_ref) from the same samples: the mean over samples of Σ_t log π(y_t|…) − log π_ref(y_t|…)
over the response tokens, at the sampling temperature (an unbiased Monte-Carlo estimate; per-sample
values can be negative, the mean cannot be in expectation).

Best-of-N sampling has no per-token log-probs of its own; `best_of_n_kl(N)` = log N − (N−1)/N
(Stiennon et al. 2020, appendix) is an upper bound on its KL to the sampling policy, tight when the N
scores have no ties; `pjlm.best_of_n.kl_estimate` estimates it from the candidates' scores.

`sample_in_chunks` samples many rows in calls of bounded size; `sequence_logps` scores given
responses under a policy (Σ over response tokens of log π), e.g. candidates drawn from another one.

Legend: B rows, P prompt length, T response length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import best_of_n
from pjlm import checkpoint as ckpt_lib
from pjlm import lora, scorers, sharding
from pjlm import rewards as rewards_lib
from pjlm.config import Config, MeshConfig, from_dict
from pjlm.data.tokenizer import Tokenizer
from pjlm.generate import generate
from pjlm.model import Transformer
from pjlm.train.ppo_steps import response_logps

_logps = jax.jit(response_logps, static_argnames=("model", "temperature", "with_entropy"))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base) = log n − (n−1)/n for a continuous score (0 at n = 1):
    `pjlm.best_of_n.analytic_kl`, kept under this name."""
    if n < 1:
        raise ValueError(f"best-of-n needs n ≥ 1, got {n}")
    return best_of_n.analytic_kl(n)


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[dict]) -> list[int]:
    """A prompt's ids: text after bos, or a conversation (a list of messages) rendered by the
    tokenizer's chat template with its generation prompt, ready for the assistant's reply."""
    if isinstance(prompt, str):
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    ids, _ = tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
    return list(ids)


def _left_padded(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[dict]]) -> tuple[np.ndarray, np.ndarray]:
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    P = max(len(row) for row in ids)
    tokens_BP = np.full((len(ids), P), tokenizer.pad_id, np.int32)
    mask_BP = np.zeros((len(ids), P), np.int32)
    for i, row in enumerate(ids):
        tokens_BP[i, P - len(row):], mask_BP[i, P - len(row):] = row, 1
    return tokens_BP, mask_BP


def sample(model: Transformer, params: Any, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[dict]], *,
           samples_per_prompt: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
           seed: int = 0) -> dict:
    """Samples for every prompt (text, or a conversation rendered with the chat template's generation
    prompt; each prompt's `samples_per_prompt` rows adjacent), as a rollout
    {"tokens" [B,P+T], "prompt_mask" [B,P], "response_mask" [B,T]} plus its decoded `RewardInput`."""
    tokens_BP, mask_BP = _left_padded(tokenizer, prompts)
    tokens_BP, mask_BP = (np.repeat(x, samples_per_prompt, axis=0) for x in (tokens_BP, mask_BP))
    out = generate(model, params, jnp.asarray(tokens_BP), jnp.asarray(mask_BP), key=jax.random.PRNGKey(seed),
                   max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tokenizer.stop_ids,
                   pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
    rollout = {"tokens": out["tokens"], "prompt_mask": jnp.asarray(mask_BP), "response_mask": out["response_mask"]}
    batch = rewards_lib.RewardInput.from_rollout(tokenizer, out["tokens"], mask_BP, out["response_mask"])
    return {"rollout": rollout, "batch": batch}


def reward_and_kl(model: Transformer, params: Any, ref_params: Any, tokenizer: Tokenizer, prompts: list[str],
                  reward_fn, *, samples_per_prompt: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
                  seed: int = 0) -> dict:
    """{"reward", "reward_se", "kl", "kl_se", "n", "texts", "scores", "kls", "rollout"} for `params`
    against `ref_params`: "scores" and "kls" are per sample (the KL estimate of each row), "rollout" the
    samples' tokens and masks (to score them with something else)."""
    drawn = sample(model, params, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                   max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    rollout = drawn["rollout"]
    response_mask = np.asarray(rollout["response_mask"], np.float32)
    logp = lambda p: np.asarray(_logps(model, p, rollout, temperature))
    kl = np.sum((logp(params) - logp(ref_params)) * response_mask, axis=1).astype(np.float64)
    scores = np.asarray(reward_fn(drawn["batch"]), np.float64)
    n = len(scores)
    return {"reward": float(scores.mean()), "reward_se": float(scores.std(ddof=1) / np.sqrt(n)),
            "kl": float(kl.mean()), "kl_se": float(kl.std(ddof=1) / np.sqrt(n)), "n": n,
            "texts": drawn["batch"].responses, "scores": scores.tolist(), "kls": kl.tolist(),
            "rollout": rollout}


def sample_in_chunks(model: Transformer, params: Any, tokenizer: Tokenizer, prompts: Sequence[str], n: int, *,
                     rows_per_call: int = 4096, max_new_tokens: int = 48, seed: int = 0) -> dict:
    """`n` samples per prompt (prompt-major rows), in `sample` calls of at most `rows_per_call` rows
    (which bounds the KV cache): {"texts": all responses, "chunks": each call's `sample` output}."""
    per_call = max(1, rows_per_call // n)
    texts, chunks = [], []
    for i in range(0, len(prompts), per_call):
        drawn = sample(model, params, tokenizer, prompts[i:i + per_call], samples_per_prompt=n,
                       max_new_tokens=max_new_tokens, seed=seed + i)
        texts += drawn["batch"].responses
        chunks.append(drawn)
    return {"texts": texts, "chunks": chunks}


def sequence_logps(model: Transformer, params: Any, rollout: dict, temperature: float = 1.0) -> np.ndarray:
    """Σ over response tokens of log π(y_t | …) for each row of a rollout ({"tokens", "prompt_mask",
    "response_mask"}, as `sample` returns it), under `params`: float64 [B]."""
    logp_BT = np.asarray(_logps(model, params, rollout, temperature), np.float64)
    return np.sum(logp_BT * np.asarray(rollout["response_mask"], np.float64), axis=1)


def _restore(path: Path, target: Any) -> Any:
    params, _ = ckpt_lib.load_params(path, target)
    return params


def base_checkpoint(meta: dict) -> Optional[str]:
    """The checkpoint a run started from: `train.init_from` as pinned at its first start (older runs:
    as configured)."""
    return (meta.get("pinned") or {}).get("train.init_from") or meta["config"]["train"]["init_from"]


def load_policy(checkpoint: str | Path, mesh: Optional[Any] = None) -> tuple[Transformer, Any, Config]:
    """The language model, its parameters and its run's config from a checkpoint of any phase that
    trains a policy (pretrain, sft, dpo: the params item; ppo: its `policy` entry). Under LoRA the
    adapters are merged into the base read from the run's `train.init_from`. `checkpoint` is a work
    directory (its latest step) or one step's folder. Params are replicated over `mesh` (default: all
    local devices on the data axis)."""
    directory, step = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(directory, step)
    config = from_dict(Config, meta["config"])
    mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    model = Transformer(config.model)
    policy = scorers.abstract_saved(model, config, mesh)
    if config.train.phase == "ppo":
        value = scorers.abstract_saved(Transformer(config.model, head="scalar"), config, mesh, strict=False)
        params = _restore(directory / str(step), {"policy": policy, "value": value})["policy"]
    else:
        params = _restore(directory / str(step), policy)
    if config.lora is not None:
        _, base, _ = load_policy(base_checkpoint(meta), mesh)
        params = jax.jit(lambda p, f: lora.merged_params(p, f, config.lora))(params, base)
    return model, params, config


def load_reward_model(workdir: str | Path, model_config, mesh: Any) -> tuple[Any, float, float]:
    """A reward-model run's (full or LoRA) jitted scorer (prompt tokens, prompt mask, response mask)
    → [B] raw scores, and its saved mean/std (for normalising as (s − mean)/std); see
    `pjlm.scorers.load_reward_model`. The tokens must be in its tokenizer; `model_config` is unused
    (the reward model has its own run's architecture)."""
    rm = scorers.load_reward_model(workdir, mesh)
    return rm.score_tokens, rm.mean, rm.std
