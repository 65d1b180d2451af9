"""Storage URLs: a run's work directory, `train.init_from`, `data.source` and `data.tokenizer` may be local
paths, file:// URLs or remote URLs (gs://, …). The remote scheme here is `fakegcs://`, a local stand-in
registered with etils.epath: its objects live under a local root, it refuses appends as an object store
does, and Orbax reaches the same objects through `pjlm.fileio.register_orbax_location`."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import chex
import jax
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from pjlm import checkpoint as ckpt_lib
from pjlm import fileio
from pjlm import metrics as metrics_lib
from pjlm.data.loader import Batcher
from pjlm.errors import ConfigError
from pjlm.train import loop
from pjlm_testing import require, tiny_config

PREFIX = "fakegcs://"
TRAIN = dict(steps=8, log_every=2, checkpoint_every=4)  # one shape and schedule: every run compiles the same steps


class _Bucket:
    """An epath backend for fakegcs://: the local os backend on `root`, without appends."""

    root: Path = Path("/nonexistent")
    _os = epath_backend.os_backend

    def local(self, url) -> str:
        text = os.fspath(url)
        assert text.startswith(PREFIX), text
        return str(self.root / text[len(PREFIX):])

    def url(self, local) -> str:
        rel = os.path.relpath(local, self.root)
        return PREFIX + ("" if rel == "." else rel)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise OSError(f"{path}: objects cannot be appended to")
        return self._os.open(self.local(path), mode)

    def glob(self, path):
        return [self.url(p) for p in self._os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self._os.walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(root), dirs, files

    def __getattr__(self, name):  # exists, isdir, listdir, makedirs, mkdir, rmtree, remove, stat, rename, copy, …
        method = getattr(self._os, name)
        return lambda *args, **kw: method(*[self.local(a) if isinstance(a, str) and a.startswith(PREFIX) else a
                                            for a in args], **kw)


BUCKET = _Bucket()


def _internal(parts) -> tuple:
    full = "/".join(os.fspath(p) for p in parts)
    return ("/fakegcs/" + full[len(PREFIX):],) if full.startswith(PREFIX) else parts


@epath.register_path_cls(PREFIX)
class FakeGcsPath(gpath.PosixGPath):
    """fakegcs://bucket/x, kept as /fakegcs/bucket/x inside (as epath keeps gs://)."""

    if sys.version_info < (3, 12):
        def __new__(cls, *parts):
            return super().__new__(cls, *_internal(parts))
    else:
        def __init__(self, *parts):
            super().__init__(*_internal(parts))

    @property
    def _uri_scheme(self):
        return "fakegcs" if self.parts[:2] == ("/", "fakegcs") else None

    @property
    def _backend(self):
        return BUCKET if self._uri_scheme else epath_backend.os_backend


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake store's root (tmp_path/store); the current directory is an empty tmp_path/cwd."""
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setattr(_Bucket, "root", root)
    monkeypatch.setattr(fileio, "_ORBAX_LOCATIONS", {"fakegcs": lambda url: root / url[len(PREFIX):]})
    monkeypatch.setenv("PJLM_HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return root


def _preempted_then_resumed(config, workdir, monkeypatch, at_step: int, during=lambda: None):
    original = Batcher.batch

    def preempt(self, step):
        if step == at_step:
            during()
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(Batcher, "batch", preempt)
    with pytest.raises(loop.Preempted):
        loop.run(config, workdir)
    monkeypatch.setattr(Batcher, "batch", original)
    return loop.run(config, workdir)


def test_a_run_trains_and_resumes_alike_on_a_local_path_a_file_url_and_remote_storage(bucket, tmp_path,
                                                                                   monkeypatch):
    config = tiny_config(train=TRAIN)
    straight = loop.run(config, tmp_path / "local")
    params = jax.device_get(straight.state.params)

    by_url = _preempted_then_resumed(config, f"file://{tmp_path}/by_url", monkeypatch, 5)
    chex.assert_trees_all_equal(jax.device_get(by_url.state.params), params)

    run = bucket / "bucket" / "run"
    seen = {}
    remote = _preempted_then_resumed(config, "fakegcs://bucket/run", monkeypatch, 5,
                                     during=lambda: seen.update(lease=json.loads((run / "lease.json").read_text())))
    chex.assert_trees_all_equal(jax.device_get(remote.state.params), params)
    assert seen["lease"]["pid"] == os.getpid()
    assert str(remote.workdir) == "fakegcs://bucket/run"

    # Everything pjlm writes is in the store, as in a local run; nothing went anywhere else.
    local_files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(p.name for p in run.iterdir()) == local_files
    for name, key in (("config.json", "config"), ("run.json", "definition"), ("data_stats.json", "rows")):
        assert json.loads((run / name).read_text())[key] == json.loads((tmp_path / "local" / name).read_text())[key]
    assert (run / "tokenizer.model").read_bytes() == (tmp_path / "local" / "tokenizer.model").read_bytes()
    assert ckpt_lib.checkpoint_steps("fakegcs://bucket/run/checkpoints") == [4, 6, 8]
    assert ckpt_lib.resolve_checkpoint("fakegcs://bucket/run")[1] == 8
    rows = metrics_lib.read_metrics("fakegcs://bucket/run")
    assert [m["step"] for m in rows if "loss" in m] == [2, 4, 6, 8], "every logged step, once"
    assert [m["loss"] for m in rows if "loss" in m] == \
        [m["loss"] for m in metrics_lib.read_metrics(tmp_path / "local") if "loss" in m]
    assert len(list((run / "tensorboard").iterdir())) == 2, "one event file per start"
    assert not (run / "lease.json").exists(), "released at the end"
    assert os.listdir(".") == [] and not (tmp_path / "home").exists()


def test_init_from_data_and_tokenizer_from_remote_storage(bucket, tmp_path):
    base = loop.run(tiny_config(train=TRAIN), "fakegcs://bucket/base")
    data = bucket / "bucket" / "data"
    data.mkdir()
    (data / "more.jsonl").write_text("".join(json.dumps({"text": f"The soup was lovely number {i}."}) + "\n"
                                             for i in range(64)))
    # A fine-tune of the remote run, on remote data, with the remote run's tokenizer, in a file:// directory.
    tune = tiny_config(data=dict(source="fakegcs://bucket/data/more.jsonl", tokenizer="fakegcs://bucket/base",
                                 eval_rows=0),
                       train=dict(TRAIN, init_from="fakegcs://bucket/base"))
    r = loop.setup(tune, f"file://{tmp_path}/fresh")  # the state a run starts from: init_from's parameters
    start, _ = loop.create_or_restore(r, ckpt_lib.Checkpointer(tmp_path / "fresh" / "checkpoints"))
    chex.assert_trees_all_equal(jax.device_get(start.params), jax.device_get(base.state.params))
    assert r.train_batches.ds is not None and len(r.train_batches.ds) > 0

    assert int(loop.run(tune, f"file://{tmp_path}/tune").state.step) == 8
    record = json.loads((tmp_path / "tune" / "run.json").read_text())
    assert record["pins"]["train.init_from"]["path"] == "fakegcs://bucket/base/checkpoints/8"
    assert record["definition"]["data.tokenizer"] == "fakegcs://bucket/base"
    assert (tmp_path / "tune" / "tokenizer.model").read_bytes() == \
        (bucket / "bucket" / "base" / "tokenizer.model").read_bytes()

    from pjlm.sample import load_for_sampling

    _, params, tokenizer = load_for_sampling("fakegcs://bucket/base")  # pjlm.evaluate.load_policy, and the tokenizer
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(base.state.params))
    assert tokenizer.fingerprint() == base_tokenizer_fingerprint(bucket)
    assert os.listdir(".") == []


def base_tokenizer_fingerprint(bucket) -> str:
    from pjlm.data.tokenizer import load_tokenizer

    return load_tokenizer(bucket / "bucket" / "base" / "tokenizer.model").fingerprint()


def test_storage_orbax_cannot_write_is_refused_before_anything_is_written(bucket, monkeypatch):
    monkeypatch.setattr(fileio, "_ORBAX_LOCATIONS", {})
    with pytest.raises(ConfigError, match=r"workdir='fakegcs://bucket/x': Orbax writes checkpoints to local paths "
                                          r"and gs:// only"):
        loop.run(tiny_config(), "fakegcs://bucket/x")
    with pytest.raises(ConfigError, match=r"workdir='nosuch://bucket/x': pjlm does not know nosuch:// storage"):
        loop.run(tiny_config(), "nosuch://bucket/x")
    assert os.listdir(".") == [] and os.listdir(bucket) == []


def test_the_staging_directory_pulls_appended_files_and_pushes_what_changed(bucket):
    remote = fileio.location("fakegcs://bucket/w")
    remote.mkdir(parents=True)
    (remote / "log.jsonl").write_text("1\n")
    staging = fileio.Staging(remote, pull=("log.jsonl", "absent.jsonl"), exclude=("private",))
    assert sorted(os.listdir(staging.local)) == ["log.jsonl"]
    with open(staging.local / "log.jsonl", "a") as f:
        f.write("2\n")
    (staging.local / "sub").mkdir()
    (staging.local / "sub" / "events").write_bytes(b"e")
    (staging.local / "private").mkdir()
    (staging.local / "private" / "state").write_bytes(b"p")
    staging.push()
    assert (bucket / "bucket" / "w" / "log.jsonl").read_text() == "1\n2\n"
    assert (bucket / "bucket" / "w" / "sub" / "events").read_bytes() == b"e"
    assert not (bucket / "bucket" / "w" / "private").exists()
    local = staging.local
    staging.close()
    assert not local.exists()
    fileio.append_text(remote / "log.jsonl", "3\n")
    assert (remote / "log.jsonl").read_text() == "1\n2\n3\n"
    fileio.write_atomic("fakegcs://bucket/w/new/x.json", "{}")
    assert (bucket / "bucket" / "w" / "new" / "x.json").read_text() == "{}"


@pytest.mark.skipif(os.environ.get("PJLM_TEST_GCS_EMULATOR") != "1", reason=(
    "opt-in (PJLM_TEST_GCS_EMULATOR=1): the emulator, not pjlm, is the weak part — in one full-suite run of "
    "four its OCDBT manifest write answered TensorStore with a 'Malformed StorageGeneration'; alone it passes. "
    "The fake remote scheme above covers pjlm's side in every run"))
def test_a_run_on_gs_through_a_local_gcs_emulator(tmp_path, monkeypatch):
    """The real gs:// path: epath through gcsfs, Orbax through TensorStore's gcs driver (commit
    markers, no renames), both against an in-process emulator on localhost."""
    require("gcsfs", "gcp_storage_emulator")  # in the test extra: fails under CI (PJLM_REQUIRE_HF=1) when missing
    from gcp_storage_emulator import server as server_lib
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    for name, value in (("STORAGE_EMULATOR_HOST", f"http://localhost:{port}"),  # gcsfs, google-cloud-storage
                        ("TENSORSTORE_GCS_HTTP_URL", f"http://localhost:{port}"),
                        ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test"), ("NO_GCE_CHECK", "True"),
                        ("GOOGLE_CLOUD_PROJECT", "test"), ("PJLM_HOME", str(tmp_path / "home"))):
        monkeypatch.setenv(name, value)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    server = server_lib.create_server("localhost", port, in_memory=True, default_bucket="bucket")
    server.start()
    try:
        config = tiny_config(train=TRAIN)
        remote = loop.run(config, "gs://bucket/run")
        local = loop.run(config, tmp_path / "local")
        chex.assert_trees_all_equal(jax.device_get(remote.state.params), jax.device_get(local.state.params))
        run = fileio.location("gs://bucket/run")
        assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
        assert ckpt_lib.checkpoint_steps("gs://bucket/run/checkpoints") == [4, 8]
        assert (run / "checkpoints" / "8" / "commit_success.txt").exists()
        assert [m["step"] for m in metrics_lib.read_metrics(run)] == [2, 4, 6, 8]
        assert int(loop.run(config, "gs://bucket/run").state.step) == 8  # a finished run restores and returns

        from pjlm.sample import load_for_sampling

        _, params, _ = load_for_sampling("gs://bucket/run")
        chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(local.state.params))
        assert os.listdir(".") == []
    finally:
        server.stop()


def test_jsonl_rows_round_trip_locally_and_on_remote_storage(bucket, tmp_path):
    rows = [{"prompt": "The soup", "response": " was très bon ✓"}, {"n": 1}]
    for where in (tmp_path / "rows.jsonl", PREFIX + "dir/rows.jsonl"):
        fileio.write_jsonl(where, rows)
        assert fileio.read_jsonl(where) == rows, where
    assert (bucket / "dir" / "rows.jsonl").exists()
