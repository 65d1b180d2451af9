"""Whether a run's train step fits its device's memory, decided before anything is allocated.

A run compiles its step from abstract arrays (`pjlm.plan_memory.build_steps`: `jax.ShapeDtypeStruct`s
only) at the longest row its data reaches, and compares XLA's memory analysis of it — state,
batch, temporaries, per device — with what one device may use (`memory_limit`: an accelerator's
`bytes_limit`; on the CPU the host's available memory shared by its local devices; or
`train.memory_limit_gib`). The pretrain/sft/reward/dpo loop then runs that very compiled step, so
the check costs no second compile.

When the step does not fit, `train.fit` decides: `check` stops the run with a `FitError` (exit 2)
whose one line names the figure, the limit and the settings that would fit; `adjust` (the recipes')
first turns on the memory savers the run left off — `train.logprob_chunk` (the [rows, L, V] logits
never exist), then `model.remat=full` — and stops only when even that does not fit. The settings a
`FitError` names are each compiled and checked too (`settings_that_fit`): the memory savers, the
largest batch and the gradient accumulation that keeps the batch, and LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Callable, Optional

import jax

from pjlm.config import Config, LoraConfig
from pjlm.errors import ConfigError

GIB = 2 ** 30
CHUNK = 8192
"""The train.logprob_chunk the savers turn on: 8192 vocabulary columns of the head at a time."""
HEADROOM = 0.05
"""Kept free beyond the step's own buffers (the allocator, the runtime, the data on the host)."""
LORA_RANK = 16
"""The LoRA rank a `FitError` proposes when the run trains every weight."""


class FitError(ConfigError):
    """A train step that does not fit the device's memory; the message names settings that would."""


@dataclasses.dataclass(frozen=True)
class Limit:
    bytes: float
    """What one device may use."""
    source: str
    """Where the figure comes from, in words."""


def _host_available_bytes() -> float:
    """The host's available memory (MemAvailable: free plus what the kernel can reclaim)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):  # not Linux: the free pages
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_limit(config: Config) -> Limit:
    """What one device may use: `train.memory_limit_gib` when set; an accelerator's `bytes_limit`; on
    the CPU the host's available memory over its local devices; each less `HEADROOM`."""
    if config.train.memory_limit_gib is not None:
        return Limit(config.train.memory_limit_gib * GIB, "train.memory_limit_gib")
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return Limit(stats["bytes_limit"] * (1 - HEADROOM), f"{device.device_kind}'s memory")
        return Limit(math.inf, f"{device.device_kind} (it reports no memory limit)")
    n = jax.local_device_count()
    shared = f" shared by {n} devices" if n > 1 else ""
    return Limit(_host_available_bytes() * (1 - HEADROOM) / n, f"the host's available memory{shared}")


def at_length(config: Config, length: int) -> Config:
    """`config` with its rows `length` tokens long: packed rows' seq_len, or the one bucket unpacked
    rows are padded to (PPO keeps its prompt buckets and response budget)."""
    d, phase = config.data, config.train.phase
    if phase == "ppo":
        return config
    if phase == "pretrain" or (phase == "sft" and d.pack):
        return dataclasses.replace(config, data=dataclasses.replace(d, seq_len=length))
    return dataclasses.replace(config, data=dataclasses.replace(d, buckets=(length,)))


CLEARLY_OVER = 1.5
"""A step whose analytic estimate (`plan_memory.estimate`, within about ±20% of the compiled figure)
exceeds the limit this many times over is known not to fit without compiling it."""
CLEARLY_UNDER = 0.5
"""A PPO step estimated under this share of the limit is known to fit without compiling it (PPO's
loop compiles its own steps, so the check's compile would be a second one)."""


@dataclasses.dataclass
class Planned:
    bytes: float
    """Per-device bytes of the step(s): the larger of PPO's update step with the reference it keeps
    beside it, and its rollout statistics."""
    how: str
    """"compiled" (XLA's memory analysis) or "estimated" (`plan_memory.estimate`)."""
    steps: Optional[list] = None
    """The planned steps when compiled (the first, the train step, ready to run)."""


def plan(config: Config, mesh, limit: Optional[float] = None) -> Planned:
    """`config`'s step(s) at its longest row: compiled, unless `limit` is given and the analytic
    estimate alone decides against it (`CLEARLY_OVER`; for PPO also `CLEARLY_UNDER`)."""
    from pjlm import plan_memory as pm

    steps, shapes = pm.build_steps(config, mesh)
    resident = 0.0
    if shapes.reference is not None and not shapes.reference_is_argument:
        resident = pm.shard_bytes(shapes.reference)
    if limit is not None:
        estimated = pm.estimate(config, shapes, mesh)["total_gib"] * GIB + resident
        if estimated > CLEARLY_OVER * limit or (config.train.phase == "ppo" and estimated < CLEARLY_UNDER * limit):
            return Planned(estimated, "estimated")
    totals = [pm.compiled_memory(step, mesh)["total_gib"] * GIB for step in steps]
    return Planned(max([totals[0] + resident, *totals[1:]]), "compiled", steps)


