"""`preference.reference`: DPO regularised towards another policy than the one it starts from.

One tiny policy run saved at steps 2 and 4 gives two policies of one shape and tokenizer: A = its
latest step (the DPO runs start from it) and B = its step 2 (the other reference).
"""

import dataclasses
import json
import math
import shutil

import chex
import jax
import numpy as np
import pytest

from pjlm.config import ConfigError, LoraConfig
from pjlm.evaluate import load_policy
from pjlm.train import loop, phases, rundir
from pjlm_testing import F32_DEEP, assert_close, clear_preferences, tiny_config

LOGGED = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
          "logps_rejected", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """root/policy: a run with checkpoints 2 and 4; root/at2: a copy of it at step 2 (a work directory
    a test may train further); root/prefs.jsonl: the pairs."""
    root = tmp_path_factory.mktemp("policies")
    loop.run(tiny_config(train=dict(steps=2, checkpoint_every=2)), root / "policy")
    shutil.copytree(root / "policy", root / "at2")
    loop.run(tiny_config(train=dict(steps=4, checkpoint_every=2)), root / "policy")
    clear_preferences(root / "prefs.jsonl", n=80)
    return root


def dpo(root, steps: int = 3, *, train=None, **preference):
    return tiny_config(train={**dict(phase="dpo", steps=steps, log_every=1, checkpoint_every=steps,
                                     init_from=str(root / "policy")), **(train or {})},
                       data=dict(source=str(root / "prefs.jsonl"), pack=False, buckets=(32,), eval_rows=0),
                       optimizer=dict(learning_rate=1e-3, warmup_steps=0), preference=dict(beta=1.0, **preference))


def _logged(result) -> list[dict]:
    return [{k: h[k] for k in LOGGED} for h in result.history if "loss" in h]


def _params(result):
    return jax.device_get(result.state.params)


def test_naming_init_from_as_the_reference_is_the_default_bit_for_bit(policies, tmp_path, capsys):
    default = loop.run(dpo(policies), tmp_path / "default")
    said_default = capsys.readouterr().err
    explicit = loop.run(dpo(policies, reference=str(policies / "policy")), tmp_path / "explicit")
    said = capsys.readouterr().err
    assert _logged(explicit) == _logged(default)  # bit for bit
    chex.assert_trees_all_equal(_params(explicit), _params(default))
    assert_close(_logged(default)[0]["loss"], math.log(2), F32_DEEP)  # policy = reference at step 1

    step4 = str(policies / "policy" / "checkpoints" / "4")
    pins = json.loads((tmp_path / "explicit" / rundir.RUN_FILE).read_text())["pins"]
    assert pins["preference.reference"]["path"] == step4 and pins["preference.reference"]["step"] == 4
    assert json.loads((tmp_path / "default" / rundir.RUN_FILE).read_text())["pins"]["preference.reference"] is None
    pinned = json.loads((tmp_path / "explicit" / "config.json").read_text())["pinned"]
    assert pinned["preference.reference"] == step4
    assert f"pjlm: reference: {step4} (preference.reference)" in said
    assert f"pjlm: reference: {step4} (train.init_from)" in said_default


