"""Paths a user gives: local paths and file:// URLs name the same place; a URL of a scheme neither local
nor known to etils.epath is refused, before anything is written (remote storage: tests/test_storage.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pjlm_testing import tiny_config
from pjlm import checkpoint as ckpt_lib
from pjlm.errors import ConfigError
from pjlm.fileio import local_path, location, url_scheme
from pjlm.train import loop


def test_local_path_maps_file_urls_and_location_refuses_unknown_schemes(tmp_path):
    assert local_path("runs/a") == Path("runs/a") and url_scheme("runs/a") is None
    assert local_path(tmp_path) == tmp_path
    assert local_path(f"file://{tmp_path}/run") == tmp_path / "run"
    assert local_path(f"file://localhost{tmp_path}/run") == tmp_path / "run"
    assert local_path("file:///data/my%20run") == Path("/data/my run")
    assert url_scheme("GS://bucket/x") == "gs"
    with pytest.raises(ConfigError, match=r"file://.*not on host 'otherhost'"):
        local_path("file://otherhost/data", "workdir")
    with pytest.raises(ConfigError, match=r"data.prepared='gs://bucket/d': gs:// is not supported here; "
                                          r"data.prepared must be on this machine"):
        local_path("gs://bucket/d", "data.prepared")
    assert location(f"file://{tmp_path}/run") == tmp_path / "run" and location("runs/a") == Path("runs/a").absolute()
    if importlib.util.find_spec("gcsfs") is None:  # epath reaches gs:// through gcsfs
        with pytest.raises(ConfigError, match=r"workdir='gs://bucket/run': gs:// storage needs the gcsfs package"):
            location("gs://bucket/run", "workdir")
    else:
        assert str(location("gs://bucket/run")) == "gs://bucket/run"
    with pytest.raises(ConfigError, match=r"workdir='nosuch://bucket/run': pjlm does not know nosuch:// storage"):
        location("nosuch://bucket/run", "workdir")


def test_a_file_url_workdir_and_init_from_are_the_local_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a URL taken for a relative path would have gone
    base = tiny_config(train=dict(steps=2, checkpoint_every=2, log_every=1))
    loop.run(base, f"file://{tmp_path}/base")
    assert ckpt_lib.checkpoint_steps(tmp_path / "base" / "checkpoints") == [2]
    assert ckpt_lib.resolve_checkpoint(f"file://{tmp_path}/base") == (tmp_path / "base" / "checkpoints", 2)

    sft = tiny_config(train=dict(phase="sft", steps=1, checkpoint_every=1, init_from=f"file://{tmp_path}/base"))
    loop.run(sft, tmp_path / "sft")
    pin = json.loads((tmp_path / "sft" / "run.json").read_text())["pins"]["train.init_from"]
    assert pin["path"] == str(tmp_path / "base" / "checkpoints" / "2")
    # The same run named by its plain path: the same definition, so it resumes (here: is finished).
    loop.run(tiny_config(train=dict(phase="sft", steps=1, checkpoint_every=1, init_from=str(tmp_path / "base"))),
             f"file://{tmp_path}/sft")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("file:")]

    with pytest.raises(ConfigError, match="pjlm does not know nosuch:// storage"):
        loop.run(base, "nosuch://bucket/run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "sft"]
