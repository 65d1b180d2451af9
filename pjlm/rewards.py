"""Reward functions for RLHF, and their weighted sum R(x, y) = Σ_k w_k·r_k(x, y).

One interface: a reward function is a callable with a `name` attribute, called on a `RewardInput`
(one rollout on the host: texts, token ids, masks) and returning one float32 score per response,
`np.ndarray [B]`. Components are plain host code (a lexicon, a regular expression) or wrap a jitted
scorer (`ModelReward`). `CompositeReward` checks every component's output (count, finiteness), so a
broken component fails with its own name instead of a NaN surfacing in the PPO loss later.

Legend: B rollout rows, P prompt length, T response length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
import traceback
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np

from pjlm.errors import ConfigError, RewardError


@dataclasses.dataclass(frozen=True)
class RewardInput:
    """One rollout, on the host. `response_mask` [B,T] is 1 on response tokens that exist (through the
    EOS if one was emitted); `finished` [B] says whether the response emitted EOS."""

    prompts: list[str]
    responses: list[str]
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    finished: np.ndarray

    def __post_init__(self):
        B = len(self.responses)
        sizes = {"prompts": len(self.prompts), "prompt_ids": len(self.prompt_ids),
                 "response_ids": len(self.response_ids), "response_mask": len(self.response_mask),
                 "finished": len(self.finished)}
        wrong = {k: v for k, v in sizes.items() if v != B}
        if wrong:
            raise ValueError(f"RewardInput: {B} responses but {wrong}; every field needs one row per response")

    @classmethod
    def from_rollout(cls, tokenizer, tokens_BS, prompt_mask_BP, response_mask_BT) -> "RewardInput":
        """Decode a sampler rollout ([left-padded prompt | response] tokens and their masks); the
        response text stops before its EOS (or the chat template's end-of-turn marker: the tokenizer's
        `stop_ids`), and `finished` records whether there was one."""
        tokens = np.asarray(tokens_BS)
        prompt_mask, mask = np.asarray(prompt_mask_BP), np.asarray(response_mask_BT)
        P = prompt_mask.shape[1]
        response = tokens[:, P:]
        stops = list(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
        finished = np.array([np.isin(row[m > 0], stops).any() for row, m in zip(response, mask)])
        texts = [tokenizer.decode([t for t, m in zip(row, mm) if m and t not in stops])
                 for row, mm in zip(response, mask)]
        prompts = [tokenizer.decode([t for t, m in zip(row, mm) if m]) for row, mm in zip(tokens[:, :P], prompt_mask)]
        return cls(prompts=prompts, responses=texts, prompt_ids=tokens[:, :P], response_ids=response,
                   response_mask=mask, finished=finished)

    @property
    def size(self) -> int:
        return len(self.responses)

    @property
    def lengths(self) -> np.ndarray:
        """Response lengths in tokens, [B] int."""
        return np.asarray(self.response_mask).sum(axis=-1).astype(np.int64)


class RewardFn(Protocol):
    name: str

    def __call__(self, batch: RewardInput) -> np.ndarray: ...


class VaderReward:
    """VADER compound sentiment of the response text (Hutto & Gilbert 2014), in [−1, 1]; the
    ground-truth reward of the controlled-sentiment experiment. The lexicon loads at construction."""

    def __init__(self, name: str = "vader"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name = name
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, batch: RewardInput) -> np.ndarray:
        return np.asarray([self._analyzer.polarity_scores(r)["compound"] for r in batch.responses], np.float32)


class LengthReward:
    """−scale·|n − target| with n the response length in tokens (Σ response_mask): 0 at the target,
    falling linearly either side."""

    def __init__(self, target: int, scale: float, name: str = "length"):
        self.name, self.target, self.scale = name, int(target), float(scale)

    def __call__(self, batch: RewardInput) -> np.ndarray:
        return (-self.scale * np.abs(batch.lengths - self.target)).astype(np.float32)


class RegexReward:
    """`reward_match` if `re.search(pattern, response)` finds the pattern, else `reward_miss` (format
    checks; anchor with ^…$ for a whole-response match, (?s) to let . cross newlines)."""

    def __init__(self, pattern: str, reward_match: float = 1.0, reward_miss: float = 0.0, name: str = "regex"):
        self.name, self.pattern = name, re.compile(pattern)
        self.reward_match, self.reward_miss = float(reward_match), float(reward_miss)

    def __call__(self, batch: RewardInput) -> np.ndarray:
        hits = [self.pattern.search(r) is not None for r in batch.responses]
        return np.where(hits, self.reward_match, self.reward_miss).astype(np.float32)


class EosPenalty:
    """−penalty for a response that never emitted EOS (ran out of budget), 0 otherwise."""

    def __init__(self, penalty: float = 1.0, name: str = "eos_penalty"):
        self.name, self.penalty = name, float(penalty)

    def __call__(self, batch: RewardInput) -> np.ndarray:
        return np.where(np.asarray(batch.finished, bool), 0.0, -self.penalty).astype(np.float32)


class ModelReward:
    """A learned reward model: `score_fn(prompt_ids, response_ids, response_mask) -> [B]` (the PPO loop
    passes a jitted scorer), normalised with the reward model's saved statistics as (s − mean)/std."""

    def __init__(self, score_fn: Callable[..., Any], mean: float = 0.0, std: float = 1.0,
                 name: str = "reward_model"):
        if not std > 0:
            raise ValueError(f"ModelReward {name!r}: std={std!r} must be positive")
        self.name, self.score_fn, self.mean, self.std = name, score_fn, float(mean), float(std)

    def __call__(self, batch: RewardInput) -> np.ndarray:
        raw = np.asarray(self.score_fn(batch.prompt_ids, batch.response_ids, batch.response_mask), np.float64)
        return ((raw - self.mean) / self.std).astype(np.float32)


