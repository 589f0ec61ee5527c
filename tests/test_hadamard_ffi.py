"""Native FFI Hadamard (resq_jax.kernels.hadamard, ffi/) against the jnp reference
(resq_jax.transforms.fwht.hadamard_transform) and the dense float64 matrix (transforms.hadamard.hadamard_matrix)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from resq_jax.kernels import hadamard as H
from resq_jax.transforms.fwht import hadamard_transform, hadamard_transform_np
from resq_jax.transforms.hadamard import HadamardSizeError, hadamard_matrix

ROOT = Path(__file__).resolve().parents[1]
SECTION2_SIZES = (576, 896, 1536, 4864, 8960, 18944, 29568)
POW2_SIZES = (64, 128, 1024, 4096, 16384)
ALL_SIZES = SECTION2_SIZES + POW2_SIZES + (14336,)
BATCHES = ((3, 5), (1,), (7,))


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def ffi(tmp_path_factory):
    """The loaded FFI status. If no built library is found (checkout never pip-installed) and a
    compiler is present, build the CPU library with CMake into a temporary dir and use it, so the
    suite always exercises the native kernel where one can exist."""
    status = H.ffi_status()
    if status.cpu_library is None and _cxx() and shutil.which("cmake"):
        build = tmp_path_factory.mktemp("ffi_build")
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build), "-DRESQ_JAX_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}"],
            check=True,
            capture_output=True,
        )
        subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(H, "_LOADER", H._Loader(search_dirs=[build]))
            yield H.ffi_status()
        return
    yield status


def _rng_x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _rel_err(y, ref, x):
    """max |y - ref| / max row norm of x."""
    y, ref, x = (np.asarray(a, dtype=np.float64) for a in (y, ref, x))
    return np.abs(y - ref).max() / np.linalg.norm(x.reshape(-1, x.shape[-1]), axis=-1).max()


# ----------------------------------------------------------------------------------------
# The library is really used
# ----------------------------------------------------------------------------------------


def test_library_loaded_when_compiler_exists(ffi):
    if _cxx() is None:
        pytest.skip("no C++ compiler on this machine: the jnp fallback is the expected path")
    assert ffi.cpu_library is not None, f"native CPU Hadamard library not loaded: {ffi.errors}"
    assert Path(ffi.cpu_library).name == H.library_filename(H.CPU_LIBRARY)
    assert ffi.cpu_isa in ("baseline", "avx2", "avx512")
    jaxpr = str(jax.make_jaxpr(lambda a: H.hadamard(a))(jnp.zeros((2, 576), jnp.float32)))
    assert "ffi_call" in jaxpr and H.CPU_TARGET in jaxpr


def test_installed_distribution_ships_the_library():
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("resq-jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("resq-jax is not pip-installed (tests run from the checkout)")
    names = {f.name for f in dist.files or ()}
    assert H.library_filename(H.CPU_LIBRARY) in names, "pip install did not install the CPU FFI library"


# ----------------------------------------------------------------------------------------
# Parity with the jnp reference and the dense float64 matrix
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", ALL_SIZES)
def test_ffi_matches_reference_float32(ffi, n):
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    batch = BATCHES[ALL_SIZES.index(n) % len(BATCHES)]
    x = _rng_x(batch + (n,), seed=n)
    for transpose in (False, True):
        if transpose:  # eager and jitted dispatch (jit traces every platform branch)
            y = jax.jit(lambda a: H.hadamard(a, n, transpose=True, impl="ffi"))(x)
        else:
            y = H.hadamard(x, n, impl="ffi")
        assert y.shape == x.shape and y.dtype == jnp.float32
        ref = hadamard_transform(x, n, transpose=transpose)
        assert _rel_err(y, ref, x) <= 1e-5, (n, transpose)
        ref64 = hadamard_transform_np(x.astype(np.float64), transpose=transpose)
        assert _rel_err(y, ref64, x) <= 1e-5, (n, transpose)


@pytest.mark.parametrize("n", (12, 20, 37, 76 * 4, 576, 1536))
def test_ffi_matches_dense_matrix(ffi, n):
    """Independent check of the convention: y = x @ hadamard_matrix(n).T (float64 dense)."""
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    x = _rng_x((5, n), seed=1)
    hm = hadamard_matrix(n)
    np.testing.assert_allclose(hm @ hm.T, np.eye(n), atol=1e-12)
    y = np.asarray(H.hadamard(x, impl="ffi"), np.float64)
    yt = np.asarray(H.hadamard(x, transpose=True, impl="ffi"), np.float64)
    assert _rel_err(y, x.astype(np.float64) @ hm.T, x) <= 1e-6
    assert _rel_err(yt, x.astype(np.float64) @ hm, x) <= 1e-6


def test_every_cpu_code_path_agrees(ffi):
    """Baseline SSE2, AVX2 and AVX-512 variants (each capped to this CPU) against the reference,
    including tiny sizes (m < vector width) and substitutes (odd K)."""
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    for n in (2, 8, 12, 37, 40, 148, 4864, 8960):
        x = _rng_x((3, n), seed=n)
        ref = hadamard_transform_np(x.astype(np.float64))
        outs = [np.asarray(H._hadamard(x, None, False, "ffi", isa)) for isa in (1, 2, 3)]
        for y in outs:
            assert _rel_err(y, ref, x) <= 1e-6, n
        # The butterflies are bit-identical; only the K x K product's summation order / FMA differ.
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_many_rows_thread_partition(ffi):
    """Large calls are split over the intra-op pool; every row must be transformed exactly once."""
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    x = _rng_x((513, 1536), seed=3)
    y = np.asarray(H.hadamard(x, impl="ffi"))
    ref = np.asarray(hadamard_transform(x))
    assert _rel_err(y, ref, x) <= 1e-5
    # Row i of the output depends only on row i of the input.
    x2 = x.copy()
    x2[200] = 0.0
    y2 = np.asarray(H.hadamard(x2, impl="ffi"))
    assert np.array_equal(np.delete(y2, 200, axis=0), np.delete(y, 200, axis=0))
    assert np.all(y2[200] == 0.0)


@pytest.mark.parametrize("dtype,eps", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)])
def test_half_precision(ffi, dtype, eps):
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    for n in (576, 4864, 16384):
        x = jnp.asarray(_rng_x((3, n), seed=n), dtype)
        y = H.hadamard(x, impl="ffi")
        assert y.dtype == dtype
        ref = hadamard_transform(x)  # float32 compute from the same inputs, one final rounding
        y64, ref64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
        # Same float32 value up to summation order (~1e-7 of the row norm), rounded once: at most
        # one ulp apart, plus the float32 summation noise for values near zero.
        row_norm = float(np.linalg.norm(np.asarray(x, np.float64), axis=-1).max())
        assert np.all(np.abs(y64 - ref64) <= 2 * eps * np.abs(ref64) + 1e-6 * row_norm)
        assert np.mean(y64 == ref64) > 0.97
        truth = hadamard_transform_np(np.asarray(x, np.float64))
        assert np.abs(y64 - truth).max() <= eps * np.abs(truth).max()


def test_half_conversions_special_values(ffi):
    """Rounding of the float16/bfloat16 I/O: overflow to inf, NaN stays NaN, subnormals."""
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    # n = 2: y = [a + b, a - b] / sqrt(2)
    for dtype in (jnp.float16, jnp.bfloat16):
        finfo = ml_dtypes.finfo(np.dtype(dtype))
        big, tiny = float(finfo.max), float(finfo.smallest_subnormal)
        x = np.array([[big, big], [np.nan, 1.0], [tiny * 3, tiny], [1.0, -1.0], [0.0, -0.0]], np.float32)
        xd = jnp.asarray(x, dtype)
        y = np.asarray(H.hadamard(xd, impl="ffi"), np.float32)
        ref = np.asarray(hadamard_transform(xd), np.float32)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        ok = ~np.isnan(ref)
        np.testing.assert_array_equal(y[ok], ref[ok])


# ----------------------------------------------------------------------------------------
# jit / vmap / grad / transpose
# ----------------------------------------------------------------------------------------


def test_jit_vmap_match_eager(ffi):
    x = jnp.asarray(_rng_x((4, 6, 896), seed=5))
    eager = H.hadamard(x)
    np.testing.assert_array_equal(jax.jit(H.hadamard)(x), eager)
    np.testing.assert_array_equal(jax.vmap(H.hadamard)(x), eager)
    np.testing.assert_array_equal(jax.vmap(H.hadamard, in_axes=1, out_axes=1)(x), eager)
    np.testing.assert_array_equal(jax.jit(jax.vmap(jax.vmap(H.hadamard)))(x), eager)


def test_transpose_is_inverse_and_matches_dense(ffi):
    x = jnp.asarray(_rng_x((3, 4864), seed=6))
    y = H.hadamard(x)
    back = H.hadamard(y, transpose=True)
    assert _rel_err(back, x, x) <= 1e-5
    hm = hadamard_matrix(4864)
    assert _rel_err(H.hadamard(x, transpose=True), np.asarray(x, np.float64) @ hm, x) <= 1e-5


@pytest.mark.parametrize("transpose", (False, True))
def test_grad_is_the_transpose_transform(ffi, transpose):
    n = 1536
    x = jnp.asarray(_rng_x((2, n), seed=7))
    w = _rng_x((2, n), seed=8)
    hm = hadamard_matrix(n)
    # f(x) = <w, x A> with A = H^T (transpose=False) or H (True)  =>  df/dx = w A^T
    g = jax.grad(lambda a: jnp.sum(jnp.asarray(w) * H.hadamard(a, transpose=transpose)))(x)
    analytic = w.astype(np.float64) @ (hm if not transpose else hm.T)
    assert _rel_err(g, analytic, w) <= 1e-5
    # Non-linear loss under jit + vmap, against the jnp reference's autodiff.
    loss = lambda f: lambda a: jnp.sum(jnp.sin(f(a)) ** 2)  # noqa: E731
    g_ffi = jax.jit(jax.vmap(jax.grad(loss(lambda a: H.hadamard(a, transpose=transpose)))))(x)
    g_ref = jax.vmap(jax.grad(loss(lambda a: hadamard_transform(a, transpose=transpose))))(x)
    assert _rel_err(g_ffi, g_ref, np.ones((1, n))) <= 1e-5
    if transpose:  # second order (the backward pass is itself the custom_vjp transform)
        x1 = x[:1, :576]
        hvp = jax.grad(lambda a: jnp.sum(jax.grad(loss(lambda b: H.hadamard(b, transpose=True)))(a)))(x1)
        hvp_ref = jax.grad(lambda a: jnp.sum(jax.grad(loss(lambda b: hadamard_transform(b, transpose=True)))(a)))(x1)
        assert _rel_err(hvp, hvp_ref, np.ones((1, 576))) <= 1e-4


def test_impls_agree(ffi):
    x = jnp.asarray(_rng_x((3, 576), seed=9))
    outs = {impl: np.asarray(H.hadamard(x, impl=impl)) for impl in ("auto", "jnp", "dense")}
    if ffi.cpu_library is not None:
        outs["ffi"] = np.asarray(H.hadamard(x, impl="ffi"))
    for impl, y in outs.items():
        assert _rel_err(y, outs["jnp"], x) <= 1e-5, impl


def test_env_override_selects_impl(ffi, monkeypatch):
    x = jnp.zeros((2, 576), jnp.float32)
    monkeypatch.setenv(H.ENV_IMPL, "dense")
    jaxpr = str(jax.make_jaxpr(lambda a: H.hadamard(a))(x))
    assert "ffi_call" not in jaxpr and "576,576" in jaxpr.replace(" ", "")
    monkeypatch.setenv(H.ENV_IMPL, "bogus")
    with pytest.raises(ValueError, match=H.ENV_IMPL):
        H.hadamard(x)


# ----------------------------------------------------------------------------------------
# Fallback and errors
# ----------------------------------------------------------------------------------------


def test_missing_library_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(H, "_LOADER", H._Loader(search_dirs=[tmp_path]))
    x = jnp.asarray(_rng_x((3, 576), seed=10))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = H.hadamard(x)
        y2 = jax.jit(lambda a: H.hadamard(a, transpose=True))(x)
        H.hadamard(x)
    ours = [w for w in rec if "native CPU Hadamard kernel is unavailable" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "ffi_call" not in str(jax.make_jaxpr(lambda a: H.hadamard(a))(x))
    np.testing.assert_array_equal(y1, hadamard_transform(x))
    np.testing.assert_array_equal(y2, hadamard_transform(x, transpose=True))
    with pytest.raises(H.FfiUnavailableError, match="pip install"):
        H.hadamard(x, impl="ffi")
    with pytest.raises(H.FfiUnavailableError, match="pip install"):
        jax.jit(lambda a: H.hadamard(a, impl="ffi"))(x)


def test_bad_inputs():
    with pytest.raises(HadamardSizeError, match="Nearby sizes that work"):
        H.hadamard(jnp.zeros((2, 1031), jnp.float32))  # 1031 is prime > MAX_K: no construction
    with pytest.raises(HadamardSizeError, match="size=512"):
        H.hadamard(jnp.zeros((2, 576), jnp.float32), 512)
    with pytest.raises(ValueError, match="floating"):
        H.hadamard(jnp.zeros((2, 576), jnp.int32))
    with pytest.raises(ValueError, match="impl must be one of"):
        H.hadamard(jnp.zeros((2, 576), jnp.float32), impl="cuda")
    with pytest.raises(HadamardSizeError):
        H.hadamard(jnp.zeros((), jnp.float32))


def test_float64_uses_the_exact_reference():
    with jax.enable_x64(True):
        x = jnp.asarray(_rng_x((3, 1536), seed=11).astype(np.float64))
        y = H.hadamard(x)
        assert y.dtype == jnp.float64
        assert _rel_err(y, hadamard_transform_np(np.asarray(x)), x) <= 1e-13
        with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
            H.hadamard(x, impl="ffi")


def test_handler_validates_operands(ffi):
    if ffi.cpu_library is None:
        pytest.skip("native library unavailable")
    x = jnp.zeros((2, 576), jnp.float32)
    with pytest.raises(Exception, match="not K \\* 2\\^m"):
        jax.block_until_ready(H._ffi_call(H.CPU_TARGET, x, np.eye(5, dtype=np.float32), False, 0))
    with pytest.raises(Exception, match="float32, bfloat16 or float16"):
        jax.block_until_ready(H._ffi_call(H.CPU_TARGET, jnp.zeros((2, 576), jnp.int32), np.eye(36), False, 0))


def test_empty_batch(ffi):
    x = jnp.zeros((0, 576), jnp.float32)
    assert H.hadamard(x).shape == (0, 576)


# ----------------------------------------------------------------------------------------
# CUDA sources compile (no GPU here: compile-only)
# ----------------------------------------------------------------------------------------


def test_cuda_kernel_compiles_for_sm80_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernel is only compiled where the CUDA toolkit is installed")
    obj = tmp_path / "hadamard_cuda.o"
    cmd = [
        nvcc, "-std=c++17", "-O3", "-c", "-Xcompiler", "-fPIC",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-isystem", jax.ffi.include_dir(), "-I", str(ROOT / "ffi"),
        str(ROOT / "ffi" / "hadamard_cuda.cu"), "-o", str(obj),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert obj.stat().st_size > 0
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout
        assert "ResqHadamardCuda" in symbols
