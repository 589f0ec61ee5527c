"""Token windows: a text tokenized once, cut into consecutive evaluation windows or random
calibration windows (seeded).
"""
from __future__ import annotations

import contextlib
import logging
import operator
from typing import Any, Iterator

import numpy as np

ALL_WINDOWS = None  # eval_windows(num_windows=ALL_WINDOWS): every full window of the text


class TextTooShortError(ValueError):
    """The tokenized text holds fewer windows than requested."""


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
