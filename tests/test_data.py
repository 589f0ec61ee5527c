"""Tests of resq_jax.data: built-in texts, the calibration/evaluation split, tokenization and windows.

The first run downloads the gensim wheel (about 28 MB from PyPI) and caches the extracted texts.
"""
from __future__ import annotations

import bz2
import dataclasses
import logging
import re
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from resq_jax.data import fetch
from resq_jax.data.extract import wiki_from_xml, wikitext_to_article
from resq_jax.data.fetch import EXTRACTOR_VERSION, LEE_MEMBER, WIKI_MEMBER, TextSourceError
from resq_jax.data.texts import (
    BUILTIN_TEXTS,
    DEFAULT_CALIB_TEXT,
    DEFAULT_EVAL_TEXT,
    OFFLINE_TEXTS,
    TextSource,
    article_heading_offsets,
    load_text,
    split_calib_eval,
    text_stats,
)
from resq_jax.data.windows import ALL_WINDOWS, TextTooShortError, calib_windows, eval_windows, max_windows, tokenize
from resq_jax.util.files import cache_dir

# ----------------------------------------------------------------------------- built-in texts

@pytest.fixture(scope="module")
def wiki() -> str:
    return load_text("wiki").text


def test_builtin_names_and_defaults():
    assert BUILTIN_TEXTS == ("wiki-calib", "wiki-eval", "wiki", "news", "wikitext2", "wikitext2-train")
    assert DEFAULT_CALIB_TEXT == "wiki-calib" and DEFAULT_EVAL_TEXT == "wiki-eval"
    assert set(OFFLINE_TEXTS) <= set(BUILTIN_TEXTS)


def test_wiki_text_is_large_clean_and_wikitext_style(wiki, capsys):
    stats = text_stats(wiki)
    with capsys.disabled():
        print(f"\n[wiki] {stats}")
    # docs/reproducing.md, Data sources: 103 articles, ~460k words before filtering (>= 200 words, markup, references ...)
    assert 90 <= stats["articles"] <= 103
    assert 380_000 <= stats["words"] <= 470_000
    assert stats["chars"] > 2_000_000
    lines = wiki.split("\n")
    assert lines[0] == " = Anarchism = " and lines[1] == "" and lines[2].startswith("Anarchism is a political")
    # headings: article " = T = ", sections " = = S = = " (deeper levels likewise), each followed by a blank line
    headings = [i for i, line in enumerate(lines) if line.startswith(" = ")]
    assert len(headings) > 1000
    for i in headings:
        assert re.fullmatch(r" (= )+\S([^\n]*\S)?( =)+ ", lines[i]), lines[i]
        assert lines[i + 1] == ""
    assert " = = History = = " in lines
    for junk in ("[[", "]]", "{{", "}}", "<ref", "</ref", "{|", "|}", "thumb|", "Category:", "File:",
                 "<!--", "&nbsp;", "()", "( )", "\n\n\n", "__NOTOC__"):
        assert junk not in wiki, junk
    assert not re.search(r"</?(ref|br|small|sup|sub|math|div|span|table)\b", wiki)
    # reference sections are dropped, redirects and short pages are gone
    assert " = = References = = " not in lines and " = = External links = = " not in lines
    assert " = AccessibleComputing = " not in lines
    assert " = Asia Minor (disambiguation) = " not in lines  # 52 words: below the 200-word floor


def test_wiki_articles_have_at_least_200_words(wiki):
    offsets = article_heading_offsets(wiki) + [len(wiki)]
    for start, end in zip(offsets[:-1], offsets[1:]):
        body = [line for line in wiki[start:end].split("\n") if line and not line.startswith(" = ")]
        assert sum(len(line.split()) for line in body) >= 200


def test_calib_eval_split(wiki, capsys):
    calib = load_text("wiki-calib")
    evaluation = load_text("wiki-eval")
    assert (calib.name, evaluation.name) == ("wiki-calib", "wiki-eval")
    assert calib.text + evaluation.text == wiki
    frac = len(calib.text) / len(wiki)
    with capsys.disabled():
        print(f"\n[split] calib {text_stats(calib.text)} eval {text_stats(evaluation.text)} "
              f"calib fraction {frac:.4f}")
    assert 0.80 <= frac < 0.85
    # the cut is the first article heading at or after 80% of the characters
    assert evaluation.text.startswith(" = ") and not evaluation.text.startswith(" = = ")
    assert re.match(r" = [^=\n]+ = \n\n", evaluation.text)
    offsets = article_heading_offsets(wiki)
    cut = len(calib.text)
    assert cut in offsets
    assert all(o < 0.8 * len(wiki) for o in offsets if o < cut)
    assert calib.text.endswith("\n\n")


