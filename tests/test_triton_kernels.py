"""Packed mixed-precision GEMM: the jnp reference, and the Triton kernels without a GPU.

* jnp reference (resq_jax.kernels.gemm_reference): codes are those of quantize_mixed,
  int32 accumulators equal a NumPy int64 matmul of the unpacked codes, the output equals fake
  quantization (dequantize_mixed(x) @ dequantize_weight(w) + bias) to float32 rounding.
* Triton kernels under Triton's interpreter (a subprocess with TRITON_INTERPRET=1, torch CPU
  tensors; tests/support/triton/selfcheck.py): codes and accumulators identical to the
  reference, outputs within float rounding, on tile non-multiples and K = 576/896/1536/4864 with
  r = K/8 and r = 0; also the JAX launchers (jax_ops) with jax_triton replaced by a stand-in.
* Ahead-of-time compile to cubin for sm_80 and sm_90 (subprocess without the interpreter), with
  the numerics visible in the PTX/SASS (IEEE division, both magic-number additions of the rint).
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resq_jax.formats import packing
from resq_jax.formats.integer import dequantize_mixed, dequantize_weight, quantize_mixed, quantize_weight_sym
from resq_jax.kernels.gemm_reference import dequantize_packed_activations, int_accumulators, pack_weights
from resq_jax.kernels.mixed_gemm import mixed_gemm, quantize_pack, select_impl, triton_available
from resq_jax.runtime.linear import ActQuant, LinearLayout, PackedLinear, pack_block_np
from support.triton import selfcheck  # imports neither triton nor torch

ROOT = Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_triton = pytest.mark.skipif(
    not (HAVE_TRITON and HAVE_TORCH),
    reason="triton (and torch) not installed: pip install -e '.[test]' installs both")


def _inputs(m, k, n, r, seed=0, dtype=jnp.float32, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * np.exp(rng.uniform(-2, 2, (m, 1)))
    if r:
        x[:, k - r:] *= 10.0
    x[0] = 0.0  # all-zero token: range [-1, 1]
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return (jnp.asarray(x, jnp.float32).astype(dtype), jnp.asarray(w),
            None if b is None else jnp.asarray(b))


def _packed(m, k, n, r, **kw):
    x, w, b = _inputs(m, k, n, r, **kw)
    codes = quantize_weight_sym(w, 4, 8, r)
    return x, codes, quantize_pack(x, r, impl="jnp"), pack_weights(codes, b), b


SHAPES = [(7, 96, 40, 16), (5, 576, 24, 72), (3, 576, 24, 0), (4, 4864, 16, 608), (2, 34, 3, 0)]


# ----------------------------------------------------------------------------------------------
# jnp reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,r", SHAPES[:3])
def test_quantize_pack_is_quantize_mixed(m, k, n, r, dtype):
    x, *_ = _inputs(m, k, n, r, dtype=dtype)
    px = quantize_pack(x, r, impl="jnp")
    ref = quantize_mixed(x, 4, 8, r)
    assert px.q4.dtype == jnp.int8 and px.q4.shape == (m, (k - r) // 2)
    np.testing.assert_array_equal(np.asarray(packing.unpack_int4(px.q4)).astype(np.int32) + 8,
                                  np.asarray(ref.low.q[:, 0]).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(px.zero4) + 8, np.asarray(ref.low.zero[:, 0, 0]))
    np.testing.assert_array_equal(np.asarray(px.scale4), np.asarray(ref.low.scale[:, 0, 0]))
    if r:
        np.testing.assert_array_equal(np.asarray(px.q8).astype(np.int32) + 128,
                                      np.asarray(ref.high.q[:, 0]).astype(np.int32))
        np.testing.assert_array_equal(np.asarray(px.zero8) + 128, np.asarray(ref.high.zero[:, 0, 0]))
    else:
        assert px.q8 is None and px.scale8 is None and px.zero8 is None
    # (q - z) * s on the signed grid is the same dequantization
    np.testing.assert_array_equal(np.asarray(dequantize_packed_activations(px)),
                                  np.asarray(dequantize_mixed(ref)))


@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_int_accumulators_equal_numpy_int64(m, k, n, r):
    _, codes, px, pw, _ = _packed(m, k, n, r)
    acc4, acc8 = int_accumulators(px, pw)
    x4 = packing.unpack_int4_np(np.asarray(px.q4)).astype(np.int64)
    w4 = packing.unpack_int4_np(np.asarray(pw.w4), axis=0).astype(np.int64)
    np.testing.assert_array_equal(w4, np.asarray(codes.q_low))
    assert acc4.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc4), x4 @ w4)
    np.testing.assert_array_equal(np.asarray(pw.colsum4), w4.sum(0))
    if r:
        want8 = np.asarray(px.q8).astype(np.int64) @ np.asarray(pw.w8).astype(np.int64)
        np.testing.assert_array_equal(np.asarray(acc8), want8)
        np.testing.assert_array_equal(np.asarray(pw.colsum8), np.asarray(pw.w8, np.int64).sum(0))
    else:
        assert acc8 is None and pw.w8 is None


@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_output_equals_fake_quant(m, k, n, r):
    """y (float32) vs dequantize_mixed(x) @ dequantize_weight(w) + bias, the float fake-quant
    linear: equal up to the float32 rounding of a length-K dot (|err| <= (K + 8) eps sum|x||w|)."""
    x, codes, px, pw, b = _packed(m, k, n, r)
    y = np.asarray(mixed_gemm(px, pw, impl="jnp", out_dtype=jnp.float32), np.float64)
    xd = np.asarray(dequantize_mixed(quantize_mixed(x, 4, 8, r)), np.float64)
    wd = np.asarray(dequantize_weight(codes), np.float64)
    fake32 = np.asarray(jnp.asarray(xd, jnp.float32) @ jnp.asarray(wd, jnp.float32)
                        + b[None, :], np.float64)
    exact = xd @ wd + np.asarray(b, np.float64)[None, :]
    mag = np.abs(xd) @ np.abs(wd) + np.abs(np.asarray(b))[None, :]
    err_int = np.max(np.abs(y - exact) / mag)
    err_fake = np.max(np.abs(fake32 - exact) / mag)
    print(f"K={k} r={r}: integer path {err_int:.2e}, float fake quant {err_fake:.2e} (x eps "
          f"{err_int / EPS32:.1f}, {err_fake / EPS32:.1f}); max |y - fake32| "
          f"{np.max(np.abs(y - fake32)):.3g}")
    assert err_int <= 8 * EPS32  # exact integers, then a few roundings
    assert np.max(np.abs(y - fake32) / mag) <= (k + 8) * EPS32
    y16 = mixed_gemm(px, pw, impl="jnp")
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(jnp.asarray(y, jnp.float32)
                                                               .astype(jnp.bfloat16)))


def test_leading_axes_jit_and_no_bias():
    x, w, _ = _inputs(6, 96, 8, 16, bias=False)
    pw = pack_weights(quantize_weight_sym(w, 4, 8, 16))
    assert pw.bias is None
    x3 = x.reshape(2, 3, 96)

    @jax.jit
    def linear(x):
        return mixed_gemm(quantize_pack(x, 16), pw, out_dtype=jnp.float32)

    y3 = linear(x3)
    assert y3.shape == (2, 3, 8)
    y2 = mixed_gemm(quantize_pack(x, 16), pw, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(y3).reshape(6, 8), np.asarray(y2))


def test_auto_is_jnp_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU backend")
    assert select_impl("auto") == "jnp" and not triton_available()


def test_bad_input_errors_name_the_fix():
    x, w, _ = _inputs(2, 96, 8, 16)
    with pytest.raises(ValueError, match="odd"):
        quantize_pack(x, 15)
    with pytest.raises(ValueError, match="odd"):
        quantize_pack(x[:, :95], 0)
    with pytest.raises(ValueError, match="0..K-1"):
        quantize_pack(x, 96)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        quantize_pack(x.astype(jnp.float16), 16)
    with pytest.raises(ValueError, match="low_bits"):
        quantize_pack(x, 16, low_bits=8)
    with pytest.raises(ValueError, match="impl must be one of"):
        quantize_pack(x, 16, impl="cuda")
    pw = pack_weights(quantize_weight_sym(w, 4, 8, 16))
    with pytest.raises(ValueError, match="same high"):
        mixed_gemm(quantize_pack(x, 32), pw)
    with pytest.raises(ValueError, match="out_dtype"):
        mixed_gemm(quantize_pack(x, 16), pw, out_dtype=jnp.float16)
    with pytest.raises(ValueError, match="group_size=None"):
        pack_weights(quantize_weight_sym(w, 4, 8, 16, group_size=16))
    with pytest.raises(ValueError, match="bias must have shape"):
        pack_weights(quantize_weight_sym(w, 4, 8, 16), jnp.zeros(7))


def _run_py(code: str, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "JAX_PLATFORMS": "cpu", "TRITON_DEFAULT_FP_FUSION": "1"})
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_import_without_triton():
    """resq_jax.kernels and the jnp path work when triton / jax_triton cannot be imported."""
    p = _run_py("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('triton', 'jax_triton'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import jax.numpy as jnp
        import resq_jax.kernels, resq_jax.kernels.triton, resq_jax.kernels.triton.launch
        from resq_jax.kernels.mixed_gemm import quantize_pack
        px = quantize_pack(jnp.ones((2, 8)), 2)
        assert 'triton' not in sys.modules and 'jax_triton' not in sys.modules
        try:
            quantize_pack(jnp.ones((2, 8)), 2, impl='triton')
        except RuntimeError as e:
            assert "impl='jnp'" in str(e), e
        else:
            raise AssertionError('impl=triton without triton must raise')
        print('ok')
    """)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcheck") / "selfcheck.json"
    p = _run_py(f"""
        import sys
        from support.triton import selfcheck
        sys.exit(selfcheck.main(['--json', {str(out)!r}]))
    """, env_extra={"TRITON_INTERPRET": "1"})
    print(p.stdout)
    if not out.exists():
        pytest.fail(f"selfcheck did not run (exit {p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    assert res["interpret"], "the kernels must have run under TRITON_INTERPRET=1"
    return res


@needs_triton
@pytest.mark.parametrize("case", selfcheck.CASES, ids=lambda c: c.name)
def test_interpreted_kernels_match_reference(interpreted, case):
    by_name = {c["case"]: c for c in interpreted["cases"]}
    c = by_name[case.name]
    assert all(c["codes_equal"].values()), (c["case"], c["codes_equal"])
    assert c["acc_equal"], c["case"]
    for dt in ("float32", "bfloat16"):
        o = c["out"][dt]
        assert o["dtype_ok"] and o["within_tol"], (c["case"], dt, o)
        assert o["max_over_mag"] <= (8 * EPS32 if dt == "float32" else 2 ** -7 + 8 * EPS32)
    assert c["ok"]


@needs_triton
def test_interpreted_cover_required_shapes(interpreted):
    names = [c["case"] for c in interpreted["cases"]]
    for k in (576, 896, 1536, 4864):
        assert any(f"_k{k}_r{k // 8}_" in n for n in names), k
        assert any(f"_k{k}_r0_" in n for n in names), k


@needs_triton
def test_jax_launchers_with_stand_in(interpreted):
    assert interpreted["jax_glue"], "no jax launcher check ran"
    for g in interpreted["jax_glue"]:
        assert g["ok"] and g["codes_equal"] and g["acc_equal"], g
        assert g["shape"][0] == 1  # the leading batch axis survived


@needs_triton
def test_runtime_packed_linear_runs_the_triton_kernels(interpreted):
    """resq_jax.runtime.linear.PackedLinear(impl="triton") feeds its stored arrays to the Triton kernels
    (through the jax launchers and the stand-in) and equals its XLA integer-dot path."""
    assert interpreted["packed_linear"], "no PackedLinear check ran"
    for g in interpreted["packed_linear"]:
        assert g["ok"] and g["max_over_mag"] <= 64 * EPS32, g
        assert g["shape"][0] == 2


# ----------------------------------------------------------------------------------------------
# the real jax_triton.triton_call under jax.jit (an NVIDIA GPU with a GPU jaxlib only)
# ----------------------------------------------------------------------------------------------
TRITON_CUSTOM_CALL = "triton_kernel_call"  # the XLA custom call jax_triton.triton_call lowers to
REAL_TRITON_CASES = selfcheck.QUICK_CASES + (selfcheck.CASES[4], selfcheck.CASES[6])  # + K = 576, 896


def real_triton_call_unavailable() -> str | None:
    """Why the real jax_triton path cannot run in this process, or None when it can."""
    why = []
    if jax.default_backend() != "gpu":
        why.append(f"JAX's default backend is {jax.default_backend()!r}, not a GPU")
    try:
        import jax_triton  # noqa: F401
    except Exception as e:  # not installed, or (on a CPU jaxlib) "requires JAX ... with GPU support"
        why.append(f"import jax_triton fails ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not why:
        return None
    return ("jax_triton.triton_call needs a CUDA GPU and a GPU jaxlib (jax_triton imports only "
            "when jaxlib has its CUDA triton plugin); here " + "; ".join(why) + ". What runs "
            "instead on this machine: the same Triton kernels under Triton's interpreter "
            "(test_interpreted_kernels_match_reference), and the JAX launchers and "
            "PackedLinear(impl='triton') eagerly with a torch stand-in for triton_call "
            "(test_jax_launchers_with_stand_in, test_runtime_packed_linear_runs_the_triton_kernels)")


@pytest.mark.parametrize("case", REAL_TRITON_CASES, ids=lambda c: c.name)
def test_real_triton_call_under_jit(case):
    """The launchers (jax_ops) through the real jax_triton.triton_call, compiled by jax.jit:
    the lowered program holds the triton_kernel_call custom call (not the jnp path), the codes
    and int32 accumulators equal the jnp reference exactly, the float32 / bfloat16 outputs are
    within the interpreter checks' tolerances (selfcheck.tolerances), and
    resq_jax.runtime.linear.PackedLinear(impl="triton") under jit equals its impl="jnp" twin. Skipped,
    with the reason, where jax_triton cannot run (any machine without a CUDA GPU)."""
    reason = real_triton_call_unavailable()
    if reason:
        pytest.skip(reason)
    pass
    from resq_jax.kernels.triton import jax_ops

    r = case.r
    x, w, bias = selfcheck.make_inputs(case)
    x = x.reshape(1, *x.shape)  # a leading batch axis, as the decoder's [B, T, K]
    codes = quantize_weight_sym(w, 4, 8, r)
    pw = pack_weights(codes, bias)
    quantize = jax.jit(lambda a: quantize_pack(a, r, impl="triton"))
    assert TRITON_CUSTOM_CALL in quantize.lower(x).as_text(), "jit did not lower to jax_triton's custom call"
    got_x, ref_x = quantize(x), quantize_pack(x, r, impl="jnp")
    assert jax.tree_util.tree_structure(got_x) == jax.tree_util.tree_structure(ref_x)
    for a, b in zip(jax.tree_util.tree_leaves(got_x), jax.tree_util.tree_leaves(ref_x)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    acc_fn = jax.jit(lambda px: jax_ops.int_accumulators(px, pw))
    assert TRITON_CUSTOM_CALL in acc_fn.lower(ref_x).as_text()
    acc4, acc8 = acc_fn(ref_x)
    ref4, ref8 = int_accumulators(ref_x, pw)
    np.testing.assert_array_equal(np.asarray(acc4), np.asarray(ref4))
    assert (acc8 is None) == (ref8 is None) == (r == 0)
    if r:
        np.testing.assert_array_equal(np.asarray(acc8), np.asarray(ref8))

    flat = {n: None if getattr(ref_x, n) is None else np.asarray(getattr(ref_x, n)).reshape(
        -1, *np.shape(getattr(ref_x, n))[2:]) for n in ("q4", "scale4", "zero4", "q8", "scale8", "zero8")}
    pwd = {n: None if getattr(pw, n) is None else np.asarray(getattr(pw, n))
           for n in ("w4", "scale4", "colsum4", "w8", "scale8", "colsum8", "bias")}
    mag = selfcheck._terms_magnitude(flat, pwd, np.asarray(ref4), None if ref8 is None else np.asarray(ref8))
    for dt, tol in zip((jnp.float32, jnp.bfloat16), selfcheck.tolerances(mag)):
        gemm = jax.jit(lambda px, dt=dt: mixed_gemm(px, pw, impl="triton", out_dtype=dt))
        assert TRITON_CUSTOM_CALL in gemm.lower(ref_x).as_text()
        y, y_ref = gemm(ref_x), mixed_gemm(ref_x, pw, impl="jnp", out_dtype=dt)
        assert y.shape == y_ref.shape == (1, case.m, case.n) and y.dtype == y_ref.dtype
        d = np.abs(np.asarray(y, np.float64) - np.asarray(y_ref, np.float64))[0]
        assert np.all(d <= tol), (jnp.dtype(dt).name, float(d.max()), float((d / (mag + 1e-30)).max()))

    k, n = w.shape
    lay = LinearLayout(d_in=k, d_out=n, groups=1, low_rows=k - r, high_rows=r, w_low_bits=4, w_high_bits=8,
                               act=ActQuant(4, 8, r))
    arrays = {} if bias is None else {"bias": np.asarray(bias, np.float32)}
    for b, q, scale in (("low", codes.q_low, codes.scale_low), ("high", codes.q_high, codes.scale_high)):
        if lay.rows(b):
            arrays.update({f"w_{b}": pack_block_np(np.asarray(q, np.int8)[None], lay.bits(b)),
                           f"scale_{b}": np.asarray(scale[0])})
    tri, ref = (PackedLinear(lay, arrays, impl) for impl in ("triton", "jnp"))
    assert tri.triton_applies()
    xx = jnp.concatenate([x, x[:, ::-1]]).astype(jnp.float32)  # [2, M, K]
    graphdef, state = nnx.split(tri)
    linear = jax.jit(lambda st, a: nnx.merge(graphdef, st)(a))
    assert TRITON_CUSTOM_CALL in linear.lower(state, xx).as_text()
    y, y_ref = np.asarray(linear(state, xx)), np.asarray(ref(xx))
    assert y.shape == y_ref.shape == (2, case.m, n)
    assert np.abs(y - y_ref).max() <= 64 * EPS32 * np.abs(y_ref).max()


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    p = _run_py("""
        import json, os, re, subprocess, tempfile, triton
        from support.triton import aot
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                                'nvdisasm')
        res = {}
        for cap in (80, 90):
            for name in aot.KERNELS:
                c = aot.compile_kernel(name, cap)
                ptx, cubin = c.asm['ptx'], c.asm['cubin']
                sass = ''
                if name == 'quantize_pack' and os.path.exists(nvdisasm):
                    with tempfile.NamedTemporaryFile(suffix='.cubin', delete=False) as f:
                        f.write(cubin)
                    sass = subprocess.run([nvdisasm, f.name], capture_output=True, text=True).stdout
                    os.unlink(f.name)
                res[f'{name}@{cap}'] = dict(
                    cubin=len(cubin), target=re.search(r'\\.target\\s+(\\S+)', ptx).group(1),
                    div_rn=ptx.count('div.rn.f32'),
                    div_approx=ptx.count('div.full.f32') + ptx.count('div.approx.f32'),
                    magic_add=ptx.count('0f4B400000'), magic_sub=ptx.count('0fCB400000'),
                    sass_magic_add=sass.count(', 12582912'), sass_magic_sub=sass.count('-12582912'),
                    mma=ptx.count('mma.sync'), wgmma=ptx.count('wgmma.mma_async'),
                    bf16_rn=ptx.count('cvt.rn.bf16'))
        print(json.dumps(res))
    """)
    if p.returncode:
        pytest.fail(f"AOT compile failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("cap", [80, 90])
@pytest.mark.parametrize("name", ["quantize_pack", "mixed_gemm", "int_acc"])
def test_aot_cubin(compiled, name, cap):
    c = compiled[f"{name}@{cap}"]
    print(name, cap, c)
    assert c["cubin"] > 0
    assert c["target"] == ("sm_80" if cap == 80 else "sm_90a")
    if name == "quantize_pack":
        assert c["div_rn"] > 0 and c["div_approx"] == 0
        assert c["magic_add"] > 0 and c["magic_add"] == c["magic_sub"]
        if c["sass_magic_add"] or c["sass_magic_sub"]:  # nvdisasm present: ptxas kept both adds
            assert c["sass_magic_add"] == c["sass_magic_sub"] > 0
    else:  # integer tensor cores: mma.sync on sm_80, wgmma on sm_90a
        assert (c["mma"] if cap == 80 else c["wgmma"]) > 0
    if name == "mixed_gemm":
        assert c["bf16_rn"] > 0


# ----------------------------------------------------------------------------------------------
# benchmark script
# ----------------------------------------------------------------------------------------------
def test_bench_script_without_gpu_exits_clearly(tmp_path):
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU backend")
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu_gemm.py"), "--json",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "no CUDA" in p.stderr and "nothing was measured" in p.stderr
    assert not out.exists()
