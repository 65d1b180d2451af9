"""Atomic file writes: a reader (or a re-run after a crash) sees the old file or the new one, never
half of one. Every file pjlm rewrites in place goes through here. And `local_path`: where a path or a
`file://` URL a user gave points on this machine."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import uuid
from pathlib import Path
from typing import IO, Iterator, Optional

from pjlm.errors import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(path: str | os.PathLike) -> Optional[str]:
    """The scheme of a URL such as file:///data or gs://bucket/run (lower case); None for a plain path."""
    m = _SCHEME.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def local_path(path: str | os.PathLike, what: str = "path") -> Path:
    """The local path a plain path or a `file://` URL names (file:///abs/dir → /abs/dir; percent
    escapes decoded). Any other URL (gs://, s3://, …) is refused with a ConfigError naming `what`:
    pjlm reads and writes work directories and checkpoints through local paths."""
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
    raise ConfigError(f"{what}={text!r}: {scheme}:// storage is not supported; pjlm reads and writes through local "
                      "paths, so mount the bucket (e.g. with gcsfuse) on every host and pass the mount point")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """`with atomic_file(path) as f:` — write `f` (binary); on success it replaces `path` at once
    (flushed to disk first); on an error `path` is untouched and the partial file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
