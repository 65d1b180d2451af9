"""A simple sampler for `pjlm sample`: one jitted full forward per new token over a fixed buffer.

Correct and shape-stable (one compile), not fast; the jitted KV-cache sampler is `pjlm.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import sharding
from pjlm.config import Config, MeshConfig, from_dict
from pjlm.data.pipeline import TOKENIZER_FILE
from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.model import Transformer


def load_for_sampling(workdir: str | Path) -> tuple[Transformer, Any, Tokenizer]:
    """The model, its latest parameters (replicated over the local devices) and its tokenizer."""
    directory, step = ckpt_lib.resolve_checkpoint(workdir)
    meta = ckpt_lib.read_meta(directory, step)
    config = from_dict(Config, meta["config"])
    tokenizer = load_tokenizer(config.data.tokenizer or Path(workdir) / TOKENIZER_FILE)
    if tokenizer.fingerprint() != meta.get("tokenizer", tokenizer.fingerprint()):
        raise ckpt_lib.CheckpointError(f"the tokenizer found for {workdir} is not the one its checkpoint was "
                                       "trained with; pass the right one in the run's data.tokenizer")
    model = Transformer(config.model)
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    abstract, shardings = sharding.abstract_params(model, mesh)
    params, _ = ckpt_lib.load_params(directory / str(step), ckpt_lib.abstract_like(abstract, shardings))
    return model, params, tokenizer


def sample_text(model: Transformer, params: Any, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 64,
                temperature: float = 1.0, n: int = 1, seed: int = 0) -> list[str]:
    """`n` continuations of `prompt` (temperature 0 = greedy), each stopped at eos."""
    prompt_ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    L = min(model.config.max_len, len(prompt_ids) + max_new_tokens)
    if len(prompt_ids) >= L:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, no room under model.max_len={model.config.max_len}")
    tokens = np.full((n, L), tokenizer.pad_id, np.int32)
    tokens[:, :len(prompt_ids)] = prompt_ids

    @jax.jit
    def next_token(params, tokens_BL, t, key):
        logits_BLV = model.apply({"params": params}, tokens_BL)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, t - 1, axis=1, keepdims=False)
        if temperature == 0:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits_BV / temperature).astype(jnp.int32)

    done = np.zeros(n, bool)
    key = jax.random.PRNGKey(seed)
    out = [[] for _ in range(n)]
    for t in range(len(prompt_ids), L):
        new = np.asarray(next_token(params, jnp.asarray(tokens), t, jax.random.fold_in(key, t)))
        tokens[:, t] = new
        for i in np.flatnonzero(~done):
            if new[i] == tokenizer.eos_id:
                done[i] = True
            else:
                out[i].append(int(new[i]))
        if done.all():
            break
    return [tokenizer.decode(ids) for ids in out]
