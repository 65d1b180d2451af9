import jax
import numpy as np
import pytest

from pjlm import rewards
from pjlm.evaluate import reward_and_kl, sample_in_chunks, sequence_logps
from pjlm.sample import load_for_sampling


@pytest.mark.slow
def test_reward_and_kl_of_a_policy_against_its_reference(pretrained):
    model, params, tokenizer = load_for_sampling(pretrained)
    vader = rewards.VaderReward()
    prompts = ["Write a review.\n", "The pasta"]
    same = reward_and_kl(model, params, params, tokenizer, prompts, vader, samples_per_prompt=8, max_new_tokens=12)
    assert same["kl"] == 0.0 and same["n"] == 16
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    other = tree.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    moved = reward_and_kl(model, other, params, tokenizer, prompts, vader, samples_per_prompt=8, max_new_tokens=12)
    assert moved["kl"] > 2 * moved["kl_se"] > 0, moved["kl"]
    analyzer = __import__("vaderSentiment.vaderSentiment", fromlist=["x"]).SentimentIntensityAnalyzer()
    expected = np.mean([analyzer.polarity_scores(t)["compound"] for t in moved["texts"]])
    assert moved["reward"] == pytest.approx(expected, abs=1e-6)
    # Per-sample KLs are the difference of the samples' sequence log-probs under the two policies.
    kls = sequence_logps(model, other, moved["rollout"]) - sequence_logps(model, params, moved["rollout"])
    np.testing.assert_allclose(moved["kls"], kls, atol=1e-4)
    assert np.mean(moved["kls"]) == pytest.approx(moved["kl"], abs=1e-6)
    # Chunked sampling keeps each prompt's samples adjacent and calls within the row limit.
    drawn = sample_in_chunks(model, params, tokenizer, prompts, 3, rows_per_call=4, max_new_tokens=4)
    assert len(drawn["texts"]) == 6 and [c["rollout"]["tokens"].shape[0] for c in drawn["chunks"]] == [3, 3]
