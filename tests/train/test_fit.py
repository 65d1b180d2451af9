"""A step checked to fit before it starts (`pjlm.fit`): a limit set low stops the run before anything
is allocated, with one line naming the figure, the limit and settings that do fit (each of which
is checked here again by compiling it); `train.fit=adjust` turns the memory savers on instead; an
out-of-memory while running gives the same line; `--fit` prints the settings. And the recipes on a
model of SmolLM2-135M's exact shape fit a 24 GB CPU host at their defaults (compile only)."""

import dataclasses
import json
import re

import jax
import pytest

from pjlm import cli, fit, recipes, sharding
from pjlm import checkpoint as ckpt_lib
from pjlm.config import LoraConfig, MeshConfig, ModelConfig, apply_overrides
from pjlm.train import loop, phases
from pjlm_testing import clear_preferences, tiny_config

GIB = 2 ** 30


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return clear_preferences(tmp_path_factory.mktemp("fit") / "prefs.jsonl", n=64)


def _dpo(pretrained, prefs, **train):
    return tiny_config(train=dict(phase="dpo", steps=2, checkpoint_every=2, init_from=str(pretrained), **train),
                       data=dict(source=prefs, pack=False, eval_rows=0, buckets=(32,)))


def _one_device_mesh(config):
    return sharding.make_mesh(config.mesh, jax.devices()[:1])


