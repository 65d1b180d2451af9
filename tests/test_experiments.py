"""Every experiment config loads, validates and has the documentation STYLE.md asks for."""

from pathlib import Path

import pytest

from pjlm.cli import load_config

EXPERIMENTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.py")
                     if "get_config" in p.read_text())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_loads_and_documents_its_command(path):
    config = load_config(str(path))
    assert config.validate() is config
    doc = path.read_text().split('"""')[1]
    assert "pjlm train experiments/" in doc and "Hardware" in doc and "Expected result" in doc
