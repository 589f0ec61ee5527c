"""The weight store: a model's tensors read from disk one at a time, when a stage asks for them.

``WeightStore`` is a read-only ``Mapping`` from contract names (models/config.py) to float32 NumPy arrays in
the contract's layout (linears ``[d_in, d_out]``). Nothing is cached: every ``store[name]`` reads that
tensor's bytes from its file (``np.fromfile`` at the tensor's offset, in the stored dtype: bfloat16 and
float16 stay 2 bytes until converted) and returns a fresh float32 array, which lives only as long as the
caller holds it. So a stage that works layer by layer holds one layer in float32, whatever the model's size,
and the files are never mapped into the process as a whole (the operating system's page cache may keep them,
which is not the process's memory).

Sources:

* safetensors (one file or shards with ``model.safetensors.index.json``): the header of every file is read
  and checked when the store is built (tensor present, dtype supported, data inside the file, shape equal to
  what the config implies), so a missing shard, a truncated file or a wrong shape fails before any work, with
  the file and the tensor named.
* GGUF: each tensor's block-quantized bytes are read and dequantized (``gguf.quants``) on access; llama.cpp's
  q/k row permutation is undone then.

Conversions are exact: float16, bfloat16 and the float8 formats widen to float32 without rounding (through
``ml_dtypes``, which jax depends on); float64 is rounded to float32 as the previous eager loaders did.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from resq_jax.models.views import index_vocab

# safetensors dtype name -> NumPy dtype of the stored elements
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_EXACT_16 = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class WeightStoreError(ValueError):
    """A weight file cannot serve a tensor; the message names the file, the tensor and the fix."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: its stored dtype and shape and where its bytes are (absolute file offsets)."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """How a contract tensor is made: ``read()`` -> float32 in the file's layout, then ``post`` (transpose,
    row permutation) into the contract's layout of ``shape``."""

    entry: TensorEntry
    read: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    post: Callable[[np.ndarray], np.ndarray] | None = None
    # rows(index) -> float32 rows ``index`` of the tensor in the file's layout, without reading the rest
    # (safetensors); None: read the whole tensor and index it
    rows: Callable[[object], np.ndarray] | None = None
    # the file's rows are the contract's columns (a linear stored [d_out, d_in])
    transposed: bool = False


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file (header only), checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightStoreError(f"{path}: {size} bytes, too short for a safetensors file; the file is "
                                       "truncated: re-download the checkpoint")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightStoreError(f"{path}: header of {n} bytes does not fit the file ({size} bytes); the "
                                       "file is truncated or not safetensors: re-download the checkpoint")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        if isinstance(e, WeightStoreError):
            raise
        raise WeightStoreError(f"cannot read the safetensors header of {path}: {e}; re-download the "
                               "checkpoint") from e
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info.get("dtype"), tuple(info.get("shape", ())), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightStoreError(f"{path}: tensor {name} has dtype {dtype}; resq-jax reads "
                                   f"{', '.join(SAFETENSORS_DTYPES)}: convert the checkpoint")
        want = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != want:
            raise WeightStoreError(f"{path}: tensor {name} ({dtype} {list(shape)}) spans {end - begin} bytes, its "
                                   f"shape needs {want}; the file is corrupt: re-download the checkpoint")
        if base + end > size:
            raise WeightStoreError(f"{path}: tensor {name} ends at byte {base + end} but the file has {size}; the "
                                   "file is truncated: re-download the checkpoint")
        out[name] = TensorEntry(file=path, name=name, dtype=dtype, shape=shape, start=base + begin,
                                nbytes=end - begin)
    return out


