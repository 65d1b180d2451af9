"""Launching: multi-process training on one machine matches one process, and the launchers' pieces.

The slow test starts `python -m pjlm train` twice on localhost with `jax.distributed` (2 processes ×
4 CPU devices, coordinator on 127.0.0.1) and once as a single process with 8 devices, on the same
config and global batch, and compares the losses process 0 logged step by step. The cheap tests
cover `maybe_initialize_distributed`'s reading of the launcher's environment (without starting
anything), the XLA flag files (checked against the installed jaxlib) and the launch scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from pjlm_testing import F32, F32_DEEP, assert_close, clear_preferences, saved_arrays
from pjlm import checkpoint as ckpt_lib
from pjlm import sharding

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
RUN_TIMEOUT_S = 300  # per launch; each takes 15-30 s on 2 cores, up to ~190 s when other jobs share them
STEPS = 6

# An experiment file with tests/pjlm_testing.py's tiny run (loaded by path, so it stays the same
# Config), shortened to 6 steps and logging every step.
EXPERIMENT = f'''
import importlib.util

_spec = importlib.util.spec_from_file_location("_pjlm_tiny_config", {str(REPO / "tests" / "pjlm_testing.py")!r})
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)


def get_config():
    return _conftest.tiny_config(train=dict(steps={STEPS}, log_every=1, eval_every=0))
'''



def _phase_experiment(lora: dict | None = None, **sections) -> str:
    """An experiment file whose config is `tiny_config(**sections)` (plain literals only), with
    `LoraConfig(**lora)` when `lora` is given."""
    config = f"_conftest.tiny_config(**{sections!r})"
    if lora is not None:
        config = f"dataclasses.replace({config}, lora=LoraConfig(**{lora!r}))"
    return "import dataclasses\n\nfrom pjlm.config import LoraConfig\n" + \
        EXPERIMENT.replace("def get_config():", "def _pretrain_config():") + \
        f"\n\ndef get_config():\n    return {config}\n"


# Variables a launcher, a cluster or this pytest process may have set that must not leak into the
# child runs: they would change their device count or make them join (or skip) a distributed run.
_LEAKY_PREFIXES = ("JAX_", "XLA_", "PJLM_", "SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "PMI_", "LIBTPU_")


def _child_env(tmp_path: Path, devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LEAKY_PREFIXES) and not k.lower().endswith("_proxy")}  # gRPC honours proxies
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               HF_HOME=str(tmp_path / "hf-home"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 80) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else ["<no output>"]
    return "\n".join(lines[-n:])


def _start(config: Path, workdir: Path, envs: list[dict[str, str]], logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    """One `pjlm train` per env, each logging to logs/process{i}.log."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen, Path]] = []
    for i, env in enumerate(envs):
        log = logs / f"process{i}.log"
        with open(log, "w") as out:
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "pjlm", "train", str(config), "--workdir", str(workdir)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs: list[tuple[subprocess.Popen, Path]], expect: int = 0, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Wait until every process has exited with `expect`; on another exit code or after `timeout_s`,
    kill every process still running and fail with the logs' tails."""
    start = time.monotonic()
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, expect)]
            timed_out = time.monotonic() - start > timeout_s
            if failed or timed_out:
                if timed_out:  # PYTHONFAULTHANDLER: SIGABRT writes every thread's Python stack to the log
                    for p, _ in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGABRT)
                    time.sleep(3)
                what = f"process(es) {failed} exited with {[codes[i] for i in failed]}" if failed else \
                    f"timed out after {timeout_s} s"
                pytest.fail(f"{len(procs)}-process run {what} (expected exit code {expect})\n" + "\n".join(
                    f"--- process {i} ({log}):\n{_tail(log)}" for i, (_, log) in enumerate(procs)))
            if all(c == expect for c in codes):
                return
            time.sleep(0.2)
    finally:
        for p, _ in procs:  # only reached with live processes after a failure or an interrupt
            if p.poll() is None:
                p.kill()
        for p, _ in procs:
            p.wait(timeout=30)