def test_split_on_hand_made_text():
    text = (" = A = \n\n" + "a" * 20 + "\n\n = B = \n\n" + "b" * 40 + "\n\n = = S = = \n\n" + "s" * 10
            + "\n\n = C = \n\nc\n")
    assert article_heading_offsets(text) == [0, 31, 107]
    calib, evaluation = split_calib_eval(text, 0.5)  # threshold 59.5: " = B = " (31) is before it,
    assert calib + evaluation == text                     # " = = S = = " (82) is only a section
    assert evaluation == " = C = \n\nc\n"
    assert split_calib_eval(text, 0.25)[1].startswith(" = B = ")  # threshold 29.5 <= 31
    assert split_calib_eval(text, 0.27)[1].startswith(" = C = ")  # threshold 31.86 > 31
    with pytest.raises(TextSourceError, match="no article heading"):
        split_calib_eval(" = A = \n\n" + "a" * 100, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        split_calib_eval(text, 1.0)


def test_news_has_300_articles(capsys):
    news = load_text("news")
    articles = news.text.split("\n\n")
    with capsys.disabled():
        print(f"\n[news] chars {len(news.text)} words {len(news.text.split())} articles {len(articles)}")
    assert news.name == "news"
    # docs/reproducing.md, Data sources: the file has 299 newlines; the last line has none: 300 articles
    assert len(articles) == 300
    assert all(a and a == a.strip() and "\n" not in a for a in articles)
    assert articles[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert articles[-1].endswith('team to beat us as well."')


def test_cached_texts_do_not_call_pip(monkeypatch, wiki):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not run once the texts are cached")

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(fetch, "_download_gensim_wheel", fail)
    assert load_text("wiki").text == wiki
    assert len(load_text("news").text) > 100_000


# ----------------------------------------------------------------------------- extraction

_ARTICLE = """{{Infobox thing
| name = Foo
| image = Foo.jpg
}}
'''Foo''' is a [[bar|thing]] used in [[baz]].<ref>{{cite book |title=Hidden}}</ref> It was made in 1900 ({{lang-de|Fuh}}).<ref name="x"/> <!-- a comment --> Foo is big.{{citation needed|date=May 2016}}
[[File:Foo.jpg|thumb|A caption with [[link]].]]

== History ==
The '''history''' of foo has two lines.<br />Second half of the paragraph &amp; more.
{| class="wikitable"
|-
! Year !! Value
|-
| 1900 || 3
|}
=== Early days ===
* First item of a list.
* Second item with <math>x^2</math> words.

== References ==
{{reflist}}
* A reference line that must vanish.

=== Sub of references ===
Gone too.

== Legacy ==
Foo is still used.
[[Category:Things]]
"""


def test_wikitext_to_article_hand_made():
    article = wikitext_to_article("Foo", _ARTICLE, min_words=1)
    assert article == (
        " = Foo = \n\n"
        "Foo is a thing used in baz. It was made in 1900. Foo is big.\n\n"
        " = = History = = \n\n"
        "The history of foo has two lines. Second half of the paragraph & more.\n\n"
        " = = = Early days = = = \n\n"
        "First item of a list.\n\n"
        "Second item with words.\n\n"
        " = = Legacy = = \n\n"
        "Foo is still used.")
    assert wikitext_to_article("Foo", _ARTICLE, min_words=42) == article  # 42 body words
    assert wikitext_to_article("Foo", _ARTICLE, min_words=43) is None


def _page(title: str, ns: int, text: str, redirect: bool = False) -> str:
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f"<text xml:space=\"preserve\">{text}</text></revision></page>")


def _fake_dump() -> bytes:
    from xml.sax.saxutils import escape

    long_body = escape(" ".join(f"word{i}" for i in range(250)) + ".<ref>cite</ref>")
    pages = [
        _page("Redirected", 0, "#REDIRECT [[Target]]", redirect=True),
        _page("Wikipedia:Policy", 4, long_body),
        _page("Short", 0, "Only a few words here."),
        _page("Long", 0, long_body),
        _page("Second", 0, "Intro paragraph.\n== Part ==\n" + long_body),
        _page("Tail", 0, "x " * 200),
    ]
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
            + "".join(pages) + "</mediawiki>").encode()


def test_wiki_from_xml_filters_pages():
    text = wiki_from_xml(_fake_dump())
    words = " ".join(f"word{i}" for i in range(250)) + "."
    assert text == (f" = Long = \n\n{words}\n\n"
                    f" = Second = \n\nIntro paragraph.\n\n = = Part = = \n\n{words}\n\n"
                    f" = Tail = \n\n{'x ' * 199}x\n")


