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
    scale = common.SCALES["ci"]
    results = sentiment.run_pipeline(tmp_path, "ci")
    points = results["points"]
    sft = next(p for p in points if p["method"] == "sft")
    summary = {p["method"]: p for p in results["summary"].values()}
    for method in ("dpo", "dpo-online", "ppo-gt", "ppo-rm"):
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
    (accuracy,) = results["reward_model_eval_accuracy"]
    assert 0.5 < accuracy <= 1.0  # the reward model ranks held-out pairs better than chance
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
    # Online DPO: round k + 1 trained on pairs of round k's policy, ranked by the reward model.
    online = next(r for r in phases.method_runs(tmp_path, scale) if r.method == "dpo-online")
    steps = [s for s, _ in online.checkpoints(tmp_path / online.name)]
    assert steps == [k * online.config.train.steps for k in range(1, scale.online_rounds + 1)]
    assert sorted(p["step"] for p in points if p["method"] == "dpo-online") == [0, *steps]
    run_json = json.loads((tmp_path / online.name / "round-2" / "run.json").read_text())
    assert run_json["pins"]["train.init_from"]["path"].startswith(str(tmp_path / online.name / "round-1"))
    assert run_json["definition"]["preference.reference"] == str(tmp_path / "sft")
    # The objective: every final policy at every β of the study, J's three readings from the same KL.
    betas = sorted({*scale.dpo_betas, *scale.online_dpo_betas, *scale.ppo_kl_coefs})
    rows = results["objective"]
    assert {(r["policy"], r["beta"]) for r in rows} == {(k, b) for k in results["summary"] for b in betas}
    std = results["reward_std"][0]
    for r in rows:
        p = results["summary"][r["policy"]]
        assert r["j_vader"] == pytest.approx(p["reward"] - r["beta"] * p["kl"], abs=1e-6), r
        at_zero = next(q for q in rows if q["policy"] == r["policy"] and q["beta"] == betas[0])
        e_rm = at_zero["j_rm"] + betas[0] * p["kl"]  # E[r] from J at one β: the raw reading is std × it
        assert r["j_rm_raw"] == pytest.approx(std * e_rm - r["beta"] * p["kl"], abs=1e-6), r
        assert r["j_rm_se"] > 0 and r["j_vader_se"] > 0 and r["j_rm_raw_se"] > 0, r
    # Distance to the optimum of every fixed-β run's final policy on the SFT candidates.
    dist = {d["method"]: d for d in results["distances"]}
    assert set(dist) == {"dpo", "dpo-online", "ppo-rm", "ppo-gt"}
    for d in dist.values():
        assert 0.0 <= d["tv_mean"] <= 1.0 and d["kl_mean"] >= 0.0 and d["tv_stderr"] > 0, d
        assert d["gap_mean"] == pytest.approx(d["beta"] * d["kl_mean"], rel=1e-4, abs=1e-6), d
        assert 1.0 <= d["candidates_mean"] <= d["candidates"] == scale.bon_candidates * max(scale.bon_ns)
    for name in ("results.json", "frontier.png", "objective.png", "curves.png", "leaderboard.md", "report.md",
                 "distances.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert "python -m experiments.sentiment" in report and "Samples" in report
    assert "plug-in estimate from the N candidates' rewards" in report and "analytic" not in report
    assert "## The objective" in report and "## Distance to the optimum" in report and "bootstrap" in report

    # A second run with the same directory trains nothing and evaluates nothing again.
    logs = {p: (tmp_path / p / "metrics.jsonl").read_text() for p in ("pretrain", "sft", "reward", "dpo-0.1",
                                                                      "ppo-gt-0.05", "dpo-online-0.1/round-2")}
    evals = (tmp_path / "evals.json").read_text()
    again = sentiment.run_pipeline(tmp_path, "ci")
    assert again["points"] == results["points"] and again["distances"] == results["distances"]
    assert json.loads((tmp_path / "results.json").read_text())["points"] == results["points"]
    # A second seed extends the directory: seed 0 is left as it was, seed 1 has its own pairs, reward
    # model and runs, and every reported number is the two seeds' mean.
    two = sentiment.run_pipeline(tmp_path, "ci", seeds=2)
    assert {p: (tmp_path / p / "metrics.jsonl").read_text() for p in logs} == logs
    assert (tmp_path / "evals.json").read_text() == evals
    seed1 = tmp_path / "seed-1"
    assert (seed1 / "data" / "pairs_train.jsonl").read_text() != (tmp_path / "data" / "pairs_train.jsonl").read_text()
    assert json.loads((seed1 / "dpo-0.1" / "run.json").read_text())["definition"]["train.seed"] == 1
    assert two["seeds"] == 2 and len(two["reward_model_eval_accuracy"]) == 2
    one = {(p["method"], p["hp"], p["step"]): p for p in results["points"]}
    for p in two["points"]:
        assert len(p["per_seed"]) == 2 and p["per_seed"][0]["reward"] == one[p["method"], p["hp"], p["step"]]["reward"]
        assert p["reward"] == pytest.approx(np.mean([q["reward"] for q in p["per_seed"]]), abs=1e-12)
        assert p["kl"] == pytest.approx(np.mean([q["kl"] for q in p["per_seed"]]), abs=1e-12)
    assert "mean over the 2 seeds" in (tmp_path / "report.md").read_text()

    # The DPO study on the same directory: seed 0's DPO retrained with one thing changed at a time.
    from experiments.sentiment import dpo_study

    every = dpo_study.variants(scale.dpo_steps, scale.dpo_lr)
    assert [v.steps for v in every[:2]] == [2 * scale.dpo_steps, 4 * scale.dpo_steps] and every[2].lr == 3 * scale.dpo_lr
    chosen = [every[-1]]  # a pair subset; the others differ from it in numbers only (steps, rate, rows kept)
    assert chosen[0].pairs == "margin" and chosen[0].steps == scale.dpo_steps
    study = dpo_study.run_study(tmp_path, "ci", [v.name for v in chosen])
    rows = {r["variant"]: r for r in study["rows"]}
    main_dpo = max((p for p in results["points"] if p["method"] == "dpo" and p["hp"] == "β=0.1"), key=lambda p: p["step"])
    assert rows["main job: DPO, β=0.1"]["reward"] == main_dpo["reward"]
    assert set(rows) == {"main job: DPO, β=0.1", "main job: online DPO, β=0.1", *(v.name for v in chosen)}
    for v in chosen:
        row = rows[v.name]
        assert row["steps"] == v.steps and row["epochs"] == pytest.approx(v.steps * scale.batch / row["pairs"])
        assert row["kl"] > 0 and row["eval_loss"] is not None, row
    out = tmp_path / "dpo-study"
    train = (tmp_path / "data" / "pairs_train.jsonl").read_text().splitlines()
    assert (out / "pairs_quarter_train.jsonl").read_text().splitlines() == train[:len(train) // 4]
    margin = [json.loads(line) for line in (out / "pairs_margin_train.jsonl").read_text().splitlines()]
    vader = dpo_study.rewards.VaderReward()
    gaps = [dpo_study.score_texts(vader, [r["prompt"] for r in margin], [r[k] for r in margin])
            for k in ("chosen", "rejected")]
    assert 0 < len(margin) < len(train) and np.all(gaps[0] - gaps[1] >= dpo_study.MARGIN)
    assert (out / "report.md").stat().st_size > 0 and (out / "frontier.png").stat().st_size > 0


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
        for run in runs:  # an online run's rounds: DPO from the previous round, the reference SFT throughout
            for k in range(1, run.rounds + 1) if run.rounds > 1 else ():
                round_k = phases.round_config(run, tmp_path / run.name, k, scale)
                round_k.validate()
                assert round_k.train.init_from == str(tmp_path / (f"{run.name}/round-{k - 1}" if k > 1 else "sft"))
                assert round_k.preference.reference == str(tmp_path / "sft")
                assert round_k.data.source == str(tmp_path / run.name / f"pairs-{k}_train.jsonl")
        assert len({r.name for r in runs}) == len(runs), name  # every run has its own directory
        assert len(runs) == len(scale.dpo_betas) + len(scale.online_dpo_betas) + 2 * (
            len(scale.ppo_kl_coefs) + len(scale.ppo_kl_targets))
        seeded = phases.method_runs(tmp_path, scale, seed=2)  # another seed: its own directory and seeds
        assert [r.name for r in seeded] == [r.name for r in runs]
        for run in seeded:
            assert run.config.train.seed == run.config.data.seed == 2
            assert str(tmp_path / "seed-2") in run.config.data.source + str(run.config.ppo.reward_model) or \
                run.method == "ppo-gt"
    sweep = phases.method_runs(tmp_path, common.SCALES["sweep"])
    assert {r.config.preference.beta for r in sweep if r.method == "dpo"} == {0.05, 0.1, 0.5, 1.0}
    adaptive = [r.config.ppo for r in sweep if r.config.ppo.kl_target]  # β may move 1% a batch, as in Ziegler et al.
    assert adaptive and all(c.kl_horizon == 20 * common.SCALES["sweep"].batch for c in adaptive)


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


def test_seeds_combine_as_mean_and_standard_error_over_seeds():
    from experiments.sentiment import report

    rows = [[{"policy": "A", "beta": 0.1, "j_rm": v, "j_rm_se": 0.01}] for v in (1.0, 2.0, 4.0)]
    (row,) = report.combine_rows(rows, ("policy", "beta"), ("j_rm",))
    assert row["j_rm"] == pytest.approx(7 / 3) and row["seeds"] == 3
    assert row["j_rm_se"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1) / math.sqrt(3))
    assert report.combine_rows(rows[:1], ("policy", "beta"), ("j_rm",)) == rows[0]  # one seed: over prompts
    point = lambda r, kl, step: {"method": "dpo", "hp": "β=0.1", "step": step, "reward": r, "kl": kl}
    series = [{("dpo", "β=0.1"): [point(0.0, 0.0, 0), point(r, kl, 10)]} for r, kl in ((0.5, 1.0), (0.7, 3.0))]
    series[1][("dpo", "β=0.1")].append(point(0.9, 4.0, 20))  # a step only one seed reached is left out
    (merged,) = report.over_seeds(series).values()
    assert [p["step"] for p in merged] == [0, 10]
    assert merged[1]["reward"] == pytest.approx(0.6) and merged[1]["kl"] == pytest.approx(2.0)
    assert merged[1]["kl_sd"] == pytest.approx(math.sqrt(2.0)) and merged[1]["kl_se"] == pytest.approx(1.0)
