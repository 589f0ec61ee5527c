"""Streamed calibration statistics: against an independent reference (the transformers forward of the
same checkpoint, sites captured with torch hooks, sums in NumPy float64), and device-count independence."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hf_fixtures import build_torch_model, tiny_llama_config, tiny_qwen2_config
from resq_jax.calibration.statistics import calibrate
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rope_inv_freq_f64(hf_config) -> np.ndarray:
    """RoPE inverse frequencies in float64 from the transformers config's rope parameters, written
    here from the published formulas (default; Llama-3 frequency scaling), not taken from models/rope.py."""
    rp = dict(hf_config.rope_parameters)
    hd = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    assert rp.get("partial_rotary_factor", 1.0) == 1.0
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return inv
    assert kind == "llama3", kind
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old_ctx = rp["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    return np.where(wavelen < old_ctx / high, inv,  # high frequencies: unchanged
                    np.where(wavelen > old_ctx / low, inv / factor,  # low frequencies: divided by factor
                             (1 - smooth) * inv / factor + smooth * inv))  # in between: interpolated


def _torch_reference_stats(torch_model, windows: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Per-layer float64 statistics of the transformers (torch, float32) forward of ``windows`` [N, T],
    captured with forward hooks on the projections (sums over all tokens of all windows)."""
    import torch

    cfg = torch_model.config
    kv = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n, t = windows.shape
    # k after RoPE, computed here in float64 from the k_proj output: split-halves layout (rotate_half),
    # positions 0..T-1 in every window
    inv = _rope_inv_freq_f64(cfg)
    np.testing.assert_allclose(inv, torch_model.model.rotary_emb.inv_freq.double().numpy(), rtol=1e-6)
    freqs = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]

    def rope(k):  # [N, T, KV, hd]
        return k * cos + np.concatenate([-k[..., hd // 2:], k[..., :hd // 2]], axis=-1) * sin

    f64 = lambda a: a.detach().double().numpy()  # noqa: E731
    n_layers = cfg.num_hidden_layers
    out = {name: [None] * n_layers for name in
           ("attn", "mlp", "value", "key", "attn_in", "o_in", "mlp_in", "down_in", "gate_in")}
    abs_mean = lambda a: np.abs(a).mean(axis=1).max(axis=0)  # noqa: E731  mean over tokens, max over windows

    def on_input(i, name):
        def hook(_module, args):
            x = f64(args[0])
            if name == "attn_in":
                out["attn"][i] = np.einsum("nti,ntj->ij", x, x)
            elif name == "mlp_in":
                out["mlp"][i] = np.einsum("nti,ntj->ij", x, x)
            elif name == "gate_in":
                out["gate_in"][i] = x
                return
            out[name][i] = abs_mean(x)
        return hook

    def on_output(i, name):
        def hook(_module, _args, y):
            y = f64(y).reshape(n, t, kv, hd)
            if name == "value":
                out["value"][i] = np.einsum("ntki,ntkj->kij", y, y)
            else:
                k = rope(y)
                out["key"][i] = np.einsum("ntki,ntkj->ij", k, k)
        return hook

    handles = []
    for i, layer in enumerate(torch_model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        handles += [att.q_proj.register_forward_pre_hook(on_input(i, "attn_in")),
                    att.o_proj.register_forward_pre_hook(on_input(i, "o_in")),
                    mlp.up_proj.register_forward_pre_hook(on_input(i, "mlp_in")),
                    mlp.gate_proj.register_forward_pre_hook(on_input(i, "gate_in")),
                    mlp.down_proj.register_forward_pre_hook(on_input(i, "down_in")),
                    att.v_proj.register_forward_hook(on_output(i, "value")),
                    att.k_proj.register_forward_hook(on_output(i, "key"))]
    try:
        with torch.no_grad():
            torch_model(torch.as_tensor(windows, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    for i in range(n_layers):  # up_proj and gate_proj read the same tensor (the mlp statistic's input)
        g = out["gate_in"][i]
        assert np.array_equal(np.einsum("nti,ntj->ij", g, g), out["mlp"][i])
    return out


@pytest.fixture(scope="module", params=["llama_tied", "qwen2_bias"])
def tiny(request, tmp_path_factory):
    """(loaded checkpoint, the transformers model it was saved from)."""
    folder = tmp_path_factory.mktemp(request.param)
    config = tiny_llama_config(tied=True) if request.param == "llama_tied" else tiny_qwen2_config()
    torch_model = build_torch_model(config, seed=5)
    torch_model.save_pretrained(folder)
    return load_model(str(folder), with_tokenizer=False), torch_model


# Tolerances. Both forwards are float32 (torch/MKL on one side, XLA on the other) and differ only
# by rounding: matmul summation orders (inner dims 64/96), rsqrt, softmax and SiLU. Over the three
# layers the activations drift apart by a few float32 ulps (eps = 1.2e-7); a second moment sums
# products of two such activations over 120 tokens, so its error relative to its largest entry is
# of the same order (measured <= 1.7e-7 on both checkpoints). Compared normwise (to the largest
# entry, per head for value): off-diagonal entries that cancel to ~0 have large elementwise
# relative errors that mean nothing. Abs-means are means of positive numbers (no cancellation),
# compared elementwise (measured <= 8e-7). Both bounds keep ~10x margin above the measured float32
# noise; a wrong site, head split or RoPE gives errors of order 1e-2..1.
MOMENT_TOL = 2e-6  # max|got - ref| / max|ref|
ABS_MEAN_RTOL = 5e-6  # elementwise


def test_statistics_match_numpy_reference(tiny):
    """calibrate (JAX decoder, streamed) against statistics of the transformers forward of the same
    checkpoint, captured with torch hooks and summed in NumPy float64; RoPE of k computed here."""
    loaded, torch_model = tiny
    cfg = loaded.config
    model = from_weights(cfg, loaded.weights)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (6, 20))
    stats = calibrate(model, windows, progress=False, per_layer=True)
    ref = _torch_reference_stats(torch_model, windows)
    assert stats.tokens == windows.size
    assert stats.attn.dtype == np.float64
    # the sums over layers (what ResQ uses, and all a default run keeps) are those of the per-layer moments,
    # and a default run gives the same sums without the per-layer arrays
    np.testing.assert_array_equal(stats.attn_sum, stats.attn.sum(0))
    np.testing.assert_array_equal(stats.mlp_sum, stats.mlp.sum(0))
    lean = calibrate(model, windows, progress=False)
    assert lean.attn is None and lean.mlp is None
    np.testing.assert_array_equal(lean.attn_sum, stats.attn_sum)
    np.testing.assert_array_equal(lean.mlp_sum, stats.mlp_sum)
    assert stats.value.shape == (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
    failures = []
    for i in range(cfg.num_layers):
        pairs = [("attn", stats.attn[i], ref["attn"][i]), ("mlp", stats.mlp[i], ref["mlp"][i]),
                 ("key", stats.key[i], ref["key"][i])]
        pairs += [(f"value[head {h}]", stats.value[i, h], ref["value"][i][h]) for h in range(cfg.num_kv_heads)]
        for name, got, want in pairs:
            err = np.abs(got - want).max() / np.abs(want).max()
            if not err <= MOMENT_TOL:
                failures.append(f"layer {i} {name}: max|err|/max|ref| = {err:.3g} > {MOMENT_TOL:g}")
        for site in ("attn_in", "o_in", "mlp_in", "down_in"):
            got, want = stats.abs_mean[site][i], ref[site][i]
            err = np.max(np.abs(got - want) / np.abs(want))
            if not err <= ABS_MEAN_RTOL:
                failures.append(f"layer {i} abs_mean[{site}]: max relative error {err:.3g} > {ABS_MEAN_RTOL:g}")
    assert not failures, "\n".join(failures)


_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax
    from resq_jax.models.loaders import load_model
    from resq_jax.models.decoder import from_weights
    from resq_jax.calibration.statistics import calibrate
    loaded = load_model({folder!r}, with_tokenizer=False)
    windows = np.random.default_rng(1).integers(0, loaded.config.vocab_size, (8, 24))
    stats = calibrate(from_weights(loaded.config, loaded.weights), windows, progress=False, per_layer=True)
    np.savez({out!r}, **stats.as_dict())
    print(json.dumps({{"devices": jax.device_count()}}))
""")


def _run(folder, out, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    script = _SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), folder=str(folder), out=str(out))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["devices"] == devices
    return dict(np.load(out))


def test_four_devices_equal_one(tmp_path):
    folder = tmp_path / "model"
    build_torch_model(tiny_llama_config(tied=True), seed=6).save_pretrained(folder)
    one = _run(folder, tmp_path / "one.npz", 1)
    four = _run(folder, tmp_path / "four.npz", 4)
    assert set(one) == set(four)
    for key in one:
        scale = np.abs(one[key]).max()
        assert np.abs(one[key] - four[key]).max() <= 1e-12 * max(scale, 1.0), key
