"""`pjlm sample`: load the latest checkpoint and continue a prompt with `pjlm.generate` (KV cache,
the whole decode loop in one compiled call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from pjlm import checkpoint as ckpt_lib
from pjlm import sharding
from pjlm.config import Config, MeshConfig, from_dict
from pjlm.data.pipeline import saved_tokenizer
from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.generate import generate
from pjlm.model import Transformer


def load_for_sampling(workdir: str | Path) -> tuple[Transformer, Any, Tokenizer]:
    """The model, its latest parameters (replicated over the local devices) and its tokenizer."""
    directory, step = ckpt_lib.resolve_checkpoint(workdir)
    meta = ckpt_lib.read_meta(directory, step)
    config = from_dict(Config, meta["config"])
    # The run's own copy first (the configured path may be on another machine), else the configured one.
    copy = saved_tokenizer(Path(workdir))
    if copy is None and not config.data.tokenizer:
        raise ckpt_lib.CheckpointError(f"{workdir} holds no tokenizer.model or tokenizer.json and its run "
                                       "names no data.tokenizer; copy the run's tokenizer into it")
    tokenizer = load_tokenizer(Path(workdir) if copy else config.data.tokenizer)
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
    """`n` continuations of `prompt` (temperature 0 = greedy), each stopped at eos (not included) or
    after `max_new_tokens` (fewer if the model's max_len leaves less room)."""
    prompt_ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    room = model.config.max_len - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, no room under model.max_len={model.config.max_len}")
    tokens_BP = np.tile(np.asarray(prompt_ids, np.int32), (n, 1))
    out = generate(model, params, tokens_BP, np.ones_like(tokens_BP), key=jax.random.key(seed),
                   max_new_tokens=min(max_new_tokens, room), temperature=temperature, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
    response_BT = np.asarray(out["tokens"])[:, len(prompt_ids):]
    keep_BT = (np.asarray(out["response_mask"]) == 1) & (response_BT != tokenizer.eos_id)
    return [tokenizer.decode(row[keep].tolist()) for row, keep in zip(response_BT, keep_BT)]
