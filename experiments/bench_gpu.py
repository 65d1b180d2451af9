"""Every GPU benchmark of BENCHMARKS.md in one device call, each job in its own process; one JSON file.

Here, on the CPU machine, once before the call (copies ../shared/bench/anchors.py and downloads the
Python 3.12 wheels the GPU image lacks — datasets, dill, multiprocess for pjlm and TRL for the peer —
into the ignored folder build/gpu/, 1.7 MiB):

    .venv/bin/python -m experiments.bench_gpu --prepare

The device call (the `run` tool; about 270 s of jobs, then up to a minute of slack):

    command:   PYTHONUNBUFFERED=1 python3 -m experiments.bench_gpu --out $OUT/bench_gpu.json
    carry:     ["build/gpu"]
    timeout_s: 330

It installs build/gpu/whl into a private --target folder, then runs the jobs of `job_list` in order
of importance, each with its own timeout and all within --budget seconds from the start; a job the
budget does not reach is recorded as skipped, and `--only NAME,…` runs it in a later call. After every
job it rewrites the JSON (per job: status ok|partial|failed|timeout|skipped, the parsed JSON output,
wall seconds, return code, the output's tail when not ok) and appends the job's output to the log
beside it (bench_gpu.log). JAX jobs get XLA_PYTHON_CLIENT_MEM_FRACTION=0.9; bench.py's
`peak_memory_gib` is the allocator's peak bytes in use, not the preallocated pool.

    python -m experiments.bench_gpu --tiny --out runs/bench_gpu_tiny.json   # the same jobs, CPU sizes

Adding a job is one `Job(name, argv, timeout_s, …)` line in `job_list`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.machinery
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pjlm.fileio import write_atomic

REPO = Path(__file__).resolve().parents[1]
SHARED_ANCHORS = REPO.parent / "shared" / "bench" / "anchors.py"
# What the GPU image lacks (its package list: /work/.library/device/KINDS.md): datasets (pjlm.data,
# imported by bench.py through pjlm.train.loop), its dill and multiprocess, and TRL for the DPO peer.
WHEELS = ("datasets==4.8.5", "dill==0.4.1", "multiprocess==0.70.19", "trl==1.16.0")
WHEEL_PYTHON = (3, 12)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
PJLM_TRAIN = ("jax", "flax", "optax", "datasets")  # what `experiments.bench` imports that may be missing
MIN_START_S = 15.0  # a job is not started with less budget left than this


@dataclasses.dataclass(frozen=True)
class Sizes:
    """All that differs between the GPU run and the --tiny CPU run."""

    model: str
    dtype: str
    attention: str
    lm_batch: int
    lm_len: int
    logprob_chunk: int
    lm_steps: int
    dpo_pairs: int
    dpo_len: int
    dpo_prompt: int
    dpo_steps: int
    lora_rank: int
    gen_batch: int
    gen_prompt: int
    gen_new: int
    gen_repeats: int
    anchor_flags: tuple[str, ...]
    plan_model: tuple[str, ...]
    """`--set` overrides of the planned model (the plan job plans the dpo_lora job's step)."""
    ppo: tuple
    """experiments.bench_ppo's arguments besides the model and dtypes: prompts, group, lengths, reward layers."""
    attention_check: tuple = ()
    """experiments.bench_attention's arguments: the fused kernel against the einsum reference."""


GPU = Sizes(model="tinyllama-1.1b", dtype="bfloat16", attention="cudnn", lm_batch=8, lm_len=2048, logprob_chunk=8192,
            lm_steps=5, dpo_pairs=8, dpo_len=512, dpo_prompt=128, dpo_steps=10, lora_rank=16, gen_batch=64,
            gen_prompt=128, gen_new=256, gen_repeats=3, anchor_flags=(), plan_model=(),
            ppo=("--prompts", 32, "--group", 2, "--prompt-len", 128, "--new-tokens", 128, "--reward-layers", 4),
            attention_check=("--implementation", "cudnn", "--dtype", "bfloat16", "--batch", 4, "--seq-len", 2048,
                       "--heads", 32, "--kv-heads", 4, "--head-dim", 64))  # TinyLlama's attention
TINY = Sizes(model="small", dtype="float32", attention="einsum", lm_batch=8, lm_len=32, logprob_chunk=128,
             lm_steps=2, dpo_pairs=8, dpo_len=32, dpo_prompt=8, dpo_steps=2, lora_rank=4, gen_batch=8,
             gen_prompt=8, gen_new=8, gen_repeats=1, anchor_flags=("--tiny",),
             plan_model=("model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                         "model.mlp_dim=384", "model.vocab_size=2048"),  # the small preset
             ppo=("--prompts", 8, "--group", 2, "--prompt-len", 8, "--new-tokens", 8, "--reward-layers", 2,
                  "--iterations", 1),
             attention_check=("--implementation", "xla", "--dtype", "float32", "--batch", 2, "--seq-len", 64,
                        "--heads", 4, "--kv-heads", 2, "--head-dim", 16, "--repeats", 1))


@dataclasses.dataclass(frozen=True)
class Job:
    """One benchmark: `python ARGV` from the repo root, killed after `timeout_s`."""

    name: str
    argv: tuple
    timeout_s: float
    files: tuple[str, ...] = ()
    """Paths (from the repo root) that must exist, else the job is skipped."""
    modules: tuple[str, ...] = ()
    """Top-level modules that must be importable (with the carried wheels), else the job is skipped."""


def job_list(s: Sizes, build: str) -> list[Job]:
    """The jobs, most important first: a run whose budget runs out loses the tail."""
    bf16, f32 = ("--param-dtype", "bfloat16", "--state-dtype", "bfloat16"), ("--param-dtype", "float32",
                                                                            "--state-dtype", "float32")
    bench = ("-m", "experiments.bench", "--model", s.model, "--dtype", s.dtype, "--attention", s.attention)
    lm = (*bench, "--batch", s.lm_batch, "--seq-len", s.lm_len, "--logprob-chunk", s.logprob_chunk,
          "--steps", s.lm_steps)
    dpo = (*bench, "--phase", "dpo", "--batch", s.dpo_pairs, "--seq-len", s.dpo_len, "--prompt-len", s.dpo_prompt,
           "--steps", s.dpo_steps, *bf16)
    gen = ("-m", "experiments.bench_generate", "--model", s.model, "--batch", s.gen_batch, "--prompt-len",
           s.gen_prompt, "--new-tokens", s.gen_new, "--dtype", s.dtype, "--repeats", s.gen_repeats)
    anchors = f"{build}/anchors.py"
    # The planner's prediction for the dpo_lora job's step (bench.py's DPO: no remat, full logits).
    planned = (*s.plan_model, "train.phase=dpo", f"lora.rank={s.lora_rank}", f"lora.alpha={2 * s.lora_rank}",
               f"data.batch_size={s.dpo_pairs}", f"data.seq_len={s.dpo_len}", "train.logprob_chunk=0",
               f"model.dtype={s.dtype}", "model.param_dtype=bfloat16", "optimizer.state_dtype=bfloat16",
               f"model.attention={s.attention}", "model.remat=none", "mesh.fsdp=1", "mesh.data=-1")
    plan = ("-m", "pjlm", "plan", "experiments/tinyllama_1b.py", "--devices", 1, "--device", "h200",
            *(a for o in planned for a in ("--set", o)))
    return [
        Job("pretrain_bf16", (*lm, *bf16), 120, modules=PJLM_TRAIN),                     # issue 4
        Job("dpo", dpo, 100, modules=PJLM_TRAIN),                                        # issue 5
        Job("dpo_lora", (*dpo, "--lora-rank", s.lora_rank), 100, modules=PJLM_TRAIN),    # issue 6
        Job("plan_dpo_lora", plan, 60, modules=PJLM_TRAIN),                              # beside dpo_lora's peak
        Job("generate", gen, 90, modules=("jax", "flax")),                               # issue 7
        Job("attention_parity", ("-m", "experiments.bench_attention", *s.attention_check), 60,
            modules=("jax", "flax")),                                                    # issue 17: auto's kernel
        Job("anchors_jax", (anchors, "--only", "versions,ceilings", *s.anchor_flags), 60, files=(anchors,),
            modules=("jax",)),
        Job("anchors_torch", (anchors, "--only", "train,generate,dpo,dpo_lora", *s.anchor_flags), 180,
            files=(anchors,), modules=("torch", "transformers", "trl", "datasets", "peft")),
        Job("pretrain_f32", (*lm, *f32), 120, modules=PJLM_TRAIN),                       # issue 4, f32 state
        Job("ppo", ("-m", "experiments.bench_ppo", "--model", s.model, "--dtype", s.dtype, "--attention", s.attention,
                    *bf16, *s.ppo), 120, modules=PJLM_TRAIN),                           # issue 16
    ]


def injected_failures() -> list[Job]:
    """Two jobs that must be recorded as failed without losing the others (--inject-failures)."""
    return [Job("injected_exit", ("-c", "import sys; print('injected failure', file=sys.stderr); sys.exit(3)"), 30),
            Job("injected_timeout", ("-c", "import time; print('sleeping', flush=True); time.sleep(60)"), 1)]


def parse_output(text: str) -> tuple[list[dict], list[dict]]:
    """(anchors.py's `RESULT {json}` lines, other lines that are one JSON object) of a job's output."""
    tagged, plain = [], []
    for line in text.splitlines():
        line = line.strip()
        target = tagged if line.startswith("RESULT ") else plain
        body = line[len("RESULT "):] if target is tagged else line
        if body.startswith("{"):
            try:
                obj = json.loads(body)
            except ValueError:
                continue
            if isinstance(obj, dict):
                target.append(obj)
    return tagged, plain


def record(text: str, rc: int | None, timed_out: bool) -> dict:
    """A finished job's status and parsed output."""
    tagged, plain = parse_output(text)
    rec: dict = {"results": tagged} if tagged else {"result": plain[-1]} if plain else {}
    if timed_out:
        rec["status"] = "timeout"
    elif rc != 0:
        rec["status"] = "failed"
    elif not rec:
        rec.update(status="failed", reason="exited 0 but printed no JSON line")
    elif any(r.get("kind") == "error" for r in tagged):
        rec["status"] = "partial"
    else:
        rec["status"] = "ok"
    if rec["status"] != "ok":
        rec["error_tail"] = text[-3000:]
    return rec


def _pump(stream, name: str, lines: list[str], log) -> None:
    for line in stream:
        lines.append(line)
        log.write(line)
        log.flush()
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()


def _kill(proc: subprocess.Popen) -> None:
    """End the job's process group: SIGTERM, then SIGKILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue  # still running: the next, stronger signal


def run_job(job: Job, env: dict, timeout_s: float, log) -> dict:
    argv = [sys.executable, *map(str, job.argv)]
    log.write(f"\n===== {job.name}: {' '.join(argv)} (timeout {timeout_s:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", process_group=0)
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc.stdout, job.name, lines, log), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # also on SIGTERM/Ctrl-C of this script: never leave a job holding the GPU
        if proc.poll() is None:
            _kill(proc)
    reader.join(10)
    wall = time.perf_counter() - start
    log.write(f"===== {job.name}: rc {proc.returncode}, {wall:.1f} s{', timed out' if timed_out else ''}\n")
    log.flush()
    return {**record("".join(lines), proc.returncode, timed_out), "wall_s": round(wall, 2),
            "returncode": proc.returncode, "timeout_s": round(timeout_s, 1), "argv": argv[1:]}


def install_wheels(build: Path, site: str) -> tuple[dict, str | None]:
    """pip-install build/whl/*.whl into the folder `site`; (setup record, `site` or None)."""
    wheels = sorted((build / "whl").glob("*.whl"))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {build / 'whl'}: run --prepare here first "
                "and carry build/gpu; jobs that need datasets or trl are skipped"}, None
    if sys.version_info[:2] != WHEEL_PYTHON:
        return {"status": "skipped", "reason": f"the wheels are for Python {'.'.join(map(str, WHEEL_PYTHON))}, "
                f"this is {sys.version.split()[0]}"}, None
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", site, *map(str, wheels)],
                          capture_output=True, text=True, timeout=180)
    rec = {"wheels": [w.name for w in wheels], "target": site, "wall_s": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        return {**rec, "status": "failed", "error_tail": (proc.stdout + proc.stderr)[-3000:]}, None
    return {**rec, "status": "ok"}, site


def job_env(site: str | None, scratch: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OUT=scratch,
               HF_HOME=os.path.join(scratch, "hf"))  # OUT: anchors.py's own jsonl stays out of ours
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    paths = [p for p in (site, str(REPO), os.environ.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def skip_reason(job: Job, site: str | None, build: str, left_s: float) -> str | None:
    for path in job.files:
        if not (REPO / path).exists():
            hint = " (run --prepare here before the device call and carry build/gpu)" if path.startswith(build) else ""
            return f"{path} is missing{hint}"
    search = [site, *sys.path] if site else sys.path
    for module in job.modules:
        if importlib.machinery.PathFinder.find_spec(module, search) is None:
            return f"module {module} is not importable{'' if site else ' (no carried wheels installed)'}"
    if left_s < MIN_START_S:
        return f"budget spent: {left_s:.0f} s left of --budget"
    return None


def machine() -> dict:
    info = {"python": sys.version.split()[0], "executable": sys.executable}
    git = shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["git_revision"] = git.stdout.strip() if git and git.returncode == 0 else None  # no .git on the device
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    return info


def run_all(jobs: list[Job], args, out: Path, log, tmp: str) -> dict:
    start = time.perf_counter()
    report = {"mode": "tiny" if args.tiny else "gpu", "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "sizes": dataclasses.asdict(TINY if args.tiny else GPU), "budget_s": args.budget, "machine": machine(),
              "complete": False, "setup": {"status": "running"},
              "jobs": {job.name: {"status": "pending"} for job in jobs}}

    def save():
        write_atomic(out, json.dumps({**report, "elapsed_s": round(time.perf_counter() - start, 1)}, indent=1) + "\n")

    save()
    report["setup"], site = install_wheels(REPO / args.build, os.path.join(tmp, "site"))
    log.write(f"===== setup: {json.dumps(report['setup'])}\n")
    save()
    env = job_env(site, os.path.join(tmp, "scratch"))
    selected = lambda name: (not args.only or name in args.only) and name not in args.skip
    for job in jobs:
        left = args.budget - (time.perf_counter() - start)
        reason = "not selected (--only/--skip)" if not selected(job.name) else skip_reason(job, site, args.build, left)
        if reason:
            report["jobs"][job.name] = {"status": "skipped", "reason": reason}
            log.write(f"\n===== {job.name}: skipped, {reason}\n")
        else:
            report["jobs"][job.name] = {"status": "running"}
            save()
            try:
                report["jobs"][job.name] = run_job(job, env, min(job.timeout_s, left), log)
            except BaseException as e:  # SIGTERM (the device call's own timeout) or Ctrl-C: keep what we have
                report["jobs"][job.name] = {"status": "interrupted", "reason": repr(e)}
                save()
                raise
        save()
    report["complete"] = True
    save()
    return report


def prepare(build: Path) -> None:
    """Copy anchors.py and download the wheels the GPU image lacks into build (ignored by git)."""
    build.mkdir(parents=True, exist_ok=True)
    (build / "anchors.py").unlink(missing_ok=True)  # the shared copy is read-only
    shutil.copyfile(SHARED_ANCHORS, build / "anchors.py")
    whl = build / "whl"
    shutil.rmtree(whl, ignore_errors=True)  # one version of each: two stop the whole install
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    ".".join(map(str, WHEEL_PYTHON)), "--implementation", "cp", *platforms, "-d", str(whl), *WHEELS],
                   check=True)
    size = sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    print(f"{build}: anchors.py and {len(list(whl.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB; "
          "carry it: the device call's `carry` is [\"build/gpu\"]")


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", action="store_true", help="on the CPU machine: fill build/gpu, run nothing")
    ap.add_argument("--tiny", action="store_true", help="the same jobs at CPU sizes")
    ap.add_argument("--out", default=None, help="JSON path; default $OUT/bench_gpu.json, else runs/bench_gpu.json")
    ap.add_argument("--build", default="build/gpu", help="what --prepare fills, relative to the repo root")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for setup and all jobs together")
    ap.add_argument("--only", type=lambda s: s.split(","), default=[], help="run only these jobs (comma-separated)")
    ap.add_argument("--skip", type=lambda s: s.split(","), default=[], help="do not run these jobs")
    ap.add_argument("--inject-failures", action="store_true", help="test: first run a failing and a hanging job")
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare(REPO / args.build)
    out = Path(args.out or (Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT")
                            else REPO / "runs" / "bench_gpu.json"))
    jobs = (injected_failures() if args.inject_failures else []) + job_list(TINY if args.tiny else GPU, args.build)
    unknown = set(args.only + args.skip) - {job.name for job in jobs}
    if unknown:
        ap.error(f"no job named {', '.join(sorted(unknown))}; the jobs are {', '.join(job.name for job in jobs)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log, tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        report = run_all(jobs, args, out, log, tmp)
    for name, job in report["jobs"].items():
        figures = {k: v for k, v in job.get("result", {}).items() if k in ("tokens_per_s", "pairs_per_s",
                   "new_tokens_per_s", "peak_memory_gib")}
        print(f"{name:16s} {job['status']:9s} {job.get('wall_s', 0):6.1f} s  {job.get('reason', '')}{figures or ''}")
    return report


if __name__ == "__main__":
    main()