class PythonReward:
    """A user's function of (prompts, responses) → one score per response (a list, array or anything
    `np.asarray` takes), as a reward component: `python:W:fn=package.module:function` in
    `ppo.rewards`, or a callable in `pjlm.train.run(..., rewards=[...])`. An exception inside it stops
    the run with a `RewardError` naming the component and the line that raised."""

    def __init__(self, fn: Callable[[list[str], list[str]], Any], name: Optional[str] = None):
        if not callable(fn):
            raise ConfigError(f"a python reward needs a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or "python"

    def __call__(self, batch: RewardInput) -> np.ndarray:
        try:
            return self.fn(list(batch.prompts), list(batch.responses))
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise RewardError(f"reward component {self.name!r} raised {type(e).__name__}: {e} "
                              f"(at {frame.filename}:{frame.lineno}, in {frame.name})") from e


def import_function(reference: str, what: str = "reward") -> Callable:
    """`package.module:function` (dots after the colon reach attributes) imported, or a ConfigError
    saying what could not be found."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} fn={reference!r} is not package.module:function")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} fn={reference!r}: cannot import {module_name!r} ({e}); put its package on "
                          "PYTHONPATH or install it") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} fn={reference!r}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} fn={reference!r} is not callable")
    return obj


class ClippedReward:
    """A component's scores clipped to [−clip, clip] (after a reward model's normalisation, before
    weighting): `clip=C` on any spec. Keeps the component's name."""

    def __init__(self, inner: "RewardFn", clip: float):
        if not clip > 0:
            raise ConfigError(f"reward component {inner.name!r}: clip={clip!r} must be positive")
        self.inner, self.clip, self.name = inner, float(clip), inner.name

    def __call__(self, batch: RewardInput) -> np.ndarray:
        scores = check_scores(self.name, self.inner(batch), batch.size)
        return np.clip(scores, -self.clip, self.clip)


def check_scores(name: str, scores: Any, n: int) -> np.ndarray:
    """`scores` as float32 [n], or a RewardError naming the component: wrong count, or non-finite values."""
    try:
        arr = np.asarray(scores, np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward component {name!r} returned {type(scores).__name__}, not numbers: {e}") from None
    if arr.size != n:
        raise RewardError(f"reward component {name!r} returned {arr.size} scores for {n} responses")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise RewardError(f"reward component {name!r} returned non-finite scores {arr[bad[:5]].tolist()} "
                          f"at rows {bad[:5].tolist()} (of {bad.size} non-finite)")
    return arr.astype(np.float32)


class CompositeReward:
    """R = Σ_k w_k·r_k over (component, weight) pairs. Calling it returns the total [B] and every
    component's own (unweighted) scores by name, so each can be logged on its own."""

    def __init__(self, components: list[tuple[RewardFn, float]]):
        if not components:
            raise ValueError("CompositeReward needs at least one (component, weight) pair")
        names = [fn.name for fn, _ in components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward component names must be unique, {dupes} repeat; give each a distinct 'name'")
        self.components = [(fn, float(w)) for fn, w in components]
        self.name = "+".join(names)

    @property
    def weights(self) -> dict[str, float]:
        return {fn.name: w for fn, w in self.components}

    def __call__(self, batch: RewardInput) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = {fn.name: check_scores(fn.name, fn(batch), batch.size) for fn, _ in self.components}
        total = np.zeros(batch.size, np.float64)
        for fn, w in self.components:
            total += w * parts[fn.name].astype(np.float64)
        return total.astype(np.float32), parts


# ---------------------------------------------------------------------------------------------
# From config
# ---------------------------------------------------------------------------------------------

REWARD_KINDS = ("vader", "length", "regex", "eos_penalty", "model", "python")


def _build_one(spec: dict, model_scorer: Callable | None) -> RewardFn:
    clip = spec.get("clip")
    fn = _build_unclipped({k: v for k, v in spec.items() if k != "clip"}, model_scorer)
    return fn if clip is None else ClippedReward(fn, float(clip))


def _build_unclipped(spec: dict, model_scorer: Callable | None) -> RewardFn:
    kind = spec.get("kind")
    kwargs = {k: v for k, v in spec.items() if k not in ("kind", "weight")}
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r} in {spec}; valid kinds: {', '.join(REWARD_KINDS)}")
    if kind == "python":
        if "fn" not in kwargs or set(kwargs) - {"fn", "name"}:
            raise ConfigError(f"reward spec {spec}: a python component takes fn=package.module:function "
                              "and optionally name=")
        fn = kwargs["fn"] if callable(kwargs["fn"]) else import_function(str(kwargs["fn"]))
        return PythonReward(fn, kwargs.get("name"))
    if kind == "model":
        if model_scorer is None:
            raise ValueError(f"reward spec {spec} needs a reward model: set ppo.reward_model "
                             "(build_reward got model_scorer=None)")
        if isinstance(model_scorer, ModelReward):  # already normalised: used as is (renamed if asked)
            if set(kwargs) - {"name"}:
                raise ValueError(f"reward spec {spec}: mean/std belong to the ModelReward passed as model_scorer")
            return ModelReward(model_scorer.score_fn, model_scorer.mean, model_scorer.std,
                               name=kwargs.get("name", model_scorer.name))
        kwargs["score_fn"] = model_scorer
    cls = {"vader": VaderReward, "length": LengthReward, "regex": RegexReward,
           "eos_penalty": EosPenalty, "model": ModelReward}[kind]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"reward spec {spec}: {e}") from None


