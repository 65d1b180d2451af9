"""The work directory's guarantees: one owner at a time, one experiment per directory.

- `Lease`: a run holds `lease.json` (host, pid, start time, last refresh), refreshed by a thread
  every tenth of `train.lease_timeout_s`. A second run on a live directory stops at once naming the
  holder. A lease not refreshed within the timeout is stale and is taken over with a message; on the
  same host a holder whose pid is gone is stale at once. Staleness is judged from the refresh time
  the holder wrote, so hosts sharing a file system need roughly synchronised clocks (NTP), never a
  pid check on another host. On remote storage (gs://) the lease is an object read and written whole:
  a first start writes it and reads it back after a moment, as a take-over does, so of two runs
  starting at once the last writer keeps it and the other stops.
- `RunRecord` (`run.json`): what defines the run, written at its first start — every config field
  (classified in `pjlm.config_rules.RESUME`), the tokenizer and data fingerprints, and the
  checkpoints it reads (`train.init_from`, `preference.reference`, `ppo.reward_model`) resolved to
  the step they had then.
  A resume compares against it: a changed *refuse* field stops with a diff unless the caller allows
  it; *warn* fields are printed; every change is appended to the record's history. The pinned
  steps are used for as long as the run lives, so a reference that moved on never leaks in.
- `config.json` is rewritten at each start with the resolved config; the one it replaces is
  appended to `config_history.jsonl` first.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from pjlm import checkpoint as ckpt_lib
from pjlm.config_rules import RESUME, field_values
from pjlm.errors import CheckpointError, ConfigError, WorkdirBusyError
from pjlm import fileio
from pjlm.fileio import write_atomic

LEASE_FILE = "lease.json"
RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
_HELD: set[str] = set()  # tokens of the leases this process holds


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Lease:
    """`with Lease(workdir, timeout_s):` holds the work directory for this run (a no-op when
    `enabled` is False, e.g. on processes other than 0). `lost` turns true if another run took the
    lease over (this one was presumed dead): the loop then refuses to save."""

    def __init__(self, workdir: Path, timeout_s: float = 300.0, *, enabled: bool = True):
        self.path = fileio.location(workdir, "workdir") / LEASE_FILE
        self.timeout_s = float(timeout_s)
        self.enabled = enabled
        self.lost = False
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = _now_iso()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started,
                "refreshed": time.time(), "token": self._token}

    def __enter__(self) -> "Lease":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        _HELD.add(self._token)
        self._thread = threading.Thread(target=self._refresh_loop, name="pjlm-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self._token)
        holder = self._read()
        if holder is not None and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def _read(self) -> Optional[dict]:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: judged by the file's age below

    def _acquire(self) -> None:
        if fileio.is_remote(self.path):  # no exclusive create on an object store: write, then read back
            if self._read() is not None:
                self._take_over()
            else:
                self._claim("started at the same moment")
            return
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
            return
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._record()))

    def _claim(self, race: str) -> None:
        write_atomic(self.path, json.dumps(self._record()))
        time.sleep(0.05)  # two runs claiming at once: the last writer wins, the other stops here
        if (self._read() or {}).get("token") != self._token:
            raise WorkdirBusyError(f"another run {race} in {self.path.parent}; use another --workdir or retry")

    def _take_over(self) -> None:
        holder = self._read() or {}
        reason = self._stale_reason(holder)
        if reason is None:
            age = time.time() - float(holder.get("refreshed", 0))
            raise WorkdirBusyError(
                f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"started {holder.get('started')}, lease refreshed {age:.0f}s ago); wait for it to finish, stop it, "
                f"or use another --workdir (a lease not refreshed for {self.timeout_s:.0f}s is taken over)")
        print(f"pjlm: taking over the work directory {self.path.parent} from host {holder.get('host')} pid "
              f"{holder.get('pid')} ({reason})", file=sys.stderr)
        self._claim("took it over at the same moment")

    def _stale_reason(self, holder: dict) -> Optional[str]:
        if not holder:
            age = time.time() - fileio.mtime(self.path)
            return f"its lease file is unreadable and {age:.0f}s old" if age > self.timeout_s else None
        age = time.time() - float(holder.get("refreshed", 0))
        if age > self.timeout_s:
            return f"its lease was last refreshed {age:.0f}s ago, beyond train.lease_timeout_s={self.timeout_s:g}"
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid == os.getpid():
                if holder.get("token") not in _HELD:
                    return "left by an earlier run in this process"
            elif not _pid_alive(pid):
                return f"process {pid} on this host is gone"
        return None

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 10):
            holder = self._read()
            if holder and holder.get("token") != self._token:
                self.lost = True
                return
            try:
                write_atomic(self.path, json.dumps(self._record()))
            except OSError as e:  # a full or unreachable disk: the next refresh tries again
                print(f"pjlm: could not refresh the lease {self.path}: {e}", file=sys.stderr)

    def check(self) -> None:
        """Raise if another run has taken this lease over (called before each save)."""
        if self.lost:
            holder = self._read() or {}
            raise WorkdirBusyError(f"another run (host {holder.get('host')}, pid {holder.get('pid')}) took over "
                                   f"{self.path.parent} while this one was running (its lease had looked stale); "
                                   "this run stops without saving. Raise train.lease_timeout_s if the disk is slow")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# What defines a run
# ---------------------------------------------------------------------------------------------

def file_fingerprint(paths: list[str]) -> str:
    """sha256 over the bytes of local files (in order), or the names themselves for Hub datasets."""
    h = hashlib.sha256()
    for name in paths:
        p = _data_file(name)
        h.update(name.encode() if p is None else b"")
        if p is not None:
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _data_file(name: str):
    """The local file `name` names (a path, a file:// URL, or a remote URL: its cached copy, which the
    run reads too), or None (a Hub dataset's name)."""
    try:
        p = fileio.location(name, "data.source")
    except ConfigError:
        return None
    if not p.is_file():
        return None
    return fileio.fetch(p, "data.source")


def tokenizer_identity(tokenizer) -> str:
    """The tokenizer's fingerprint, and its chat template's when it has one (a changed template
    renders the same conversations into other tokens)."""
    template = getattr(tokenizer, "chat_template", None)
    suffix = f"+template:{hashlib.sha256(template.encode()).hexdigest()[:12]}" if template else ""
    return tokenizer.fingerprint() + suffix


def data_fingerprint(data_cfg) -> str:
    """The training and held-out data's identity: file contents for local files, names otherwise."""
    sources = [s.strip() for s in data_cfg.source.split(",")]
    evals = [s.strip() for s in (data_cfg.eval_source or "").split(",") if s.strip()]
    return file_fingerprint(sources + ["--eval--"] + evals)


def pin_checkpoint(path: Optional[str]) -> Optional[dict]:
    """A checkpoint reference resolved now: {"given", "directory", "step", "path"} (path = the step's folder)."""
    if not path:
        return None
    directory, step = ckpt_lib.resolve_checkpoint(path)
    return {"given": str(path), "directory": str(directory), "step": step, "path": str(directory / str(step))}


def reward_model_paths(rewards) -> dict[str, str]:
    """{"ppo.rewards[i]": path} for each learned reward component of `ppo.rewards` that names its own
    checkpoint (`model:W:path=DIR`); the others read `ppo.reward_model`."""
    from pjlm.rewards import parse_reward_spec

    specs = [parse_reward_spec(text) for text in rewards]
    return {f"ppo.rewards[{i}]": str(s["path"]) for i, s in enumerate(specs) if s["kind"] == "model" and s.get("path")}


def resolve_pins(config) -> dict:
    """The checkpoints a run reads, each resolved to its step now (see `pin_checkpoint`)."""
    ppo, dpo = config.train.phase == "ppo", config.train.phase == "dpo"
    pins = {"train.init_from": pin_checkpoint(config.train.init_from),
            "preference.reference": pin_checkpoint(config.preference.reference) if dpo else None,
            "ppo.reward_model": pin_checkpoint(config.ppo.reward_model) if ppo else None}
    if ppo:
        pins.update({key: pin_checkpoint(path) for key, path in reward_model_paths(config.ppo.rewards).items()})
    return pins


def check_pin(name: str, pin: Optional[dict]) -> Optional[str]:
    """The pinned step's folder, or a CheckpointError when that step no longer exists."""
    if pin is None:
        return None
    if not (fileio.location(pin["path"], name) / "params").exists():
        raise CheckpointError(
            f"{name}={pin['given']} was pinned at this run's first start to step {pin['step']} "
            f"({pin['path']}), which no longer exists (that run kept only its newest checkpoints); restore it, "
            f"or start a new --workdir")
    return pin["path"]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _definition(config) -> dict:
    values = _plain(field_values(config))
    paths = ("train.init_from", "preference.reference", "ppo.reward_model", "data.tokenizer")
    for key in paths:  # paths compare by what they name
        if values.get(key):
            values[key] = str(fileio.location(values[key], key))
    return values


def _diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


class RunRecord:
    """`run.json` of a work directory: the run's definition at its first start, its pins, and history."""

    def __init__(self, workdir: Path, data: dict):
        self.workdir, self.data = workdir, data

    @property
    def pins(self) -> dict:
        return self.data["pins"]

    @classmethod
    def open(cls, workdir: Path, config, *, has_checkpoint: bool, allow_config_change: bool,
             is_main: bool) -> "RunRecord":
        """The record of a resumed run (checked against `config`), or a new one for a first start."""
        path = workdir / RUN_FILE
        definition = _definition(config)
        if has_checkpoint and path.exists():
            record = cls(workdir, json.loads(path.read_text()))
            record._check_config(definition, allow_config_change)
            return record
        data = {"created": _now_iso(), "definition": definition, "pins": resolve_pins(config), "history": []}
        if has_checkpoint:  # a work directory from before run.json existed: recorded from now on
            data["history"].append({"time": _now_iso(), "note": "run.json created on a resume"})
        record = cls(workdir, data)
        if is_main:
            record.save()
        return record

    def save(self) -> None:
        write_atomic(self.workdir / RUN_FILE, json.dumps(self.data, indent=2))

    def _check_config(self, definition: dict, allow: bool) -> None:
        changes = _diff(self.data["definition"], definition)
        if not changes:
            return
        refused = {k: v for k, v in changes.items() if RESUME.get(k, "refuse") == "refuse"}
        if refused and not allow:
            lines = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in refused.items())
            raise ConfigError(f"{self.workdir} holds a run that this config does not continue ({lines}); resume "
                              "with the run's config, use a new --workdir, or pass --allow-config-change "
                              "(allow_config_change=True) to record the change and go on")
        warned = {k: v for k, v in changes.items() if RESUME.get(k) == "warn" or k in refused}
        for k, (old, new) in warned.items():
            print(f"pjlm: resuming {self.workdir.name} with {k} changed: {old!r} → {new!r}", file=sys.stderr)
        self.data["history"].append({"time": _now_iso(), "changes": {k: [o, n] for k, (o, n) in changes.items()},
                                     "forced": sorted(refused)})
        self.data["definition"] = definition
        for key in ("train.init_from", "ppo.reward_model"):  # a forced new source is pinned afresh
            if key in refused:
                self.pins[key] = pin_checkpoint(definition.get(key))
        if "preference.reference" in refused:
            dpo = definition.get("train.phase") == "dpo"
            self.pins["preference.reference"] = pin_checkpoint(definition["preference.reference"]) if dpo else None
        if "ppo.rewards" in refused and definition.get("train.phase") == "ppo":
            for key in [k for k in self.pins if k.startswith("ppo.rewards[")]:
                del self.pins[key]
            self.pins.update({key: pin_checkpoint(path)
                              for key, path in reward_model_paths(definition["ppo.rewards"]).items()})

    def check_fingerprints(self, tokenizer: str, data: str, allow: bool) -> None:
        """At the first start record the tokenizer and data fingerprints; on a resume refuse a change."""
        for key, value in (("tokenizer", tokenizer), ("data", data)):
            old = self.data.setdefault("fingerprints", {}).get(key)
            if old is not None and old != value and not allow:
                what = {"tokenizer": "data.tokenizer", "data": "the contents of data.source / data.eval_source"}[key]
                raise ConfigError(f"{self.workdir} was trained with {key} fingerprint {old}, but this start has "
                                  f"{value}: {what} changed. Resume with the original, use a new --workdir, or pass "
                                  "--allow-config-change")
            if old is not None and old != value:
                self.data["history"].append({"time": _now_iso(), "changes": {f"fingerprint.{key}": [old, value]},
                                             "forced": [f"fingerprint.{key}"]})
            self.data["fingerprints"][key] = value


def write_config(workdir: Path, meta: dict) -> None:
    """config.json ← the resolved config; a different previous one is appended to config_history.jsonl."""
    path = workdir / CONFIG_FILE
    text = json.dumps(meta, indent=2, default=str)
    if path.exists():
        old = path.read_text()
        try:
            changed = json.loads(old).get("config") != json.loads(text).get("config")
        except ValueError:
            changed = True
        if changed:
            fileio.append_text(workdir / CONFIG_HISTORY_FILE,
                               json.dumps({"replaced": _now_iso(), "previous": old}) + "\n")
    write_atomic(path, text)
