"""Test setup: 8 fake CPU devices (before JAX initialises), a private datasets cache, and the rule
that a test needing torch/transformers/peft fails instead of skipping when PJLM_REQUIRE_HF=1."""

import os
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="pjlm-hf-home-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


def require(*modules: str):
    """Import and return the named modules; skip without them, or fail under PJLM_REQUIRE_HF=1."""
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            msg = f"{name} is not installed ({e}); install the test extra: pip install -e '.[hf,test]'"
            if os.environ.get("PJLM_REQUIRE_HF") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
    return loaded[0] if len(loaded) == 1 else loaded


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices; XLA_FLAGS was set too late"
