import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from experiments import bench_generate
from pjlm_testing import F32, F32_DEEP, assert_close
from pjlm import sharding
from pjlm.config import MeshConfig, model_preset
from pjlm.generate import _generate_jit, generate, sample_logits
from pjlm.model import Transformer

B, P, T = 4, 8, 8
PROMPT_LENS = np.array([8, 5, 2, 7])  # left-padded to P


def _model(**overrides):
    model = Transformer(model_preset("tiny", max_len=P + T, **overrides))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


@pytest.fixture(scope="module")
def tiny():
    return _model()


@pytest.fixture(scope="module")
def prompts():
    mask_BP = (np.arange(P)[None] >= P - PROMPT_LENS[:, None]).astype(np.int32)
    tokens_BP = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 1, 256), np.int32) * mask_BP
    return tokens_BP, mask_BP


def _full_forward(model):
    return jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg))


def _layout(prompt_mask_BP, response_mask_BT):
    """Segment ids and positions of a left-padded prompt followed by its response."""
    seg_BL = np.concatenate([prompt_mask_BP, response_mask_BT], axis=1).astype(np.int32)
    return np.maximum(np.cumsum(seg_BL, axis=1) - 1, 0).astype(np.int32), seg_BL


def _reference_greedy(model, params, tokens_BP, mask_BP):
    """Re-run the full forward on the growing sequence (a fixed buffer; causality hides the tail)."""
    fwd = _full_forward(model)
    buf_BL = np.zeros((B, P + T), np.int32)
    buf_BL[:, :P] = tokens_BP
    pos_BL, seg_BL = _layout(mask_BP, np.ones((B, T), np.int32))
    for t in range(T):
        logits_BLV = fwd(params, buf_BL, pos_BL, seg_BL)
        buf_BL[:, P + t] = np.argmax(np.asarray(logits_BLV[:, P + t - 1]), axis=-1)
    return buf_BL


@pytest.mark.parametrize("window", [None, 5])
def test_cached_greedy_equals_full_forward_each_step(prompts, window):
    model, params = _model(sliding_window=window)
    out = generate(model, params, *prompts, key=jax.random.key(2), max_new_tokens=T, temperature=0.0)
    np.testing.assert_array_equal(out["tokens"], _reference_greedy(model, params, *prompts))
    np.testing.assert_array_equal(out["response_mask"], np.ones((B, T)))
    assert out["tokens"].shape == (B, P + T) and out["logprobs"].shape == (B, T)


@pytest.mark.parametrize("top_k", [0, 20])
def test_logprobs_are_the_full_forwards_tempered_log_softmax(tiny, prompts, top_k):
    model, params = tiny
    out = generate(model, params, *prompts, key=jax.random.key(3), max_new_tokens=T, temperature=0.7, top_k=top_k)
    tokens_BL = np.asarray(out["tokens"])
    pos_BL, seg_BL = _layout(prompts[1], np.asarray(out["response_mask"]))
    logits_BTV = _full_forward(model)(params, tokens_BL, pos_BL, seg_BL)[:, P - 1:-1] / 0.7
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)  # the full vocabulary even with top-k
    expected_BT = np.take_along_axis(np.asarray(logp_BTV), tokens_BL[:, P:, None], axis=-1)[..., 0]
    assert_close(out["logprobs"], expected_BT, F32_DEEP)  # cached decoding vs the full forward: through a model
    assert np.all(expected_BT < 0) and len(np.unique(tokens_BL[:, P:])) > 3, "sampled, not greedy"
    if top_k:
        logits_BTV = np.asarray(logits_BTV)
        rank_BT = (logits_BTV > np.take_along_axis(logits_BTV, tokens_BL[:, P:, None], axis=-1)).sum(-1)
        assert rank_BT.max() < top_k, "a token outside the top k was drawn"


def test_rows_stop_independently_at_eos(tiny, prompts):
    model, params = tiny
    greedy_BT = np.asarray(generate(model, params, *prompts, key=jax.random.key(4), max_new_tokens=T,
                                    temperature=0.0)["tokens"])[:, P:]

    def first_hit(token):
        return np.array([list(row).index(token) if token in row else T for row in greedy_BT])

    # An eos that rows meet at different steps (some maybe never): the greedy token of some row.
    eos = next(int(v) for v in greedy_BT.reshape(-1) if len(set(first_hit(v))) > 1 and first_hit(v).min() < T - 1)
    stop_B = first_hit(eos)
    out = generate(model, params, *prompts, key=jax.random.key(4), max_new_tokens=T, temperature=0.0,
                   eos_id=eos, pad_id=255)
    live_BT = np.arange(T)[None] <= stop_B[:, None]
    np.testing.assert_array_equal(out["response_mask"], live_BT.astype(np.int32))
    np.testing.assert_array_equal(out["tokens"][:, P:], np.where(live_BT, greedy_BT, 255))
    np.testing.assert_array_equal(np.asarray(out["logprobs"])[~live_BT], 0.0)
    assert np.all(np.asarray(out["logprobs"])[live_BT] < 0)
    for b in np.flatnonzero(stop_B < T):
        assert out["tokens"][b, P + stop_B[b]] == eos, "the eos token itself is part of the response"


