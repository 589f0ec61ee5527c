"""models.gguf_tokenizer: the GGUF's tokenizer built without torch, against independent references.

- transformers' own GGUF tokenizer (its reader needs torch, which the test extra installs) on both built-in
  models, on the whole Wikipedia sample, the news corpus and a string of special tokens, emojis, CJK, code
  and whitespace runs. transformers knows Qwen2's pre-tokenizer but not "smollm": for SmolLM2 it falls back
  to GPT-2's split, which differs from SmolLM2's own tokenizer.json (digits split one by one *before* the
  GPT-2 regex; llama.cpp's "smollm" does the same). The SmolLM2 reference is therefore transformers' GGUF
  tokenizer with SmolLM2's published pre-tokenizer, ``Sequence([Digits(individual_digits=True),
  ByteLevel(use_regex=True)])``, written the Hugging Face way rather than as our regex list.
- the pre-tokenizer regexes of every supported name against the Python ``regex`` engine applying
  llama.cpp's expressions as llama.cpp spells them, one after the other.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import regex

from resq_jax.data.texts import builtin_text
from resq_jax.models import loaders
from resq_jax.models.gguf_tokenizer import (
    PRE_TOKENIZER_SPLITS,
    GGUFTokenizerError,
    gguf_tokenizer_metadata,
    tokenizer_from_gguf_metadata,
)

MIXED = ("<|im_start|>user\nHi 😀👍🏽 🇺🇸 中文字符テスト 한국어 naïve café Ελληνικά\t\t  x = [1, 22, 333, 4444, 55555]\n\n\n"
         "   def f(a, b):\n\treturn a ** 2 + b  # it's 3.14159, they'll've\r\n\r\n<|im_end|><|endoftext|>"
         "  \u00a0 <tool_call>{\"k\": 1}</tool_call>   \n  end  ")
TEXTS = {"wiki": lambda: builtin_text("wiki"), "news": lambda: builtin_text("news"), "mixed": lambda: MIXED}


def _reference(path, pre):
    """transformers' GGUF tokenizer (torch-backed reader), SmolLM2 given its tokenizer.json pre-tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if pre == "smollm":
        ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ref


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-coder-0.5b"])
def pair(request):
    path = loaders._builtin_path(request.param)
    meta = gguf_tokenizer_metadata(gguf.GGUFReader(str(path)))
    ours = tokenizer_from_gguf_metadata(meta, source=str(path))
    return request.param, meta, ours, _reference(path, meta["tokenizer.ggml.pre"])


@pytest.mark.parametrize("text", sorted(TEXTS))
def test_ids_equal_reference_and_round_trip(pair, text):
    name, _, ours, ref = pair
    s = TEXTS[text]()
    for special in (False, True):
        a = ours(s, add_special_tokens=special)["input_ids"]
        b = ref(s, add_special_tokens=special)["input_ids"]
        if a != b:
            i = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-1])) if x != y)
            pytest.fail(f"{name} {text}: first difference at token {i}: ours "
                        f"{ours.convert_ids_to_tokens(a[i:i + 4])} reference {ref.convert_ids_to_tokens(b[i:i + 4])}")
    assert ours.decode(ours(s, add_special_tokens=False)["input_ids"]) == s
    if text == "wiki":  # a real-size text: hundreds of thousands of tokens
        assert len(a) > 500_000


