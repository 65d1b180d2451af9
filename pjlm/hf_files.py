"""Safetensors shards of a Hugging Face model directory: a lazy reader and a streaming writer.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, "__metadata__"), then the raw little-endian tensor bytes. It is read here through
`np.memmap` rather than `safetensors.safe_open`: `framework="numpy"` cannot hold bfloat16 (most
published checkpoints), and `framework="flax"` materialises each whole tensor on the default device.
A memory-mapped view in any dtype (bfloat16 via `ml_dtypes`) reads from disk only the bytes a
slice of it touches, so each device shard of a large model pulls just its own part.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def shard_files(directory: Path) -> list[Path]:
    """The weight files of an HF model directory: those its index names, else `model.safetensors`,
    else every `*.safetensors` there."""
    index = directory / INDEX_FILE
    if index.exists():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights; convert a pytorch_model.bin "
                                "checkpoint first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    return files


def _read_header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return 8 + n, json.loads(fh.read(n))


class SafetensorsReader:
    """Name → memory-mapped numpy view over all of a directory's shards; `close()` unmaps them."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._maps: dict[Path, np.memmap] = {}
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for file in shard_files(self.directory):
            start, header = _read_header(file)
            header.pop("__metadata__", None)
            for name, info in header.items():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} is in both {self._where[name][0].name} and {file.name}; "
                                     f"remove the stray file from {self.directory}")
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name!r} in {file.name} has dtype {info['dtype']}, which pjlm cannot read")
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

