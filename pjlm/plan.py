"""A memory planner: a phase's train step compiled from abstract arrays, before any pod is reserved.

    pjlm plan CONFIG --devices N [--device h100] [--set section.field=value ...]
    python -m pjlm.plan CONFIG --devices N ...        (the child process `pjlm plan` runs)

`plan(config)` builds the step exactly as training does — the same `Transformer`, `make_optimizer`,
`loop.abstract_state` (shapes and shardings of the TrainState), the same step function with the
same static arguments and shardings as `pjlm.train.phases.build` (PPO: as `pjlm.train.ppo`), the
state donated — from `jax.ShapeDtypeStruct`s only: no parameter is allocated, so any model size
plans on a laptop. XLA's compiled memory analysis gives the per-device figures, an analytic
estimate breaks it down beside them, and the step's FLOPs per token come too (all three in
`pjlm.plan_memory`).

The vocabulary is `config.model.vocab_size` as given (a run takes its tokenizer's instead): plan
for a tokenizer with `--set model.vocab_size=…`. Rows are the longest a phase's batches have
(`plan_memory.row_length`); PPO plans its update step on a minibatch and, beside it, the rollout
statistics.

Devices: `plan` uses the devices this process has (the first `n_devices`). JAX fixes the device
count when it starts, so `plan_subprocess` (what the CLI calls) compiles in a child process: on
this machine's accelerators when it has N of them, else on N fake CPU devices. A CPU compile of a
bfloat16 step overstates its memory (the CPU compiler keeps float32 copies of bf16 weights that a
GPU or TPU would not), so for a named accelerator (`device=`) the verdict `fits` is decided by the
compiled figure only when the compile ran on that accelerator, else by the analytic estimate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import Optional, Sequence

GIB = 2 ** 30

# Per-chip memory in GiB as the runtime reports it (nvidia-smi's total, JAX's bytes_limit), not the
# marketing figure: the "80GB" H100 and A100 show 79.6 / 79.3 GiB, the A100 "40GB" 39.6 GiB, the
# H200's "141 GB" 140.4 GiB of which about 139 GiB is usable beside the CUDA context. TPUs: HBM per
# chip from Google's system-architecture pages (v4 32 GiB, v5e 16, v5p 95, v6e/Trillium 32).
ACCELERATORS: dict[str, float] = {
    "h100": 79.6, "h200": 139.0, "a100-80": 79.3, "a100-40": 39.6,
    "v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0,
}
ALIASES = {"a100": "a100-80", "tpu-v4": "v4", "tpu-v5e": "v5e", "tpu-v5p": "v5p", "tpu-v6e": "v6e", "trillium": "v6e"}
# How each names itself in `jax.Device.device_kind` (regular expressions searched in its lowercase):
# decides whether a compile ran on it. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "TPU v5 lite"
# (v5e), "TPU v5p" or plain "TPU v5" (v5p), "TPU v6 lite" (v6e).
DEVICE_KINDS: dict[str, str] = {
    "h100": r"h100", "h200": r"h200", "a100-80": r"a100.*80g", "a100-40": r"a100.*40g", "v4": r"tpu v4",
    "v5e": r"tpu v5 ?(lite|e)", "v5p": r"tpu v5p|tpu v5$", "v6e": r"tpu v6|trillium",
}
GPUS = ("h100", "h200", "a100-80", "a100-40")
# JAX preallocates this share of a GPU's memory and never grows past it; XLA_PYTHON_CLIENT_MEM_FRACTION
# (read, when set, from the planner's environment) changes it. TPUs give the runtime all of their HBM.
GPU_MEM_FRACTION = 0.75
# Kept free beyond the step's own buffers: allocator fragmentation, cuDNN/cuBLAS workspaces, the
# runtime's own buffers and collectives' scratch.
HEADROOM = 0.05


def accelerator(name: str) -> str:
    """The key of `ACCELERATORS` a user's name means (case and a 'tpu' prefix ignored)."""
    from pjlm.errors import ConfigError

    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    key = ALIASES.get(key, key)
    if key not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator {name!r} for --device; choose one of {', '.join(ACCELERATORS)}")
    return key


