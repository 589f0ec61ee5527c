"""Text sources for calibration and evaluation, tokenization, and token windows.

Texts (``load_text``):
- Built-in, offline (obtained by this module itself from the pinned ``gensim==4.4.0`` wheel on
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

import bz2
import contextlib
import dataclasses
import io
import logging
import operator
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
EXTRACTOR_VERSION = 1  # bump whenever the extraction below changes its output
MIN_ARTICLE_WORDS = 200
CALIB_FRACTION = 0.8

BUILTIN_TEXTS = ("wiki-calib", "wiki-eval", "wiki", "news", "wikitext2", "wikitext2-train")
OFFLINE_TEXTS = ("wiki-calib", "wiki-eval", "wiki", "news")
DEFAULT_CALIB_TEXT = "wiki-calib"
DEFAULT_EVAL_TEXT = "wiki-eval"
ALL_WINDOWS = None  # eval_windows(num_windows=ALL_WINDOWS): every full window of the text

_WIKITEXT2_SPLITS = {"wikitext2": "test", "wikitext2-train": "train"}
_WIKITEXT2_ID = ("Salesforce/wikitext", "wikitext-2-raw-v1")


class TextSourceError(ValueError):
    """A text cannot be obtained (missing file, empty text, no network for a download, ...)."""


class TextTooShortError(ValueError):
    """The tokenized text holds fewer windows than requested."""


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


def cache_dir() -> Path:
    """Where extracted texts live: $RESQ_JAX_CACHE/text or ~/.cache/resq_jax/text."""
    root = os.environ.get("RESQ_JAX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "resq_jax"
    return base / "text"


def _cache_paths(directory: Path) -> dict[str, Path]:
    stem = f"gensim-{GENSIM_VERSION}-x{EXTRACTOR_VERSION}"
    return {"wiki": directory / f"{stem}-wiki.txt", "news": directory / f"{stem}-lee-news.txt"}


def wiki_text() -> str:
    """The whole built-in Wikipedia sample (downloaded and extracted on first use)."""
    return _cached_text("wiki")


def news_text() -> str:
    """The Lee news corpus, one article per paragraph (downloaded on first use)."""
    return _cached_text("news")


def _cached_text(key: str) -> str:
    directory = cache_dir()
    paths = _cache_paths(directory)
    if not paths[key].is_file():
        _build_cache(directory, paths)
    return paths[key].read_text(encoding="utf-8")


def _build_cache(directory: Path, paths: dict[str, Path]) -> None:
    """Fetch the gensim wheel once and write both extracted texts."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resq_jax_gensim_") as tmp:
        wheel = _download_gensim_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            wiki_xml = bz2.decompress(zf.read(WIKI_MEMBER))
            lee = zf.read(LEE_MEMBER).decode("utf-8")
    _write_atomic(paths["wiki"], wiki_from_xml(wiki_xml))
    _write_atomic(paths["news"], news_from_lines(lee))


def _download_gensim_wheel(dest: Path) -> Path:
    """pip download gensim==GENSIM_VERSION (no dependencies, wheel only) into dest."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", f"gensim=={GENSIM_VERSION}", "-d", str(dest)]
    # The data members are the same in every wheel; if this platform has none, take Linux's.
    attempts = [base, base + ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                              "--implementation", "cp", "--abi", "cp311"]]
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dest.glob("gensim-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
        errors.append((proc.stderr or proc.stdout).strip()[-800:])
    raise TextSourceError(
        f"could not download gensim=={GENSIM_VERSION} from PyPI, which holds the built-in "
        f"Wikipedia and news texts (needed once; they are cached in {cache_dir()}). "
        f"Check network access to PyPI, or pass a UTF-8 text file instead of a built-in name. "
        f"pip said: {errors[-1]}")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


# ----------------------------------------------------------------------------- Wikipedia

_SKIP_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "footnotes", "sources", "citations", "notes and references", "references and notes",
    "works cited", "notes and citations", "general references", "cited sources"})
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "category", "media"})
_DROP_CONTENT_TAGS = ("math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight",
                      "source", "chem", "ce", "hiero", "graph", "references", "templatedata",
                      "mapframe", "table")

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF_RE = re.compile(r"<ref\b[^<>]*/\s*>", re.I)
_REF_RE = re.compile(r"<ref\b[^<>]*>.*?</ref\s*>", re.I | re.S)
_DROP_TAGS_RE = re.compile(
    r"<(" + "|".join(_DROP_CONTENT_TAGS) + r")\b[^<>]*?(?:/\s*>|>.*?</\1\s*>)", re.I | re.S)
_HEADING_RE = re.compile(r"^(={1,6})(.+?)(={1,6})[ \t]*$", re.MULTILINE)
_HTML_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_MAGIC_WORD_RE = re.compile(r"__[A-Z]+__")
_LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</ref", "thumb|", "px|")


def wiki_from_xml(xml_bytes: bytes, min_words: int = MIN_ARTICLE_WORDS) -> str:
    """MediaWiki XML dump -> WikiText-style plain text of its main-namespace articles.

    Redirects and other namespaces are skipped; articles with fewer than ``min_words`` words
    of body text (headings not counted) are dropped. Articles are separated by blank lines.
    """
    articles = []
    for title, wikitext in iter_main_articles(xml_bytes):
        article = wikitext_to_article(title, wikitext, min_words)
        if article is not None:
            articles.append(article)
    return "\n\n".join(articles) + "\n"


def iter_main_articles(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each non-redirect page in namespace 0, in dump order."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = elem.findtext("{*}ns", default="0").strip()
        title = (elem.findtext("{*}title") or "").strip()
        text = elem.findtext("{*}revision/{*}text") or ""
        redirect = elem.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
        if ns == "0" and not redirect and title:
            yield title, text
        elem.clear()


def wikitext_to_article(title: str, wikitext: str, min_words: int = MIN_ARTICLE_WORDS) -> str | None:
    """One article's wikitext -> " = Title = " block, or None if shorter than min_words."""
    blocks: list[str] = []
    words = 0
    skip_level = None  # inside a skipped section (references, links ...) of this level
    for level, heading, body in _sections(_prestrip(wikitext)):
        if heading is not None:
            if skip_level is not None and level > skip_level:
                continue
            skip_level = None
            if heading.lower() in _SKIP_SECTIONS:
                skip_level = level
                continue
        elif skip_level is not None:
            continue
        paragraphs = _body_paragraphs(body)
        if not paragraphs:
            continue
        if heading:
            blocks.append(_heading_line(heading, level))
        blocks.extend(paragraphs)
        words += sum(len(p.split()) for p in paragraphs)
    if words < min_words:
        return None
    return "\n\n".join([_heading_line(title, 1)] + blocks)


