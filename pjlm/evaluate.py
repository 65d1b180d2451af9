"""Where a policy sits on the reward–KL plane: the quantity the controlled-sentiment study plots.

`reward_and_kl` samples responses to held-out prompts from a policy, scores them with a reward
function (e.g. VADER, the ground truth of the built-in corpus), and estimates the sequence-level
KL(π ‖ π_ref) from the same samples: the mean over samples of Σ_t log π(y_t|…) − log π_ref(y_t|…)
over the response tokens, at the sampling temperature (an unbiased Monte-Carlo estimate; per-sample
values can be negative, the mean cannot be in expectation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import rewards as rewards_lib
from pjlm.data.tokenizer import Tokenizer
from pjlm.generate import generate
from pjlm.model import Transformer
from pjlm.train.ppo_steps import response_logps


def reward_and_kl(model: Transformer, params: Any, ref_params: Any, tokenizer: Tokenizer, prompts: list[str],
                  reward_fn, *, samples_per_prompt: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
                  seed: int = 0) -> dict:
    """{"reward", "reward_se", "kl", "kl_se", "n", "texts"} for `params` against `ref_params`."""
    ids = [([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(p) for p in prompts]
    ids = [row for row in ids for _ in range(samples_per_prompt)]
    P = max(len(row) for row in ids)
    tokens = np.full((len(ids), P), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), P), np.int32)
    for i, row in enumerate(ids):
        tokens[i, P - len(row):], mask[i, P - len(row):] = row, 1
    out = generate(model, params, jnp.asarray(tokens), jnp.asarray(mask), key=jax.random.PRNGKey(seed),
                   max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id)
    rollout = {"tokens": out["tokens"], "prompt_mask": jnp.asarray(mask), "response_mask": out["response_mask"]}
    logp = jax.jit(lambda p: response_logps(model, p, rollout, temperature))
    response_mask = np.asarray(out["response_mask"], np.float32)
    kl = np.sum((np.asarray(logp(params)) - np.asarray(logp(ref_params))) * response_mask, axis=1)
    batch = rewards_lib.RewardInput.from_rollout(tokenizer, out["tokens"], mask, out["response_mask"])
    texts = batch.responses
    scores = np.asarray(reward_fn(batch), np.float64)
    n = len(scores)
    return {"reward": float(scores.mean()), "reward_se": float(scores.std(ddof=1) / np.sqrt(n)),
            "kl": float(kl.mean()), "kl_se": float(kl.std(ddof=1) / np.sqrt(n)), "n": n, "texts": texts}
