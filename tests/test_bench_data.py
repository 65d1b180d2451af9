from experiments import bench_data


def test_data_benchmark_runs(capsys):
    result = bench_data.main(["--docs", "2000", "--seq-len", "128", "--batch", "8", "--vocab", "512"])
    assert result["tokens"] > 20_000
    assert all(result[k] > 0 for k in ("tokenize_tok_s", "pack_tok_s", "batch_tok_s"))
    out = capsys.readouterr().out
    assert "tokenize:" in out and "batch assembly:" in out


def test_streamed_data_benchmark_runs(capsys):
    from experiments import bench_data_stream

    result = bench_data_stream.main(["--docs", "300", "--repeat", "1", "--seq-len", "128", "--batch", "8",
                                     "--workers", "1", "--vocab", "320", "--steps", "5"])
    assert result["tokens"] > 5_000 and result["prepare_tok_s"][1] > 0 and result["read_tok_s"][8] > 0
    assert "headroom" in capsys.readouterr().out