def _heading_line(title: str, level: int) -> str:
    return " " + "= " * level + title + " =" * level + " "


def _prestrip(wikitext: str) -> str:
    """Remove what strip_code would leave or choke on: comments, references, tables, math."""
    text = _COMMENT_RE.sub("", wikitext)
    text = _REF_SELF_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROP_TAGS_RE.sub("", text)
    return _drop_tables(text)


def _drop_tables(text: str) -> str:
    """Drop wiki tables ({| ... |}, nested ones included), line by line."""
    kept, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            kept.append(line)
    return "\n".join(kept)


def _sections(text: str) -> Iterator[tuple[int, str | None, str]]:
    """(level, plain heading or None for the lead, body wikitext) in order."""
    position, level, heading = 0, 0, None
    for m in _HEADING_RE.finditer(text):
        yield level, heading, text[position:m.start()]
        level = min(len(m.group(1)), len(m.group(3)))
        raw_title = m.group(1)[level:] + m.group(2) + m.group(3)[level:]
        heading = _clean_line(_strip_code(raw_title))
        position = m.end()
    yield level, heading, text[position:]


def _strip_code(wikitext: str) -> str:
    import mwparserfromhell  # noqa: PLC0415 - only needed when building the cache

    code = mwparserfromhell.parse(wikitext)
    for link in code.filter_wikilinks(recursive=True):
        namespace = str(link.title).split(":", 1)[0].strip().lower() if ":" in str(link.title) else ""
        if namespace in _DROP_LINK_NAMESPACES:
            with contextlib.suppress(ValueError):  # already gone with a removed parent
                code.remove(link)
    for tag in code.filter_tags(recursive=True):
        name = str(tag.tag).strip().lower()
        with contextlib.suppress(ValueError):
            if name == "br":
                code.replace(tag, " ")
            elif name in _DROP_CONTENT_TAGS:
                code.remove(tag)
    return code.strip_code(normalize=True, collapse=True)


def _body_paragraphs(body: str) -> list[str]:
    if not body.strip():
        return []
    paragraphs = []
    for line in _strip_code(body).split("\n"):
        if any(marker in line for marker in _LEFTOVER_MARKUP):
            continue
        stripped = line.lstrip()
        if stripped.startswith(("|", "!", "File:", "Image:", "Category:")):
            continue
        line = _clean_line(line)
        if any(ch.isalpha() for ch in line):
            paragraphs.append(line)
    return paragraphs


def _clean_line(line: str) -> str:
    line = _HTML_TAG_RE.sub(" ", line)
    line = _MAGIC_WORD_RE.sub("", line)
    line = re.sub(r"\s+", " ", line)
    for _ in range(2):  # "( ; )" -> "" can expose another empty pair
        line = re.sub(r"\(\s*(?:[,;:.]\s*)*\)", "", line)
        line = re.sub(r"\[\s*\]", "", line)
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)
        line = re.sub(r"\s*[,;:]\s*\)", ")", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", line)
    line = re.sub(r"\s+", " ", line)
    return line.strip().lstrip(",;:. ").strip()


def news_from_lines(corpus: str) -> str:
    """Lee corpus (one article per line) -> articles joined with blank lines."""
    articles = [line.strip() for line in corpus.splitlines() if line.strip()]
    return "\n\n".join(articles)


# ----------------------------------------------------------------------------- tokens

_LONG_SEQUENCE_WARNING = "Token indices sequence length is longer than the specified maximum"


class _DropLongSequenceWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LONG_SEQUENCE_WARNING)


