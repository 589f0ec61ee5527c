"""Zero-shot tasks built offline from the built-in evaluation text (the Wikipedia articles held out from
calibration), for lm-evaluation-harness: the YAMLs in resq_jax/eval/tasks/ load their documents from here.

cloze-wiki (LAMBADA's construction on our text): every paragraph of at least ``MIN_WORDS`` words whose last
  sentence ends in a plain word (letters only, at least 3) that already occurs earlier in the paragraph, so that the
  word is predictable from the passage rather than from the sentence alone (LAMBADA keeps passages where humans
  need the wider context; we can only ask that the word be in it). The model sees the paragraph up to that word
  and is scored on `` word``: accuracy (the word is the greedy continuation) and perplexity, as lambada_openai.
nextsent-wiki (a 4-way choice of the next sentence): every paragraph of at least 3 sentences; the context is its
  first two sentences, the choices its third sentence and the third sentences of 3 other paragraphs drawn with a
  fixed seed, in a seeded order; accuracy and length-normalized accuracy, as HellaSwag.
Both read only the evaluation split, never the calibration text, so a quantizer calibrated on the default text has
not seen them.
"""
from __future__ import annotations

import re

import numpy as np

from resq_jax.data.texts import DEFAULT_EVAL_TEXT, load_text

MIN_WORDS = 40
SEED = 1234
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\"'])[.!?](?=\s+[A-Z\"'(]|\s*$)")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def paragraphs(text: str) -> list[str]:
    """Body paragraphs (article headings are one-line paragraphs of a few words: dropped by the callers' minimums)."""
    return [p.strip() for p in text.split("\n") if p.strip()]


def sentences(paragraph: str) -> list[str]:
    """Split after ., ! or ? that follows a lower-case letter, a digit or a closing mark and precedes a capital."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    return out + ([tail] if tail else [])


def cloze_docs(text: str, min_words: int = MIN_WORDS) -> list[dict]:
    """[{"context": passage up to its last word, "target": that word}] (module docstring)."""
    docs = []
    for p in paragraphs(text):
        sents = sentences(p)
        if len(p.split()) < min_words or not sents or not sents[-1].endswith("."):
            continue
        passage = " ".join(sents)[:-1]  # without the final period
        context, _, word = passage.rpartition(" ")
        if _WORD.match(word) and re.search(rf"\b{word}\b", context, flags=re.IGNORECASE):
            docs.append({"context": context, "target": word})
    return docs


def next_sentence_docs(text: str, choices: int = 4, seed: int = SEED) -> list[dict]:
    """[{"context": two sentences, "choices": [4 sentences], "gold": index of the true third sentence}]."""
    groups = [s for s in (sentences(p) for p in paragraphs(text)) if len(s) >= 3 and all(len(x) > 20 for x in s[:3])]
    rng = np.random.default_rng(seed)
    docs = []
    for i, s in enumerate(groups):
        others = rng.choice([j for j in range(len(groups)) if j != i], size=choices - 1, replace=False)
        options = [s[2]] + [groups[j][2] for j in others]
        order = rng.permutation(choices)
        docs.append({"context": " ".join(s[:2]), "choices": [options[k] for k in order],
                     "gold": int(np.flatnonzero(order == 0)[0])})
    return docs


def _dataset(docs: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(docs)}


def cloze_wiki(**_) -> dict:
    """lm-eval ``custom_dataset`` of cloze-wiki (resq_jax/eval/tasks/cloze_wiki.yaml)."""
    return _dataset(cloze_docs(load_text(DEFAULT_EVAL_TEXT).text))


def nextsent_wiki(**_) -> dict:
    """lm-eval ``custom_dataset`` of nextsent-wiki (resq_jax/eval/tasks/nextsent_wiki.yaml)."""
    return _dataset(next_sentence_docs(load_text(DEFAULT_EVAL_TEXT).text))
