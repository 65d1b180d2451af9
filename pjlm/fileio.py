"""Where pjlm reads and writes: local paths, `file://` URLs, and remote storage (gs://, …).

`location(where)` turns what a user gave (a work directory, `train.init_from`, a data file) into a
path object: a `pathlib.Path` (absolute) for a local path or a `file://` URL, an `etils.epath.Path`
for a URL of a scheme epath knows (gs://, s3://, … and any registered with
`epath.register_path_cls`). Both have the pathlib API pjlm uses (read_text, write_bytes, exists,
iterdir, mkdir, unlink, …), so the code that reads and writes the small files of a run is the same
for both. What differs on an object store, which cannot append and where a rename is a copy, is here:

- `write_atomic` / `atomic_file`: a reader (or a re-run after a crash) sees the old file or the new
  one, never half of one. Local: a temporary file renamed over the old one; remote: one object write,
  which is atomic there. Every file pjlm rewrites in place goes through them.
- `append_text`: local: an append; remote: the object read and written whole (small files only).
- `Staging`: a local directory standing in for a remote one, for files written by appending or by
  libraries that only write local files (metrics.jsonl, TensorBoard events): pulled when it opens,
  pushed on `push()` and at `close()`.
- `fetch`: a local copy of a remote file (data files that `datasets` reads), cached by URL.
- `orbax_path`: what Orbax and TensorStore are given for a checkpoint location: the path itself,
  locally and for gs:// (Orbax's own GCS support: TensorStore's gcs driver, commit markers instead of
  renames); a scheme Orbax cannot write is refused, unless `register_orbax_location` says where its
  objects are also reachable (a test's fake bucket on a local directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import urllib.parse
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Sequence, Union

from pjlm.errors import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_FSSPEC_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
"""epath reaches these schemes through fsspec (when TensorFlow is absent), which needs the package."""
_ORBAX_LOCATIONS: dict[str, Callable[[str], Any]] = {}

Location = Union[Path, Any]
"""A `pathlib.Path` or an `etils.epath.Path` (remote)."""


def url_scheme(path: str | os.PathLike) -> Optional[str]:
    """The scheme of a URL such as file:///data or gs://bucket/run (lower case); None for a plain path."""
    m = _SCHEME.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def local_path(path: str | os.PathLike, what: str = "path") -> Path:
    """The local path a plain path or a `file://` URL names (file:///abs/dir → /abs/dir; percent
    escapes decoded). A remote URL is refused with a ConfigError naming `what`: for what must be on
    this machine (use `location` for what may be remote)."""
    scheme = url_scheme(path)
    if scheme is None:
        return Path(path)
    text = os.fspath(path)
    if scheme == "file":
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{what}={text!r}: a file:// URL names a path on this machine (file:///abs/path "
                              f"or file://localhost/abs/path), not on host {parsed.netloc!r}")
        return Path(urllib.parse.unquote(parsed.path))
    raise ConfigError(f"{what}={text!r}: {scheme}:// is not supported here; {what} must be on this machine "
                      "(a local path or a file:// URL)")


def location(where: str | os.PathLike, what: str = "path") -> Location:
    """The path object for `where`: an absolute `pathlib.Path` for a local path or a file:// URL, an
    `etils.epath.Path` for a remote URL (a path object already remote is returned as is). A scheme
    neither local nor known to epath is refused with a ConfigError naming `what`."""
    if isinstance(where, Path):
        return where.absolute()
    if is_remote(where):
        return where
    text = os.fspath(where)
    scheme = url_scheme(text)
    if scheme is None or scheme == "file":
        return local_path(text, what).absolute()
    from etils import epath

    try:
        path = epath.Path(text)
    except KeyError:
        raise ConfigError(f"{what}={text!r}: pjlm does not know {scheme}:// storage; use a local path, a file:// "
                          "URL, or a URL that etils.epath reads (gs://, s3://, …)") from None
    package = _FSSPEC_PACKAGES.get(scheme)
    if package and importlib.util.find_spec(package) is None and importlib.util.find_spec("tensorflow") is None:
        raise ConfigError(f"{what}={text!r}: {scheme}:// storage needs the {package} package; pip install {package}"
                          + (" (or pip install 'pjlm[gcs]')" if scheme == "gs" else ""))
    return path


def is_remote(path: Any) -> bool:
    """Whether `path` (a path object) is on remote storage: an epath path with a URL scheme."""
    return not isinstance(path, (str, Path)) and url_scheme(os.fspath(path)) not in (None, "file")


def register_orbax_location(scheme: str, to_orbax: Callable[[str], Any]) -> None:
    """Say where Orbax (TensorStore) reaches the objects of `scheme`://: `to_orbax(url)` → a local path
    or a gs:// URL holding the same objects. For schemes Orbax cannot write itself (it writes local
    paths and gs://): a test's fake bucket kept in a local directory, or a bucket also mounted."""
    _ORBAX_LOCATIONS[scheme.lower()] = to_orbax


