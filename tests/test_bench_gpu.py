"""experiments/bench_gpu.py: the one-call GPU benchmark script, run whole at CPU sizes (--tiny)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from experiments import bench_gpu

REPO = Path(__file__).resolve().parents[1]
PJLM_JOBS = ("pretrain_bf16", "dpo", "dpo_lora", "generate")


def _flags(argv) -> dict:
    argv = [str(a) for a in argv]
    return {a: b for a, b in zip(argv, argv[1:] + [""]) if a.startswith("--")}


def test_tiny_run_records_every_job_and_survives_a_failing_and_a_hanging_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device: faster than conftest's eight
    out = tmp_path / "x.json"
    # Skipped here: pretrain_f32,
    # pretrain_bf16 but for two dtype flags (checked below), to keep this test near 30 s on two cores.
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_gpu", "--tiny", "--inject-failures",
                           "--build", str(tmp_path / "no-build"), "--skip", "pretrain_f32",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    jobs = report["jobs"]
    assert report["complete"] and report["mode"] == "tiny"
    assert list(jobs)[:2] == ["injected_exit", "injected_timeout"], "the failures run first, the rest after them"

    assert jobs["injected_exit"]["status"] == "failed" and jobs["injected_exit"]["returncode"] == 3
    assert "injected failure" in jobs["injected_exit"]["error_tail"]
    assert jobs["injected_timeout"]["status"] == "timeout" and jobs["injected_timeout"]["wall_s"] < 15

    for name in PJLM_JOBS:
        assert jobs[name]["status"] == "ok", (name, jobs[name])
        result = jobs[name]["result"]
        if name == "generate":
            assert result["new_tokens_per_s"] > 0
            continue
        assert result["tokens_per_s"] > 0 and result["peak_memory_gib"] > 0 and math.isfinite(result["loss"])
    for name in ("dpo", "dpo_lora"):
        assert jobs[name]["result"]["pairs_per_s"] > 0 and jobs[name]["result"]["phase"] == "dpo"
    assert jobs["dpo_lora"]["result"]["lora_rank"] == bench_gpu.TINY.lora_rank
    assert jobs["pretrain_bf16"]["result"]["param_dtype"] == "bfloat16"
    ppo = jobs["ppo"]["result"]  # a PPO iteration: a smaller reward model beside the policy
    assert jobs["ppo"]["status"] == "ok", jobs["ppo"]
    assert ppo["iterations_per_s"] > 0 and ppo["rows"] == 16 and ppo["new_tokens"] == bench_gpu.TINY.ppo[7]
    assert 0 < ppo["reward_params_m"] < ppo["policy_params_m"] and ppo["peak_memory_gib"] > 0
    assert ppo["time_generate_s"] > 0 and ppo["time_score_s"] > 0 and ppo["time_update_s"] > 0

    parity = jobs["attention_parity"]["result"]  # the kernel auto picks, against the einsum reference
    assert jobs["attention_parity"]["status"] == "ok" and parity["parity"] and parity["ms_fwd_bwd"] > 0
    assert parity["implementation"] == "xla" and max(parity[f"rel_error_{x}"] for x in ("out", "dq", "dk", "dv")) \
        <= parity["bound"]

    skipped = {name: job for name, job in jobs.items() if job["status"] == "skipped"}
    assert set(skipped) == {"pretrain_f32", "anchors_jax", "anchors_torch"}
    planned = jobs["plan_dpo_lora"]["result"]  # the planner's figures for the dpo_lora job's step
    assert planned["phase"] == "dpo" and planned["temporaries_gib"] > 0 and planned["device"] == "h200"
    assert planned["rows"] == 2 * bench_gpu.TINY.dpo_pairs and planned["seq_len"] == bench_gpu.TINY.dpo_len
    assert all(job["reason"] for job in skipped.values())
    assert "--prepare" in skipped["anchors_torch"]["reason"] and "--prepare" in report["setup"]["reason"]
    log = out.with_suffix(".log").read_text()
    assert "===== pretrain_bf16" in log and "injected failure" in log


def test_parse_output_and_status():
    text = "\n".join(["noise", 'RESULT {"kind": "hf_train_step", "tokens_per_s": 5.0}', "RESULT {broken",
                      'RESULT {"kind": "error", "part": "dpo"}', "[train] 1.0s"])
    assert bench_gpu.record(text, 0, False)["status"] == "partial"
    assert [r["kind"] for r in bench_gpu.record(text, 0, False)["results"]] == ["hf_train_step", "error"]
    one = bench_gpu.record('warning\n{"a": 1}\n{"a": 2}\n', 0, False)
    assert one == {"result": {"a": 2}, "status": "ok"}
    assert bench_gpu.record("Traceback ...\n", 0, False)["status"] == "failed"
    assert bench_gpu.record('{"a": 1}\n', 1, False)["status"] == "failed"
    assert bench_gpu.record('{"a": 1}\n', -9, True)["status"] == "timeout"


def test_gpu_jobs_run_the_commands_benchmarks_md_gives():
    gpu = {job.name: job for job in bench_gpu.job_list(bench_gpu.GPU, "build/gpu")}
    tiny = {job.name: job for job in bench_gpu.job_list(bench_gpu.TINY, "build/gpu")}
    assert list(gpu) == list(tiny), "one job list, two sizes"
    table = "\n".join(line for line in (REPO / "BENCHMARKS.md").read_text().splitlines() if line.startswith("| "))
    commands = re.findall(r"`python -m (experiments\.bench\S*) ([^`]*)`", table)  # GPU rows 4, 5, 7 come first
    documented = {"pretrain_bf16": commands[0], "dpo": commands[1], "generate": commands[2]}
    for name, (module, args) in documented.items():
        assert gpu[name].argv[1] == module
        assert _flags(args.split()).items() <= _flags(gpu[name].argv).items(), name
    assert _flags(gpu["dpo_lora"].argv) == {**_flags(gpu["dpo"].argv), "--lora-rank": "16"}
    assert _flags(gpu["pretrain_f32"].argv) == {**_flags(gpu["pretrain_bf16"].argv), "--param-dtype": "float32",
                                                "--state-dtype": "float32"}
