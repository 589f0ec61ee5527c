"""The tokenizer stored in a GGUF file, built with ``tokenizers`` alone (no torch, no transformers GGUF reader).

A GGUF carries no ``tokenizer.json``; llama.cpp writes the vocabulary as metadata under
``tokenizer.ggml.*``. For byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: Llama 3,
Qwen2/2.5, SmolLM, GPT-2, ...) the keys used here are

  tokens         the vocabulary, id order, spelled in GPT-2's byte alphabet ("Ġ" is a space byte)
  merges         BPE merges "left right", best first
  token_type     1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
  pre            the name of the pre-tokenizer (how text is cut into words before BPE)
  bos/eos/unknown/padding_token_id, add_bos_token, add_eos_token, chat_template

The pre-tokenizer names are llama.cpp's (``src/llama-vocab.cpp`` is their public definition): each name
stands for a list of regular expressions applied one after the other, every match and every gap between
matches becoming a piece of its own ("isolated" in ``tokenizers``' terms). Where llama.cpp rewrote a
model's original ``tokenizer.json`` regex into a form its regex engine handles (``(?i:'s|...)`` spelled as
``'[sS]|...``), the original form is used here, since ``tokenizers`` (Oniguruma) runs it as written.

The result is a transformers ``PreTrainedTokenizerFast`` so the rest of the code sees one tokenizer type.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

__all__ = ["GGUFTokenizerError", "PRE_TOKENIZER_SPLITS", "tokenizer_from_gguf_metadata", "gguf_tokenizer_metadata"]


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer metadata names something this module cannot build; the message says what."""


# GPT-2's word regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's tokenizer.json regex (llama.cpp's LLAMA3, also "llama-bpe"): numbers in runs of at most 3.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's tokenizer.json regex (llama.cpp's QWEN2): every digit a word of its own.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes applied in order (llama.cpp's regex_exprs for that name).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for BPE vocabularies: punctuation runs, GPT-2 words, digit runs, then triples.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    # StarCoder's vocabulary, reused by SmolLM/SmolLM2: digits split one by one, then GPT-2 words.
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
}
# llama.cpp sets ignore_merges for the Llama-3 family (a word that is itself a token is not re-merged)
# and adds BOS by default there; the GGUF's add_bos_token key overrides that default.
_LLAMA3_NAMES = frozenset({"llama3", "llama-v3", "llama-bpe"})

_CONTROL, _USER_DEFINED = 3, 4


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes 33..126, 161..172, 174..255 map to
    themselves; the other 68 bytes to U+0100 onwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spelled(token: str, alphabet: frozenset[str]) -> str:
    """A vocabulary entry in the byte alphabet: as stored when it already is, else its UTF-8 bytes mapped."""
    if set(token) <= alphabet:
        return token
    table = _byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))


def gguf_tokenizer_metadata(reader) -> dict[str, Any]:
    """The ``tokenizer.*`` fields of a ``gguf.GGUFReader`` as plain Python values (lists stay lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any], *, source: str = "GGUF"):
    """Build a ``PreTrainedTokenizerFast`` from GGUF tokenizer metadata (``tokenizer.ggml.*`` keys).

    Raises :class:`GGUFTokenizerError` naming the tokenizer model or pre-tokenizer when either is one
    this module does not know.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFTokenizerError(
            f"{source}: tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level BPE as in "
            "Llama 3, Qwen2 and SmolLM); load the model from a transformers folder with its tokenizer.json")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise GGUFTokenizerError(
            f"{source}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}); "
            "load the model from a transformers folder with its tokenizer.json")
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    merges: Sequence[str] = meta.get("tokenizer.ggml.merges") or ()
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"{source}: {len(tokens)} tokens but {len(types)} token types; the file is corrupt")

    # Control and user-defined tokens are matched whole in the text, never built by BPE: they keep their
    # stored spelling. Every other entry is a BPE word in the byte alphabet.
    alphabet = frozenset(_byte_alphabet().values())
    whole = [ty in (_CONTROL, _USER_DEFINED) for ty in types]
    vocab = {t if w else _spelled(t, alphabet): i for i, (t, w) in enumerate(zip(tokens, whole))}
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFTokenizerError(f"{source}: merge {m!r} is not 'left right'; the file is corrupt")
        pairs.append((left, right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre in _LLAMA3_NAMES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    # As llama.cpp does, control tokens (<|im_start|>, ...) and user-defined ones (<tool_call>) are cut out
    # of the text before pre-tokenization; only control tokens are "special" (dropped by
    # decode(skip_special_tokens=True)).
    added = [AddedToken(t, special=ty == _CONTROL, normalized=False)
             for t, ty, w in zip(tokens, types, whole) if w]
    tok.add_tokens(added)

    def token_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos = token_of("bos_token_id"), token_of("eos_token_id")
    kwargs: dict[str, Any] = {
        # transformers builds the post-processor that adds BOS/EOS from these two flags.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_NAMES)) and bos is not None,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None,
    }
    kwargs |= {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", token_of("unknown_token_id")),
                                ("pad_token", token_of("padding_token_id"))) if v is not None}
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
