"""Pytree helpers: frozen dataclasses whose array fields are leaves and static fields are
aux data.
"""
from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(cls):
    """Frozen dataclass registered as a pytree; fields with metadata static=True are static.
    Shared by every code container (resq_jax.formats, resq_jax.kernels.gemm_reference, resq_jax.runtime)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    meta = [f.name for f in fields if f.metadata.get("static", False)]
    data = [f.name for f in fields if not f.metadata.get("static", False)]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static_field(**kw):
    """A static (hashed, not traced) field of a ``pytree_dataclass``."""
    return dataclasses.field(metadata={"static": True}, **kw)