def test_cache_is_built_once_atomically(tmp_path, monkeypatch):
    wheel = tmp_path / "gensim-4.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(WIKI_MEMBER, bz2.compress(_fake_dump()))
        zf.writestr(LEE_MEMBER, "First story .\nSecond story.\n\n")
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return wheel

    monkeypatch.setenv("RESQ_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_download_gensim_wheel", fake_download)
    assert cache_dir("text") == tmp_path / "cache" / "text"
    assert load_text("news").text == "First story .\n\nSecond story."
    assert load_text("wiki").text.startswith(" = Long = \n\n")
    calib, evaluation = load_text("wiki-calib").text, load_text("wiki-eval").text
    assert evaluation.startswith(" = Tail = ")  # the only article heading past 80%
    assert calib.startswith(" = Long = ") and " = Second = " in calib
    assert len(calls) == 1  # both texts written by the one download
    files = sorted(p.name for p in (tmp_path / "cache" / "text").iterdir())
    assert files == [f"gensim-4.4.0-x{EXTRACTOR_VERSION}-lee-news.txt",
                     f"gensim-4.4.0-x{EXTRACTOR_VERSION}-wiki.txt"]  # no temporary leftovers
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in (tmp_path / "cache" / "text").iterdir())


def test_download_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("RESQ_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(
        returncode=1, stderr="ERROR: No matching distribution found for gensim==4.4.0", stdout=""))
    with pytest.raises(TextSourceError, match=r"could not download gensim==4\.4\.0.*PyPI.*text file"
                                                   r".*No matching distribution"):
        load_text("wiki-eval")


# ----------------------------------------------------------------------------- files, online texts

def test_text_file_name_and_content(tmp_path):
    path = tmp_path / "my_corpus.v2.txt"
    path.write_text("Hello wörld.\n", encoding="utf-8")
    source = load_text(str(path))
    assert source == TextSource("my_corpus.v2", "Hello wörld.\n")
    assert load_text(path).name == "my_corpus.v2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.name = "other"


