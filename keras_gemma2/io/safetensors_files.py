"""Reading and writing the safetensors format with numpy, bfloat16 included.

Reading memory-maps each file, so a checkpoint larger than RAM loads one
tensor at a time. Writing goes to a temporary name and is renamed into place.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from keras_gemma2.io.atomic import atomic_write

DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CorruptFileError(OSError, ValueError):
    """A checkpoint file that is truncated or not in its format (an OSError and a ValueError)."""


def repair_hint(path, missing=False):
    """The fix for a bad or missing file the user made or copied.

    Readers of downloaded checkpoints pass their own `repair_hint` (see
    `checkpoints.download.repair_hint`), which says to download again instead.
    """
    if missing:
        return "Copy the missing file into the folder, or save the checkpoint again."
    return "Replace it with a complete copy (it was probably cut short while being copied or saved)."


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file."""

    def __init__(self, path, repair_hint=repair_hint):
        self.path = os.fspath(path)
        self._repair_hint = repair_hint
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                self._corrupt("is truncated: too short to be a safetensors file.")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                self._corrupt(
                    f"is truncated or corrupt: its header claims {header_size} bytes but the "
                    f"file has {size}."
                )
            try:
                header = json.loads(f.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._corrupt("is corrupt: unreadable safetensors header.")
        if not isinstance(header, dict):
            self._corrupt("is corrupt: its safetensors header is not a JSON object.")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_size
        self._entries = header
        for name, entry in header.items():
            try:
                if not {"dtype", "shape", "data_offsets"} <= set(entry):
                    raise KeyError(name)
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self._corrupt(f"is corrupt: the header entry of tensor {name!r} is malformed.")
            if self._data_start + end > size:
                self._corrupt(
                    f"is truncated: tensor {name!r} ends at byte {self._data_start + end} but "
                    f"the file has {size} bytes."
                )
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}.")

    def _corrupt(self, problem):
        raise CorruptFileError(f"{self.path} {problem} {self._repair_hint(self.path)}") from None

    def keys(self):
        return list(self._entries)

    def shape(self, name):
        return tuple(self._entries[name]["shape"])

    def get(self, name, rows=None):
        """The tensor, memory-mapped; `rows=(start, stop)` maps only those rows of its first axis.

        A row slice is its own mapping: dropping it drops its pages from this
        process (a whole-tensor map keeps every page read resident until it goes).
        """
        entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize != end - begin:
            self._corrupt(f"is corrupt: tensor {name!r} has a size that does not match its shape.")
        if rows is not None:
            start, stop = max(0, rows[0]), min(rows[1], shape[0])
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            begin, shape = begin + start * row_bytes, (max(0, stop - start), *shape[1:])
            count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype)
        array = np.memmap(
            self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=(count,)
        )
        return array.reshape(shape)


def write_file(path, tensors, metadata=None):
    """Write `{name: array or zero-argument callable}` to `path` atomically."""
    # asarray(order="C") keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
    arrays = {name: np.asarray(t() if callable(t) else t, order="C") for name, t in tensors.items()}
    header, offset = {}, 0
    for name, array in arrays.items():
        if array.dtype not in DTYPE_NAMES:
            raise ValueError(f"Cannot write tensor {name!r} of dtype {array.dtype} to safetensors.")
        header[name] = {
            "dtype": DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays.values():
            f.write(array.reshape(-1).view(np.uint8))  # no copy, any dtype


def parse_size(size):
    """'4GB', '500MB', '10KB' or an int number of bytes; anything else is a clear error."""
    problem = (
        "max_shard_size must be a positive number of bytes or a size such as '4GB', '500MB' "
        f"or '10KB', got {size!r}."
    )
    if isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_)):
        value = int(size)
    elif isinstance(size, str):
        text, factor = size.strip().upper(), 1
        for suffix, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if text.endswith(suffix):
                text, factor = text[: -len(suffix)].strip(), scale
                break
        try:
            number = float(text)
        except ValueError:
            raise ValueError(problem) from None
        if not np.isfinite(number):
            raise ValueError(problem)
        value = int(number * factor)
    else:
        raise ValueError(problem)
    if value < 1:
        raise ValueError(problem)
    return value


def write_sharded(directory, tensors, shapes_and_sizes, max_shard_size, prefix="model"):
    """Write tensors into shards of at most `max_shard_size` bytes.

    `tensors`: {name: callable returning the array}, produced one at a time
    while writing. `shapes_and_sizes`: {name: nbytes} to plan shards upfront.
    One file is named `{prefix}.safetensors`; several get an index json.
    Returns the written file names.
    """
    limit = parse_size(max_shard_size)
    shards, current, current_size = [], [], 0
    for name, nbytes in shapes_and_sizes.items():
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    shards.append(current)

    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        write_file(
            os.path.join(directory, file_name),
            {name: tensors[name] for name in shard},
            metadata={"format": "pt"},
        )
        weight_map.update({name: file_name for name in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(shapes_and_sizes.values())}, "weight_map": weight_map}
        write_json(os.path.join(directory, f"{prefix}.safetensors.index.json"), index)
        names.append(f"{prefix}.safetensors.index.json")
    return names


def write_json(path, data):
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) checkpoint directory, by name.

    `repair_hint(path, missing=False)` words the fix for a bad or missing file.
    """

    def __init__(self, directory, prefix="model", repair_hint=repair_hint):
        index_path = os.path.join(directory, f"{prefix}.safetensors.index.json")
        single_path = os.path.join(directory, f"{prefix}.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = {}
            for file_name in sorted(set(weight_map.values())):
                shard_path = os.path.join(directory, file_name)
                if not os.path.exists(shard_path):
                    raise FileNotFoundError(
                        f"Shard {file_name} listed in {index_path} is missing. "
                        + repair_hint(shard_path, missing=True)
                    )
                files[file_name] = SafetensorsFile(shard_path, repair_hint)
            self._where = {name: files[file_name] for name, file_name in weight_map.items()}
        elif os.path.exists(single_path):
            single = SafetensorsFile(single_path, repair_hint)
            self._where = {name: single for name in single.keys()}
        else:
            raise FileNotFoundError(
                f"No {prefix}.safetensors or {prefix}.safetensors.index.json in {directory}."
            )

    def __contains__(self, name):
        return name in self._where

    def keys(self):
        return list(self._where)

    def shape(self, name):
        return self._where[name].shape(name)

    def get(self, name, rows=None):
        return self._where[name].get(name, rows)
