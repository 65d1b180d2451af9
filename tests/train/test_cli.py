from pathlib import Path

import pytest

from pjlm import cli
from pjlm.config import ConfigError, apply_overrides



def test_overrides_apply_and_bad_ones_name_the_valid_keys(make_config):
    config = apply_overrides(make_config(), ["optimizer.learning_rate=1e-2", "data.buckets=16,32",
                                             "train.init_from=none", "model.sliding_window=8"])
    assert (config.optimizer.learning_rate, config.data.buckets, config.model.sliding_window) == (1e-2, (16, 32), 8)
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lr'; valid keys: b1, b2, decay"):
        apply_overrides(config, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"train.steps='ten' is not a valid int"):
        apply_overrides(config, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"train.phase='rl'; choose one of 'pretrain', 'sft'"):
        apply_overrides(config, ["train.phase=rl"])
    with pytest.raises(ConfigError, match=r"must look like section.field=value"):
        apply_overrides(config, ["steps"])
    with pytest.raises(ConfigError, match=r"'optimizer' is a section"):
        apply_overrides(config, ["optimizer=adam"])


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text("from pjlm.config import Config\ndef get_config():\n    return Config()\n")
    assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "w"), "--set", "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)]) == 2


def test_train_then_sample_from_the_command_line(tmp_path, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text("import sys\nsys.path.insert(0, %r)\nfrom pjlm_testing import tiny_config\n"
                   "def get_config():\n    return tiny_config()\n" % str(Path(__file__).parents[1]))
    assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "run"), "--set", "train.steps=6"]) == 0
    assert "finished at step 6" in capsys.readouterr().out
    assert cli.main(["sample", "--workdir", str(tmp_path / "run"), "--prompt", "The pasta", "--temperature", "0",
                     "--max-new-tokens", "12", "--samples", "2"]) == 0
    out = capsys.readouterr().out.split("---\n")
    assert out[0].startswith("The pasta") and out[0] == out[1], "greedy samples agree"
