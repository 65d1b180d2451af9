"""The composite study's pieces: two preferences from the same samples, the PPO reward it builds, and
the trend the report states. (The study itself runs for minutes; its committed report is the run.)"""

from __future__ import annotations

import numpy as np
import pytest

from experiments.sentiment import composite
from experiments.sentiment.common import SCALES
from pjlm.rewards import parse_reward_spec


def test_both_preferences_come_from_the_same_samples_and_pull_apart():
    prompts = ["The soup", "My room"]
    texts = [["was great and lovely and warm.", "bad.", "was fine I guess, nothing more.", ""],
             ["ok", "was awful, rude and dirty all week long.", "was lovely.", "was lovely too."]]
    vader = np.array([[0.9, -0.5, 0.2, 0.0], [0.3, -0.9, 0.6, 0.6]])
    pairs = composite.preference_pairs(prompts, texts, vader, min_gap=0.1, min_word_gap=3)
    positive, concise = pairs["positive"], pairs["concise"]
    # Per prompt, every pair over the gap, the empty response in none.
    got = {(p["chosen"], p["rejected"]) for p in positive[0]}
    assert got == {(texts[0][0], texts[0][1]), (texts[0][0], texts[0][2]), (texts[0][2], texts[0][1])}
    # VADER ties (0.6, 0.6) make no positive pair; word counts under the gap make no concise pair.
    assert (texts[1][2], texts[1][3]) not in {(p["chosen"], p["rejected"]) for p in positive[1]}
    got = {(p["chosen"], p["rejected"]) for p in concise[1]}
    assert got == {(texts[1][0], texts[1][1]), (texts[1][2], texts[1][1]), (texts[1][3], texts[1][1])}
    for group in concise:  # concise: the chosen is always the shorter
        assert all(composite.words(p["chosen"]) + 3 <= composite.words(p["rejected"]) for p in group)
    # The two preferences disagree on some pair: the long positive review against the short negative one.
    assert (texts[0][0], texts[0][1]) in {(p["chosen"], p["rejected"]) for p in positive[0]}
    assert (texts[0][1], texts[0][0]) in {(p["chosen"], p["rejected"]) for p in concise[0]}
    for groups in (positive, concise):  # one group per prompt, in order
        assert all(p["prompt"] == prompts[i] for i, group in enumerate(groups) for p in group)


@pytest.mark.parametrize("w", composite.WEIGHTS)
def test_each_weighting_is_a_ppo_run_on_two_named_reward_models(tmp_path, w):
    config = composite.ppo_config(tmp_path, SCALES["cpu"], w)
    config.validate()
    specs = [parse_reward_spec(s) for s in config.ppo.rewards]
    assert [(s["kind"], s["name"]) for s in specs] == [("model", "positive"), ("model", "concise")]
    assert specs[0]["path"].endswith("composite/rm-positive") and specs[1]["path"].endswith("composite/rm-concise")
    assert specs[0]["weight"] == pytest.approx(w) and specs[0]["weight"] + specs[1]["weight"] == pytest.approx(1.0)
    assert config.ppo.reward_model is None and config.train.init_from == str(tmp_path / "sft")


def _point(w, vader, words, se=0.01):
    return {"w": w, "vader": vader, "vader_se": se, "words": words, "words_se": se, "kl": 1.0, "kl_se": se}


def test_the_trend_reports_direction_and_whether_the_ends_differ_beyond_noise():
    points = {"sft": _point(None, 0.0, 30.0), "a": _point(0.2, 0.1, 10.0), "b": _point(0.5, 0.3, 14.0),
              "c": _point(0.8, 0.5, 13.0)}
    vader, words = composite.trend(points, "vader"), composite.trend(points, "words")
    assert vader["w"] == [0.2, 0.5, 0.8] and vader["monotone"] == "increasing"
    assert vader["ends_gap"] == pytest.approx(0.4) and vader["ends_gap_se"] == pytest.approx(np.hypot(0.01, 0.01))
    assert vader["significant"]
    assert words["monotone"] == "no" and words["significant"]
    noisy = {k: {**p, "words_se": 5.0} for k, p in points.items()}
    assert not composite.trend(noisy, "words")["significant"]  # |13 − 10| < 2·√(5² + 5²)