def orbax_path(path: Location, what: str = "workdir") -> Any:
    """What Orbax and TensorStore are given for checkpoint location `path` (see the module's doc)."""
    if not is_remote(path):
        return path
    text = os.fspath(path)
    scheme = url_scheme(text)
    if scheme in _ORBAX_LOCATIONS:
        return _ORBAX_LOCATIONS[scheme](text)
    if scheme == "gs":
        return path
    raise ConfigError(f"{what}={text!r}: Orbax writes checkpoints to local paths and gs:// only, not {scheme}://; "
                      "put the work directory on one of those")


def mtime(path: Location) -> float:
    """The modification time of a file (seconds since the epoch), local or remote."""
    st = path.stat()
    return float(st.st_mtime if hasattr(st, "st_mtime") else st.mtime or 0)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """`with atomic_file(path) as f:` — write `f` (binary); on success it replaces `path` at once
    (flushed to disk first; remote: one object write); on an error `path` is untouched and the partial
    file removed."""
    path = location(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        buf = io.BytesIO()
        yield buf
        path.write_bytes(buf.getvalue())
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write `rows` as JSON lines to `path` atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    text = location(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` (UTF-8) to `path`, creating it. Remote: the object is read and written whole, so
    only for small files written now and then (histories, superseded rows)."""
    path = location(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = path.read_bytes() if path.exists() else b""
    write_atomic(path, old + text.encode("utf-8"))


def move(src: Location, dst: Location) -> None:
    """Move file or directory `src` to `dst` (whose parent is created). Local: a rename; remote, where
    a rename is a copy anyway: every object copied (server-side where the store can), then `src`
    removed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(src):
        src.rename(dst)
        return
    if not src.is_dir():
        src.copy(dst)
        src.unlink()
        return
    for root, _, files in src.walk():
        rel = os.path.relpath(os.fspath(root), os.fspath(src))
        folder = dst if rel == "." else dst / rel
        folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            (root / name).copy(folder / name)
    src.rmtree()


def cache_dir() -> Path:
    """pjlm's local cache: $PJLM_HOME, else ~/.cache/pjlm."""
    return Path(os.environ.get("PJLM_HOME") or Path.home() / ".cache" / "pjlm")


def fetch(path: str | os.PathLike, what: str = "path") -> Path:
    """A local file with the contents of `path`: the file itself when it is local, else a copy under
    `cache_dir()/remote`, downloaded again when the remote object's size or time differs."""
    path = location(path, what)
    if not is_remote(path):
        return path
    text = os.fspath(path)
    local = cache_dir() / "remote" / hashlib.sha256(text.encode()).hexdigest()[:16] / (path.name or "file")
    st = path.stat()
    stamp = f"{getattr(st, 'length', None)} {mtime(path)}"
    stamp_file = local.with_name(local.name + ".stamp")
    if local.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(local) as f, path.open("rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)
    stamp_file.write_text(stamp)
    return local


class Staging:
    """A local directory standing in for `remote`, for files written by appending or by libraries that
    write only local files. `pull` names files copied from `remote` when it opens (those appended to);
    `push()` uploads every file changed since the last push (whole objects), and `close()` pushes and
    removes the local copy. For a local `remote` the directory is `remote` itself and both do nothing.
    `exclude`: top-level names never pushed (e.g. a library's own local state)."""

    def __init__(self, remote: Location, *, pull: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
        self.remote = remote
        self._exclude = set(exclude)
        self._pushed: dict[str, tuple[int, int]] = {}
        if not is_remote(remote):
            self.local = remote
            return
        self.local = Path(tempfile.mkdtemp(prefix="pjlm-staging-"))
        for name in pull:
            if (remote / name).exists():
                (self.local / name).write_bytes((remote / name).read_bytes())
                self._pushed[name] = self._stamp(self.local / name)

    @staticmethod
    def _stamp(file: Path) -> tuple[int, int]:
        st = file.stat()
        return st.st_size, st.st_mtime_ns

    def push(self) -> None:
        """Upload the files changed since the last push."""
        if self.local is self.remote:
            return
        made: set[str] = set()
        for file in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = file.relative_to(self.local).as_posix()
            if rel.split("/", 1)[0] in self._exclude or self._pushed.get(rel) == (stamp := self._stamp(file)):
                continue
            target = self.remote / rel
            if os.path.dirname(rel) not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(os.path.dirname(rel))
            target.write_bytes(file.read_bytes())
            self._pushed[rel] = stamp

    def close(self) -> None:
        """Push, then drop the local copy; safe to call twice."""
        if self.local is self.remote or not self.local.exists():
            return
        try:
            self.push()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
