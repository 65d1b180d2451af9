import pytest

from pjlm_testing import tiny_config


@pytest.fixture
def make_config():
    return tiny_config
