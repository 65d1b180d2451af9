"""pjlm.rewards: each component, the weighted sum with per-component scores, validation, build_reward."""

import numpy as np
import pytest

from pjlm_testing import F32, assert_close
from pjlm import rewards


def _batch(responses, finished=None, lengths=None, T=8):
    B = len(responses)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return rewards.RewardInput(
        prompts=["p"] * B, responses=list(responses), prompt_ids=np.zeros((B, 3), np.int32),
        response_ids=np.arange(B * T, dtype=np.int32).reshape(B, T), response_mask=mask,
        finished=np.ones(B, bool) if finished is None else np.asarray(finished, bool))


class _Const:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def __call__(self, batch):
        return np.asarray(self.values, np.float32)


def test_vader_sign_on_clear_sentences():
    scores = rewards.VaderReward()(_batch(["This movie is wonderful, I love it!",
                                           "Terrible, awful, the worst film ever.", "The film is 90 minutes."]))
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


def test_length_regex_and_eos_components():
    b = _batch(["answer: 42", "no idea", "Answer: 7"], finished=[True, False, True], lengths=[2, 5, 8])
    np.testing.assert_allclose(rewards.LengthReward(target=5, scale=0.5)(b), [-1.5, 0.0, -1.5])
    np.testing.assert_allclose(rewards.RegexReward(r"^answer: \d+$", 1.0, -1.0)(b), [1.0, -1.0, -1.0])
    np.testing.assert_allclose(rewards.RegexReward(r"(?i)answer")(b), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(rewards.EosPenalty(2.0)(b), [0.0, -2.0, 0.0])


def test_model_reward_normalises_with_saved_statistics():
    seen = {}

    def score_fn(prompt_ids, response_ids, response_mask):
        seen["shapes"] = (prompt_ids.shape, response_ids.shape, response_mask.shape)
        return response_mask.sum(-1) * 1.0  # lengths as raw scores

    b = _batch(["a", "b", "c"], lengths=[2, 4, 8])
    out = rewards.ModelReward(score_fn, mean=4.0, std=2.0)(b)
    np.testing.assert_allclose(out, [-1.0, 0.0, 2.0])
    assert seen["shapes"] == ((3, 3), (3, 8), (3, 8))
    with pytest.raises(ValueError, match="std"):
        rewards.ModelReward(score_fn, mean=0.0, std=0.0)


def test_composite_weighted_sum_and_per_component_scores():
    comp = rewards.CompositeReward([(_Const("a", [1.0, 2.0]), 0.5), (_Const("b", [10.0, -10.0]), 2.0),
                                    (rewards.EosPenalty(1.0), 3.0)])
    total, parts = comp(_batch(["x", "y"], finished=[True, False]))
    np.testing.assert_allclose(total, [0.5 + 20.0, 1.0 - 20.0 - 3.0])
    assert total.dtype == np.float32 and set(parts) == {"a", "b", "eos_penalty"}
    np.testing.assert_allclose(parts["b"], [10.0, -10.0])   # unweighted
    np.testing.assert_allclose(parts["eos_penalty"], [0.0, -1.0])


def test_composite_errors_name_the_component():
    b = _batch(["w", "x", "y", "z"])
    with pytest.raises(ValueError, match="reward component 'short' returned 3 scores for 4 responses"):
        rewards.CompositeReward([(_Const("ok", np.zeros(4)), 1.0), (_Const("short", np.zeros(3)), 1.0)])(b)
    with pytest.raises(ValueError, match="reward component 'nan'.*non-finite.*rows \\[1, 3\\]"):
        rewards.CompositeReward([(_Const("nan", [0.0, np.nan, 1.0, np.inf]), 1.0)])(b)
    with pytest.raises(ValueError, match="unique"):
        rewards.CompositeReward([(rewards.EosPenalty(), 1.0), (rewards.EosPenalty(), 2.0)])
    with pytest.raises(ValueError, match="response_mask"):
        rewards.RewardInput(["p"], ["r"], np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((2, 2)), np.ones(1, bool))


def test_build_reward_from_specs():
    comp = rewards.build_reward(
        [{"kind": "vader", "weight": 1.0}, {"kind": "eos_penalty", "weight": 1.0, "penalty": 1.0},
         {"kind": "length", "weight": 0.1, "target": 4, "scale": 0.5},
         {"kind": "regex", "pattern": "good", "weight": 0.5},
         {"kind": "model", "weight": 2.0, "mean": 1.0, "std": 2.0}],
        model_scorer=lambda p, r, m: np.full(len(r), 3.0))
    assert comp.weights == {"vader": 1.0, "eos_penalty": 1.0, "length": 0.1, "regex": 0.5, "reward_model": 2.0}
    total, parts = comp(_batch(["a good day", "bad"], finished=[True, False], lengths=[4, 8]))
    np.testing.assert_allclose(parts["reward_model"], [1.0, 1.0])
    np.testing.assert_allclose(parts["length"], [0.0, -2.0])
    expected = parts["vader"] + parts["eos_penalty"] + 0.1 * parts["length"] + 0.5 * parts["regex"] + 2.0
    assert_close(total, expected, F32)  # a weighted sum of float32 parts
    assert parts["vader"][0] > 0 and parts["vader"][1] < 0
    # A ready ModelReward (already normalised) is used as it is.
    ready = rewards.ModelReward(lambda p, r, m: np.full(len(r), 5.0), mean=1.0, std=4.0)
    _, parts = rewards.build_reward([{"kind": "model"}], model_scorer=ready)(_batch(["a", "b"]))
    np.testing.assert_allclose(parts["reward_model"], [1.0, 1.0])


def test_build_reward_errors():
    with pytest.raises(ValueError, match="unknown reward kind .sentiment.*vader, length, regex, eos_penalty, model, python"):
        rewards.build_reward([{"kind": "sentiment"}])
    with pytest.raises(ValueError, match="model_scorer=None"):
        rewards.build_reward([{"kind": "model"}])
    with pytest.raises(ValueError, match="unexpected keyword argument 'targt'"):
        rewards.build_reward([{"kind": "length", "targt": 3, "scale": 1.0}])
    with pytest.raises(ValueError, match="unique"):
        rewards.build_reward([{"kind": "regex", "pattern": "a"}, {"kind": "regex", "pattern": "b"}])
    two = rewards.build_reward([{"kind": "regex", "pattern": "a"}, {"kind": "regex", "pattern": "b", "name": "has_b"}])
    assert list(two.weights) == ["regex", "has_b"]


def test_parse_reward_spec_strings_from_config():
    assert rewards.parse_reward_spec("model:1.0") == {"kind": "model", "weight": 1.0}
    assert rewards.parse_reward_spec("length:0.1:target=40:scale=0.05") == {
        "kind": "length", "weight": 0.1, "target": 40, "scale": 0.05}
    assert rewards.parse_reward_spec(r"regex:0.5:pattern=^A: \d+$:reward_miss=-1") == {
        "kind": "regex", "weight": 0.5, "pattern": r"^A: \d+$", "reward_miss": -1}
    assert rewards.parse_reward_spec("eos_penalty:1:penalty=1")["penalty"] == 1


USER_REWARDS = '''
def exclamations(prompts, responses):
    return [r.count("!") for r in responses]

def broken(prompts, responses):
    return {"not": "scores"}[responses[0]]
'''


def test_python_rewards_from_a_spec_and_from_code(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = rewards.parse_reward_spec("python:0.5:fn=my_rewards:exclamations:clip=1.5")
    assert spec == {"kind": "python", "weight": 0.5, "fn": "my_rewards:exclamations", "clip": 1.5}
    lengths = lambda prompts, responses: [float(len(r)) for r in responses]  # noqa: E731
    composite = rewards.build_reward([spec], extra=[(lengths, 0.25), rewards.LengthReward(target=2, scale=1.0)])
    assert composite.weights == {"exclamations": 0.5, "<lambda>": 0.25, "length": 1.0}
    total, parts = composite(_batch(["hi!", "wow!!!", "ok"], lengths=[2, 4, 2]))
    np.testing.assert_array_equal(parts["exclamations"], [1.0, 1.5, 0.0])  # 3 clipped to 1.5
    np.testing.assert_array_equal(parts["<lambda>"], [3.0, 6.0, 2.0])
    np.testing.assert_array_equal(parts["length"], [0.0, -2.0, 0.0])
    assert_close(total, 0.5 * parts["exclamations"] + 0.25 * parts["<lambda>"] + parts["length"], F32)


def test_python_reward_errors_name_the_component(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = rewards.build_reward([rewards.parse_reward_spec("python:1:fn=my_rewards:broken")])
    with pytest.raises(rewards.RewardError, match=r"component 'broken' raised KeyError: 'a' \(at .*my_rewards.py:6, in broken\)"):
        broken(_batch(["a"]))
    wrong_count = rewards.build_reward([], extra=[lambda p, r: [1.0]])
    with pytest.raises(rewards.RewardError, match="'<lambda>' returned 1 scores for 2 responses"):
        wrong_count(_batch(["a", "b"]))
    with pytest.raises(rewards.ConfigError, match="cannot import 'no_such_module'"):
        rewards.build_reward([rewards.parse_reward_spec("python:1:fn=no_such_module:f")])
    with pytest.raises(rewards.ConfigError, match="has no 'nothing'"):
        rewards.build_reward([rewards.parse_reward_spec("python:1:fn=my_rewards:nothing")])
    with pytest.raises(rewards.ConfigError, match="is not package.module:function"):
        rewards.build_reward([{"kind": "python", "fn": "my_rewards.exclamations"}])
    with pytest.raises(rewards.ConfigError, match="not callable"):
        rewards.extra_components([3])
    with pytest.raises(rewards.ConfigError, match="clip=-1.0 must be positive"):
        rewards.build_reward([{"kind": "length", "target": 1, "scale": 1.0, "clip": -1}])
