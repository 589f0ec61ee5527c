"""The lm-evaluation-harness model "resq-jax" (resq_jax/cli/harness.py) against lm-eval's own HF backend
(transformers + torch reading the same GGUF) on SmolLM2, and the offline tasks built from the evaluation text."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from resq_jax.data.texts import DEFAULT_EVAL_TEXT, load_text
from resq_jax.cli.harness import ResqJaxLM, run_tasks
from resq_jax.eval.local_tasks import cloze_docs, next_sentence_docs, sentences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUESTS = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin"),
            ("", "Hello world"), ("Question: what is 2+2?\nAnswer: ", "4"),
            ("In 1905, Albert Einstein published", " four papers that changed physics forever.")]


@pytest.fixture(scope="module")
def ours():
    return ResqJaxLM(model="smollm2", batch_size=4)


@pytest.fixture(scope="module")
def hf(ours):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    folder, name = ours.resolved.description.split(" (")[0].rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return HFLM(pretrained=model, tokenizer=ours.tokenizer, batch_size=4)


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_hf_backend(ours, hf):
    """Same requests, same tokenizer: log-likelihoods within 1e-4 per continuation token, the same is_greedy
    (measured: at most 2.5e-5 apart)."""
    reqs = _instances("loglikelihood", REQUESTS)
    a, b = ours.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (la, ga), (lb, gb) in zip(REQUESTS, a, b):
        n = len(ours.tok_encode(cont))
        assert abs(la - lb) <= 1e-4 * max(n, 1), (ctx, cont, la, lb)
        assert ga == gb, (ctx, cont)
    assert a[0][1] and not a[1][1] and a[0][0] > a[1][0] + 3  # Paris is the greedy answer, Berlin far behind


def test_loglikelihood_rolling_equals_hf_backend_and_our_perplexity(ours, hf):
    """A 300-token text: rolling log-likelihood within 1e-4 relative of the HF backend's; and two 256-token
    evaluation windows scored as rolling windows give our perplexity (eval.perplexity, a different code path:
    chunked vocabulary, layer-streamed) within 1e-5."""
    text = "The quick brown fox jumps over the lazy dog. " * 30
    reqs = _instances("loglikelihood_rolling", [(text,)])
    np.testing.assert_allclose(ours.loglikelihood_rolling(reqs, disable_tqdm=True),
                               hf.loglikelihood_rolling(reqs, disable_tqdm=True), rtol=1e-4)

    from resq_jax.data.windows import eval_windows, tokenize
    from resq_jax.eval.perplexity import perplexity
    from resq_jax.models.streaming import LayerStreamer

    r = ours.resolved
    windows = eval_windows(tokenize(load_text(DEFAULT_EVAL_TEXT).text, r.tokenizer), 2, 256)
    scored = ours._loglikelihood_tokens([((None, None), [int(w[0])], [int(t) for t in w[1:]]) for w in windows],
                                        disable_tqdm=True)
    ppl = np.exp(-sum(s for s, _ in scored) / (windows.shape[0] * (windows.shape[1] - 1)))
    ref = perplexity(LayerStreamer.from_weights(r.config, r.weights), windows, progress=False).ppl
    np.testing.assert_allclose(ppl, ref, rtol=1e-5)


def test_generate_until_equals_hf_backend(ours, hf):
    """Five prompts of different lengths (one batch of 4 left-padded rows plus a batch of 1 filled with copies),
    two settings groups: the same continuations as the HF backend's greedy generation, cut at the same stop
    strings."""
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
               "Question: what is 2+2?\nAnswer:", "The three primary colors are", "Python is a programming language"]
    args = [(p, {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    args.append(("The first president of the United States was", {"until": ["\n\n"], "max_gen_toks": 6}))
    reqs = _instances("generate_until", args)
    mine, theirs = ours.generate_until(reqs, disable_tqdm=True), hf.generate_until(reqs, disable_tqdm=True)
    assert mine == theirs
    assert all("." not in m and "\n" not in m for m in mine[:5]) and sum(len(m) > 3 for m in mine) >= 4, mine


def test_local_tasks_equal_hf_backend(ours, hf):
    """cloze-wiki and nextsent-wiki (16 documents each) through lm-eval's simple_evaluate: every metric within
    1e-4 of the HF backend's on the same documents."""
    from lm_eval.evaluator import simple_evaluate

    from resq_jax.cli.harness import task_manager

    tasks = ["cloze-wiki", "nextsent-wiki"]
    mine = run_tasks(ours, tasks, limit=16)
    theirs = simple_evaluate(model=hf, tasks=tasks, limit=16, task_manager=task_manager(tasks))["results"]
    for task in tasks:
        assert mine[task]["n"] == 16
        for metric, value in mine[task]["metrics"].items():
            np.testing.assert_allclose(value, theirs[task][f"{metric},none"], rtol=1e-4, err_msg=f"{task} {metric}")
    assert 0.3 < mine["nextsent-wiki"]["metrics"]["acc_norm"] and 0.2 < mine["cloze-wiki"]["metrics"]["acc"]


