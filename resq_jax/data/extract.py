"""Plain text from the raw sources: Wikipedia articles from MediaWiki XML (markup parsed with
mwparserfromhell) and the news corpus from its lines.
"""
from __future__ import annotations

import contextlib
import io
import re
import xml.etree.ElementTree as ET
from typing import Iterator

MIN_ARTICLE_WORDS = 200


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
