import pytest

from pjlm_testing import tiny_config


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny pre-trained run: the starting point of SFT, reward, DPO and LoRA tests."""
    from pjlm.train import loop

    workdir = tmp_path_factory.mktemp("pretrained")
    loop.run(tiny_config(train=dict(steps=30, checkpoint_every=30), data=dict(synthetic_docs=800)), workdir)
    return workdir