def test_special_tokens_and_flags(pair):
    name, meta, ours, ref = pair
    toks = meta["tokenizer.ggml.tokens"]
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        assert getattr(ours, attr) == (None if i is None else toks[i]), attr
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.add_bos_token is bool(meta["tokenizer.ggml.add_bos_token"]) is False
    assert ours.chat_template == meta["tokenizer.chat_template"]
    assert len(ours) == len(toks)  # no token was added past the vocabulary
    # every control token is one id and is dropped by skip_special_tokens
    types = np.asarray(meta["tokenizer.ggml.token_type"])
    for i in np.flatnonzero(types == 3)[:8]:
        assert ours(toks[i], add_special_tokens=False)["input_ids"] == [int(i)]
        assert ours.decode([int(i)], skip_special_tokens=True) == ""
    msgs = [{"role": "user", "content": "2+2?"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


# ----------------------------------------------------------------------------- pre-tokenizer regexes

# llama.cpp's regex_exprs, as llama.cpp spells them (its engine has no (?i:...)): an independent statement
# of what each name means.
_LC_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LC_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA_CPP = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _LC_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [_LC_GPT2],
    "smollm": [r"\p{N}", _LC_GPT2],
    "starcoder": [r"\p{N}", _LC_GPT2],
    "llama-bpe": [_LC_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [_LC_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
_LLAMA_CPP |= {"llama3": _LLAMA_CPP["llama-bpe"], "llama-v3": _LLAMA_CPP["llama-bpe"],
               "deepseek-r1-qwen": _LLAMA_CPP["qwen2"]}


def _llama_cpp_split(text: str, exprs: list[str]) -> list[str]:
    """Apply each regex to every piece: matches and the gaps between them all become pieces."""
    pieces = [text]
    for e in exprs:
        out = []
        for p in pieces:
            at = 0
            for m in regex.finditer(e, p):
                if m.start() > at:
                    out.append(p[at:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                at = m.end()
            if at < len(p):
                out.append(p[at:])
        pieces = out
    return pieces


def _tiny_meta(pre: str, **extra):
    """A byte-level vocabulary of the 256 byte symbols and no merges: ids expose the pre-tokenization."""
    from resq_jax.models.gguf_tokenizer import _byte_alphabet

    toks = [_byte_alphabet()[b] for b in range(256)] + ["<s>", "</s>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.token_type": [1] * 256 + [3, 3], "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257, **extra}


def test_supported_names_are_the_llama_cpp_ones():
    assert set(PRE_TOKENIZER_SPLITS) == set(_LLAMA_CPP)


@pytest.mark.parametrize("pre", sorted(_LLAMA_CPP))
def test_pre_tokenizer_matches_llama_cpp_regexes(pre):
    from resq_jax.models.gguf_tokenizer import _byte_alphabet

    tok = tokenizer_from_gguf_metadata(_tiny_meta(pre))
    table = _byte_alphabet()
    text = MIXED.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|endoftext|>", "")
    text += builtin_text("news")[:20_000] + " I'M SURE HE'LL 2,147,483,647th +=<>^~| $5 ... 1234567 \n \n\n  x"
    ours = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    want = ["".join(table[b] for b in p.encode("utf-8")) for p in _llama_cpp_split(text, _LLAMA_CPP[pre])]
    assert ours == want


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from resq_jax.models.gguf_tokenizer import _byte_alphabet

    t = _byte_alphabet()
    assert t == bytes_to_unicode()
    assert t[ord(" ")] == "\u0120" and t[ord("\n")] == "\u010a" and t[ord("A")] == "A" and t[0xAD] == "\u0143"


def test_llama3_adds_bos_by_default_and_metadata_overrides():
    assert tokenizer_from_gguf_metadata(_tiny_meta("llama-bpe"))("a")["input_ids"] == [256, ord("a")]
    off = tokenizer_from_gguf_metadata(_tiny_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}))
    assert off("a")["input_ids"] == [ord("a")]
    eos = tokenizer_from_gguf_metadata(_tiny_meta("qwen2", **{"tokenizer.ggml.add_eos_token": True}))
    assert eos("a")["input_ids"] == [ord("a"), 257]


def test_bpe_merges_apply_in_rank_order():
    from resq_jax.models.gguf_tokenizer import _byte_alphabet

    meta = _tiny_meta("gpt-2")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["ab", "bc", "abc"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1, 1, 1]
    meta["tokenizer.ggml.merges"] = ["b c", "a b", "a bc"]  # "bc" outranks "ab": abc -> a + bc -> abc
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok("abc")["input_ids"] == [260]
    assert tok("ab")["input_ids"] == [258]
    assert tok("abd")["input_ids"] == [258, ord("d")]
    assert _byte_alphabet()[ord("a")] == "a"


@pytest.mark.parametrize("key,value,needle", [
    ("tokenizer.ggml.model", "llama", "tokenizer model 'llama' is not supported"),
    ("tokenizer.ggml.pre", "chatglm-bpe", "pre-tokenizer 'chatglm-bpe' is not supported"),
])
def test_unknown_names_are_clear_errors(key, value, needle):
    with pytest.raises(GGUFTokenizerError, match=regex.escape(needle)):
        tokenizer_from_gguf_metadata(_tiny_meta("gpt-2", **{key: value}), source="x.gguf")


def test_loader_reports_unknown_pre_tokenizer(tmp_path):
    """A GGUF whose tokenizer cannot be built fails in load_model with one line naming it."""
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in _tiny_meta("mystery").items():
        if isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    with pytest.raises(loaders.ModelLoadError, match="pre-tokenizer 'mystery' is not supported"):
        loaders._load_tokenizer_gguf(tmp_path / "m.gguf", reader)