def test_cloze_and_next_sentence_construction():
    text = load_text(DEFAULT_EVAL_TEXT).text
    cloze = cloze_docs(text)
    assert len(cloze) >= 100
    for d in cloze:
        assert re.fullmatch(r"[A-Za-z]{3,}", d["target"]) and not d["context"].endswith(" ")
        assert re.search(rf"\b{d['target']}\b", d["context"], flags=re.IGNORECASE)
        assert d["context"] + " " + d["target"] + "." in text  # the paragraph's own words, ending a sentence
    calib = load_text("wiki-calib").text
    assert not any(d["context"][:200] in calib for d in cloze[:50])  # held out from calibration
    nxt = next_sentence_docs(text)
    assert len(nxt) >= 300
    for d in nxt[:100]:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["gold"] < 4
        assert d["context"] + " " + d["choices"][d["gold"]] in text
    assert len({d["gold"] for d in nxt}) == 4
    assert sentences("He came home. Then he slept! Did he? Yes, at 3 p.m. he did.") == \
        ["He came home.", "Then he slept!", "Did he?", "Yes, at 3 p.m. he did."]


def test_evaluate_script_tasks_json_and_table(tmp_path):
    js = tmp_path / "r.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--quiet", "--tasks",
                          "cloze-wiki", "--limit", "8", "--no-ppl", "--json", str(js)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads(js.read_text())["runs"][0]
    got = run["tasks"]["cloze-wiki"]
    assert got["n"] == 8 and got["num_fewshot"] == 0 and set(got["metrics"]) == {"acc", "perplexity"}
    assert res.stdout.splitlines()[0].startswith("model: ")  # stdout carries the table alone
    assert res.stderr == "", res.stderr[-2000:]  # --quiet silences lm-eval's notes and progress bars too
    header = res.stdout.splitlines()[1]
    assert "cloze-wiki acc" in header and "cloze-wiki perplexity" in header
    assert f"{got['metrics']['acc']:.3f}+-{got['stderr']['acc']:.3f}" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "cloze-wiki,no-such-task"], "--tasks: unknown lm-eval task(s) no-such-task"),
    (["--tasks", "cloze-wiki", "--limit", "0"], "--limit must be a positive integer"),
    (["--limit", "5"], "--limit applies to --tasks"),
])
def test_bad_task_arguments_are_one_line_before_loading(args, needle):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--model", "/nonexistent/m",
                          *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        res.stderr[-2000:]


def test_model_args_with_an_unknown_method_is_one_clear_error():
    """Checked before the model loads (the model path does not exist)."""
    with pytest.raises(ValueError, match="unknown method 'omniquant'; choose one of .*spinquant"):
        ResqJaxLM(model="/nonexistent/m", method="omniquant")
    with pytest.raises(ValueError, match="settings cayley_steps need a method= other than none"):
        ResqJaxLM(model="/nonexistent/m", cayley_steps=4)
