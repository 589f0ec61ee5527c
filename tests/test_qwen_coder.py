"""Real Qwen2 checks on Qwen2.5-Coder-0.5B-Instruct (491 MB GGUF assembled from six PyPI wheels):
slow, CI skips them (run with ``python -m pytest -m slow tests/test_qwen_coder.py``)."""
import pytest

from hf_fixtures import transformers_gguf_perplexity
from resq_jax.data.texts import load_text
from resq_jax.data.windows import eval_windows, tokenize
from resq_jax.eval.perplexity import perplexity
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model

pytestmark = pytest.mark.slow
WINDOWS, SEQ = 8, 512


@pytest.fixture(scope="module")
def qwen():
    return load_model("qwen2.5-coder-0.5b")


def test_perplexity_matches_transformers(qwen):
    windows = eval_windows(tokenize(load_text("wiki-eval").text, qwen.tokenizer), WINDOWS, SEQ)
    ours = perplexity(from_weights(qwen.config, qwen.weights), windows, progress=False).ppl
    ref = transformers_gguf_perplexity(qwen.source, windows)
    print(f"Qwen2.5-Coder-0.5B ppl ours {ours:.4f} transformers {ref:.4f} rel {ours / ref - 1:+.2e}")
    assert abs(ours / ref - 1) < 0.002, (ours, ref)
    assert 10 < ours < 80
