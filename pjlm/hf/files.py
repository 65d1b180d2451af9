"""Safetensors shards of a Hugging Face model directory: a lazy reader and a streaming writer.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, "__metadata__"), then the raw little-endian tensor bytes. It is read here through
`np.memmap` rather than `safetensors.safe_open`: `framework="numpy"` cannot hold bfloat16 (most
published checkpoints), and `framework="flax"` materialises each whole tensor on the default device.
A memory-mapped view in any dtype (bfloat16 via `ml_dtypes`) reads from disk only the bytes a
slice of it touches, so each device shard of a large model pulls just its own part.

Nothing in a directory is trusted: the reader opens only files inside it (an index entry or symlink
that leads out is refused), bounds each header, and checks every tensor's dtype, shape and byte range
against its file when it opens the directory. A bad file is an `HFFormatError` naming file and tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from pjlm.errors import HFFormatError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound on a header
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_REDO = "the file is corrupt or truncated: download or save it again"


class MissingWeightsError(HFFormatError, FileNotFoundError):
    """A weight file the directory should hold is absent (still a FileNotFoundError for callers)."""


def inside(directory: Path, name: str | Path, what: str) -> Path:
    """`directory / name` with symlinks followed, refused unless it stays inside `directory` (or, for a
    Hugging Face cache snapshot `<repo>/snapshots/<rev>/`, inside `<repo>/blobs/`, where its links lead).
    `what` says where the name came from, for the message."""
    if Path(name).is_absolute():
        raise HFFormatError(f"{what} is an absolute path; name files relative to {directory}")
    root = directory.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    target = (directory / name).resolve()
    if not any(target.is_relative_to(r) for r in roots):
        raise HFFormatError(f"{what} leads to {target}, outside {directory}; pjlm reads only files inside "
                            "the model directory")
    return target


def read_json(directory: Path, name: str) -> Any:
    """A JSON file of the directory (confined to it); malformed JSON is an `HFFormatError`."""
    file = directory / name
    inside(directory, name, str(file))
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HFFormatError(f"{file} is not valid UTF-8 JSON ({_short(e)}); download or save it again") from None


def shard_files(directory: Path) -> list[Path]:
    """The weight files of an HF model directory: those its index names, else `model.safetensors`,
    else every `*.safetensors` there. Each is checked to exist inside the directory."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_json(directory, INDEX_FILE)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise HFFormatError(f"{index} has no \"weight_map\" object; download or save it again")
        files: dict[Path, Path] = {}  # resolved → as named, so two names for one file read it once
        for tensor, name in weight_map.items():
            what = f"{index}: weight_map entry {_short(tensor)} -> {_short(name)}"
            if not isinstance(name, str):
                raise HFFormatError(f"{what} is not a file name")
            files.setdefault(_existing(directory, name, what), directory / name)
        return sorted(files.values())
    if (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MissingWeightsError(f"{directory} holds no *.safetensors weights; convert a pytorch_model.bin "
                                  "checkpoint first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    for file in files:
        _existing(directory, file.name, str(file))
    return files


def _existing(directory: Path, name: str, what: str) -> Path:
    target = inside(directory, name, what)
    if not target.is_file():
        raise MissingWeightsError(f"{what}: no such file in {directory}; download the missing shard")
    return target


def _read_header(file: Path) -> tuple[int, dict]:
    """(where the tensor data starts, {name: {dtype, shape, data_offsets}}), every entry checked
    against the file's size; "__metadata__" is dropped."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise HFFormatError(f"{file}: {size} bytes, too short to hold a safetensors header; {_REDO}")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise HFFormatError(f"{file}: header length {n} is over the {MAX_HEADER_BYTES}-byte bound on a "
                                f"safetensors header; {_REDO}")
        if n > size - 8:
            raise HFFormatError(f"{file}: header length {n} exceeds the {size - 8} bytes after it; {_REDO}")
        try:
            header = json.loads(fh.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except HFFormatError as e:
            raise HFFormatError(f"{file}: {e}; {_REDO}") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise HFFormatError(f"{file}: header is not UTF-8 JSON ({_short(e)}); {_REDO}") from None
    if not isinstance(header, dict):
        raise HFFormatError(f"{file}: header is a JSON {type(header).__name__}, not an object; {_REDO}")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_tensor(file, name, info, size - 8 - n)
    return 8 + n, header


def _check_tensor(file: Path, name: str, info: Any, data_bytes: int) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, and data_offsets [begin, end]
    inside the file's data that span exactly the bytes the shape and dtype need."""
    where = f"{file}: tensor {_short(name)}"
    if not isinstance(info, dict):
        raise HFFormatError(f"{where} has header entry {_short(info)}, not {{dtype, shape, data_offsets}}; {_REDO}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise HFFormatError(f"{where} has dtype {_short(dtype)}, which pjlm cannot read "
                            f"(it reads {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HFFormatError(f"{where} has shape {_short(shape)}, not a list of non-negative integers; {_REDO}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise HFFormatError(f"{where} has data_offsets {_short(offsets)}, not a pair [begin, end] of integers; {_REDO}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise HFFormatError(f"{where} has data_offsets [{begin}, {end}], not 0 <= begin <= end; {_REDO}")
    if end > data_bytes:
        raise HFFormatError(f"{where} ends at data byte {end} but the file holds {data_bytes} bytes of data; {_REDO}")
    need = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != need:
        raise HFFormatError(f"{where} has data_offsets [{begin}, {end}] ({end - begin} bytes) but shape "
                            f"{shape} of {dtype} needs {need} bytes; {_REDO}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise HFFormatError(f"header names {_short(twice)} twice")
    return dict(pairs)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: Any, limit: int = 120) -> str:
    """`repr(x)` cut to one short line: header values come from the file and can be anything."""
    text = repr(x) if not isinstance(x, BaseException) else str(x).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


class SafetensorsReader:
    """Name → memory-mapped numpy view over all of a directory's shards; `close()` unmaps them.
    Every file and tensor entry is checked when the reader opens the directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._maps: dict[Path, np.memmap] = {}
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for file in shard_files(self.directory):
            start, header = _read_header(file)
            for name, info in header.items():
                if name in self._where:
                    raise HFFormatError(f"tensor {_short(name)} is in both {self._where[name][0].name} and "
                                        f"{file.name}; remove the stray file from {self.directory}")
                self._where[name] = (file, start, info)

    def names(self) -> set[str]:
        return set(self._where)

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._where[name][2]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only view of one tensor; nothing is read until it (or a slice of it) is used."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in {self.directory}'s safetensors files")
        file, start, info = self._where[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[file][start + begin:start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self) -> None:
        self._maps.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MB", "20KB" or "2GiB" (2^30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size={size!r}; use bytes or a size such as '5GB', '500MB' or '20KB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list[int]]:
    """Split tensor entries (in order) into files of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_file(file: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
               fetch: Callable[[int], np.ndarray]) -> int:
    """Stream one safetensors file: the header from the entries' shapes, then `fetch(i)` one at a time.
    Returns the bytes of tensor data written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for i, (name, shape, dtype) in enumerate(entries):
            array = np.ascontiguousarray(fetch(i), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: shape {array.shape}, expected {tuple(shape)}")
            fh.write(array.tobytes())
    return offset


def write_shards(directory: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                 fetch: Callable[[int], np.ndarray], max_shard_size: int | str) -> list[Path]:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` plus the index when over `max_shard_size`."""
    shards = plan_shards(entries, parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    total, weight_map = 0, {}
    for file, members in zip(names, shards):
        total += write_file(directory / file, [entries[i] for i in members], lambda j, m=members: fetch(m[j]))
        weight_map.update({entries[i][0]: file for i in members})
    stale = [p for p in _existing_weights(directory) if p.name not in names]
    for path in stale:  # a previous export's shards would confuse a reader of the directory
        path.unlink()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [directory / f for f in names]


def _existing_weights(directory: Path) -> Iterator[Path]:
    yield from directory.glob("model*.safetensors")
    if (directory / INDEX_FILE).exists():
        yield directory / INDEX_FILE

