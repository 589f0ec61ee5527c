"""The on-paper cost model (resq_jax/cli/cost_model.py) counts the real models' weights: its per-layer weight
entries times the layers equal the non-embedding parameter counts their model cards state (Qwen2.5-7B 6.53B,
Llama-3-8B 8.03B total minus 2 x 128256 x 4096 embedding and head, Llama-3-70B 70.6B minus 2 x 128256 x 8192);
the norms and biases the cards include are below 0.1%."""
from __future__ import annotations

import pytest

from resq_jax.cli.cost_model import layer_cost, main, seconds


@pytest.mark.parametrize("shape,non_embedding", [
    ("qwen2.5-7b", 6.53e9),
    ("llama-3-8b", 8.03e9 - 2 * 128256 * 4096),
    ("llama-3-70b", 70.6e9 - 2 * 128256 * 8192),
])
def test_layer_weights_match_the_model_cards(shape, non_embedding):
    lc = layer_cost(shape, 4096)
    assert lc.layers * lc.weights == pytest.approx(non_embedding, rel=2e-3)


def test_more_gpus_never_slower_and_tokens_scale_the_calibration():
    lc, lc8 = layer_cost("llama-3-8b", 4096), layer_cost("llama-3-8b", 8 * 4096)
    assert lc8.calibrate == pytest.approx(8 * lc.calibrate, rel=1e-3)
    times = [seconds(lc8, g) for g in (1, 8, 64)]
    assert times == sorted(times, reverse=True) and seconds(lc8, 0) > times[0]


def test_unknown_shape_is_one_line(capsys):
    assert main(["--shapes", "gpt-5"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown shape 'gpt-5'; choose from")