def planned_bytes(config: Config, mesh) -> float:
    """The compiled per-device bytes of `config`'s step(s) (`plan`)."""
    return plan(config, mesh).bytes


def savers(config: Config) -> list[tuple[str, Callable[[Config], Config]]]:
    """The memory savers `config` leaves off, cheapest first: chunked log-probs (when the head is a
    language model's large vocabulary without a softcap), then full rematerialisation."""
    out = []
    c = config.model
    if (config.train.phase in ("pretrain", "sft", "dpo") and config.train.logprob_chunk == 0 and c.vocab_size > CHUNK
            and c.final_softcap is None):
        out.append((f"train.logprob_chunk={CHUNK}", lambda cfg: dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, logprob_chunk=CHUNK))))
    if c.remat != "full":
        out.append(("model.remat=full", lambda cfg: dataclasses.replace(cfg, model=cfg.model.replace(remat="full"))))
    return out


def _with_all(config: Config, chosen) -> Config:
    for _, apply in chosen:
        config = apply(config)
    return config


def _divisor(config: Config, mesh) -> int:
    from pjlm import sharding

    sizes = sharding.mesh_sizes(mesh)
    return sizes.get("data", 1) * sizes.get("fsdp", 1)


def _with_batch(config: Config, batch: int) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=batch))


def _fits(config: Config, mesh, limit: float) -> Optional[float]:
    """The compiled bytes of `config`'s step when it fits `limit`, else None."""
    p = plan(config, mesh, limit)
    return p.bytes if p.bytes <= limit else None