def read_safetensor(entry: TensorEntry) -> np.ndarray:
    """The tensor's bytes from disk, widened to float32 (exactly, except float64 which is rounded)."""
    dtype = SAFETENSORS_DTYPES[entry.dtype]
    count = entry.nbytes // dtype.itemsize
    a = np.fromfile(entry.file, dtype=dtype, count=count, offset=entry.start)
    if a.size != count:
        raise WeightStoreError(f"{entry.file}: tensor {entry.name} could be read only in part ({a.size} of "
                               f"{count} values); the file changed or is truncated: re-download the checkpoint")
    return a.astype(np.float32).reshape(entry.shape)


def read_safetensor_rows(entry: TensorEntry, index) -> np.ndarray:
    """Rows ``index`` (a slice or an integer array along the first axis) of a safetensors tensor, widened to
    float32; only those rows' pages are read (the file is memory-mapped for the duration of the call)."""
    dtype = SAFETENSORS_DTYPES[entry.dtype]
    mapped = np.memmap(entry.file, dtype=dtype, mode="r", offset=entry.start, shape=entry.shape)
    try:
        return np.asarray(mapped[index], dtype=np.float32)
    finally:
        del mapped


def read_gguf_tensor(entry: TensorEntry, tensor_type) -> np.ndarray:
    """One GGUF tensor's bytes from disk, dequantized to float32 in NumPy order (GGUF's shape reversed);
    ``entry.shape`` is that NumPy shape."""
    import gguf

    raw = np.fromfile(entry.file, dtype=np.uint8, count=entry.nbytes, offset=entry.start)
    if raw.size != entry.nbytes:
        raise WeightStoreError(f"{entry.file}: tensor {entry.name} could be read only in part; the file is "
                               "truncated: re-download it")
    rows = int(np.prod(entry.shape[:-1], dtype=np.int64)) if len(entry.shape) > 1 else 1
    w = gguf.quants.dequantize(raw.reshape(rows, -1), tensor_type)
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(entry.shape))


class WeightStore(Mapping):
    """Contract name -> float32 array, read on each access (see the module docstring)."""

    def __init__(self, sources: Mapping[str, TensorSource], source: str = "weights"):
        self._sources = dict(sources)
        self.source = source

    def __getitem__(self, name: str) -> np.ndarray:
        s = self._sources[name]
        w = s.read()
        w = s.post(w) if s.post is not None else w
        if tuple(w.shape) != s.shape:  # a post-processing bug, never the user's input (checked at build)
            raise WeightStoreError(f"{s.entry.file}: tensor {s.entry.name} read as {w.shape}, expected {s.shape}")
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, name) -> bool:
        return name in self._sources

    def vocab_slice(self, name: str, index) -> np.ndarray:
        """Entries ``index`` (slice or integer array) of ``name`` along its vocabulary axis (``VOCAB_AXIS``),
        float32, reading only those rows from a safetensors file."""
        s = self._sources[name]
        if s.rows is None or (s.post is not None and not s.transposed):
            return index_vocab(name, self[name], index)
        rows = s.rows(index)
        return np.ascontiguousarray(rows.T) if s.transposed else rows

    def vocab_dtype(self, name: str) -> np.dtype:
        """A table stored in bfloat16 / float16 (safetensors) holds values of that dtype; others float32."""
        s = self._sources[name]
        stored = SAFETENSORS_DTYPES.get(s.entry.dtype)
        return stored if s.rows is not None and stored in _EXACT_16 else np.dtype(np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        """The contract shape of ``name``, without reading it."""
        return self._sources[name].shape

    def stored_dtype(self, name: str) -> str:
        """The dtype ``name`` is stored in (e.g. ``BF16``, ``F32``, a GGUF type such as ``Q4_1``)."""
        return self._sources[name].entry.dtype

    def stored_bytes(self) -> int:
        """Bytes of all tensors as stored (what the files hold, not float32)."""
        return sum(s.entry.nbytes for s in self._sources.values())

    def float32_bytes(self) -> int:
        """Bytes of all tensors in float32 (what an eager loader would hold)."""
        return sum(4 * int(np.prod(s.shape, dtype=np.int64)) for s in self._sources.values())