def usable_gib(key: str) -> float:
    """What a step may use on one chip: its memory × JAX's GPU preallocation share × (1 − HEADROOM)."""
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION)) if key in GPUS else 1.0
    return ACCELERATORS[key] * fraction * (1 - HEADROOM)


def _verdict(record: dict, device: str) -> dict:
    """Whether the step fits `device`: by the compiled total when the compile ran on that kind of
    chip, else by the analytic one; PPO adds the reference it keeps beside the update step and
    takes the larger of its two steps."""
    key = accelerator(device)
    compiled_here = re.search(DEVICE_KINDS[key], record["device_kind"].lower()) is not None
    extra = record.get("resident_gib", 0.0)
    if compiled_here:
        required = max([record["total_gib"] + extra] + [s["total_gib"] for s in record.get("other_steps", {}).values()])
    else:
        required = record["analytic"]["total_gib"] + extra
    usable = usable_gib(key)
    return {"device": key, "device_memory_gib": ACCELERATORS[key], "usable_gib": usable, "required_gib": required,
            "fits": required <= usable, "decided_by": "compiled" if compiled_here else "analytic"}


def plan(config, *, device: Optional[str] = None, n_devices: Optional[int] = None, fit: bool = False) -> dict:
    """Plan `config.train.phase`'s step on this process's first `n_devices` devices (all of them by
    default; the mesh must fit them). Returns one record, per device, in GiB:

    `device_kind`, `n_devices`, `phase`, `mesh` (axis sizes), `rows` and `seq_len` of the planned
    batch, `n_params`; XLA's `arguments_gib`, `temporaries_gib`, `outputs_gib` and `alias_gib` (the
    outputs written into donated arguments), and `total_gib` = arguments + temporaries + outputs −
    alias: the step's peak footprint, each donated buffer counted once; `analytic`
    (`plan_memory.estimate`); `flops_per_token` (`plan_memory.step_flops`). PPO adds `other_steps`
    (the rollout statistics' figures), `rollout_flops_per_token`, and `resident_gib` (the reference
    tree it keeps beside the update step, without LoRA). With `device` (a name `accelerator` knows):
    `device_memory_gib`, `usable_gib`, `required_gib`, `fits` and `decided_by` ("compiled" when the
    compile ran on that accelerator, else "analytic"). With `fit`: `fit`, `pjlm.fit.report` — whether
    the step fits one device (`device`'s usable memory, else this machine's) and, when it does not,
    the settings that would, each compiled."""
    import jax
    from pjlm import plan_memory as pm
    from pjlm import sharding
    from pjlm.errors import ConfigError

    config.validate()
    if device is not None:
        accelerator(device)
    devices = jax.devices()
    if n_devices is not None:
        if n_devices > len(devices):
            raise ConfigError(f"{n_devices} devices asked for, but this process has {len(devices)} "
                              f"({devices[0].device_kind}); `pjlm plan` runs the compile on fake devices")
        devices = devices[:n_devices]
    mesh = sharding.make_mesh(config.mesh, devices)
    sizes = sharding.mesh_sizes(mesh)
    sharding.check_divides_mesh(config.model, sizes)
    sharding.check_batch_divides_mesh(config.data.batch_size, sizes, "data.batch_size")
    steps, shapes = pm.build_steps(config, mesh)
    figures = [pm.compiled_memory(step, mesh) for step in steps]
    policy = shapes.states[0]
    record = {"device_kind": devices[0].device_kind, "n_devices": len(devices), "phase": config.train.phase,
              "mesh": sizes, "rows": shapes.rows, "seq_len": shapes.length,
              "n_params": pm.param_count(policy.params) + pm.param_count(policy.frozen), **figures[0],
              "analytic": pm.estimate(config, shapes, mesh), **pm.step_flops(config, shapes)}
    if len(steps) > 1:
        record["other_steps"] = {step.name: f for step, f in zip(steps[1:], figures[1:])}
    if shapes.reference is not None and not shapes.reference_is_argument:
        record["resident_gib"] = pm.shard_bytes(shapes.reference) / GIB
    if device is not None:
        record.update(_verdict(record, device))
    if fit:
        from pjlm import fit as fit_lib

        limit = None if device is None else fit_lib.Limit(usable_gib(accelerator(device)) * GIB,
                                                          f"{accelerator(device)}'s usable memory")
        record["fit"] = fit_lib.report(config, mesh, pm.row_length(config), limit)
    return record