def _launch(config: Path, workdir: Path, envs: list[dict[str, str]], logs: Path) -> float:
    """Start one `pjlm train` per env and wait for all to succeed; returns the wall time."""
    start = time.monotonic()
    _wait(_start(config, workdir, envs, logs))
    return time.monotonic() - start


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _two_process_envs(tmp_path: Path) -> list[dict[str, str]]:
    coordinator = f"127.0.0.1:{_free_port()}"
    return [_child_env(tmp_path, 4, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(i)) for i in range(2)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The setup every multi-process test shares: the tiny experiment, its one-process pre-training run
    (the reference of the two-process run and the `init_from` of every later phase) and a preference
    file for DPO and the reward model."""
    tmp = tmp_path_factory.mktemp("launch")
    config = tmp / "tiny_experiment.py"
    config.write_text(EXPERIMENT)
    wall = _launch(config, tmp / "one-process", [_child_env(tmp, 8)], tmp / "logs-one")
    return SimpleNamespace(tmp=tmp, config=config, base=tmp / "one-process", wall=wall,
                           prefs=clear_preferences(tmp / "prefs.jsonl", n=64))


def _start_phase(launched, run: str, processes: int, **sections) -> tuple[Path, list]:
    """Start the phase `tiny_config(**sections)` as `run` on 1 process (8 devices) or 2 (4 each);
    returns its work directory and its processes (for `_wait`)."""
    tmp = launched.tmp
    config = tmp / f"{run}_experiment.py"
    config.write_text(_phase_experiment(**sections))
    envs = [_child_env(tmp, 8)] if processes == 1 else _two_process_envs(tmp)
    return tmp / run, _start(config, tmp / run, envs, tmp / f"logs-{run}")


def _one_and_two(launched, name: str, two_process_variants: dict[str, dict], **sections):
    """Run the phase `tiny_config(**sections)` once as one process and, for each variant (overrides of
    `sections`, e.g. the reference cache on or off), as two: returns {"one": dir, variant: dir}."""
    dirs = {}
    for variant, overrides in {"one": {}, **two_process_variants}.items():
        merged = {k: {**sections.get(k, {}), **overrides.get(k, {})} for k in {*sections, *overrides}}
        dirs[variant], procs = _start_phase(launched, f"{name}-{variant}", 1 if variant == "one" else 2, **merged)
        _wait(procs)
    return dirs


def _reward_sections(launched, **lora) -> dict:
    """The reward-model run from the pre-training run: 3 steps on the preference file, full or LoRA."""
    return dict(train=dict(phase="reward", steps=3, log_every=1, eval_every=3, eval_batches=2, checkpoint_every=3,
                           init_from=str(launched.base)),
                data=dict(source=launched.prefs, pack=False, buckets=(32,), seq_len=32, eval_rows=16),
                optimizer=dict(learning_rate=2e-3, warmup_steps=0), **lora)


@pytest.fixture(scope="module")
def reward_runs(launched):
    """Two one-process reward-model runs from the pre-training run, trained at once: a full one (also
    the reference of the two-process reward-model run) and a LoRA one (rank 4)."""
    full, full_procs = _start_phase(launched, "reward-one", 1, **_reward_sections(launched))
    lora, lora_procs = _start_phase(launched, "reward-lora", 1,
                                    **_reward_sections(launched, lora=dict(rank=4, alpha=8.0)))
    _wait(full_procs + lora_procs)
    return SimpleNamespace(full=full, lora=lora)


def _assert_same_run(one: Path, two: Path, keys: tuple[str, ...], steps: int, what: str,
                     unchecked: tuple[str, ...] = ()) -> None:
    """Process 0 of the two-process run logged every step once, with the one-process run's values of
    `keys` (F32_DEEP: a batch's values through the model, reduced across processes in another order),
    and both processes' checkpoint shards hold the one-process run's final parameters."""
    ref, got = _metrics(one), _metrics(two)
    assert [m["step"] for m in ref] == [m["step"] for m in got]  # the same lines (training and held-out)
    assert [m["step"] for m in ref if not any(k.startswith("eval_") for k in m)] == list(range(1, steps + 1))
    for m1, m2 in zip(ref, got):
        for key in (k for k in keys if k in m1):
            assert_close(m2[key], m1[key], F32_DEEP, what=f"{what} step {m1['step']} {key}")
    want, have = (saved_arrays(d / "checkpoints" / str(steps)) for d in (one, two))
    for path in unchecked:  # parameters the loss does not determine (see the caller)
        for tree in (want, have):
            *parents, leaf = path.split("/")
            for key in parents:
                tree = tree[key]
            del tree[leaf]
    # The parameters after `steps` Adam updates: F32_DEEP relative to each leaf's largest value (Adam
    # divides by √v, so a gradient's last bits can move an update by a few ulps of the learning rate).
    assert_close(have, want, F32_DEEP, what=f"{what}: final parameters")


@pytest.mark.slow
def test_two_processes_reach_the_one_process_loss(launched):
    two = launched.tmp / "two-processes"
    # No tokenizer is in place: both processes train the same one, and only process 0 writes it.
    t_two = _launch(launched.config, two, _two_process_envs(launched.tmp), launched.tmp / "logs-two")
    one = launched.base
    ref, got = _metrics(one), _metrics(two)
    for m in ref + got:  # both runs saw 8 global devices (the throughput is also given per device)
        assert round(m["tokens_per_s"] / m["tokens_per_s_per_device"]) == 8
    assert [m["tokens"] for m in got] == [m["tokens"] for m in ref]  # the same global batches
    print(f"\none process: {launched.wall:.1f} s, two processes: {t_two:.1f} s; losses (1 process, 2 processes): "
          f"{[(m1['loss'], m2['loss']) for m1, m2 in zip(ref, got)]}")
    _assert_same_run(one, two, ("loss", "grad_norm"), STEPS, "pre-training")
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trained
    # Process 0 alone says what the run is and shows progress.
    logs = [(launched.tmp / "logs-two" / f"process{i}.log").read_text() for i in range(2)]
    assert "pjlm: pretrain on cpu: 2 process(es), 8 device(s)" in logs[0] and "step/s" in logs[0]
    assert "pjlm: pretrain on" not in logs[1] and "step/s" not in logs[1] and "%|" not in logs[1]


@pytest.mark.slow
def test_two_process_dpo_with_and_without_the_reference_cache(launched):
    """DPO's reference log-probs computed inside the step, or once up front and gathered from both
    processes into the cache file: either way, the one-process run's losses and parameters."""
    dirs = _one_and_two(
        launched, "dpo", {"two": {}, "two-cached": {"preference": {"precompute_ref": True}}},
        train=dict(phase="dpo", steps=3, log_every=1, eval_every=0, checkpoint_every=3, init_from=str(launched.base)),
        data=dict(source=launched.prefs, pack=False, buckets=(32,), seq_len=32, eval_rows=0),
        optimizer=dict(learning_rate=1e-3, warmup_steps=0), preference=dict(beta=0.5))
    for variant in ("two", "two-cached"):
        _assert_same_run(dirs["one"], dirs[variant], ("loss", "grad_norm", "reward_chosen", "reward_rejected"), 3,
                         f"DPO ({variant})")
    assert (dirs["two-cached"] / "ref_logps_train.npz").exists()


@pytest.mark.slow
def test_two_process_reward_model(launched, reward_runs):
    two, procs = _start_phase(launched, "reward-two", 2, **_reward_sections(launched))
    _wait(procs)
    dirs = {"one": reward_runs.full, "two": two}
    # The Bradley–Terry loss sees only score differences: the score head's bias gets a gradient that is
    # rounding noise, which Adam scales to a step of up to ±lr, so every score (and the scores' mean)
    # may move by that constant. What the loss does see is compared: the margin, the scores' spread on
    # held-out pairs (sums over both processes' rows, finalised once) and every other parameter.
    _assert_same_run(dirs["one"], dirs["two"], ("loss", "grad_norm", "margin", "eval_reward_std"), 3,
                     "reward model", unchecked=("score_head/bias",))
    stats = [ckpt_lib.read_meta(d / "checkpoints", 3)["reward_stats"] for d in (dirs["one"], dirs["two"])]
    assert_close(stats[1]["std"], stats[0]["std"], F32_DEEP, what="saved reward std")


@pytest.mark.slow
def test_two_process_ppo_with_two_reward_models_and_rules(launched, reward_runs):
    """PPO from the pre-training run with the composite reward pjlm exists for: a full and a LoRA
    reward model (on the policy's tokenizer, so scored on device from the rollout's tokens, their
    parameters global arrays sharded over both processes) and two rules, weighted. Rollouts sampled,
    decoded and scored per process give the same metrics as one process (the same samples: the
    sampler's random bits do not depend on the layout)."""
    weights = {"regex": 1.0, "length": 0.5, "full": 0.5, "lora": 0.3}
    dirs = _one_and_two(
        launched, "ppo", {"two": {}},
        train=dict(phase="ppo", steps=3, log_every=1, eval_every=0, checkpoint_every=3, init_from=str(launched.base)),
        data=dict(synthetic_docs=100, batch_size=8, buckets=(16,), seq_len=64, eval_rows=0),
        optimizer=dict(learning_rate=3e-3, warmup_steps=0),
        ppo=dict(rewards=("regex:1.0:pattern=s", "length:0.5:target=6:scale=0.2",
                          f"model:0.5:path={reward_runs.full}:name=full",
                          f"model:0.3:path={reward_runs.lora}:name=lora"),
                 max_new_tokens=8, group_size=2, kl_coef=0.05))
    ref, got = _metrics(dirs["one"]), _metrics(dirs["two"])
    for m1, m2 in zip(ref, got):  # rule rewards of the same decoded texts: equal
        assert (m2["reward_regex"], m2["reward_length"], m2["response_length"]) == \
            (m1["reward_regex"], m1["reward_length"], m1["response_length"])
        terms = [w * m2[f"reward_{name}"] for name, w in weights.items()]
        # A float32 weighted sum per row, then means: F32, on the terms' scale (the sum may cancel).
        assert_close(m2["reward"], sum(terms), F32, scale=sum(map(abs, terms)), what=f"step {m2['step']} reward")
    _assert_same_run(dirs["one"], dirs["two"], ("reward_full", "reward_lora", "reward", "kl", "policy_loss",
                                                "value_loss", "entropy"), 3, "PPO with two reward models and rules")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    """SIGTERM to process 1 alone: both processes save the same step (one checkpoint, whole) and exit
    with the preemption's code, instead of process 0 waiting forever in the step's collectives."""
    config = tmp_path / "long_experiment.py"
    steps = 100_000  # far more than run before the signal: the run must stop because of it
    config.write_text(_phase_experiment(train=dict(steps=steps, log_every=1, eval_every=0, checkpoint_every=steps)))
    workdir = tmp_path / "run"
    procs = _start(config, workdir, _two_process_envs(tmp_path), tmp_path / "logs")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (workdir / "metrics.jsonl").exists() or len(_metrics(workdir)) < 3:  # compiled and stepping
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            _wait(procs, timeout_s=0)  # fails with the logs
        time.sleep(0.2)
    procs[1][0].send_signal(signal.SIGTERM)
    _wait(procs, expect=128 + signal.SIGTERM, timeout_s=60)
    saved = [int(line.split("preempted at step ")[1].split()[0]) for _, log in procs
             for line in log.read_text().splitlines() if "preempted at step " in line]
    assert len(saved) == 2 and saved[0] == saved[1] < steps, saved
    assert ckpt_lib.checkpoint_steps(workdir / "checkpoints") == [saved[0]]
    assert _metrics(workdir)[-1]["step"] == saved[0]  # every step up to the save was logged
    assert saved_arrays(workdir / "checkpoints" / str(saved[0]))  # both processes' shards are readable
# --- maybe_initialize_distributed: which environments start jax.distributed, and with what ---

_DETECTED = ("PJLM_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
             "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def initialize_calls(monkeypatch):
    """A clean launcher environment; records jax.distributed.initialize calls instead of making them."""
    for var in _DETECTED:
        monkeypatch.delenv(var, raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, None),
    ({"PJLM_DISTRIBUTED": "1"}, {}),  # TPU pods: jax reads the slice's metadata
    ({"PJLM_DISTRIBUTED": "true"}, {}),
    ({"SLURM_NTASKS": "16"}, {}),  # SLURM: jax reads SLURM_*
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}),  # jax reads it, and auto-detects the rest
    ({"PJLM_DISTRIBUTED": "0", "SLURM_NTASKS": "16"}, None),  # explicit opt-out
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5555", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     dict(coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1, cluster_detection_method="deactivate")),
])
def test_initialize_distributed_follows_the_launcher(monkeypatch, initialize_calls, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sharding.maybe_initialize_distributed() is (expected is not None)
    assert initialize_calls == ([] if expected is None else [expected])


@pytest.mark.parametrize("env, match", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"\[0, JAX_NUM_PROCESSES\)"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "positive integer"),
])
def test_initialize_distributed_rejects_a_partial_manual_setup(monkeypatch, initialize_calls, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        sharding.maybe_initialize_distributed()
    assert initialize_calls == []


def test_initialize_distributed_is_idempotent(monkeypatch, initialize_calls):
    monkeypatch.setenv("PJLM_DISTRIBUTED", "1")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert sharding.maybe_initialize_distributed() is True
    assert initialize_calls == []


# --- the flag files and the scripts ---

bash = pytest.mark.skipif(shutil.which("bash") is None, reason="the launchers are bash scripts")


def _bash(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@bash
def test_xla_flag_files_are_accepted_by_this_jaxlib(tmp_path):
    """XLA parses every --xla_* flag (GPU ones too) at start-up and aborts on an unknown one, so a CPU
    run checks the GPU file's flag names; libtpu's flags can only be checked on a TPU."""
    env = {k: v for k, v in _child_env(tmp_path, 1).items() if k != "XLA_FLAGS"}
    probe = (f"{sys.executable} -c 'import jax; x = jax.numpy.arange(8.0).sum(); "
             "print(jax.device_count(), float(x))'")
    out = _bash(f"source launch/xla/h100.env && source launch/xla/cpu_test.env && {probe}", env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["4", "28.0"]  # cpu_test.env's 4 devices, appended to h100's flags
    for tpu in ("tpu_v4.env", "tpu_v5e.env"):
        out = _bash(f'source launch/xla/{tpu} && echo "$LIBTPU_INIT_ARGS"', env)
        assert out.returncode == 0 and "--xla_tpu_enable_latency_hiding_scheduler=true" in out.stdout, out.stderr


@bash
def test_launch_scripts(tmp_path):
    env = _child_env(tmp_path, 1)
    for script in ("tpu_pod.sh", "slurm.sbatch"):
        assert _bash(f"bash -n launch/{script}", env).returncode == 0, script
    env.update(TPU_NAME="my-v4-32", ZONE="us-central2-b", DRY_RUN="1", VENV="~/venv")
    out = _bash("bash launch/tpu_pod.sh experiments/pretrain_synthetic.py '/mnt/gcs/runs/a b' "
                "--set train.steps=20", env)
    assert out.returncode == 0, out.stderr
    remote = out.stdout.splitlines()[0]
    assert remote == ("on every worker: cd ~/pjlm && source ~/venv/bin/activate && source launch/xla/tpu_v4.env && "
                      "export PJLM_DISTRIBUTED=1 && python3 -m pjlm train experiments/pretrain_synthetic.py "
                      "--workdir /mnt/gcs/runs/a\\ b --set train.steps=20")
    assert "gcloud compute tpus tpu-vm ssh my-v4-32 --zone us-central2-b --worker=all" in out.stdout
    out = _bash("bash launch/tpu_pod.sh experiments/pretrain_synthetic.py gs://bucket/run", env)
    assert out.returncode == 0 and "--workdir gs://bucket/run" in out.stdout, out.stderr
    env.update(INSTALL="1")  # a gs:// work directory needs gcsfs on the workers: the gcs extra
    out = _bash("bash launch/tpu_pod.sh experiments/pretrain_synthetic.py gs://bucket/run", env)
    assert out.returncode == 0 and "-m pip install -q -e '.[tpu,gcs]' &&" in out.stdout, out.stderr
    env.update(INSTALL="1")
    out = _bash("bash launch/tpu_pod.sh experiments/pretrain_synthetic.py /mnt/gcs/runs/a", env)
    assert out.returncode == 0 and "&& python3 -m pip install -q -e '.[tpu]' && source launch/xla" in out.stdout


def test_accelerator_extras_name_extras_of_jax():
    """pjlm[tpu], pjlm[cuda], pjlm[cuda13] pull jax with an extra the installed jax declares (a
    misspelt extra makes pip warn and install a CPU-only jaxlib)."""
    import tomllib
    from importlib import metadata

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    provided = set(metadata.metadata("jax").get_all("Provides-Extra"))
    for name, want in (("tpu", "tpu"), ("cuda", "cuda12"), ("cuda13", "cuda13")):
        (requirement,) = extras[name]
        assert requirement.startswith(f"jax[{want}]") and want in provided, (name, requirement)