def _summed_logps(path, rows: dict) -> np.ndarray:
    """Σ log π over each row's response tokens: a direct forward, log-softmax in float64 on the host."""
    model, params, _ = load_policy(path)
    logits = np.asarray(model.apply({"params": params}, rows["tokens"], rows["positions"], rows["segment_ids"]),
                        np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    target = np.take_along_axis(logp[:, :-1], np.asarray(rows["tokens"])[:, 1:, None], axis=-1)[..., 0]
    return np.sum(target * np.asarray(rows["loss_mask"])[:, 1:], axis=1)


def test_the_first_rewards_are_beta_times_the_log_ratio_of_start_and_reference(policies, tmp_path):
    reference = str(policies / "policy" / "checkpoints" / "2")
    config = dpo(policies, steps=1, reference=reference)
    got = _logged(loop.run(config, tmp_path / "dpo"))[0]
    batch = loop.setup(config, tmp_path / "probe").train_batches.batch(0)
    a = {side: _summed_logps(policies / "policy", batch[side]) for side in ("chosen", "rejected")}
    b = {side: _summed_logps(reference, batch[side]) for side in ("chosen", "rejected")}
    beta = config.preference.beta
    want_c, want_r = beta * np.mean(a["chosen"] - b["chosen"]), beta * np.mean(a["rejected"] - b["rejected"])
    h = (a["chosen"] - b["chosen"]) - (a["rejected"] - b["rejected"])
    want_loss = np.mean(np.logaddexp(0.0, -beta * h))  # −log σ(βh)
    # The rewards are differences of log-prob sums that mostly cancel: their error is bounded on the
    # scale of the sums (β·max|log π|), as pjlm_testing.assert_close allows for a cancelling sum.
    scale = beta * max(np.abs(v).max() for v in (*a.values(), *b.values()))
    assert_close(got["reward_chosen"], want_c, F32_DEEP, scale=scale, what="reward_chosen")
    assert_close(got["reward_rejected"], want_r, F32_DEEP, scale=scale, what="reward_rejected")
    assert_close(got["logps_chosen"], np.mean(a["chosen"]), F32_DEEP, what="the policy's log-probs")
    assert_close(got["loss"], want_loss, F32_DEEP, scale=scale, what="loss")
    # The reference matters: against init_from both rewards are 0.
    assert min(abs(want_c), abs(want_r)) > 100 * F32_DEEP * scale, (want_c, want_r, scale)

    # precompute_ref caches the actual reference's log-probs, under a key naming it
    cached = _logged(loop.run(dpo(policies, steps=1, reference=reference, precompute_ref=True), tmp_path / "cached"))
    assert_close(cached[0]["reward_chosen"], got["reward_chosen"], F32_DEEP, scale=scale, what="cached reward")
    keys = {name: phases.reference_key(r, r.train_batches) for name, r in (
        ("default", loop.setup(dpo(policies), tmp_path / "p1")),
        ("named", loop.setup(dpo(policies, reference=str(policies / "policy")), tmp_path / "p2")),
        ("other", loop.setup(dpo(policies, reference=reference), tmp_path / "p3")))}
    assert keys["named"] == keys["default"] != keys["other"]


def test_a_resume_keeps_the_pinned_reference_and_refuses_another(policies, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(policies / "at2", ref)
    config = dpo(policies, steps=4, train=dict(checkpoint_every=2), reference=str(ref))
    first = loop.run(config, tmp_path / "dpo")
    loop.run(tiny_config(train=dict(steps=4, checkpoint_every=2)), ref)  # the reference moves on to step 4
    moved = loop.run(config, tmp_path / "moved")  # a new run reads the moved reference: step 4, init_from's
    assert_close(_logged(moved)[0]["loss"], math.log(2), F32_DEEP)
    assert abs(_logged(first)[0]["loss"] - math.log(2)) > 1e-3  # the pinned one was step 2

    again = loop.run(dataclasses.replace(config, train=dataclasses.replace(config.train, resume_step=2)),
                     tmp_path / "dpo")  # steps 3 and 4 again, after the reference moved
    chex.assert_trees_all_equal(_params(again), _params(first))
    assert _logged(again)[-1] == _logged(first)[-1]
    pin = json.loads((tmp_path / "dpo" / rundir.RUN_FILE).read_text())["pins"]["preference.reference"]
    assert pin["step"] == 2 and pin["path"] == str(ref / "checkpoints" / "2")

    other = dpo(policies, steps=4, train=dict(checkpoint_every=2), reference=str(policies / "policy"))
    with pytest.raises(ConfigError, match=r"preference\.reference: .* → .*allow-config-change"):
        loop.run(other, tmp_path / "dpo")
    loop.run(other, tmp_path / "dpo", allow_config_change=True)  # a forced change is pinned afresh
    record = json.loads((tmp_path / "dpo" / rundir.RUN_FILE).read_text())
    assert record["pins"]["preference.reference"]["path"] == str(policies / "policy" / "checkpoints" / "4")
    assert "preference.reference" in record["history"][-1]["forced"]


@pytest.mark.parametrize("sections, lora, message", [
    (dict(train=dict(phase="sft")), False, r"preference\.reference='r' is DPO's reference policy, but "
                                          r"train\.phase=sft; unset preference\.reference"),
    (dict(train=dict(phase="dpo")), True, r"preference\.reference='r' cannot be used with LoRA: a LoRA run's "
                                          r"reference is its frozen base"),
    (dict(train=dict(phase="dpo"), preference=dict(loss_type="simpo")), False,
     r"preference\.reference='r' is unused by preference\.loss_type=simpo"),
])
def test_a_reference_where_none_is_read_is_refused(sections, lora, message):
    config = tiny_config(**{**sections, "preference": {"reference": "r", **sections.get("preference", {})}})
    if lora:
        config = dataclasses.replace(config, lora=LoraConfig())
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_a_reference_of_another_shape_is_named(policies, tmp_path):
    small = tiny_config(train=dict(steps=1, checkpoint_every=1))
    small = dataclasses.replace(small, model=small.model.replace(n_layers=1))
    loop.run(small, tmp_path / "one_layer")
    with pytest.raises(ConfigError, match=r"the model does not have the shape of preference\.reference=.*one_layer.*: "
                                          r"model\.n_layers=2 \(saved: 1\); give a reference of train\.init_from's"):
        loop.setup(dpo(policies, reference=str(tmp_path / "one_layer")), tmp_path / "dpo")
