"""train.report_to: Weights & Biases beside metrics.jsonl and TensorBoard (pjlm/wandb_log.py).

One real wandb run in offline mode (files only, no network) whose history is read back from its
.wandb file; the rest against a fake `wandb` module that records calls and, like wandb, refuses a
`step=` lower than the last."""

from __future__ import annotations

import importlib.machinery
import json
import struct
import sys
import types
from pathlib import Path

import pytest

from pjlm.config import Config, ConfigError, TrainConfig, apply_overrides
from pjlm.metrics import MetricWriter, read_metrics, truncate_metrics
from pjlm_testing import require


def _config(**train) -> Config:
    return Config(train=TrainConfig(**train))


# --------------------------------------------------------------------------------------------------
# A real offline run.


def _offline_history(path: Path) -> tuple[list[dict], dict]:
    """The history rows and the config of a .wandb file (LevelDB-log framing: a 7-byte file header,
    32 KiB blocks of records, each a 7-byte header — crc, length, type — and a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, part, rows, config = 32768, 7, b"", [], {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                rows.append({k: json.loads(v) for k, v in items.items() if not k.startswith("_")})
            elif record.WhichOneof("record_type") == "config":  # the config, sent after init
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return rows, config


def test_offline_wandb_run_holds_the_logged_metrics_at_their_steps_and_resumes(tmp_path, monkeypatch):
    require("wandb")  # in the test extra: fails under CI (PJLM_REQUIRE_HF=1) when missing
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    workdir = tmp_path / "my-run"
    config = _config(report_to=("wandb",))
    with MetricWriter(workdir, total_steps=20, progress=False, config=config) as w:
        w.write(5, {"loss": 2.5, "lr": 1e-3})
        w.write(10, {"loss": 2.0, "lr": 2e-3})
        w.write(10, {"eval_loss": 2.25})
    run_id = (workdir / "wandb_id").read_text().strip()
    assert not (workdir / "tensorboard").exists()  # report_to names wandb only
    runs = tmp_path / "wandb_home" / "wandb"
    (first,) = runs.glob(f"offline-run-*/run-{run_id}.wandb")
    rows, logged_config = _offline_history(first)
    assert rows == [{"step": 5, "loss": 2.5, "lr": 1e-3}, {"step": 10, "loss": 2.0, "lr": 2e-3},
                    {"step": 10, "eval_loss": 2.25}]
    assert logged_config["train"]["report_to"] == ["wandb"]

    # A resume from step 5 logs step 10 again, then 15: the same run id, nothing refused.
    truncate_metrics(workdir, 5)
    with MetricWriter(workdir, total_steps=20, progress=False, config=config) as w:
        w.write(10, {"loss": 1.9})
        w.write(15, {"loss": 1.5})
    # Offline, each start writes its own directory (offline-run-<time>-<id>, then -<id>-1 within a second).
    (second,) = set(runs.glob(f"offline-run-*/run-{run_id}.wandb")) - {first}
    assert _offline_history(second)[0] == [{"step": 10, "loss": 1.9}, {"step": 15, "loss": 1.5}]
    assert [r["step"] for r in read_metrics(workdir)] == [5, 10, 15]


# --------------------------------------------------------------------------------------------------
# A fake wandb module.


class _FakeRun:
    def __init__(self, module, kwargs):
        self.module, self.init_kwargs = module, kwargs
        self.config: dict = {}
        self.config_updates: list[tuple[dict, bool]] = []
        self.metrics: list[tuple[str, str | None]] = []
        self.rows: list[dict] = []
        self.finished = False
        self._step = 0
        outer = self

        class _Config:
            def update(self, d, allow_val_change=None):
                outer.config_updates.append((d, allow_val_change))

        self.config = _Config()

    def define_metric(self, name, step_metric=None, **_):
        self.metrics.append((name, step_metric))

    def log(self, data, step=None, commit=None):
        if step is not None and step < self._step:
            raise AssertionError(f"wandb would drop step {step} < {self._step}")
        self._step = self._step + 1 if step is None else step
        self.rows.append(dict(data))

    def finish(self):
        self.finished = True
        self.module.run = None


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.run = None
    module.runs = []

    def init(**kwargs):
        module.run = _FakeRun(module, kwargs)
        module.runs.append(module.run)
        return module.run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    for name in ("WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    return module


def test_resume_continues_the_same_wandb_run_and_logs_repeated_steps(tmp_path, fake_wandb):
    workdir = tmp_path / "sft-7"
    config = _config(report_to=("tensorboard", "wandb"), steps=20)
    with MetricWriter(workdir, total_steps=20, progress=False, config=config) as w:
        for step in (5, 10, 15):
            w.write(step, {"loss": 1.0 / step})
    truncate_metrics(workdir, 10)  # the checkpoint was at 10; step 15 is logged again
    resumed = _config(report_to=("tensorboard", "wandb"), steps=30)  # an "allow" change
    with MetricWriter(workdir, total_steps=30, progress=False, config=resumed) as w:
        w.write(15, {"loss": 0.5})
        w.write(20, {"loss": 0.25})

    first, second = fake_wandb.runs
    assert first.finished and second.finished
    run_id = (workdir / "wandb_id").read_text().strip()
    for run in (first, second):
        assert run.init_kwargs == {"project": "pjlm", "name": "sft-7", "id": run_id, "resume": "allow",
                                   "dir": str(workdir)}
        assert run.metrics == [("step", None), ("*", "step")]  # the training step is every chart's x-axis
    assert first.config_updates[0][0]["train"]["steps"] == 20
    assert second.config_updates == [(second.config_updates[0][0], True)]
    assert second.config_updates[0][0]["train"]["steps"] == 30
    assert [r["step"] for r in first.rows + second.rows] == [5, 10, 15, 15, 20]
    assert second.rows[0] == {"loss": 0.5, "step": 15}
    assert [r["step"] for r in read_metrics(workdir)] == [5, 10, 15, 20]
    assert (workdir / "tensorboard").is_dir()


def test_project_is_the_config_field_then_the_environment_then_pjlm(tmp_path, fake_wandb, monkeypatch):
    MetricWriter(tmp_path / "a", total_steps=1, progress=False, config=_config(report_to=("wandb",))).close()
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    MetricWriter(tmp_path / "b", total_steps=1, progress=False, config=_config(report_to=("wandb",))).close()
    MetricWriter(tmp_path / "c", total_steps=1, progress=False,
                 config=_config(report_to=("wandb",), wandb_project="from-config")).close()
    assert [r.init_kwargs["project"] for r in fake_wandb.runs] == ["pjlm", "from-env", "from-config"]
    assert [r.init_kwargs["dir"] for r in fake_wandb.runs] == [str(tmp_path / "a"), None, None]  # $WANDB_DIR wins
    assert len({r.init_kwargs["id"] for r in fake_wandb.runs}) == 3


def test_an_active_wandb_run_is_logged_into_and_left_open(tmp_path, fake_wandb):
    outer = fake_wandb.init(project="sweep")
    with MetricWriter(tmp_path, total_steps=5, progress=False, config=_config(report_to=("wandb",))) as w:
        w.write(1, {"loss": 3.0})
    assert fake_wandb.runs == [outer] and not outer.finished and fake_wandb.run is outer
    assert outer.rows == [{"loss": 3.0, "step": 1}]


def test_only_the_main_process_and_only_when_named(tmp_path, fake_wandb):
    with MetricWriter(tmp_path / "worker", total_steps=5, is_main=False, config=_config(report_to=("wandb",))) as w:
        w.write(1, {"loss": 1.0})
    with MetricWriter(tmp_path / "tb", total_steps=5, progress=False, config=_config()) as w:
        w.write(1, {"loss": 1.0})
    with MetricWriter(tmp_path / "none", total_steps=5, progress=False, config=_config(report_to=("none",))) as w:
        w.write(1, {"loss": 1.0})
    assert fake_wandb.runs == []
    assert not (tmp_path / "worker").exists()
    assert (tmp_path / "tb" / "tensorboard").is_dir() and not (tmp_path / "tb" / "wandb_id").exists()
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["metrics.jsonl"]


# --------------------------------------------------------------------------------------------------
# The config field.


def test_wandb_not_installed_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises, find_spec finds nothing
    with pytest.raises(ConfigError, match=r"pip install 'pjlm\[wandb\]'"):
        _config(report_to=("tensorboard", "wandb")).validate()
    with pytest.raises(ConfigError, match=r"pip install 'pjlm\[wandb\]'"):
        apply_overrides(Config(), ["train.report_to=wandb"])
    with pytest.raises(ConfigError, match=r"pip install 'pjlm\[wandb\]'"):
        MetricWriter(tmp_path, total_steps=1, progress=False, config=_config(report_to=("wandb",)))
    _config().validate()  # the default needs no wandb


def test_report_to_overrides_as_a_list_or_none():
    assert Config().train.report_to == ("tensorboard",)
    assert apply_overrides(Config(), ["train.report_to=none"]).train.report_to == ("none",)
    assert apply_overrides(Config(), ['train.report_to=["tensorboard"]']).train.report_to == ("tensorboard",)
    with pytest.raises(ConfigError, match="choose one of 'tensorboard', 'wandb', 'none'"):
        apply_overrides(Config(), ["train.report_to=tensorboardX"])
    with pytest.raises(ConfigError, match="'none' alone"):
        apply_overrides(Config(), ["train.report_to=none,tensorboard"])
    with pytest.raises(ConfigError, match="train.report_to='wandb' is out of range"):
        _config(report_to="wandb").validate()  # a bare string, not a list
