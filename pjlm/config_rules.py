"""Two tables over every config field: the values it accepts, and what a resume may change.

`RANGES` is checked by `Config.validate()` before any work starts; each error names the field and
the accepted range. A 0 documented as "off" (`train.eval_every`, `optimizer.grad_clip`,
`train.logprob_chunk`) is inside its range. Literal fields (choices) are checked from their type.

`RESUME` classifies every field for a resume of an existing work directory (`pjlm.train.rundir`):

- refuse: the field defines the experiment (model shape and math, phase, data, tokenizer, the
  objective, the starting point); a resume with it changed stops with a diff, unless the user
  passes `allow_config_change` (`--allow-config-change`), and the change is recorded;
- warn: an optimisation setting; the resume goes on, prints the change and records it;
- allow: cadence, length, mesh and speed settings; recorded, nothing printed.

A test checks that both tables name every field of every section.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Callable, Literal

from pjlm.errors import ConfigError

_Range = tuple[str, Callable[[Any], bool]]


def _at_least(n) -> _Range:
    return f"≥ {n}", lambda v: v >= n


_POSITIVE: _Range = ("> 0", lambda v: v > 0)
_NON_NEGATIVE: _Range = _at_least(0)
_ONE_OR_MORE: _Range = _at_least(1)
_UNIT: _Range = ("in [0, 1]", lambda v: 0 <= v <= 1)
_UNIT_OPEN: _Range = ("in [0, 1)", lambda v: 0 <= v < 1)
_ANY: _Range = ("any value", lambda v: True)
_OPTIONAL_POSITIVE: _Range = ("> 0 or None", lambda v: v is None or v > 0)

# Byte fallback (256 pieces), unk/bos/eos/pad and the chat markers: the least a trained vocabulary holds.
MIN_TRAINED_VOCAB = 256 + 4 + 4 + 1

RANGES: dict[str, _Range] = {
    "model.vocab_size": _ONE_OR_MORE, "model.d_model": _ONE_OR_MORE, "model.n_layers": _ONE_OR_MORE,
    "model.n_heads": _ONE_OR_MORE, "model.n_kv_heads": _ONE_OR_MORE,
    "model.head_dim": ("≥ 2 and even, or None", lambda v: v is None or (v >= 2 and v % 2 == 0)),
    "model.mlp_dim": _ONE_OR_MORE, "model.max_len": _ONE_OR_MORE, "model.rope_theta": _POSITIVE,
    "model.norm_eps": _POSITIVE, "model.tie_embeddings": _ANY, "model.qkv_bias": _ANY,
    "model.sliding_window": ("≥ 1 or None", lambda v: v is None or v >= 1), "model.dtype": _ANY,
    "model.param_dtype": _ANY, "model.remat": _ANY, "model.attention": _ANY,
    "model.scan_unroll": _ONE_OR_MORE, "model.init_std": _POSITIVE,
    "model.global_every": _NON_NEGATIVE, "model.rope_local_theta": _OPTIONAL_POSITIVE, "model.rope_scaling": _ANY,
    "model.rope_factor": _POSITIVE, "model.rope_low_freq_factor": _POSITIVE, "model.rope_high_freq_factor": _POSITIVE,
    "model.rope_original_max_len": _ONE_OR_MORE, "model.qk_norm": _ANY,
    "model.norm_offset": ("0 or 1", lambda v: v in (0, 1)), "model.post_norms": _ANY, "model.activation": _ANY,
    "model.embed_scale": _ANY, "model.query_pre_attn_scalar": _OPTIONAL_POSITIVE,
    "model.attn_softcap": _OPTIONAL_POSITIVE, "model.final_softcap": _OPTIONAL_POSITIVE,
    "mesh.data": ("≥ 1 or -1", lambda v: v >= 1 or v == -1), "mesh.fsdp": ("≥ 1 or -1", lambda v: v >= 1 or v == -1),
    "mesh.tensor": ("≥ 1 or -1", lambda v: v >= 1 or v == -1),
    "optimizer.learning_rate": _POSITIVE, "optimizer.warmup_steps": _NON_NEGATIVE,
    "optimizer.warmup_ratio": ("in [0, 1) or None", lambda v: v is None or 0 <= v < 1), "optimizer.decay": _ANY,
    "optimizer.min_lr_ratio": _UNIT, "optimizer.b1": _UNIT_OPEN, "optimizer.b2": _UNIT_OPEN,
    "optimizer.eps": _POSITIVE, "optimizer.weight_decay": _NON_NEGATIVE, "optimizer.decay_embeddings": _ANY,
    "optimizer.grad_clip": ("≥ 0 (0 = off)", lambda v: v >= 0), "optimizer.grad_accum": _ONE_OR_MORE,
    "optimizer.state_dtype": _ANY,
    "data.source": ("a non-empty string", lambda v: bool(str(v).strip())), "data.schema": _ANY,
    "data.split": ("a non-empty string", lambda v: bool(str(v).strip())), "data.subset": _ANY, "data.revision": _ANY,
    "data.eval_source": _ANY, "data.eval_rows": ("≥ 0 (0 = no held-out rows)", lambda v: v >= 0),
    "data.synthetic_docs": _ONE_OR_MORE, "data.tokenizer": _ANY,
    "data.tokenizer_vocab_size": _at_least(MIN_TRAINED_VOCAB), "data.seq_len": _at_least(2),
    "data.pack": _ANY, "data.buckets": ("each ≥ 2", lambda v: all(b >= 2 for b in v)),
    "data.max_prompt_len": ("≥ 1 or None", lambda v: v is None or v >= 1), "data.batch_size": _ONE_OR_MORE,
    "data.seed": _ANY, "data.on_error": _ANY, "data.text_unit": _ANY, "data.train_on": _ANY, "data.prepared": _ANY,
    "train.phase": _ANY, "train.steps": _ONE_OR_MORE, "train.epochs": _OPTIONAL_POSITIVE, "train.log_every": _ONE_OR_MORE,
    "train.eval_every": ("≥ 0 (0 = never)", lambda v: v >= 0), "train.eval_batches": _ONE_OR_MORE,
    "train.checkpoint_every": _ONE_OR_MORE, "train.keep_checkpoints": _ONE_OR_MORE, "train.init_from": _ANY,
    "train.seed": _ANY, "train.logprob_chunk": ("≥ 0 (0 = full logits)", lambda v: v >= 0),
    "train.masked_logprob_chunk": ("≥ 0 (0 = the head at every position)", lambda v: v >= 0),
    "train.resume_step": ("≥ 1 or None", lambda v: v is None or v >= 1),
    "train.lease_timeout_s": _POSITIVE,
    "train.report_to": ("a list of 'tensorboard' and 'wandb', or 'none' alone (metrics.jsonl is always written)",
                        lambda v: isinstance(v, (tuple, list)) and set(v) <= {"tensorboard", "wandb", "none"}
                        and ("none" not in v or len(v) == 1)),
    "train.wandb_project": ("a non-empty string or None", lambda v: v is None or bool(str(v).strip())),
    "train.fit": _ANY, "train.memory_limit_gib": _OPTIONAL_POSITIVE,
    "lora.rank": _ONE_OR_MORE, "lora.alpha": _POSITIVE,
    "lora.targets": ("a non-empty list of regular expressions", lambda v: len(v) > 0 and all(_compiles(t) for t in v)),
    "preference.beta": _POSITIVE, "preference.loss_type": _ANY, "preference.label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "preference.simpo_gamma": _NON_NEGATIVE, "preference.ipo_length_normalize": _ANY,
    "preference.nll_coef": _NON_NEGATIVE, "preference.precompute_ref": _ANY,
    "preference.reference": ("a checkpoint path or None", lambda v: v is None or bool(str(v).strip())),
    "preference.reward_margin": _NON_NEGATIVE, "preference.center_coef": _NON_NEGATIVE,
    "ppo.reward_model": _ANY, "ppo.rewards": ("a non-empty list of kind:weight[:key=value] specs", lambda v: len(v) > 0),
    "ppo.group_size": _ONE_OR_MORE, "ppo.max_new_tokens": _ONE_OR_MORE, "ppo.temperature": _POSITIVE,
    "ppo.epochs": _ONE_OR_MORE, "ppo.minibatches": _ONE_OR_MORE, "ppo.clip": _POSITIVE,
    "ppo.value_clip": _POSITIVE, "ppo.value_coef": _NON_NEGATIVE, "ppo.entropy_coef": _NON_NEGATIVE,
    "ppo.gamma": _UNIT, "ppo.lam": _UNIT, "ppo.kl_kind": _ANY, "ppo.kl_coef": ("≥ 0 (0 = no KL penalty)", lambda v: v >= 0),
    "ppo.kl_target": _OPTIONAL_POSITIVE, "ppo.kl_horizon": _ONE_OR_MORE, "ppo.advantage": _ANY,
    "ppo.whiten_advantages": _ANY,
}

Resume = Literal["refuse", "warn", "allow"]
_REFUSE, _WARN, _ALLOW = "refuse", "warn", "allow"

RESUME: dict[str, Resume] = {
    **{f"model.{f}": _REFUSE for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                       "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias",
                                       "sliding_window", "param_dtype", "global_every", "rope_local_theta",
                                       "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                                       "rope_original_max_len", "qk_norm", "norm_offset", "post_norms", "activation",
                                       "embed_scale", "query_pre_attn_scalar", "attn_softcap", "final_softcap")},
    "model.max_len": _WARN, "model.dtype": _WARN, "model.attention": _WARN, "model.init_std": _ALLOW,
    "model.remat": _ALLOW, "model.scan_unroll": _ALLOW,
    "mesh.data": _ALLOW, "mesh.fsdp": _ALLOW, "mesh.tensor": _ALLOW,
    **{f"optimizer.{f}": _WARN for f in ("learning_rate", "warmup_steps", "warmup_ratio", "decay", "min_lr_ratio", "b1", "b2", "eps",
                                         "weight_decay", "decay_embeddings", "grad_clip")},
    "optimizer.grad_accum": _ALLOW, "optimizer.state_dtype": _REFUSE,
    **{f"data.{f}": _REFUSE for f in ("source", "split", "subset", "revision", "schema", "eval_rows", "synthetic_docs", "tokenizer",
                                      "tokenizer_vocab_size", "seq_len", "pack", "max_prompt_len", "batch_size",
                                      "seed", "text_unit", "train_on")},
    "data.eval_source": _WARN, "data.buckets": _WARN, "data.on_error": _WARN,
    "data.prepared": _REFUSE,  # another directory (or none) is another batch order
    "train.phase": _REFUSE, "train.init_from": _REFUSE, "train.seed": _REFUSE,
    **{f"train.{f}": _ALLOW for f in ("steps", "epochs", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                                      "keep_checkpoints", "logprob_chunk", "masked_logprob_chunk", "resume_step", "lease_timeout_s",
                                      "report_to", "wandb_project", "fit", "memory_limit_gib")},
    "lora": _REFUSE, "lora.rank": _REFUSE, "lora.alpha": _REFUSE, "lora.targets": _REFUSE,
    **{f"preference.{f}": _REFUSE for f in ("beta", "loss_type", "label_smoothing", "simpo_gamma",
                                            "ipo_length_normalize", "nll_coef", "reward_margin", "center_coef",
                                            "reference")},
    "preference.precompute_ref": _ALLOW,
    **{f"ppo.{f}": _REFUSE for f in ("reward_model", "rewards", "group_size", "temperature", "epochs",
                                     "minibatches", "kl_kind", "kl_coef", "kl_target", "advantage")},
    **{f"ppo.{f}": _WARN for f in ("max_new_tokens", "clip", "value_clip", "value_coef", "entropy_coef", "gamma",
                                   "lam", "kl_horizon", "whiten_advantages")},
}


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def field_values(config) -> dict[str, Any]:
    """{"section.field": value} for every leaf field; an optional section that is off is {"lora": None}."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if section is None:
            out[f.name] = None
        elif dataclasses.is_dataclass(section):
            out.update({f"{f.name}.{g.name}": getattr(section, g.name) for g in dataclasses.fields(section)})
        else:
            out[f.name] = section
    return out


