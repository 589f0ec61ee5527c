"""Streamed calibration statistics: an independent NumPy float64 reference, and device-count independence."""
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import build_torch_model, tiny_llama_config
from models.decoder import from_weights
from models.loaders import load_model
from models.runner import LayerStreamer
from resq_jax.calibration import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_torch_model(tiny_llama_config(tied=False), seed=5).save_pretrained(folder)
    return load_model(str(folder), with_tokenizer=False)


def test_statistics_match_numpy_reference(tiny):
    cfg = tiny.config
    model = from_weights(cfg, tiny.weights)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (6, 20))
    stats = calibrate(model, windows, progress=False)
    # reference: capture every site on the whole batch at once, sums in NumPy float64
    st = LayerStreamer(model)
    x = st.embed(jnp.asarray(windows))
    for i in range(cfg.num_layers):
        x_next, sites = st.layer(i, x, capture=("attn_in", "mlp_in", "v", "k_rope", "down_in"))
        a = np.asarray(sites["attn_in"], np.float64).reshape(-1, cfg.hidden_size)
        m = np.asarray(sites["mlp_in"], np.float64).reshape(-1, cfg.hidden_size)
        v = np.asarray(sites["v"], np.float64).reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        k = np.asarray(sites["k_rope"], np.float64).reshape(-1, cfg.head_dim)
        # the float32 forward of the reference batch differs from the streamed one at ~1e-7
        close = lambda got, ref: np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())  # noqa: E731
        close(stats.attn[i], a.T @ a)
        close(stats.mlp[i], m.T @ m)
        for h in range(cfg.num_kv_heads):
            close(stats.value[i, h], v[:, h].T @ v[:, h])
        close(stats.key[i], k.T @ k)
        d = np.abs(np.asarray(sites["down_in"], np.float64)).mean(axis=1).max(axis=0)
        np.testing.assert_allclose(stats.abs_mean["down_in"][i], d, rtol=1e-5)
        x = x_next
    assert stats.tokens == windows.size
    assert stats.attn.dtype == np.float64


_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax
    from models.loaders import load_model
    from models.decoder import from_weights
    from resq_jax.calibration import calibrate
    loaded = load_model({folder!r}, with_tokenizer=False)
    windows = np.random.default_rng(1).integers(0, loaded.config.vocab_size, (8, 24))
    stats = calibrate(from_weights(loaded.config, loaded.weights), windows, progress=False)
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
