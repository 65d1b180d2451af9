"""`pjlm sample`: load the latest checkpoint and continue a prompt with `pjlm.generate` (KV cache,
the whole decode loop in one compiled call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pjlm import checkpoint as ckpt_lib
from pjlm import evaluate
from pjlm.data.pipeline import saved_tokenizer
from pjlm.data.tokenizer import Tokenizer, load_tokenizer
from pjlm.errors import ConfigError
from pjlm.fileio import location
from pjlm.model import Transformer


def load_for_sampling(workdir: str | Path) -> tuple[Transformer, Any, Tokenizer]:
    """The model, its latest parameters (replicated over the local devices; a PPO run's policy, a LoRA
    run's adapters merged into their base) and its tokenizer."""
    model, params, config = evaluate.load_policy(workdir)
    # The run's own copy first (the configured path may be on another machine), else the configured one.
    copy = saved_tokenizer(location(workdir, "workdir"))
    if copy is None and not config.data.tokenizer:
        raise ckpt_lib.CheckpointError(f"{workdir} holds no tokenizer.model or tokenizer.json and its run "
                                       "names no data.tokenizer; copy the run's tokenizer into it")
    tokenizer = load_tokenizer(location(workdir, "workdir") if copy else config.data.tokenizer)
    meta = ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(workdir))
    if tokenizer.fingerprint() != meta.get("tokenizer", tokenizer.fingerprint()):
        raise ckpt_lib.CheckpointError(f"the tokenizer found for {workdir} is not the one its checkpoint was "
                                       "trained with; pass the right one in the run's data.tokenizer")
    return model, params, tokenizer


def sample_text(model: Transformer, params: Any, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 64,
                temperature: float = 1.0, n: int = 1, seed: int = 0, chat: bool = False) -> list[str]:
    """`n` continuations of `prompt` (temperature 0 = greedy), each stopped at eos or the chat
    template's end-of-turn marker (not included) or after `max_new_tokens` (fewer if the model's
    max_len leaves less room). With `chat`, `prompt` is one user message, rendered by the model's chat
    template with its generation prompt, and the samples are the assistant's replies."""
    query = [{"role": "user", "content": prompt}] if chat else prompt
    prompt_len = len(evaluate.prompt_ids(tokenizer, query))
    room = model.config.max_len - prompt_len
    if room <= 0:
        raise ConfigError(f"the prompt has {prompt_len} tokens, no room under model.max_len={model.config.max_len}; "
                          "shorten --prompt")
    drawn = evaluate.sample(model, params, tokenizer, [query], samples_per_prompt=n,
                            max_new_tokens=min(max_new_tokens, room), temperature=temperature, seed=seed)
    return drawn["batch"].responses