@contextlib.contextmanager
def _no_long_sequence_warning() -> Iterator[None]:
    logger = logging.getLogger("transformers.tokenization_utils_base")
    flt = _DropLongSequenceWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
    """Tokenize the whole text once, with no BOS or other special tokens -> ids: [n_tokens] int32.

    ``tokenizer``: a transformers tokenizer (called as ``tokenizer(text,
    add_special_tokens=False)["input_ids"]``), or an object with
    ``encode(text, add_special_tokens=False)`` returning ids or an encoding with ``.ids``
    (``tokenizers.Tokenizer``). transformers' "sequence longer than the maximum" warning is
    suppressed: the windows cut from the ids are short.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    with _no_long_sequence_warning():
        if callable(tokenizer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif hasattr(tokenizer, "encode"):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            ids = getattr(encoded, "ids", encoded)
        else:
            raise TypeError(f"tokenizer must be callable or have .encode, got {type(tokenizer).__name__}")
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"the tokenizer returned {ids.dtype} ids of shape {ids.shape}; expected one "
                         "flat sequence of integer token ids")
    return _as_int32(ids)


def _as_int32(ids: np.ndarray) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids must lie in [0, 2**31), got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


def _check_token_ids(token_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one flat array [n_tokens], got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    return _as_int32(ids)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{what} must be a positive integer, got {number}")
    return number


def max_windows(n_tokens: int, seq_len: int) -> int:
    """How many non-overlapping windows of seq_len tokens fit in n_tokens (tail dropped)."""
    return n_tokens // _positive_int(seq_len, "seq_len")


def _check_fits(n_tokens: int, num_windows: int | None, seq_len: int, purpose: str) -> int:
    available = n_tokens // seq_len
    if available == 0:
        raise TextTooShortError(
            f"the text has {n_tokens} tokens, fewer than one {purpose} window of {seq_len} tokens; "
            f"use a longer text or a shorter window length")
    if num_windows is not None and num_windows > available:
        raise TextTooShortError(
            f"asked for {num_windows} {purpose} windows of {seq_len} tokens, but the text has "
            f"{n_tokens} tokens: at most {available} non-overlapping windows are available; "
            f"ask for at most {available} windows, use shorter windows or a longer text")
    return available


def eval_windows(token_ids: np.ndarray, num_windows: int | None, seq_len: int) -> np.ndarray:
    """token_ids: [n_tokens] -> the first num_windows non-overlapping windows [num_windows, seq_len]
    int32 (window i = token_ids[i*seq_len:(i+1)*seq_len]; the tail is dropped).

    ``num_windows=ALL_WINDOWS`` (None) takes every full window.
    """
    seq_len = _positive_int(seq_len, "seq_len")
    if num_windows is not ALL_WINDOWS:
        num_windows = _positive_int(num_windows, "num_windows")
    ids = _check_token_ids(token_ids)
    available = _check_fits(ids.size, num_windows, seq_len, "evaluation")
    n = available if num_windows is ALL_WINDOWS else num_windows
    return ids[: n * seq_len].reshape(n, seq_len).copy()


def calib_windows(token_ids: np.ndarray, num_windows: int, seq_len: int, seed: int) -> np.ndarray:
    """token_ids: [n_tokens] -> num_windows random windows [num_windows, seq_len] int32.

    Start offsets are uniform over [0, n_tokens - seq_len] (inclusive), drawn with
    ``np.random.default_rng(seed).integers``; windows may overlap. Asking for more windows
    than the text's ``n_tokens // seq_len`` non-overlapping windows is an error.
    """
    seq_len = _positive_int(seq_len, "seq_len")
    num_windows = _positive_int(num_windows, "num_windows")
    seed = operator.index(seed)
    ids = _check_token_ids(token_ids)
    _check_fits(ids.size, num_windows, seq_len, "calibration")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seq_len + 1, size=num_windows)  # [num_windows]
    return ids[starts[:, None] + np.arange(seq_len)[None, :]]


def text_stats(text: str) -> dict[str, int]:
    """Characters, whitespace-separated words and article headings of a text."""
    return {"chars": len(text), "words": len(text.split()),
            "articles": len(article_heading_offsets(text))}


__all__ = [
    "ALL_WINDOWS", "BUILTIN_TEXTS", "CALIB_FRACTION", "DEFAULT_CALIB_TEXT", "DEFAULT_EVAL_TEXT",
    "OFFLINE_TEXTS", "TextSource", "TextSourceError", "TextTooShortError", "article_heading_offsets",
    "builtin_text", "cache_dir", "calib_windows", "eval_windows", "load_text", "max_windows",
    "news_text", "split_calib_eval", "text_stats", "tokenize", "wiki_from_xml", "wiki_text",
    "wikitext_to_article",
]