def check_ranges(config) -> None:
    """Every field inside its range and every Literal field one of its choices, else a ConfigError
    naming the field, the value and what is accepted."""
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = typing.get_type_hints(type(section))
        for g in dataclasses.fields(section):
            key, value = f"{f.name}.{g.name}", getattr(section, g.name)
            choices = _literal_choices(hints[g.name])
            if choices and value not in choices:
                raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(repr, choices))}")
            accepted, ok = RANGES[key]
            try:
                good = ok(value)
            except TypeError:
                good = False
            if not good:
                raise ConfigError(f"{key}={value!r} is out of range; it must be {accepted}")


def _literal_choices(t) -> tuple:
    if typing.get_origin(t) is typing.Union:
        t = next((a for a in typing.get_args(t) if a is not type(None)), t)
    return typing.get_args(t) if typing.get_origin(t) is Literal else ()


def markdown_table() -> str:
    """docs/config.md: every field with its default, accepted values and resume policy."""
    from pjlm.config import Config, LoraConfig

    config = Config(lora=LoraConfig())
    lines = ["# Config fields: accepted values and what a resume may change", "",
             "Generated by `python -m pjlm.config_rules > docs/config.md` from `pjlm/config_rules.py` (a test keeps",
             "it current). *refuse*: a resume with the field changed stops with a diff unless `--allow-config-change`;",
             "*warn*: it goes on and prints the change; *allow*: it goes on. Every change is recorded in the work",
             "directory's `run.json`.", "",
             "| field | default | accepted | on resume |", "|---|---|---|---|",
             f"| lora | None (off) | a LoraConfig, or None | {RESUME['lora']} |"]
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        hints = typing.get_type_hints(type(section))
        for g in dataclasses.fields(section):
            key = f"{f.name}.{g.name}"
            choices = _literal_choices(hints[g.name])
            accepted = " / ".join(map(str, choices)) if choices else RANGES[key][0]
            default = repr(getattr(section, g.name)).replace("|", "\\|")  # a table cell cannot hold a bare |
            lines.append(f"| `{key}` | `{default}` | {accepted} | {RESUME[key]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
