"""Text sources for calibration and evaluation (tokenization and token windows: resq_jax/data/windows.py).

Texts (``load_text``):
- Built-in, offline (obtained by resq_jax/data/fetch.py from the pinned ``gensim==4.4.0`` wheel on
  PyPI, then cached as plain text):
    "wiki"        103-article English Wikipedia sample, markup stripped, WikiText-style
                  (" = Title = " article headings, " = = Section = = " section headings,
                  paragraphs separated by blank lines); articles of >= 200 words only.
    "wiki-calib"  the first 80% of "wiki" by characters, cut at an article heading
                  (the first article heading at or after 80% of the characters).
    "wiki-eval"   the rest of "wiki" (starts with an article heading);
                  wiki-calib + wiki-eval == wiki exactly.
    "news"        the Lee news corpus (299 short articles), joined with "\\n\\n".
- Online, through the ``datasets`` library: "wikitext2" (WikiText-2 raw, test split) and
  "wikitext2-train" (train split), rows joined with "\\n\\n" (docs/reproducing.md, WikiText-2).
- Any UTF-8 text file; its text name is the file name without extension.

Cache: ``$RESQ_JAX_CACHE/text/`` if RESQ_JAX_CACHE is set, else ``~/.cache/resq_jax/text/``.
Files are written atomically (temporary file + ``os.replace``); once they exist pip is never
called again. The cache file names carry the gensim and extractor versions.

Windows (docs/reproducing.md, Evaluation protocol): the whole text is tokenized once without BOS or
other special tokens (``tokenize``); evaluation takes the first N non-overlapping windows of
L tokens (``eval_windows``); calibration takes N windows at uniform random start offsets
drawn from ``np.random.default_rng(seed)`` (``calib_windows``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from resq_jax.data.fetch import TextSourceError, news_text, wiki_text

CALIB_FRACTION = 0.8

BUILTIN_TEXTS = ("wiki-calib", "wiki-eval", "wiki", "news", "wikitext2", "wikitext2-train")
OFFLINE_TEXTS = ("wiki-calib", "wiki-eval", "wiki", "news")
DEFAULT_CALIB_TEXT = "wiki-calib"
DEFAULT_EVAL_TEXT = "wiki-eval"

_WIKITEXT2_SPLITS = {"wikitext2": "test", "wikitext2-train": "train"}
_WIKITEXT2_ID = ("Salesforce/wikitext", "wikitext-2-raw-v1")


@dataclasses.dataclass(frozen=True)
class TextSource:
    name: str  # built-in name, or the file name without extension
    text: str

    def __repr__(self) -> str:  # keep reprs short: texts are megabytes
        return f"TextSource(name={self.name!r}, chars={len(self.text)})"


# ----------------------------------------------------------------------------- loading

def load_text(source: str | os.PathLike) -> TextSource:
    """A built-in name (``BUILTIN_TEXTS``) or a path to a UTF-8 text file -> TextSource."""
    if isinstance(source, str) and source in BUILTIN_TEXTS:
        return TextSource(source, builtin_text(source))
    path = Path(source).expanduser()
    if not path.exists():
        raise TextSourceError(
            f"text {str(source)!r} is neither a built-in text nor an existing file (looked for "
            f"{path.resolve()}); pass a path to a UTF-8 text file or one of the built-in names: "
            f"{', '.join(BUILTIN_TEXTS)}")
    if not path.is_file():
        raise TextSourceError(f"text path {path} is not a regular file; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextSourceError(f"text file {path} is not valid UTF-8 ({e}); convert it to UTF-8") from e
    if not text.strip():
        raise TextSourceError(f"text file {path} is empty; pass a file with text in it")
    return TextSource(path.stem, text)


def builtin_text(name: str) -> str:
    """The text of one built-in (see module docstring)."""
    if name == "wiki":
        return wiki_text()
    if name in ("wiki-calib", "wiki-eval"):
        calib, evaluation = split_calib_eval(wiki_text())
        return calib if name == "wiki-calib" else evaluation
    if name == "news":
        return news_text()
    if name in _WIKITEXT2_SPLITS:
        return _wikitext2(_WIKITEXT2_SPLITS[name])
    raise TextSourceError(f"unknown built-in text {name!r}; choose one of {', '.join(BUILTIN_TEXTS)}")


def _wikitext2(split: str) -> str:
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported on demand
    except ImportError as e:
        raise TextSourceError(
            "the WikiText-2 texts need the `datasets` package (pip install 'resq-jax[wikitext]') and access to "
            "the Hugging Face hub; offline, use the built-in texts "
            f"{', '.join(OFFLINE_TEXTS)} or a text file") from e
    try:
        rows = datasets.load_dataset(*_WIKITEXT2_ID, split=split)["text"]
    except Exception as e:  # the hub's errors vary: connection, offline mode, missing cache
        raise TextSourceError(
            f"could not load WikiText-2 ({split} split) from the Hugging Face hub ({type(e).__name__}: "
            f"{e}); the hub may be unreachable. Offline, use the built-in texts "
            f"{', '.join(OFFLINE_TEXTS)} or a text file") from e
    return "\n\n".join(rows)


# ----------------------------------------------------------------------------- split

_ARTICLE_HEADING_RE = re.compile(r"^ = (?!= )[^\n]*= $", re.MULTILINE)


def article_heading_offsets(text: str) -> list[int]:
    """Character offsets of the article headings (" = Title = " lines, not section headings)."""
    return [m.start() for m in _ARTICLE_HEADING_RE.finditer(text)]


def split_calib_eval(text: str, fraction: float = CALIB_FRACTION) -> tuple[str, str]:
    """text -> (calibration, evaluation): cut at the first article heading at or after
    ``fraction`` of the characters. calibration + evaluation == text."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    threshold = fraction * len(text)
    for offset in article_heading_offsets(text):
        if offset >= threshold:
            return text[:offset], text[offset:]
    raise TextSourceError(
        f"no article heading (' = Title = ' line) at or after {fraction:.0%} of the text's "
        f"{len(text)} characters: cannot split it into calibration and evaluation parts")


def text_stats(text: str) -> dict[str, int]:
    """Characters, whitespace-separated words and article headings of a text."""
    return {"chars": len(text), "words": len(text.split()),
            "articles": len(article_heading_offsets(text))}
