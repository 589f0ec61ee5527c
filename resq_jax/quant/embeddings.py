"""Quantized embedding tables: the token embeddings and the lm_head in 8 or 4 bits.

ResQ and the papers keep both in 16 bits (docs/algorithms.md, What stays in float), which dominates the size of a
small model's checkpoint (SmolLM2: 21% of the parameters; Qwen2.5-0.5B, untied: 55%). This
module is the optional alternative (``QuantConfig.embed_bits`` < 16), applied by the fake-quant
pipeline and stored by the packed runtime, so the perplexity a user reads is the stored model's.

Format. A table ``t: [V, d]`` (one row per token; the lm_head ``[d, V]`` is quantized as its
transpose, one row per output logit) is quantized symmetrically per (row, group of ``group``
channels along d): ``scale = max|t| / (2^(b-1) - 1)`` rounded to float16 (the stored precision;
an all-zero group uses 1), ``q = clip(round(t / scale), -2^(b-1), 2^(b-1) - 1)``, value
``q * scale`` in float32; with the recipe's MSE clip search on (the integer recipes' default) the
max is shrunk by the factor of least squared error per group. Default groups: 64 channels at
<= 4 bits, the whole row above.

Tied models. A model with tied embeddings that gets its norms folded and its residual stream
rotated (ResQ, QuaRot) has ``lm_head = U^T diag(g) E^T`` and ``embed = E U`` (docs/algorithms.md,
Norm folding and fusion): both are functions of the one rotated table ``T = E U``, since
``lm_head = U^T diag(g) U T^T``. The quantized model therefore keeps one table, Q(T), and the
head ``M Q(T)^T`` with ``M = U^T diag(g) U`` ([d, d], computed from U rounded to float32 and
the final-norm gain g, in float64): one table stored instead of two, as in the float model.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from resq_jax.formats.bits import check_bits
from resq_jax.models.views import overlaid

LOW_BITS_GROUP = 64  # default group at <= 4 bits (4.25 bits per value with float16 scales)


class EmbeddingConfigError(ValueError):
    """Invalid embedding quantization settings; the message names the fix."""


def default_group(bits: int, d: int) -> int:
    """Channels per scale: LOW_BITS_GROUP at <= 4 bits (when it divides d), else the whole row."""
    return LOW_BITS_GROUP if bits <= 4 and d % LOW_BITS_GROUP == 0 else d


def check_embed_settings(bits: int, group: int | None, d: int) -> int:
    """The group size in effect for ``bits`` / ``group`` on a hidden size d; a clear error when the
    group does not divide d or the bits are not 2..8 (or 16: off)."""
    try:
        check_bits(bits, "embed_bits")
    except ValueError as e:
        raise EmbeddingConfigError(f"--embed-bits: {e}") from None
    if group is None:
        return default_group(bits, d)
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or d % group:
        divisors = [g for g in range(8, d + 1) if d % g == 0]
        raise EmbeddingConfigError(f"--embed-group {group!r} must divide the hidden size {d}; use one of "
                                   f"{', '.join(map(str, divisors))}")
    return group


@dataclasses.dataclass(frozen=True)
class TableCodes:
    """Symmetric codes of a table ``[V, d]``: q int8 [V, d], scale float16 [V, d // group]."""

    q: np.ndarray
    scale: np.ndarray
    bits: int

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 [V, d] = q * scale (exact: an int8 times a float16 fits in float32)."""
        v, d = self.q.shape
        s = self.scale.astype(np.float32)[:, :, None]
        return (self.q.reshape(v, -1, self.group).astype(np.float32) * s).reshape(v, d)


CLIP_FACTORS = tuple(np.float32(1.0 - 0.02 * i) for i in range(20))  # 1.00, 0.98, ..., 0.62


def _group_codes(tg: np.ndarray, bits: int, factor: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """tg: float32 [R, n, group] -> (q int8, scale float16 [R, n]) with scale = factor * max|tg| /
    (2^(b-1) - 1) rounded to float16 (1 for an all-zero group); round, then clip."""
    maxq = np.float32(2 ** (bits - 1) - 1)
    s = (factor * np.max(np.abs(tg), axis=-1) / maxq).astype(np.float16)
    s[s == 0] = 1
    q = np.clip(np.round(tg / s.astype(np.float32)[..., None]), -maxq - 1, maxq).astype(np.int8)
    return q, s


def quantize_table(t: np.ndarray, bits: int, group: int, clip_search: bool = False) -> TableCodes:
    """t: [V, d] float -> TableCodes (module docstring), quantizer arithmetic in float32; rows are
    processed in chunks so a 150k-token vocabulary needs no second float32 copy.

    ``clip_search``: per (row, group), the scale of the factor in CLIP_FACTORS (times max|t|)
    whose squared error sum is smallest (the first on ties). Measured on SmolLM2 rotated by QuaRot,
    4-bit groups of 64 (embeddings and the derived head, 10 x 512 tokens): perplexity x1.115 of
    the float model without, x1.075 with."""
    t = np.asarray(t)
    v, d = t.shape
    if d % group:
        raise EmbeddingConfigError(f"group {group} does not divide the table width {d}")
    q = np.empty((v, d), np.int8)
    scale = np.empty((v, d // group), np.float16)
    for start in range(0, v, 8192):
        tg = t[start:start + 8192].astype(np.float32).reshape(-1, d // group, group)
        best_q, best_s, best_err = None, None, None
        for factor in CLIP_FACTORS if clip_search else CLIP_FACTORS[:1]:
            cq, cs = _group_codes(tg, bits, factor)
            err = np.sum(np.square(cq * cs.astype(np.float32)[..., None] - tg), axis=-1)
            if best_q is None:
                best_q, best_s, best_err = cq, cs, err
                continue
            better = err < best_err
            best_q = np.where(better[..., None], cq, best_q)
            best_s, best_err = np.where(better, cs, best_s), np.where(better, err, best_err)
        q[start:start + 8192] = best_q.reshape(-1, d)
        scale[start:start + 8192] = best_s
    return TableCodes(q=q, scale=scale, bits=bits)


def head_map(basis: np.ndarray | None, gain: np.ndarray) -> np.ndarray:
    """M = B^T diag(g) B: [d, d] float64, with B the residual basis rounded to float32 (the
    stored precision) or the identity (None)."""
    g = np.asarray(gain, np.float64)
    if basis is None:
        return np.diag(g)
    b = np.asarray(basis, np.float32).astype(np.float64)
    return b.T @ (g[:, None] * b)


def tied_head(basis: np.ndarray | None, gain: np.ndarray, table: np.ndarray) -> np.ndarray:
    """lm_head [d, V] float32 = M table^T (module docstring), computed in float64."""
    m = head_map(basis, gain)
    out = np.empty((m.shape[0], table.shape[0]), np.float32)
    for start in range(0, table.shape[0], 16384):
        out[:, start:start + 16384] = m @ table[start:start + 16384].astype(np.float64).T
    return out


@dataclasses.dataclass(frozen=True)
class EmbeddingCodes:
    """The quantized embeddings of a model and how its lm_head derives from them.

    table:  codes of ``embed`` [V, d]
    head:   codes of ``lm_head^T`` [V, d] (untied models), else None
    basis:  [d, d] float32 residual basis U of a tied, rotated model (lm_head = M Q(T)^T), or None
    gain:   [d] float32 final-norm gain g of a tied model with folded norms, or None (the head is
            the table itself: lm_head = Q(T)^T, a model that stays tied)
    """

    table: TableCodes
    head: TableCodes | None = None
    basis: np.ndarray | None = None
    gain: np.ndarray | None = None

    def embed(self) -> np.ndarray:
        return self.table.dequantize()

    def lm_head(self, embed: np.ndarray | None = None) -> np.ndarray | None:
        """lm_head [d, V] float32, or None for a model that stays tied (the decoder uses embed^T)."""
        if self.head is not None:
            return np.ascontiguousarray(self.head.dequantize().T)
        if self.gain is None:
            return None
        return tied_head(self.basis, self.gain, self.embed() if embed is None else embed)

    @property
    def bits(self) -> int:
        return self.table.bits

    @property
    def head_kind(self) -> str:
        """"table" (own codes), "derived" (M Q(T)^T) or "tied" (the decoder's embed^T)."""
        return "table" if self.head is not None else ("derived" if self.gain is not None else "tied")


def quantize_embeddings(weights: Mapping, bits: int, group: int, *, tied_gain: np.ndarray | None = None,
                        basis: np.ndarray | None = None, clip_search: bool = False) -> tuple[dict, EmbeddingCodes]:
    """Quantize a (fused) weights dict's ``embed`` and ``lm_head`` (module docstring).

    ``clip_search``: quantize_table's MSE search of the scales. ``tied_gain``: the final-norm
    gain of a model whose embeddings were tied before untie + fold (the head is then derived from
    the one quantized table, with ``basis`` the residual rotation or None); None for an untied
    model (the lm_head gets its own codes) and for a model that stays tied (no ``lm_head``
    entry). Returns (a view of weights with the dequantized tables, codes)."""
    out = {}
    table = quantize_table(weights["embed"], bits, group, clip_search)
    head = None
    if "lm_head" in weights and tied_gain is None:
        head = quantize_table(np.asarray(weights["lm_head"]).T, bits, group, clip_search)
    codes = EmbeddingCodes(table=table, head=head,
                           basis=None if basis is None or tied_gain is None else np.asarray(basis, np.float32),
                           gain=None if tied_gain is None else np.asarray(tied_gain, np.float32))
    out["embed"] = codes.embed()
    lm_head = codes.lm_head(out["embed"])
    if lm_head is not None:
        out["lm_head"] = lm_head
    return overlaid(weights, out), codes
