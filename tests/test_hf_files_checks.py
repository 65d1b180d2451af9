"""`pjlm.hf.files` trusts nothing in a model directory: files stay inside it, headers are bounded, and
every tensor's dtype, shape and byte range are checked against its file when the reader opens it.

Every malformed directory is built here from a small valid safetensors file, then corrupted.
"""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from pjlm.errors import HFFormatError, PjlmError
from pjlm.hf.files import INDEX_FILE, MAX_HEADER_BYTES, SafetensorsReader, shard_files

A = np.arange(12, dtype=np.float32).reshape(3, 4)
B = np.arange(5, dtype=np.int64)


def raw_file(path, header, data=b"", length=None):
    """A safetensors file by hand: 8-byte length (default: the header's), JSON header, data bytes."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def one_tensor(path, **entry):
    """`path` holding tensor "w" = A, its header entry overridden by `entry`."""
    header = {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, A.nbytes], **entry}}
    return raw_file(path, header, A.tobytes())


def indexed(directory, weight_map):
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def raises(directory, *parts):
    """The reader refuses `directory` with one line that names every part."""
    with pytest.raises(HFFormatError) as info:
        SafetensorsReader(directory)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PjlmError)
    return message


def test_two_shards_with_an_index_read_back_exactly(tmp_path):
    save_file({"a": A}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": B}, str(tmp_path / "model-00002-of-00002.safetensors"))
    indexed(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    with SafetensorsReader(tmp_path) as reader:
        assert reader.names() == {"a", "b"}
        np.testing.assert_array_equal(reader.get("a"), A)
        np.testing.assert_array_equal(reader.get("b"), B)
        assert reader.get("b").dtype == B.dtype


def test_index_entry_escaping_with_dotdot_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": A}, str(tmp_path / "outside.safetensors"))  # a valid file: only confinement stops it
    indexed(model, {"a": "../outside.safetensors"})
    raises(model, INDEX_FILE, "'a'", "../outside.safetensors", "outside")


def test_index_entry_with_an_absolute_path_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    target = tmp_path / "abs.safetensors"
    save_file({"a": A}, str(target))
    indexed(model, {"a": str(target)})
    raises(model, INDEX_FILE, "'a'", str(target), "absolute path")


def test_symlink_to_a_file_outside_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": A}, str(tmp_path / "elsewhere.safetensors"))
    os.symlink(tmp_path / "elsewhere.safetensors", model / "model.safetensors")
    raises(model, "model.safetensors", "elsewhere.safetensors", "outside")
    indexed(model, {"a": "model.safetensors"})  # the same link named by an index
    raises(model, INDEX_FILE, "'a'", "model.safetensors", "outside")


def test_symlink_inside_the_directory_is_followed(tmp_path):
    save_file({"a": A}, str(tmp_path / "real.safetensors"))
    os.symlink("real.safetensors", tmp_path / "model.safetensors")
    with SafetensorsReader(tmp_path) as reader:
        np.testing.assert_array_equal(reader.get("a"), A)


def test_hugging_face_cache_snapshot_links_into_its_blobs(tmp_path):
    """`huggingface_hub` keeps `<repo>/snapshots/<rev>/model.safetensors -> ../../blobs/<hash>`."""
    (tmp_path / "repo" / "blobs").mkdir(parents=True)
    snapshot = tmp_path / "repo" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"a": A}, str(tmp_path / "repo" / "blobs" / "f00d"))
    os.symlink("../../blobs/f00d", snapshot / "model.safetensors")
    with SafetensorsReader(snapshot) as reader:
        np.testing.assert_array_equal(reader.get("a"), A)


def test_index_naming_a_missing_file(tmp_path):
    indexed(tmp_path, {"a": "model-00001-of-00002.safetensors"})
    with pytest.raises(FileNotFoundError):  # still what callers that catch FileNotFoundError expect
        SafetensorsReader(tmp_path)
    raises(tmp_path, INDEX_FILE, "model-00001-of-00002.safetensors", "no such file")


def test_malformed_index(tmp_path):
    save_file({"a": A}, str(tmp_path / "model.safetensors"))
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"a": ')
    raises(tmp_path, INDEX_FILE, "not valid UTF-8 JSON")
    (tmp_path / INDEX_FILE).write_text('{"metadata": {}}')
    raises(tmp_path, INDEX_FILE, "weight_map")


def test_directory_without_weights_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no"):
        shard_files(tmp_path)
    with pytest.raises(HFFormatError):
        shard_files(tmp_path)


def test_header_length_beyond_the_file(tmp_path):
    file = raw_file(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}},
                    length=1000)
    raises(tmp_path, file, "header length 1000", "exceeds")


def test_header_length_of_2_to_the_40(tmp_path):
    file = raw_file(tmp_path / "model.safetensors", {}, length=2**40)
    raises(tmp_path, file, f"header length {2**40}", f"{MAX_HEADER_BYTES}-byte bound")


def test_file_shorter_than_the_length_prefix(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02\x03")
    raises(tmp_path, tmp_path / "model.safetensors", "too short")


def test_header_not_json_or_not_an_object(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    raises(tmp_path, file, "not UTF-8 JSON")
    raw_file(file, [1, 2])
    raises(tmp_path, file, "JSON list, not an object")


def test_truncated_file(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": A}, str(file))
    file.write_bytes(file.read_bytes()[:-4])
    raises(tmp_path, file, "tensor 'a'", f"ends at data byte {A.nbytes}", f"holds {A.nbytes - 4} bytes")


def test_offsets_span_disagrees_with_shape_and_dtype(tmp_path):
    file = one_tensor(tmp_path / "model.safetensors", shape=[3, 3])
    raises(tmp_path, file, "tensor 'w'", f"[0, {A.nbytes}]", "needs 36 bytes")
    one_tensor(file, dtype="F64")
    raises(tmp_path, file, "tensor 'w'", "F64 needs 96 bytes")


def test_begin_after_end(tmp_path):
    file = one_tensor(tmp_path / "model.safetensors", data_offsets=[A.nbytes, 0])
    raises(tmp_path, file, "tensor 'w'", f"[{A.nbytes}, 0]", "begin <= end")


def test_negative_shape(tmp_path):
    file = one_tensor(tmp_path / "model.safetensors", shape=[-3, -4])
    raises(tmp_path, file, "tensor 'w'", "[-3, -4]", "non-negative")


@pytest.mark.parametrize("entry, complaint", [
    (dict(data_offsets=[0]), "not a pair"),
    (dict(data_offsets=[0.0, 48.0]), "not a pair"),
    (dict(data_offsets=[-4, 44]), "begin <= end"),
    (dict(shape="3x4"), "not a list"),
    (dict(shape=[3, True]), "not a list"),
    (dict(dtype="F4"), "cannot read"),
    (dict(dtype=["F32"]), "cannot read"),
])
def test_malformed_entry_fields(tmp_path, entry, complaint):
    file = one_tensor(tmp_path / "model.safetensors", **entry)
    raises(tmp_path, file, "tensor 'w'", complaint)


def test_entry_not_an_object_and_duplicate_names(tmp_path):
    file = raw_file(tmp_path / "model.safetensors", {"w": [0, 1]})
    raises(tmp_path, file, "tensor 'w'", "not {dtype, shape, data_offsets}")
    entry = json.dumps({"dtype": "U8", "shape": [1], "data_offsets": [0, 1]})
    blob = f'{{"w": {entry}, "w": {entry}}}'.encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\x00")
    raises(tmp_path, file, "'w' twice")


def test_tensor_in_two_shards(tmp_path):
    save_file({"a": A}, str(tmp_path / "one.safetensors"))
    save_file({"a": A}, str(tmp_path / "two.safetensors"))
    raises(tmp_path, "'a'", "one.safetensors", "two.safetensors")