PROBE_EXIT = 3  # the child found fewer devices of this machine's own kind than asked for


def plan_subprocess(config_path: str, overrides: Sequence[str] = (), devices: Optional[int] = None,
                    device: Optional[str] = None, fit: bool = False) -> list[dict]:
    """`plan` of an experiment file (with `--set` overrides) in a child process: on `devices` of
    this machine's accelerators when it has that many, else on `devices` fake CPU devices (None:
    whatever devices the machine has). Returns the child's records, one per device kind (one).
    A config error — the file's, or a mesh that does not fit `devices` — raises `ConfigError`
    here, before any child starts."""
    from pjlm.cli import load_config
    from pjlm.config import MeshConfig, check_batch_divides_mesh, check_divides_mesh
    from pjlm.errors import ConfigError

    config = load_config(config_path, overrides)
    if device is not None:
        accelerator(device)
    args = [sys.executable, "-m", "pjlm.plan", str(config_path), *[f"--set={o}" for o in overrides]]
    args += ["--device", device] if device is not None else []
    args += ["--fit"] if fit else []
    env = dict(os.environ)
    if devices is None:
        return _child(args, env)
    if devices < 1:
        raise ConfigError(f"--devices {devices}: give a positive number of devices")
    sizes = dict(zip(MeshConfig.AXES, config.mesh.resolve(devices)))
    check_divides_mesh(config.model, sizes)
    check_batch_divides_mesh(config.data.batch_size, sizes, "data.batch_size")
    args += ["--devices", str(devices)]
    if _may_have_accelerators(env):  # compile on them if there are enough; never preallocate their memory
        records = _child(args + ["--probe"], {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
        if records is not None:
            return records
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    env.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(), JAX_PLATFORMS="cpu")
    return _child(args, env)


def _may_have_accelerators(env: dict) -> bool:
    """Whether JAX could start on an accelerator here (a PJRT plugin or libtpu is installed), told
    without starting it: starting a backend in this process would hold the device."""
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    plugins = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
    return any(importlib.util.find_spec(m) is not None for m in plugins)


def _child(args: list[str], env: dict) -> Optional[list[dict]]:
    """Run the planner's child; its records, or None when it had too few devices (`--probe`)."""
    from pjlm.errors import ConfigError, PjlmError

    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode == PROBE_EXIT and "--probe" in args:
        return None
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 2 and lines and "error" in lines[-1]:
        raise (ConfigError if lines[-1].get("config_error") else PjlmError)(lines[-1]["error"])
    if proc.returncode != 0:
        raise RuntimeError(f"the planner's child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return lines


def _rounded(record: dict) -> dict:
    """GiB figures to 6 significant digits (KiB at 1 GiB)."""
    return {k: _rounded(v) if isinstance(v, dict) else float(f"{v:.6g}") if k.endswith("_gib") else v
            for k, v in record.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child process: plan one experiment file here and print its record as one JSON line (a
    user's mistake: {"error": ...} and exit 2)."""
    ap = argparse.ArgumentParser(prog="python -m pjlm.plan", description="Plan a step's memory on this process's "
                                 "devices (`pjlm plan` runs this in a child process).")
    ap.add_argument("config", help="an experiments/*.py file defining get_config()")
    ap.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    ap.add_argument("--device", default=None, help=f"say whether it fits one of: {', '.join(ACCELERATORS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--fit", action="store_true", help="also say whether the step fits and which settings would")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from pjlm.cli import load_config
    from pjlm.errors import ConfigError, PjlmError

    try:
        config = load_config(args.config, args.set)
        if args.probe:
            import jax

            if jax.device_count() < args.devices:
                return PROBE_EXIT
        record = plan(config, device=args.device, n_devices=args.devices, fit=args.fit)
    except PjlmError as e:
        print(json.dumps({"error": " ".join(str(e).split()), "config_error": isinstance(e, ConfigError)}))
        return 2
    print(json.dumps(_rounded(record)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