def test_a_step_over_the_limit_stops_before_anything_is_written_naming_settings_that_fit(pretrained, prefs,
                                                                                       tmp_path, capsys):
    config = _dpo(pretrained, prefs)
    config = dataclasses.replace(config, model=config.model.replace(vocab_size=320),
                                 data=dataclasses.replace(config.data, batch_size=32))
    mesh = sharding.make_mesh(config.mesh)
    need = fit.plan(fit.at_length(config, 32), mesh).bytes
    limit_gib = 0.8 * need / GIB
    workdir = tmp_path / "dpo"
    code = cli.main(["dpo", "--model", str(pretrained), "--dataset", prefs, "--workdir", str(workdir),
                     "--steps", "2", "--set", "data.batch_size=32", "--set", "data.seq_len=32",
                     "--set", "train.fit=check", "--set", f"train.memory_limit_gib={limit_gib}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("pjlm: config error: the dpo step needs") and "(train.memory_limit_gib)" in err, err
    assert not ckpt_lib.checkpoint_steps(workdir / "checkpoints")
    # Every setting it names fits when given back as --set, by the compiled figure.
    named = re.findall(r"((?:--set \S+ ?)+)\(", err.split("Settings that fit:")[1])
    assert any("model.remat=full" in s for s in named) and any("data.batch_size=" in s for s in named), err
    base = apply_overrides(recipes.build("dpo", model=str(pretrained), dataset=prefs, steps=2,
                                         overrides=["data.batch_size=32", "data.seq_len=32"]), [])
    base = dataclasses.replace(base, model=base.model.replace(vocab_size=320))
    for sets in named:
        got = fit.plan(fit.at_length(apply_overrides(base, sets.replace("--set", "").split()), 32), mesh).bytes
        assert got <= limit_gib * GIB, (sets, got / GIB, limit_gib)


def test_adjust_turns_on_the_savers_it_needs_and_the_run_goes_on(pretrained, prefs, tmp_path, capsys):
    config = _dpo(pretrained, prefs, fit="adjust")
    sized = dataclasses.replace(config, model=config.model.replace(vocab_size=320))
    mesh = sharding.make_mesh(config.mesh)
    plain = fit.plan(fit.at_length(sized, 32), mesh).bytes
    remat = fit.plan(fit.at_length(dataclasses.replace(sized, model=sized.model.replace(remat="full")), 32), mesh).bytes
    assert remat < plain
    limit = dataclasses.replace(config.train, memory_limit_gib=(remat + plain) / 2 / GIB)
    result = loop.run(dataclasses.replace(config, train=limit), tmp_path / "dpo")
    assert "train.fit=adjust turned on model.remat=full" in capsys.readouterr().err
    saved = ckpt_lib.read_meta(*ckpt_lib.resolve_checkpoint(tmp_path / "dpo"))["config"]
    assert saved["model"]["remat"] == "full" and int(result.state.step) == 2


def test_out_of_memory_while_running_is_the_same_one_line(pretrained, prefs, tmp_path, monkeypatch):
    build = phases.build

    def exhausted(*args, **kwargs):
        phase = build(*args, **kwargs)
        return dataclasses.replace(phase, step=lambda state, batch: (_ for _ in ()).throw(
            jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 35972763976 bytes.")))

    monkeypatch.setattr(phases, "build", exhausted)
    with pytest.raises(fit.FitError, match=r"out of memory while running: the dpo step needs .* Settings that fit: "
                                           r"--set model.remat=full"):
        loop.run(_dpo(pretrained, prefs), tmp_path / "dpo")


def test_fit_flags_print_the_settings(pretrained, prefs, tmp_path, capsys):
    code = cli.main(["dpo", "--model", str(pretrained), "--dataset", prefs, "--workdir", str(tmp_path / "w"),
                     "--fit", "--set", "data.batch_size=8", "--set", "data.seq_len=32",
                     "--set", "train.memory_limit_gib=0.0001"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and record["fits"] is False and record["limit_gib"] == pytest.approx(0.0001)
    assert record["rows"] == "8 pairs × 32 tokens" and not (tmp_path / "w" / "checkpoints").exists()
    assert all(s["gib"] <= 0.0001 for s in record["settings_that_fit"])
    roomy = fit.report(tiny_config(), sharding.make_mesh(MeshConfig()), 32)
    assert roomy["fits"] and roomy["settings_that_fit"] == [] and 0 < roomy["required_gib"] < roomy["limit_gib"]


def test_recipes_pad_to_buckets_of_the_final_seq_len(pretrained, prefs):
    assert recipes.length_buckets(1024) == (64, 96, 128, 192, 256, 384, 512, 768, 1024)
    assert recipes.length_buckets(300) == (64, 96, 128, 192, 256, 300)
    config = recipes.build("dpo", model=str(pretrained), dataset=prefs, overrides=["data.seq_len=60"])
    assert config.data.buckets == (60,) and config.train.fit == "adjust" and config.model.remat == "none"
    kept = recipes.build("dpo", model=str(pretrained), dataset=prefs, overrides=["data.buckets=[16, 48]"])
    assert kept.data.buckets == (16, 48)
    assert recipes.build("sft", model=str(pretrained), dataset=prefs).data.buckets == ()  # packed rows


SMOLLM2_135M = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_dim=1536,
                           max_len=8192, rope_theta=100000.0, tie_embeddings=True)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["sft", "reward", "dpo", "ppo"])
def test_the_recipes_fit_a_24_gb_host_on_a_real_shape(phase):
    """At recipe defaults (batch 16, seq_len 1024, PPO 512) with LoRA, on SmolLM2-135M's shape, the
    adjusted step compiles under the 20 GiB a 24 GB host has available (compile only: nothing runs)."""
    config = recipes.with_buckets(recipes.recipe_config(phase, SMOLLM2_135M, "/imported/smollm2", lora_rank=8))
    if phase == "ppo":
        config = apply_overrides(config, ['ppo.rewards=["length:1.0"]'])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, memory_limit_gib=20.0))
    adjusted, planned = fit.fitted(config, _one_device_mesh(config), max(config.data.buckets or (config.data.seq_len,)))
    assert adjusted.lora == LoraConfig(rank=8, alpha=16.0) and adjusted.data.batch_size == 16
    if planned.how != "compiled":  # PPO's loop compiles its own steps, so a clear fit is only estimated there
        planned = fit.plan(fit.at_length(adjusted, adjusted.data.seq_len), _one_device_mesh(adjusted))
    assert planned.how == "compiled" and planned.bytes <= 20 * GIB, (phase, planned.bytes / GIB)
    print(f"{phase}: {planned.bytes / GIB:.1f} GiB ({planned.how}) with remat={adjusted.model.remat}, "
          f"logprob_chunk={adjusted.train.logprob_chunk}")