def test_top_k_one_and_tiny_top_p_are_greedy(tiny, prompts):
    model, params = tiny
    greedy = generate(model, params, *prompts, key=jax.random.key(5), max_new_tokens=T, temperature=0.0)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        out = generate(model, params, *prompts, key=jax.random.key(5), max_new_tokens=T, temperature=1.3, **kwargs)
        np.testing.assert_array_equal(out["tokens"], greedy["tokens"])


def test_sample_logits_truncates_to_top_k_and_nucleus():
    logits_BV = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]] * 4000))
    key = jax.random.key(6)
    top_p, logp_top_p = sample_logits(logits_BV, key, temperature=1.0, top_p=0.75)
    assert set(np.unique(top_p)) == {0, 2}, "nucleus 0.75 is {0.5, 0.3}"
    assert_close(logp_top_p, np.log(np.array([0.5, 0.05, 0.3, 0.15]))[top_p], F32)  # one log-softmax
    top_k, _ = sample_logits(logits_BV, key, temperature=2.0, top_k=3)
    assert set(np.unique(top_k)) == {0, 2, 3}
    full, _ = sample_logits(logits_BV, key, temperature=1.0)
    assert abs(float(np.mean(np.asarray(full) == 1)) - 0.05) < 0.02


def test_sharded_run_equals_single_device(tiny, prompts):
    model, params = tiny
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, shardings = sharding.abstract_params(model, mesh)
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["layers"]["attn"]["q"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    with sharding.use_mesh(mesh):
        compiled = _generate_jit.lower(model, sharded_params, *prompts, jax.random.key(7), max_new_tokens=T,
                                       temperature=0.0, top_k=0, top_p=1.0, eos_id=None, pad_id=0).compile()
        out = compiled(sharded_params, *prompts, jax.random.key(7))
    # The cache [layers, B, S, K, H] = [2, 4, 16, 2, 16] lives as batch/4 × kv_heads/2 per device.
    assert "f32[2,1,16,1,16]" in compiled.as_text() and "f32[2,4,16,2,16]" not in compiled.as_text()
    ref = generate(model, params, *prompts, key=jax.random.key(7), max_new_tokens=T, temperature=0.0)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    assert_close(out["logprobs"], ref["logprobs"], F32_DEEP)  # through the model, sharded vs not


def test_too_long_a_generation_names_the_limit(tiny, prompts):
    model, params = tiny
    with pytest.raises(ValueError, match="exceeds model.max_len=16"):
        generate(model, params, *prompts, key=jax.random.key(0), max_new_tokens=T + 1)


def test_generation_benchmark_runs(capsys):
    result = bench_generate.main(["--batch", "8", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1"])
    assert result["new_tokens_per_s"] > 0 and '"new_tokens_per_s"' in capsys.readouterr().out


def test_vocab_limit_keeps_padded_embedding_rows_out_of_the_samples(tiny, prompts):
    model, params = tiny
    V, limit = model.config.vocab_size, 40  # as if only the first 40 rows had tokenizer ids
    free = generate(model, params, *prompts, key=jax.random.key(3), max_new_tokens=T, temperature=1.0)
    assert (np.asarray(free["tokens"])[:, P:] >= limit).mean() > 0.5  # a random model spreads over all V
    for temperature in (0.0, 1.0):
        out = generate(model, params, *prompts, key=jax.random.key(3), max_new_tokens=T, temperature=temperature,
                       vocab_limit=limit)
        assert (np.asarray(out["tokens"])[:, P:] < limit).all()
        assert np.isfinite(np.asarray(out["logprobs"])).all()
    same = generate(model, params, *prompts, key=jax.random.key(3), max_new_tokens=T, temperature=1.0, vocab_limit=V)
    np.testing.assert_array_equal(same["tokens"], free["tokens"])  # a limit at V changes nothing


def test_a_row_stops_at_any_of_several_stop_ids():
    """eos_id may be several ids (eos and a chat template's end-of-turn marker): each row stops at the
    first of them it samples, and samples exactly as with no stop ids until then."""
    model = Transformer(model_preset("tiny", vocab_size=16, max_len=32))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(8, 4)), jnp.int32)
    mask = jnp.ones((8, 4), bool)
    free = generate(model, params, prompts, mask, key=jax.random.PRNGKey(1), max_new_tokens=12, eos_id=None)
    free_new = np.asarray(free["tokens"])[:, 4:]
    stops = (3, 11)
    out = generate(model, params, prompts, mask, key=jax.random.PRNGKey(1), max_new_tokens=12, eos_id=stops)
    new, m = np.asarray(out["tokens"])[:, 4:], np.asarray(out["response_mask"])
    for row in range(8):
        hits = [t for t in range(12) if free_new[row, t] in stops]
        end = hits[0] + 1 if hits else 12
        assert m[row].tolist() == [1] * end + [0] * (12 - end)
        assert new[row, :end].tolist() == free_new[row, :end].tolist()
    assert any(free_new[r, t] in stops for r in range(8) for t in range(11)), "the test must see a stop"