def build_reward(specs: list[dict], *, model_scorer: Callable | None = None,
                 extra: Sequence[Extra] = ()) -> CompositeReward:
    """A `CompositeReward` from config dicts, e.g. {"kind": "length", "weight": 0.1, "target": 40,
    "scale": 0.05}: `kind` (one of REWARD_KINDS), `weight` (default 1.0), an optional `name`, an
    optional `clip` (scores clipped to [−clip, clip] before weighting, after a model's
    normalisation), and the rest as the component's keyword arguments. "model" wraps
    `model_scorer`, a score_fn(prompt_ids, response_ids, response_mask) -> [B], in a ModelReward
    with the spec's mean/std; a ModelReward passed as `model_scorer` is used as it is. "python"
    imports `fn` (package.module:function, a function of (prompts, responses)). `extra`: more
    components from Python (`extra_components`)."""
    components = [(_build_one(dict(s), model_scorer), float(s.get("weight", 1.0))) for s in specs]
    return CompositeReward(components + extra_components(extra))


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return text


def parse_reward_spec(text: str) -> dict:
    """`PPOConfig.rewards`' string form kind:weight[:key=value...] as a build_reward dict, e.g.
    "length:0.1:target=40:scale=0.05" → {"kind": "length", "weight": 0.1, "target": 40, "scale": 0.05}.
    A piece without `key=` continues the previous value, so a regex pattern may contain ':'."""
    kind, _, rest = text.partition(":")
    weight, _, rest = rest.partition(":")
    spec: dict[str, Any] = {"kind": kind, "weight": float(weight) if weight else 1.0}
    key = None
    for piece in rest.split(":") if rest else []:
        m = re.match(r"^(\w+)=(.*)$", piece, re.S)
        if m:
            key, spec[m.group(1)] = m.group(1), m.group(2)
        elif key is None:
            raise ValueError(f"reward spec {text!r}: {piece!r} is not key=value")
        else:
            spec[key] += ":" + piece
    return {k: (_parse_value(v) if k not in ("kind", "pattern", "name", "fn", "path") and isinstance(v, str) else v)
            for k, v in spec.items()}


Extra = Union["RewardFn", Callable[[list[str], list[str]], Any], tuple]


def extra_components(rewards: Sequence[Extra]) -> list[tuple["RewardFn", float]]:
    """(component, weight) pairs from `pjlm.train.run(..., rewards=[...])`: each item a reward function
    (a callable with a `name`, called on a `RewardInput`), a plain function of (prompts, responses),
    or either as (item, weight); weight 1.0 by default."""
    out = []
    for item in rewards:
        fn, weight = (item if isinstance(item, tuple) else (item, 1.0))
        if not callable(fn):
            raise ConfigError(f"rewards=[...] item {item!r} is not callable; pass a function of (prompts, "
                              "responses) or a RewardFn, optionally as (fn, weight)")
        out.append((fn if hasattr(fn, "name") else PythonReward(fn), float(weight)))
    return out
