"""The built-in texts' source: the gensim wheel fetched from PyPI with pip, its Wikipedia dump and
news corpus extracted once and cached under $RESQ_JAX_CACHE/text (default ~/.cache/resq_jax/text).
"""
from __future__ import annotations

import bz2
import tempfile
import zipfile
from pathlib import Path

from resq_jax.data.extract import news_from_lines, wiki_from_xml
from resq_jax.util.files import cache_dir, pip_download, write_text_atomic


class TextSourceError(ValueError):
    """A text cannot be obtained (missing file, empty text, no network for a download, ...)."""


GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
EXTRACTOR_VERSION = 1  # bump whenever the extraction (extract.py) changes its output


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
    directory = cache_dir("text")
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
    write_text_atomic(paths["wiki"], wiki_from_xml(wiki_xml))
    write_text_atomic(paths["news"], news_from_lines(lee))


def _download_gensim_wheel(dest: Path) -> Path:
    """pip download gensim==GENSIM_VERSION (no dependencies, wheel only) into dest."""
    # The data members are the same in every wheel; if this platform has none, take Linux's.
    linux = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
             "--abi", "cp311")
    wheel, error = pip_download(f"gensim=={GENSIM_VERSION}", dest, extra_attempts=[linux])
    if wheel is None:
        raise TextSourceError(
            f"could not download gensim=={GENSIM_VERSION} from PyPI, which holds the built-in "
            f"Wikipedia and news texts (needed once; they are cached in {cache_dir('text')}). "
            f"Check network access to PyPI, or pass a UTF-8 text file instead of a built-in name. "
            f"pip said: {error}")
    return wheel