def test_missing_empty_and_bad_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(TextSourceError) as info:
        load_text(str(missing))
    message = str(info.value)
    assert str(missing) in message and "wiki-calib" in message and "wikitext2" in message
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(TextSourceError, match="empty"):
        load_text(str(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextSourceError, match="UTF-8"):
        load_text(str(latin))
    with pytest.raises(TextSourceError, match="not a regular file"):
        load_text(str(tmp_path))
    assert issubclass(TextSourceError, ValueError)


def test_wikitext2_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(TextSourceError, match=r"`datasets` package.*wiki-calib"):
        load_text("wikitext2")


def test_wikitext2_hub_unreachable_and_join(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(TextSourceError, match=r"unreachable.*wiki-calib"):
        load_text("wikitext2-train")

    seen = {}

    def fake(path, name, split):
        seen.update(path=path, name=name, split=split)
        return {"text": ["", " = Title = \n", " Body . \n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake))
    source = load_text("wikitext2")
    assert source == TextSource("wikitext2", "\n\n = Title = \n\n\n Body . \n")
    assert seen == {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    load_text("wikitext2-train")
    assert seen["split"] == "train"


# ----------------------------------------------------------------------------- tokenize

def _tiny_hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]",
                                   model_max_length=4)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_tokenize_transformers_no_bos_and_no_length_warning():
    logger = logging.getLogger("transformers.tokenization_utils_base")
    records = _Records()
    logger.addHandler(records)
    try:
        text = "a b c z a b c a"
        ids = tokenize(text, _tiny_hf_tokenizer())
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, [2, 3, 4, 0, 2, 3, 4, 2])
        assert not any("sequence length" in m for m in records.messages)
        # control: the same call with special tokens adds BOS and logs the warning we suppress
        direct = _tiny_hf_tokenizer()(text)["input_ids"]
        assert direct[0] == 1 and len(direct) == 9
        assert any("sequence length is longer" in m for m in records.messages)
    finally:
        logger.removeHandler(records)


def test_tokenize_encode_style_and_errors():
    class EncodeOnly:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return types.SimpleNamespace(ids=[len(w) for w in text.split()])

    np.testing.assert_array_equal(tokenize("aa b cccc", EncodeOnly()), [2, 1, 4])
    with pytest.raises(TypeError, match="callable or have .encode"):
        tokenize("a", object())
    with pytest.raises(ValueError, match="flat sequence"):
        tokenize("a", lambda t, add_special_tokens: {"input_ids": [[1, 2]]})
    with pytest.raises(TypeError, match="str"):
        tokenize(b"a", EncodeOnly())


# ----------------------------------------------------------------------------- windows

def test_eval_windows_first_n_non_overlapping():
    ids = np.arange(23, dtype=np.int64)
    w = eval_windows(ids, 2, 5)
    assert w.dtype == np.int32 and w.shape == (2, 5)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    every = eval_windows(ids, ALL_WINDOWS, 5)  # 4 full windows, tail 20..22 dropped
    np.testing.assert_array_equal(every, np.arange(20).reshape(4, 5))
    np.testing.assert_array_equal(eval_windows(ids, 4, 5), every)
    np.testing.assert_array_equal(eval_windows(ids, 1, 23), ids[None, :])
    w[0, 0] = 99  # a copy, not a view of the caller's ids
    assert ids[0] == 0
    assert max_windows(23, 5) == 4


def test_eval_windows_errors():
    ids = np.arange(23)
    with pytest.raises(TextTooShortError, match=r"asked for 5 evaluation windows of 5 tokens.*23 tokens"
                                                     r".*at most 4 non-overlapping windows"):
        eval_windows(ids, 5, 5)
    with pytest.raises(TextTooShortError, match=r"the text has 23 tokens, fewer than one evaluation "
                                                     r"window of 24 tokens"):
        eval_windows(ids, None, 24)
    with pytest.raises(TextTooShortError, match="0 tokens"):
        eval_windows(np.zeros(0, np.int32), 1, 4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"num_windows must be a positive integer, got {bad}"):
            eval_windows(ids, bad, 5)
        with pytest.raises(ValueError, match=f"seq_len must be a positive integer, got {bad}"):
            eval_windows(ids, 1, bad)
    with pytest.raises(ValueError, match="num_windows must be a positive integer"):
        eval_windows(ids, 2.5, 5)
    with pytest.raises(ValueError, match=r"flat array \[n_tokens\]"):
        eval_windows(ids.reshape(1, -1), 1, 5)
    with pytest.raises(ValueError, match="integers"):
        eval_windows(ids.astype(np.float32), 1, 5)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        eval_windows(np.array([1, -1, 2]), 1, 3)
    assert issubclass(TextTooShortError, ValueError)


def test_calib_windows_are_seeded_random_windows():
    ids = np.arange(1000, dtype=np.int32) * 3
    w = calib_windows(ids, 8, 16, seed=0)
    assert w.dtype == np.int32 and w.shape == (8, 16)
    # each row is a contiguous slice of the text starting at rng.integers(0, 1000 - 16 + 1)
    starts = np.random.default_rng(0).integers(0, 1000 - 16 + 1, size=8)
    np.testing.assert_array_equal(w, np.stack([ids[s:s + 16] for s in starts]))
    np.testing.assert_array_equal(np.diff(w, axis=1), 3)
    np.testing.assert_array_equal(calib_windows(ids, 8, 16, seed=0), w)
    other = calib_windows(ids, 8, 16, seed=1)
    assert not np.array_equal(other, w)
    # start offsets cover the whole range, the very last window included
    many = calib_windows(np.arange(12), 4, 3, seed=5)
    firsts = {int(r[0]) for s in range(50) for r in calib_windows(np.arange(12), 4, 3, seed=s)}
    assert firsts == set(range(10))
    assert many.shape == (4, 3)


def test_calib_windows_errors():
    ids = np.arange(100)
    with pytest.raises(TextTooShortError, match=r"asked for 11 calibration windows of 10 tokens.*100 "
                                                     r"tokens: at most 10 non-overlapping windows"):
        calib_windows(ids, 11, 10, seed=0)
    assert calib_windows(ids, 10, 10, seed=0).shape == (10, 10)
    with pytest.raises(TextTooShortError, match="fewer than one calibration window of 101 tokens"):
        calib_windows(ids, 1, 101, seed=0)
    with pytest.raises(ValueError, match="num_windows must be a positive integer, got 0"):
        calib_windows(ids, 0, 10, seed=0)
    with pytest.raises(ValueError, match="num_windows must be a positive integer, got None"):
        calib_windows(ids, None, 10, seed=0)
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got -1"):
        calib_windows(ids, 1, -1, seed=0)


def test_windows_of_a_real_text():
    text = load_text("wiki-eval").text
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # a byte "tokenizer"
    w = eval_windows(ids, 40, 512)
    assert bytes(w[0].astype(np.uint8)).decode("utf-8", "ignore").startswith(" = ")
    np.testing.assert_array_equal(w.reshape(-1), ids[:40 * 512])
    c = calib_windows(ids, 64, 512, seed=0)
    assert c.shape == (64, 512) and len({int(r[0]) for r in c}) > 1
