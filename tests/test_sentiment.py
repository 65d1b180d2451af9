"""The controlled-sentiment main job (experiments/sentiment.py) at its CI size, and its pieces."""

import json
import math
import random

import numpy as np
import pytest

from experiments import sentiment
from pjlm.evaluate import best_of_n_kl


def _se(a: dict, b: dict) -> float:
    return math.sqrt(a["reward_se"] ** 2 + b["reward_se"] ** 2)


@pytest.mark.slow
def test_ci_pipeline_raises_ground_truth_reward_at_a_kl_cost_and_reruns_skip(tmp_path):
    results = sentiment.run_pipeline(tmp_path, "ci")
    points = results["points"]
    sft = next(p for p in points if p["method"] == "sft")
    summary = {p["method"]: p for p in results["summary"].values()}
    for method in ("dpo", "ppo-gt"):
        run = sorted((p for p in points if p["method"] == method), key=lambda p: p["step"])
        assert run[0]["step"] == 0 and run[0]["kl"] == 0.0  # step 0 is the SFT policy itself
        final = run[-1]
        assert final["step"] > 0 and final is not run[0]
        assert final["kl"] > 2 * final["kl_se"] > 0, (method, final)
        assert final["reward"] - sft["reward"] > 2 * _se(final, sft), (method, final, sft)
        assert summary[method]["reward"] == final["reward"]
    oracle = [p for p in points if p["method"] == "bon-oracle"]
    assert [p["kl"] for p in oracle] == pytest.approx([best_of_n_kl(int(p["hp"][2:])) for p in oracle])
    assert max(oracle, key=lambda p: p["kl"])["reward"] > sft["reward"]  # picking by the truth cannot lose
    assert 0.0 <= results["reward_model_eval_accuracy"] <= 1.0
    assert all(0.0 <= p["top_sentence_share"] <= 1.0 for p in points)
    assert len(results["leaderboard"]) == len(results["summary"])
    for name in ("results.json", "frontier.png", "curves.png", "leaderboard.md", "report.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert "python -m experiments.sentiment" in report and "analytic" in report and "Samples" in report

    # A second run with the same directory trains nothing and evaluates nothing again.
    logs = {p: (tmp_path / p / "metrics.jsonl").read_text() for p in ("pretrain", "sft", "reward", "dpo-0.1",
                                                                      "ppo-gt-0.05")}
    again = sentiment.run_pipeline(tmp_path, "ci")
    assert again["points"] == results["points"]
    assert {p: (tmp_path / p / "metrics.jsonl").read_text() for p in logs} == logs
    assert json.loads((tmp_path / "results.json").read_text())["points"] == results["points"]


def test_best_of_n_kl_matches_the_exact_kl_of_best_of_n_over_many_outcomes():
    # Base policy: uniform over M outcomes with distinct scores. Best-of-n picks the outcome of rank r
    # (1 = worst) with probability (r/M)^n − ((r−1)/M)^n; its KL to uniform tends to log n − (n−1)/n.
    M = 200_000
    r = np.arange(1, M + 1, dtype=np.float64)
    for n in (1, 2, 4, 16, 64):
        p = (r / M) ** n - ((r - 1) / M) ** n
        exact = float(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * M), 0.0)))
        assert best_of_n_kl(n) == pytest.approx(exact, abs=2e-3), n
    with pytest.raises(ValueError, match="n ≥ 1"):
        best_of_n_kl(0)


def test_split_review_gives_a_2_to_8_word_prompt_and_the_rest():
    rng = random.Random(0)
    review = "The curry was really delicious, but the prices were truly bad and the room was loud."
    lengths = set()
    for _ in range(200):
        prompt, response = sentiment.split_review(review, rng)
        assert prompt + response == review and response.startswith(" ")
        lengths.add(len(prompt.split()))
    assert lengths == set(range(2, 9))
    assert sentiment.split_review("Too short to split.", rng) is None


def test_a_local_corpus_is_cleaned_shuffled_and_checked(tmp_path):
    path = tmp_path / "reviews.jsonl"
    texts = [f"Review {i}: the film was fine.<br /><br />I liked the actors a lot, really." for i in range(30)]
    path.write_text("".join(json.dumps({"review": t, "label": 1}) + "\n" for t in texts))
    reviews = sentiment.load_reviews(str(path), 20, seed=0, text_field="review")
    assert len(reviews) == 20 and len(set(reviews)) == 20
    assert all("<br" not in r and "  " not in r for r in reviews)
    assert reviews != [t.replace("<br /><br />", " ") for t in texts[:20]]  # shuffled
    with pytest.raises(ValueError, match="--text-field"):
        sentiment.load_reviews(str(path), 20, seed=0, text_field="text")
    with pytest.raises(ValueError, match="needs 40"):
        sentiment.load_reviews(str(path), 40, seed=0, text_field="review")


def test_every_scale_builds_valid_configs(tmp_path):
    for name, scale in sentiment.SCALES.items():
        configs = [*sentiment.phase_configs(tmp_path, scale).values()]
        runs = sentiment.method_runs(tmp_path, scale)
        configs += [r.config for r in runs]
        for config in configs:
            config.validate()
        assert len({r.name for r in runs}) == len(runs), name  # every run has its own directory
        assert len(runs) == len(scale.dpo_betas) + 2 * (len(scale.ppo_kl_coefs) + len(scale.ppo_kl_targets))
    sweep = sentiment.method_runs(tmp_path, sentiment.SCALES["sweep"])
    assert {r.config.preference.beta for r in sweep if r.method == "dpo"} == {0.05, 0.1, 0.5, 1.0}


def test_top_sentence_finds_the_stock_phrase_and_counts_each_response_once():
    from experiments.sentiment_eval import top_sentence

    texts = [" It was fine. I would definitely recommend it.", " Great! I would definitely recommend it. "
             "I would definitely recommend it.", " The soup was cold.", ""]
    assert top_sentence(texts) == ("I would definitely recommend it.", 0.5)
    assert top_sentence([]) == ("", 0.0)


def test_a_work_directory_refuses_another_scale(tmp_path):
    settings = {"docs": 10, "dpo_betas": (0.1,), "corpus": "synthetic"}
    sentiment.check_same_scale(tmp_path / "scale.json", settings, "ci")
    sentiment.check_same_scale(tmp_path / "scale.json", settings, "ci")  # the same again is fine
    with pytest.raises(SystemExit, match=r"\(docs differ from --scale cpu\); use a new --workdir"):
        sentiment.check_same_scale(tmp_path / "scale.json", {**settings, "docs": 20}, "cpu")
