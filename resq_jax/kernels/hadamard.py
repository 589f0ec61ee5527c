"""Fast Hadamard transform of any LLM size as an XLA FFI custom call (C++ on CPU, CUDA on NVIDIA).

``hadamard(x)`` computes ``x @ hadamard_matrix(n).T`` on the last axis (``y_i = sum_j H[i, j] x_j``),
``hadamard(x, transpose=True)`` computes ``x @ hadamard_matrix(n)`` (the inverse), with
``n = K * 2^m``, ``H_n = (H_K ⊗ H_{2^m}) / sqrt(n)`` and ``(K, H_K, m) =``
:func:`resq_jax.transforms.hadamard.hadamard_factor` (docs/algorithms.md, Hadamard sizes). The numerics are those of
:func:`resq_jax.transforms.fwht.hadamard_transform` (the jnp reference): float32 accumulation for
float32 / bfloat16 / float16 inputs, the Sylvester butterflies, then the K x K product with H_K
(passed to the kernel as a float32 constant operand, so substitutes for sizes with no Hadamard
matrix work too), then one multiply by float32(1 / sqrt(n)), then rounding to the input dtype.

Implementations (``impl``):

* ``"ffi"``: the native kernels of ``ffi/``: ``libresq_hadamard_cpu`` on CPU, ``libresq_hadamard_cuda``
  on NVIDIA GPUs. Raises :class:`FfiUnavailableError` when the library for the platform is missing.
* ``"jnp"``: :func:`resq_jax.transforms.fwht.hadamard_transform` (always available, defines the numerics).
* ``"dense"``: ``x @ hadamard_matrix(n).T`` as one matmul (O(n^2), for checks and benchmarks).
* ``"auto"`` (default): per platform at lowering time (``jax.lax.platform_dependent``), the FFI
  kernel when its library is loaded, else the jnp reference; a missing CPU library is reported once
  with a ``RuntimeWarning``. float64 inputs always take the jnp path (the kernels are float32 inside).
  The environment variable ``RESQ_JAX_HADAMARD_IMPL`` (``ffi``, ``jnp`` or ``dense``) overrides
  ``"auto"`` without code changes.

Works under ``jax.jit``, ``jax.vmap`` (batch axes become more rows) and reverse-mode differentiation
(``jax.grad``/``jax.vjp``: the cotangent of ``y = x H^T`` is ``dy H``, i.e. the transform with the
opposite ``transpose`` flag; higher orders work the same way). Forward mode (``jax.jvp``) is not
supported (``jax.custom_vjp``). Layout: inside XLA every operand of a custom call is a dense row-major
buffer (the call requests that layout), so strided or transposed views of ``x`` never reach the kernel
and need no special handling; rows are the product of the leading dimensions.

Where the native libraries are looked up (first hit wins): ``$RESQ_JAX_FFI_LIB_DIR``; next to this
file (regular install, in-place build); the other ``resq_jax.kernels`` package directories; the files
recorded for the installed ``resq-jax`` distribution (editable installs keep the compiled libraries in
site-packages while the Python files stay in the checkout); ``resq_jax/kernels`` under the
interpreter's ``platlib``/``purelib``; ``<checkout>/build/**`` (a CMake or scikit-build-core build
directory). Loading and registration happen once, lazily, under a lock.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import os
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resq_jax.transforms.fwht import hadamard_transform
from resq_jax.transforms.hadamard import HadamardSizeError, hadamard_factor, hadamard_matrix
from resq_jax.util.precision import EXACT

__all__ = [
    "IMPLS",
    "CPU_TARGET",
    "CUDA_TARGET",
    "FfiUnavailableError",
    "FfiStatus",
    "hadamard",
    "ffi_status",
    "library_filename",
    "find_library",
]

IMPLS = ("auto", "ffi", "jnp", "dense")
CPU_TARGET = "resq_hadamard_cpu"
CUDA_TARGET = "resq_hadamard_cuda"
CPU_LIBRARY = "resq_hadamard_cpu"
CUDA_LIBRARY = "resq_hadamard_cuda"
ENV_IMPL = "RESQ_JAX_HADAMARD_IMPL"
ENV_LIB_DIR = "RESQ_JAX_FFI_LIB_DIR"
_DISTRIBUTION = "resq-jax"
_FFI_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_ISA_NAMES = {1: "baseline", 2: "avx2", 3: "avx512"}


class FfiUnavailableError(RuntimeError):
    """impl="ffi" was requested but the native library for the platform is not loaded."""


@dataclasses.dataclass(frozen=True)
class FfiStatus:
    """What the loader found. cpu_library / cuda_library: the loaded files (None if missing);
    cpu_isa: the code path the CPU kernel uses on this machine (baseline, avx2, avx512);
    errors: why a library is missing or failed to load."""

    cpu_library: str | None
    cuda_library: str | None
    cpu_isa: str | None
    errors: tuple[str, ...]


# ----------------------------------------------------------------------------------------
# Finding, loading and registering the native libraries
# ----------------------------------------------------------------------------------------


def library_filename(stem: str) -> str:
    """File name CMake gives the shared library `stem` on this OS (libX.so, libX.dylib, X.dll)."""
    if sys.platform == "win32":
        return f"{stem}.dll"
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    return f"lib{stem}.so"


def _package_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    dirs = [here]
    try:
        import resq_jax.kernels as kernels_pkg

        dirs += [Path(p) for p in getattr(kernels_pkg, "__path__", [])]
    except ImportError:  # pragma: no cover - this module is part of the package
        pass
    return dirs


def _distribution_files(filename: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return []
    found = []
    for f in dist.files or ():
        if f.name == filename:
            found.append(Path(dist.locate_file(f)))
    return found


def _build_dirs() -> list[Path]:
    root = Path(__file__).resolve().parents[2]
    build = root / "build"
    if not build.is_dir():
        return []
    # build/<tag>/ (scikit-build-core build-dir) and build/ (plain cmake), two levels deep at most.
    dirs = [build] + sorted(p for p in build.iterdir() if p.is_dir())
    dirs += sorted(q for p in dirs[1:] for q in p.iterdir() if q.is_dir())
    return dirs


def _search_paths(filename: str, extra_dirs: list[Path] | None) -> list[Path]:
    candidates: list[Path] = []
    if extra_dirs is not None:
        return [Path(d) / filename for d in extra_dirs]
    env = os.environ.get(ENV_LIB_DIR)
    if env:
        candidates.append(Path(env) / filename)
    candidates += [d / filename for d in _package_dirs()]
    candidates += _distribution_files(filename)
    for key in ("platlib", "purelib"):
        candidates.append(Path(sysconfig.get_paths()[key]) / "resq_jax" / "kernels" / filename)
    candidates += [d / filename for d in _build_dirs()]
    seen, unique = set(), []
    for c in candidates:
        key = str(c)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def find_library(stem: str, search_dirs: list[Path] | None = None) -> Path | None:
    """First existing file for library `stem` (see the module docstring for the search order);
    `search_dirs` replaces the whole search (used by tests)."""
    for path in _search_paths(library_filename(stem), search_dirs):
        if path.is_file():
            return path
    return None


def _cuda_backend_present() -> bool:
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


class _Loader:
    """Loads and registers the FFI libraries once (thread-safe); remembers what it found.
    search_dirs=None uses the default search (module docstring)."""

    def __init__(self, search_dirs: list[Path] | None = None):
        self._search_dirs = search_dirs
        self._lock = threading.Lock()
        self._status: FfiStatus | None = None
        self._libs: list[ctypes.CDLL] = []  # keep the handles alive
        self._warned = False

    def status(self) -> FfiStatus:
        with self._lock:
            if self._status is None:
                self._status = self._load()
            return self._status

    def warn_missing_once(self, platform: str, filename: str) -> None:
        st = self.status()
        with self._lock:
            if self._warned:
                return
            self._warned = True
        detail = "; ".join(st.errors) if st.errors else "not found"
        warnings.warn(
            f"resq_jax.kernels.hadamard: the native {platform} Hadamard kernel is unavailable ({detail}); "
            "using the jnp reference (same numbers, slower). Build it with `pip install .` (needs a C++ "
            f"compiler and CMake; nvcc for CUDA) or point {ENV_LIB_DIR} at the directory holding {filename}.",
            RuntimeWarning,
            stacklevel=5,
        )

    def _load(self) -> FfiStatus:
        errors: list[str] = []
        cpu_path = find_library(CPU_LIBRARY, self._search_dirs)
        cpu_loaded, cpu_isa = None, None
        if cpu_path is None:
            errors.append(f"{library_filename(CPU_LIBRARY)} not found")
        else:
            try:
                lib = ctypes.CDLL(str(cpu_path))
                jax.ffi.register_ffi_target(CPU_TARGET, jax.ffi.pycapsule(lib.ResqHadamardCpu), platform="cpu")
                lib.ResqHadamardCpuIsa.restype = ctypes.c_int32
                lib.ResqHadamardCpuIsa.argtypes = [ctypes.c_int32]
                cpu_isa = _ISA_NAMES.get(int(lib.ResqHadamardCpuIsa(0)), "unknown")
                self._libs.append(lib)
                cpu_loaded = str(cpu_path)
            except (OSError, AttributeError) as e:
                errors.append(f"cannot load {cpu_path}: {e}")
        cuda_loaded = None
        if _cuda_backend_present():
            cuda_path = find_library(CUDA_LIBRARY, self._search_dirs)
            if cuda_path is None:
                errors.append(f"{library_filename(CUDA_LIBRARY)} not found")
            else:
                try:
                    lib = ctypes.CDLL(str(cuda_path))
                    jax.ffi.register_ffi_target(
                        CUDA_TARGET, jax.ffi.pycapsule(lib.ResqHadamardCuda), platform="CUDA"
                    )
                    self._libs.append(lib)
                    cuda_loaded = str(cuda_path)
                except (OSError, AttributeError) as e:
                    errors.append(f"cannot load {cuda_path}: {e}")
        return FfiStatus(cpu_loaded, cuda_loaded, cpu_isa, tuple(errors))


_LOADER = _Loader()


def ffi_status() -> FfiStatus:
    """Loads the native libraries if not done yet and reports what is available."""
    return _LOADER.status()


# ----------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------


def _ffi_call(target: str, x: jax.Array, hk: np.ndarray, transpose: bool, isa: int | None = None) -> jax.Array:
    """x: [..., n] float32/bfloat16/float16, hk: [K, K] -> y: [..., n] (same dtype).
    isa (CPU target only): 0 = best for this CPU, 1 = baseline SSE2, 2 = AVX2+FMA, 3 = AVX-512
    (capped to what the CPU supports)."""
    call = jax.ffi.ffi_call(
        target,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        vmap_method="expand_dims",  # x gains the batch axis as leading rows; H_K gets [1, K, K]
    )
    attrs = {"transpose": bool(transpose)}
    if isa is not None:
        attrs["isa"] = np.int32(isa)
    return call(x, jnp.asarray(hk, dtype=jnp.float32), **attrs)


def _jnp(x: jax.Array, n: int, transpose: bool) -> jax.Array:
    return hadamard_transform(x, n, transpose=transpose)


def _dense(x: jax.Array, n: int, transpose: bool) -> jax.Array:
    cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    h = hadamard_matrix(n)
    hmat = jnp.asarray(h if transpose else h.T, dtype=cdt)  # y = x @ H^T, or x @ H for transpose
    y = jnp.matmul(x.astype(cdt), hmat, precision=EXACT)
    return y.astype(x.dtype)


def _forward(x: jax.Array, n: int, transpose: bool, impl: str, isa: int) -> jax.Array:
    if impl == "jnp":
        return _jnp(x, n, transpose)
    if impl == "dense":
        return _dense(x, n, transpose)
    _, hk, _ = hadamard_factor(n)
    st = _LOADER.status()

    def cpu(x_):
        return _ffi_call(CPU_TARGET, x_, hk, transpose, isa)

    def cuda(x_):
        return _ffi_call(CUDA_TARGET, x_, hk, transpose)

    def reference(x_):
        return _jnp(x_, n, transpose)

    if impl == "ffi":
        # Every branch of platform_dependent is traced, only the one for the lowering platform is
        # lowered: an unregistered target in another platform's branch is harmless. The check that
        # the library of the default backend is loaded happens before tracing (_resolve_impl).
        return jax.lax.platform_dependent(x, cpu=cpu, cuda=cuda, default=reference)
    # auto
    return jax.lax.platform_dependent(
        x,
        cpu=cpu if st.cpu_library else reference,
        cuda=cuda if st.cuda_library else reference,
        default=reference,
    )


def _transform_impl(x, n, transpose, impl, isa):
    return _forward(x, n, transpose, impl, isa)


_transform = jax.custom_vjp(_transform_impl, nondiff_argnums=(1, 2, 3, 4))


def _transform_fwd(x, n, transpose, impl, isa):
    # Calls the custom_vjp function (not _forward) so that the forward pass stays differentiable
    # under an outer grad (second order): the FFI call itself has no derivative rule.
    return _transform(x, n, transpose, impl, isa), None


def _transform_bwd(n, transpose, impl, isa, _, dy):
    # y = x @ H^T  =>  dx = dy @ H: the same transform with the opposite flag.
    return (_transform(dy, n, not transpose, impl, isa),)


_transform.defvjp(_transform_fwd, _transform_bwd)


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def _default_kernel_platform() -> str | None:
    """'cpu' or 'cuda' when the default backend has a native kernel in ffi/, else None."""
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda") and _cuda_backend_present():
        return "cuda"
    return None


def _resolve_impl(impl: str, dtype: jnp.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_IMPL, "").strip().lower()
        if env and env != "auto":
            if env not in IMPLS:
                raise ValueError(f"${ENV_IMPL} must be one of {IMPLS}, got {env!r}")
            impl = env
    if impl in ("jnp", "dense"):
        return impl
    platform = _default_kernel_platform()
    st = _LOADER.status()
    loaded = {"cpu": st.cpu_library, "cuda": st.cuda_library}.get(platform) if platform else None
    stem = CUDA_LIBRARY if platform == "cuda" else CPU_LIBRARY
    if impl == "ffi":
        if dtype not in _FFI_DTYPES:
            raise ValueError(
                f"the FFI Hadamard kernel supports float32, bfloat16 and float16, got {dtype}; "
                "cast x (e.g. x.astype(jnp.float32)) or use impl='jnp' (computes float64 in float64)"
            )
        if loaded is None:
            where = f"the {platform.upper()} library {library_filename(stem)}" if platform else "a CPU or CUDA backend"
            raise FfiUnavailableError(
                f"impl='ffi' needs {where}, which is not available on the '{jax.default_backend()}' backend "
                f"({'; '.join(st.errors) or 'not found'}). Build it with `pip install .` or use "
                "impl='auto' / impl='jnp'."
            )
        return impl
    # auto: float64 keeps full precision in the jnp reference (the kernels compute in float32).
    if dtype not in _FFI_DTYPES:
        return "jnp"
    if platform is not None and loaded is None:
        _LOADER.warn_missing_once(platform.upper(), library_filename(stem))
    return impl


def describe_auto() -> str:
    """One line naming what ``impl="auto"`` runs for float32 on the default backend (for the CLIs to print)."""
    impl = os.environ.get(ENV_IMPL, "").strip().lower() or "auto"
    if impl in ("jnp", "dense"):
        return f"Hadamard transform: {impl} (${ENV_IMPL}={impl})"
    platform = _default_kernel_platform()
    st = _LOADER.status()
    if platform == "cpu" and st.cpu_library:
        return f"Hadamard transform: native CPU kernel ({st.cpu_isa}, {st.cpu_library})"
    if platform == "cuda" and st.cuda_library:
        return f"Hadamard transform: native CUDA kernel ({st.cuda_library})"
    return (f"Hadamard transform: jnp reference, the native {platform or jax.default_backend()} kernel is unavailable "
            f"({'; '.join(st.errors) or 'not built for this backend'})")


def hadamard(x, size: int | None = None, *, transpose: bool = False, impl: str = "auto") -> jax.Array:
    """Normalized Hadamard transform along the last axis.

    x: [..., n] float32, bfloat16, float16 (or float64, computed by the jnp reference).
    Returns y: [..., n], same dtype:
      transpose=False: y = x @ hadamard_matrix(n).T   (y_i = sum_j H[i, j] x_j)
      transpose=True:  y = x @ hadamard_matrix(n)     (the inverse)
    size: optional check that n == size. impl: "auto" | "ffi" | "jnp" | "dense" (module docstring).
    Raises HadamardSizeError for a size with no construction (the message lists sizes
    that work), ValueError for a non-floating dtype or an unknown impl, FfiUnavailableError for
    impl="ffi" without the native library. Usable under jit / vmap / grad.
    """
    return _hadamard(x, size, transpose, impl, 0)


def _hadamard(x, size, transpose, impl, isa) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise HadamardSizeError("hadamard needs at least one axis (x: [..., n]), got a scalar")
    n = x.shape[-1]
    if size is not None and size != n:
        raise HadamardSizeError(
            f"size={size} does not match the last axis of x (shape {x.shape}); pass size=None or reshape x"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"hadamard needs a floating x (float32, bfloat16, float16 or float64), got {x.dtype}; "
            "cast it first, e.g. x.astype(jnp.float32)"
        )
    hadamard_factor(n)  # HadamardSizeError (with sizes that work) for impossible n
    resolved = _resolve_impl(impl, jnp.dtype(x.dtype))
    return _transform(x, n, bool(transpose), resolved, int(isa))

