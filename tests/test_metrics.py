import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from pjlm.config import model_preset
from pjlm.metrics import (
    PEAK_BF16_FLOPS,
    MetricWriter,
    Throughput,
    flops_per_token,
    matmul_params,
    peak_flops,
    read_metrics,
)


def test_flops_per_token_matches_a_hand_count():
    # tiny: D=64, N=4, K=2, H=16, F=128, 2 layers, V=256.
    c = model_preset("tiny")
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128   # q, k+v, o, gate+up+down = 36864
    matmul = 2 * per_layer + 64 * 256                             # + output head = 90112
    assert matmul_params(c) == matmul == 90112
    T = 128
    # Attention per layer per token: QKᵀ and AV, 2·N·H FLOPs per key each, forward+backward ×3,
    # over a mean causal context of (T+1)/2 keys.
    attention = 2 * 3 * (2 * 2 * 4 * 16) * (T + 1) / 2
    assert flops_per_token(c, T) == pytest.approx(6 * 90112 + attention)
    assert flops_per_token(c, T) == pytest.approx(540672 + 99072)


def test_sliding_window_caps_the_attention_term():
    c = model_preset("tiny", sliding_window=4)
    full = model_preset("tiny")
    T = 10
    # Keys attended at t = 1..10 with window 4: 1, 2, 3, 4, 4, 4, 4, 4, 4, 4 → mean 3.4.
    attention_window = 12 * 2 * 4 * 16 * 3.4
    assert flops_per_token(c, T) == pytest.approx(6 * matmul_params(c) + attention_window)
    assert flops_per_token(c, T) < flops_per_token(full, T)


def test_tinyllama_is_about_six_n():
    c = model_preset("tinyllama-1.1b")
    n = matmul_params(c)
    assert 0.95e9 < n < 1.1e9
    # At 2048 tokens the causal attention term adds about 9% to 6N.
    assert 1.08 * 6 * n < flops_per_token(c, 2048) < 1.10 * 6 * n


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("TPU v2", 45e12),
    ("TPU v3", 123e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", None),
    ("Some Future Accelerator 9000", None),
])
def test_peak_flops_lookup(kind, expected):
    assert peak_flops(kind) == expected


def test_peak_flops_of_a_cpu_device_is_none():
    assert peak_flops(jax.devices()[0]) is None


def test_peak_table_checks_the_more_specific_key_first():
    # A key that contains another key must come before it, or it could never match.
    keys = list(PEAK_BF16_FLOPS)
    for i, key in enumerate(keys):
        for earlier in keys[:i]:
            assert earlier not in key, f"{key!r} is shadowed by the earlier key {earlier!r}"


def test_throughput_arithmetic():
    fpt, peak = 6e9, 100e12
    t = Throughput(flops_per_token=fpt, n_devices=2, peak_flops_per_device=peak)
    assert t.update(step=10, tokens=0, now=100.0) == {}  # starts the clock
    out = t.update(step=15, tokens=1000, now=100.5)
    assert out["tokens_per_s"] == pytest.approx(2000.0)
    assert out["tokens_per_s_per_device"] == pytest.approx(1000.0)
    assert out["step_time_s"] == pytest.approx(0.5 / 5)
    assert out["mfu"] == pytest.approx(2000 * fpt / (2 * peak))
    # The next interval is measured from the previous call, not from the start.
    out = t.update(step=16, tokens=500, now=101.5)
    assert out["tokens_per_s"] == pytest.approx(500.0)
    assert out["step_time_s"] == pytest.approx(1.0)


def test_throughput_omits_mfu_without_a_peak():
    t = Throughput(flops_per_token=6e9, n_devices=1, peak_flops_per_device=None)
    t.update(step=0, tokens=0, now=0.0)
    out = t.update(step=1, tokens=100, now=2.0)
    assert "mfu" not in out
    assert out["tokens_per_s"] == pytest.approx(50.0)


def _read_event_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse TensorBoard event files (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metric_writer_jsonl_tensorboard_and_resume(tmp_path):
    with MetricWriter(tmp_path, total_steps=100, progress=False) as w:
        w.write(1, {"loss": np.float32(2.5), "lr": jax.numpy.asarray(1e-3)})
        w.write(2, {"loss": 2.25, "tokens_per_s": 1234.5, "tokens": np.int64(4096)})
        # Flushed each call: readable before close.
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)}
    assert type(first["loss"]) is float
    # Reopening the same workdir (a resumed run) appends.
    with MetricWriter(tmp_path, total_steps=100, progress=False) as w:
        w.write(3, {"loss": 2.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == [2.5, 2.25, 2.0]
    assert records[1]["tokens_per_s"] == 1234.5
    assert records[1]["tokens"] == 4096 and type(records[1]["tokens"]) is int

    scalars = _read_event_scalars(tmp_path / "tensorboard")
    assert sorted(scalars["loss"]) == [(1, 2.5), (2, 2.25), (3, 2.0)]
    assert scalars["lr"][0][0] == 1 and scalars["lr"][0][1] == pytest.approx(1e-3)


def test_metric_writer_text(tmp_path):
    with MetricWriter(tmp_path, total_steps=10, progress=False) as w:
        w.write_text(5, "sample", "once upon a time")
    rec = json.loads((tmp_path / "text.jsonl").read_text())
    assert rec == {"step": 5, "tag": "sample", "text": "once upon a time"}
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(p.stat().st_size > 0 for p in events)


def test_metric_writer_without_tensorboard(tmp_path):
    with MetricWriter(tmp_path, total_steps=10, tensorboard=False, progress=False) as w:
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_non_main_writer_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, total_steps=10, is_main=False) as w:
        w.write(1, {"loss": 1.0})
        w.write_text(1, "sample", "text")
    assert not workdir.exists()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == ""


def test_progress_bar_shows_step_loss_and_throughput(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=10, tensorboard=False) as w:
        w.write(3, {"loss": 1.5, "tokens_per_s": 2000.0})
        w.write(7, {"loss": 1.25, "tokens_per_s": 2100.0})
    err = capsys.readouterr().err
    assert "7/10" in err
    assert "loss=1.2500" in err
    assert "tok/s=2100" in err


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
