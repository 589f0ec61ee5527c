"""Where a quantized model's integer weight codes live while a run uses them: memory, or files.

``CodeStore`` maps ``layers.{i}.{name}`` to ``formats.integer.WeightCodes``. In memory it is a dict. With a
folder (``CodeStore.spilled()``: a private temporary folder, deleted when the store is garbage-collected or
``close``d) each WeightCodes is written to ``.npy`` files when it is set and read back when it is asked for,
so the codes of a 7B model (6.5 GB as int8) never sit in memory together: GPTQ sets a layer's codes and
drops them, and evaluation and packing read one layer's back. Other values (an ``EmbeddingCodes``) stay in
memory. Reading returns NumPy arrays equal to what was set.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, MutableMapping

import numpy as np

from resq_jax.formats.integer import WeightCodes

_ARRAYS = ("q_low", "scale_low", "q_high", "scale_high")


class CodeStore(MutableMapping):
    """Name -> codes, in memory or spilled to a folder (module docstring)."""

    def __init__(self, folder: str | Path | None = None):
        self._folder = None if folder is None else Path(folder)
        self._memory: dict = {}
        self._spilled: dict[str, dict] = {}  # name -> the WeightCodes' static fields and which arrays are None

    @classmethod
    def spilled(cls, parent: str | Path | None = None) -> "CodeStore":
        """A store whose WeightCodes go to a new temporary folder (under ``parent``, default the system's),
        removed with the store."""
        folder = Path(tempfile.mkdtemp(prefix="resq-jax-codes-", dir=parent))
        store = cls(folder)
        store._finalizer = weakref.finalize(store, shutil.rmtree, folder, True)
        return store

    @property
    def folder(self) -> Path | None:
        """The spill folder (None for a store in memory): other large arrays of the same model may go there."""
        return self._folder

    def close(self):
        """Remove the spill folder now (a spilled store is empty afterwards)."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self._spilled.clear()
        self._memory.clear()

    def _path(self, name: str, field: str) -> Path:
        return self._folder / f"{name}.{field}.npy"

    def __setitem__(self, name: str, codes):
        if self._folder is None or not isinstance(codes, WeightCodes):
            self._spilled.pop(name, None)
            self._memory[name] = codes
            return
        present = {}
        for field in _ARRAYS:
            a = getattr(codes, field)
            present[field] = a is not None
            if a is not None:
                np.save(self._path(name, field), np.asarray(a), allow_pickle=False)
        self._memory.pop(name, None)
        self._spilled[name] = {"present": present, "low_bits": codes.low_bits, "high_bits": codes.high_bits,
                               "group_size": codes.group_size}

    def __getitem__(self, name: str):
        if name in self._memory:
            return self._memory[name]
        meta = self._spilled[name]
        arrays = {f: np.load(self._path(name, f)) if meta["present"][f] else None for f in _ARRAYS}
        return WeightCodes(**arrays, low_bits=meta["low_bits"], high_bits=meta["high_bits"],
                           group_size=meta["group_size"])

    def __delitem__(self, name: str):
        if name in self._memory:
            del self._memory[name]
            return
        meta = self._spilled.pop(name)
        for f in _ARRAYS:
            if meta["present"][f]:
                self._path(name, f).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        yield from self._spilled
        yield from self._memory

    def __len__(self) -> int:
        return len(self._spilled) + len(self._memory)

    def __contains__(self, name) -> bool:
        return name in self._memory or name in self._spilled

    def nbytes_spilled(self) -> int:
        """Bytes of the spilled arrays on disk."""
        return sum(self._path(n, f).stat().st_size for n, m in self._spilled.items() for f in _ARRAYS
                   if m["present"][f])
