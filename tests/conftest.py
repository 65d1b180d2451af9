"""Test setup: 8 fake CPU devices (before JAX initialises) and a private, offline datasets cache.
Helpers (`require`, `tiny_config`) live in pjlm_testing.py."""

import os
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="pjlm-hf-home-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PJLM_HOME", tempfile.mkdtemp(prefix="pjlm-home-"))  # the import cache of `pjlm sft|dpo|…`
# One persistent compilation cache for the session (and the runs it starts in subprocesses): the tests
# compile the same tiny programs many times over, and XLA's CPU compile is most of a tiny run's time.
# Keyed by the program, the compile options and the backend, so a hit is the executable a compile
# would give; every compile is cached (no minimum time or size).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="pjlm-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices; XLA_FLAGS was set too late"