def _largest_batch(config: Config, mesh, limit: float, need: float) -> Optional[tuple[int, float]]:
    """The largest data.batch_size (a multiple of the mesh's data×fsdp) whose step fits `limit`, with
    its compiled bytes (`need`: the bytes at `config`'s batch): memory is affine in the batch, so one
    more compile places it and one or two confirm it. None when even the smallest batch does not fit."""
    div, B = _divisor(config, mesh), config.data.batch_size
    if B <= div:
        return None
    half = max(div, (B // 2) // div * div)
    need_half = planned_bytes(_with_batch(config, half), mesh)
    if need_half > limit and half == div:
        return None
    per_row = max((need - need_half) / (B - half), 1.0)
    guess = min(int((limit - (need - per_row * B)) // per_row) // div * div, B - div)
    for candidate in (guess, guess - div):
        if candidate < div:
            return None
        got = need_half if candidate == half else planned_bytes(_with_batch(config, candidate), mesh)
        if got <= limit:
            return candidate, got
    return None


def _accumulation(batch: int, micro: int, div: int) -> Optional[int]:
    """The fewest gradient-accumulation steps k that split `batch` into micro-batches of at most `micro`
    rows, each a multiple of `div`."""
    for k in range(2, batch // div + 1):
        if batch % k == 0 and (batch // k) % div == 0 and batch // k <= micro:
            return k
    return None


def settings_that_fit(config: Config, mesh, limit: float) -> list[dict]:
    """Settings under which `config`'s step fits `limit` bytes per device, each compiled and checked:
    the memory savers, as many as needed; the largest batch and the gradient accumulation that keeps
    the batch; LoRA of rank `LORA_RANK` when every weight trains. The batch and LoRA are tried alone
    first, then on top of every saver. Each item: {"set": ["section.field=value", ...], "gib": compiled
    GiB per device, "note": words or ""}."""
    out, chosen = [], []
    for saver in savers(config):
        chosen.append(saver)
        got = _fits(_with_all(config, chosen), mesh, limit)
        if got is not None:
            out.append({"set": [s for s, _ in chosen], "gib": got / GIB, "note": ""})
            break
    bases = [(config, [])] + ([(_with_all(config, chosen), [s for s, _ in chosen])] if chosen else [])
    if config.train.phase != "ppo":
        for base, sets in bases:
            largest = _largest_batch(base, mesh, limit, planned_bytes(base, mesh))
            if largest is None:
                continue
            B, (micro, got) = config.data.batch_size, largest
            out.append({"set": [*sets, f"data.batch_size={micro}"], "gib": got / GIB, "note": "the largest batch"})
            k = _accumulation(B, micro, _divisor(config, mesh))
            accum = None if k is None else _fits(
                dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, grad_accum=k)), mesh, limit)
            if accum is not None:
                out.append({"set": [*sets, f"optimizer.grad_accum={k}"], "gib": accum / GIB,
                            "note": f"keeps the batch of {B}"})
            break
    if config.lora is None and config.train.init_from:
        for base, sets in bases:
            got = _fits(dataclasses.replace(base, lora=LoraConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK)), mesh, limit)
            if got is not None:
                out.append({"set": [*sets, f"lora.rank={LORA_RANK}", f"lora.alpha={2 * LORA_RANK}"],
                            "gib": got / GIB, "note": "LoRA adapters on the frozen weights"})
                break
    return out


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def _rows_words(config: Config, length: int) -> str:
    unit = {"reward": "pairs", "dpo": "pairs", "ppo": f"prompts × {config.ppo.group_size} samples"}.get(
        config.train.phase, "rows")
    return f"{config.data.batch_size} {unit} × {length} tokens"


def message(config: Config, length: int, need: Planned, limit: Limit, settings: list[dict]) -> str:
    """The one line a run that does not fit stops with."""
    what = (f"the {config.train.phase} step needs {_size(need.bytes)} per device at {_rows_words(config, length)} "
            f"({need.how}), but a device may use {_size(limit.bytes)} ({limit.source})")
    if not settings:
        return (f"{what}; none of the settings pjlm tries fits (memory savers, a smaller batch, LoRA): use more "
                "devices (mesh), shorter rows (data.seq_len) or a smaller model")
    tried = "; ".join(f"--set {' --set '.join(s['set'])} ({_size(s['gib'] * GIB)}{', ' + s['note'] if s['note'] else ''})"
                      for s in settings)
    return f"{what}. Settings that fit: {tried}"


def agreed_limit(config: Config) -> Limit:
    """`memory_limit`, the smallest over the run's processes (every process takes the same decision)."""
    limit = memory_limit(config)
    if jax.process_count() == 1:
        return limit
    import numpy as np
    from pjlm import sharding

    smallest = float(sharding.all_rows(np.array([[limit.bytes]], np.float32)).min())
    return limit if smallest >= limit.bytes else Limit(smallest, f"{limit.source}, the least of the processes'")


def report(config: Config, mesh, length: int, limit: Optional[Limit] = None) -> dict:
    """What `--fit` prints: the step's compiled GiB per device at rows of `length` tokens, the limit
    (`memory_limit` unless given), whether it fits, and when it does not the settings that would."""
    config = at_length(config, length)
    limit = limit or agreed_limit(config)
    need = plan(config, mesh)
    fits = need.bytes <= limit.bytes
    return {"phase": config.train.phase, "rows": _rows_words(config, length), "required_gib": need.bytes / GIB,
            "limit_gib": limit.bytes / GIB, "limit_source": limit.source, "fits": fits,
            "settings_that_fit": [] if fits else settings_that_fit(config, mesh, limit.bytes)}


def fitted(config: Config, mesh, length: int) -> tuple[Config, Optional[Planned]]:
    """`config` checked to fit at rows of `length` tokens (see the module docstring), with memory
    savers turned on where `train.fit=adjust` needs them, and the plan that fits (its steps, when
    compiled, ready to run; None with `train.fit=off`). Raises `FitError`."""
    if config.train.fit == "off":
        return config, None
    limit = agreed_limit(config)
    planned = at_length(config, length)
    need = plan(planned, mesh, limit.bytes)
    if need.bytes <= limit.bytes:
        return config, need
    if config.train.fit == "adjust":
        chosen: list = []
        for saver in savers(config):
            chosen.append(saver)
            adjusted = plan(_with_all(planned, chosen), mesh, limit.bytes)
            if adjusted.bytes <= limit.bytes:
                if jax.process_index() == 0:
                    print(f"pjlm: the step needs {_size(need.bytes)} per device at {_rows_words(config, length)} "
                          f"({need.how}), over the {_size(limit.bytes)} a device may use ({limit.source}); "
                          f"train.fit=adjust turned on {' and '.join(s for s, _ in chosen)} "
                          f"({_size(adjusted.bytes)}, {adjusted.how})", file=sys.stderr, flush=True)
                return _with_all(config, chosen), adjusted
    if need.how != "compiled":
        need = plan(planned, mesh)
    raise FitError(message(planned, length, need, limit, settings_that_fit(planned, mesh, limit.bytes)))


def out_of_memory(error: BaseException) -> bool:
    """Whether an exception is XLA running out of device memory."""
    return "RESOURCE_EXHAUSTED" in str(error)


def explain_out_of_memory(config: Config, mesh, length: int) -> FitError:
    """The `FitError` of a step that ran out of memory although the check let it start: its compiled
    figure, and settings that fit in 90% of it (the device had less than the check believed)."""
    planned = at_length(config, length)
    limit = agreed_limit(config)
    need = plan(planned, mesh)
    within = Limit(min(limit.bytes, 0.9 * need.bytes), f"{limit.source}; it ran out at {_size(need.bytes)}")
    return FitError("out of memory while running: " + message(planned, length, need, within,
                                                                settings_that_fit(planned, mesh, within.bytes)))
