import pytest

from pjlm.config import ConfigError, MeshConfig, ModelConfig, check_batch_divides_mesh, check_divides_mesh, model_preset


def test_heads_not_divisible_by_kv_heads_names_both_fields():
    with pytest.raises(ConfigError, match=r"model\.n_heads=6 .*model\.n_kv_heads=4"):
        ModelConfig(n_heads=6, n_kv_heads=4, d_model=48).validate()


def test_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model\.d_model=65"):
        ModelConfig(d_model=65).validate()
    assert ModelConfig(d_model=65, head_dim=16).validate().resolved_head_dim == 16


def test_mesh_that_does_not_divide_devices():
    with pytest.raises(ConfigError, match=r"3×1×1 = 3 but there are 8 devices"):
        MeshConfig(data=3, fsdp=1, tensor=1).resolve(8)
    with pytest.raises(ConfigError, match=r"does not divide the 8 devices; set mesh\.fsdp"):
        MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ConfigError, match=r"only one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)


def test_dimension_that_does_not_divide_its_mesh_axis():
    cfg = model_preset("tiny", vocab_size=257)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=257 .*tensor axis \(2\)"):
        check_divides_mesh(cfg, {"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=2 .*tensor axis \(4\)"):
        check_divides_mesh(model_preset("tiny"), {"data": 1, "fsdp": 2, "tensor": 4})
    with pytest.raises(ConfigError, match=r"model\.d_model=64 .*fsdp axis \(3\)"):
        check_divides_mesh(model_preset("tiny"), {"data": 1, "fsdp": 3, "tensor": 1})


def test_batch_that_does_not_divide_data_and_fsdp():
    with pytest.raises(ConfigError, match=r"batch 12 is not divisible by the mesh's data×fsdp = 8; set batch_size"):
        check_batch_divides_mesh(12, {"data": 2, "fsdp": 4, "tensor": 1})


def test_presets():
    assert model_preset("tinyllama-1.1b").n_kv_heads == 4
    assert model_preset("small", vocab_size=100).vocab_size == 100
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        model_preset("huge")
    with pytest.raises(ConfigError, match=r"model\.remat"):
        model_preset("tiny", remat="some")


def test_gradient_accumulation_is_refused_where_it_is_not_implemented():
    from pjlm.config import Config, apply_overrides

    with pytest.raises(ConfigError, match=r"grad_accum > 1 does not apply to train.phase=ppo"):
        apply_overrides(Config(), ["train.phase=ppo", "optimizer.grad_accum=2"])
    assert apply_overrides(Config(), ["train.phase=dpo", "optimizer.grad_accum=2"]).optimizer.grad_accum == 2
    assert apply_overrides(Config(), ["optimizer.grad_accum=2"]).optimizer.grad_accum == 2


def test_a_tuple_override_takes_a_json_list_when_an_item_holds_a_comma():
    from pjlm.config import Config, apply_overrides

    config = apply_overrides(Config(), ['ppo.rewards=["regex:1.0:pattern=^(yes|no), because", "vader:0.5"]'])
    assert config.ppo.rewards == ("regex:1.0:pattern=^(yes|no), because", "vader:0.5")
    assert apply_overrides(Config(), ["ppo.rewards=vader:1.0,eos_penalty:1.0"]).ppo.rewards == (
        "vader:1.0", "eos_penalty:1.0")
    assert apply_overrides(Config(), ["data.buckets=[64, 128]"]).data.buckets == (64, 128)
    with pytest.raises(ConfigError, match="not one"):
        apply_overrides(Config(), ['ppo.rewards=["vader:1.0"'])


def test_none_is_a_choice_where_a_field_lists_it_and_null_elsewhere():
    from pjlm.config import Config, apply_overrides

    config = apply_overrides(Config(), ["model.remat=full"])
    assert apply_overrides(config, ["model.remat=none"]).model.remat == "none"
    assert apply_overrides(Config(), ["model.sliding_window=none"]).model.sliding_window is None
    with pytest.raises(ConfigError, match="cannot be None"):
        apply_overrides(Config(), ["model.d_model=none"])
