"""The controlled-sentiment main job (experiments/sentiment/) at its CI size, and its pieces."""

import itertools
import json
import math
import random

import numpy as np
import pytest

from experiments import sentiment
from experiments.sentiment import common, phases
from pjlm.evaluate import best_of_n_kl


def _se(a: dict, b: dict) -> float:
    return math.sqrt(a["reward_se"] ** 2 + b["reward_se"] ** 2)


@pytest.mark.slow
def test_ci_pipeline_raises_ground_truth_reward_at_a_kl_cost_and_reruns_skip(tmp_path):
    results = sentiment.run_pipeline(tmp_path, "ci")
    points = results["points"]
    sft = next(p for p in points if p["method"] == "sft")
    summary = {p["method"]: p for p in results["summary"].values()}
    for method in ("dpo", "ppo-gt", "ppo-rm"):
        run = sorted((p for p in points if p["method"] == method), key=lambda p: p["step"])
        assert run[0]["step"] == 0 and run[0]["kl"] == 0.0  # step 0 is the SFT policy itself
        final = run[-1]
        assert final["step"] > 0 and final is not run[0]
        assert final["kl"] > 2 * final["kl_se"] > 0, (method, final)
        assert final["reward"] - sft["reward"] > 2 * _se(final, sft), (method, final, sft)
        assert summary[method]["reward"] == final["reward"]
    oracle = [p for p in points if p["method"] == "bon-oracle"]
    for p in (p for p in points if p["method"].startswith("bon")):  # the plug-in KL: 0 at N = 1, ≤ the bound
        n = int(p["hp"][2:])
        assert 0.0 <= p["kl"] <= best_of_n_kl(n) + 1e-9, p
        assert (p["kl"] == 0.0) == (n == 1) and "plug-in" in p["kl_method"], p
    assert max(oracle, key=lambda p: p["kl"])["reward"] > sft["reward"]  # picking by the truth cannot lose
    by_rm = max((p for p in points if p["method"] == "bon-rm"), key=lambda p: int(p["hp"][2:]))
    assert by_rm["reward"] - sft["reward"] > 2 * _se(by_rm, sft), (by_rm, sft)  # the learned reward helps too
    assert 0.0 <= results["reward_model_eval_accuracy"] <= 1.0
    assert all(0.0 <= p["top_sentence_share"] <= 1.0 for p in points)
    board = results["leaderboard"]
    assert len(board) == len(results["summary"]) and all(r["bt_se"] > 0 and r["bt_fit_se"] > 0 for r in board)
    # The leaderboard (wins on shared prompts) orders every two policies whose mean rewards are more than
    # two standard errors apart as their rewards do (fixed seeds).
    finals, score = results["summary"], {r["policy"]: r["bt_score"] for r in board}
    for a, b in itertools.combinations(finals, 2):
        gap = finals[a]["reward"] - finals[b]["reward"]
        if abs(gap) > 2 * _se(finals[a], finals[b]):
            assert (score[a] - score[b]) * gap > 0, (a, b, finals[a]["reward"], finals[b]["reward"], score)
    # The objective: every final policy at every β of the study, J's two readings from the same KL.
    betas = sorted({*common.SCALES["ci"].dpo_betas, *common.SCALES["ci"].ppo_kl_coefs})
    rows = results["objective"]
    assert {(r["policy"], r["beta"]) for r in rows} == {(k, b) for k in results["summary"] for b in betas}
    for r in rows:
        p = results["summary"][r["policy"]]
        assert r["j_vader"] == pytest.approx(p["reward"] - r["beta"] * p["kl"], abs=1e-6), r
        assert r["j_rm_se"] > 0 and r["j_vader_se"] > 0, r
    # Distance to the optimum of every fixed-β run's final policy on the SFT candidates.
    dist = {d["method"]: d for d in results["distances"]}
    assert set(dist) == {"dpo", "ppo-rm", "ppo-gt"}
    for d in dist.values():
        assert 0.0 <= d["tv_mean"] <= 1.0 and d["kl_mean"] >= 0.0 and d["tv_stderr"] > 0, d
        assert d["gap_mean"] == pytest.approx(d["beta"] * d["kl_mean"], rel=1e-4, abs=1e-6), d
        assert 1.0 <= d["candidates_mean"] <= d["candidates"] == max(common.SCALES["ci"].bon_ns)
    for name in ("results.json", "frontier.png", "objective.png", "curves.png", "leaderboard.md", "report.md",
                 "distances.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert "python -m experiments.sentiment" in report and "Samples" in report
    assert "plug-in estimate from the N candidates' rewards" in report and "analytic" not in report
    assert "## The objective" in report and "## Distance to the optimum" in report and "bootstrap" in report

    # A second run with the same directory trains nothing and evaluates nothing again.
    logs = {p: (tmp_path / p / "metrics.jsonl").read_text() for p in ("pretrain", "sft", "reward", "dpo-0.1",
                                                                      "ppo-gt-0.05")}
    again = sentiment.run_pipeline(tmp_path, "ci")
    assert again["points"] == results["points"] and again["distances"] == results["distances"]
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
        prompt, response = phases.split_review(review, rng)
        assert prompt + response == review and response.startswith(" ")
        lengths.add(len(prompt.split()))
    assert lengths == set(range(2, 9))
    assert phases.split_review("Too short to split.", rng) is None


def test_a_local_corpus_is_cleaned_shuffled_and_checked(tmp_path):
    path = tmp_path / "reviews.jsonl"
    texts = [f"Review {i}: the film was fine.<br /><br />I liked the actors a lot, really." for i in range(30)]
    path.write_text("".join(json.dumps({"review": t, "label": 1}) + "\n" for t in texts))
    reviews = phases.load_reviews(str(path), 20, seed=0, text_field="review")
    assert len(reviews) == 20 and len(set(reviews)) == 20
    assert all("<br" not in r and "  " not in r for r in reviews)
    assert reviews != [t.replace("<br /><br />", " ") for t in texts[:20]]  # shuffled
    with pytest.raises(ValueError, match="--text-field"):
        phases.load_reviews(str(path), 20, seed=0, text_field="text")
    with pytest.raises(ValueError, match="needs 40"):
        phases.load_reviews(str(path), 40, seed=0, text_field="review")


def test_every_scale_builds_valid_configs(tmp_path):
    for name, scale in common.SCALES.items():
        configs = [*phases.phase_configs(tmp_path, scale).values()]
        runs = phases.method_runs(tmp_path, scale)
        configs += [r.config for r in runs]
        for config in configs:
            config.validate()
        assert len({r.name for r in runs}) == len(runs), name  # every run has its own directory
        assert len(runs) == len(scale.dpo_betas) + 2 * (len(scale.ppo_kl_coefs) + len(scale.ppo_kl_targets))
    sweep = phases.method_runs(tmp_path, common.SCALES["sweep"])
    assert {r.config.preference.beta for r in sweep if r.method == "dpo"} == {0.05, 0.1, 0.5, 1.0}


def test_top_sentence_finds_the_stock_phrase_and_counts_each_response_once():
    from experiments.sentiment.evaluation import top_sentence

    texts = [" It was fine. I would definitely recommend it.", " Great! I would definitely recommend it. "
             "I would definitely recommend it.", " The soup was cold.", ""]
    assert top_sentence(texts) == ("I would definitely recommend it.", 0.5)
    assert top_sentence([]) == ("", 0.0)


def test_a_work_directory_refuses_another_scale(tmp_path):
    settings = {"docs": 10, "dpo_betas": (0.1,), "corpus": "synthetic"}
    phases.check_same_scale(tmp_path / "scale.json", settings, "ci")
    phases.check_same_scale(tmp_path / "scale.json", settings, "ci")  # the same again is fine
    with pytest.raises(SystemExit, match=r"\(docs differ from --scale cpu\); use a new --workdir"):
        phases.check_same_scale(tmp_path / "scale.json", {**settings, "docs": 20}, "cpu")
