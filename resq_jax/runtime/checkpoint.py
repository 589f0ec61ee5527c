"""Save and restore quantized models with orbax-checkpoint, atomically.

A packed checkpoint folder (``save_packed`` / ``load_packed``; format ``resq-jax-packed``) holds
  meta.json     format and version, source model, model config, quantization config, activation
                spec, linear layouts, down_proj Hadamard size, and a manifest of every array
                (shape, dtype, CRC-32 of its bytes)
  arrays/layers/{i}/  one orbax PyTree checkpoint per decoder layer: its packed int4/int8 codes, scales,
                biases, norms and online key rotation (column sums are derived from the codes at load)
  arrays/vocab/{embed,lm_head}/{k}/  the 16-bit float vocabulary tables, one orbax PyTree checkpoint
                per block of ``block`` vocabulary entries (rows of embed, columns of lm_head), each with
                its own CRC-32 in the manifest
  arrays/common/  orbax PyTree checkpoint: ``arrays`` (the final norm, and the embeddings / lm_head
                when they are int8/int4 codes (resq_jax.quant.embeddings)) and ``transforms`` (the
                recipe's projections, float32)
  tokenizer/    the tokenizer's files (when the model has a tokenizer)

Version 4 writes and reads the arrays one layer and one vocabulary block at a time, so a model the host
cannot hold whole (a 7B model's float16 embed and lm_head are 1.1 GB each, spilled to disk while it is
made) is saved with one layer or one block in memory. Version 3 (the vocabulary tables inside
``arrays/common``) and version 2 (one ``arrays/`` tree) are still read.

Writes go to a hidden staging folder next to the target, renamed into place only when complete
(meta.json written last): a crash leaves the old checkpoint (or none), never a half-written one.
Reads check everything before returning: format and version, the config, every array against the
manifest and against the shapes the config implies, and the CRC of every array (a truncated or
swapped file is reported, never run); a version 3 or 4 checkpoint is checked layer by layer (and block by
block) and each layer is checked again when it is read for use. The previous fake-quant format
(``resq-jax-fake-quant`` version 1) is still readable with ``load_fake_quant``; ``load_checkpoint`` reads either.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from resq_jax.models.config import ModelConfig
from resq_jax.models.loaders import expected_shapes
from resq_jax.models.views import VOCAB_AXIS, VOCAB_SLICE, index_vocab
from resq_jax.quant.fake_quant import FakeQuantHooks
from resq_jax.quant.layouts import LINEARS, ActivationSpec
from resq_jax.runtime.linear import LinearLayout
from resq_jax.runtime.pack import PackedArrays, PackedModel
from resq_jax.util.files import json_default

FORMAT = "resq-jax-packed"
# 2: column sums derived at load, quantized embeddings; 3: arrays written per layer; 4: float vocabulary tables
# written per block of entries
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
FAKE_QUANT_FORMAT = "resq-jax-fake-quant"
FAKE_QUANT_VERSION = 1
RERUN = "re-create it with scripts/quantize.py --out"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message says what is wrong and what to do."""


@dataclasses.dataclass
class LoadedPacked:
    model: Any  # resq_jax.runtime.pack.PackedModel
    tokenizer: Any
    source: str


@dataclasses.dataclass
class LoadedCheckpoint:
    """A fake-quant checkpoint (format resq-jax-fake-quant)."""

    config: Any
    weights: dict[str, np.ndarray]
    hooks: Any
    qconfig: dict
    transforms: dict[str, np.ndarray]
    tokenizer: Any
    source: str
    weight_bits: float | None = None  # bits per decoder-linear weight (None: not recorded)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.asarray(value)
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = np.asarray(v)
    return out


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _manifest(arrays: Mapping[str, np.ndarray]) -> dict:
    return {k: {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": _crc(a)} for k, a in sorted(arrays.items())}


def _dtype(name: str) -> np.dtype:
    """A manifest's dtype name as a NumPy dtype (bfloat16 from ml_dtypes)."""
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name)) if name == "bfloat16" else np.dtype(name)


def _vocab_index(name: str, start: int, stop: int) -> tuple[slice, ...]:
    """The index of vocabulary entries [start, stop) of the table ``name`` (embed rows, lm_head columns)."""
    return (slice(None),) * VOCAB_AXIS[name] + (slice(start, stop),)



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(path: str | os.PathLike):
    """Remove the staging folders of the checkpoint ``path`` left by writers that died (kill -9, power loss, a
    failed multi-process job)."""
    path = Path(path).absolute()
    for p in path.parent.glob(f".{path.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def check_target(path: str | os.PathLike, force: bool):
    """CheckpointError unless a checkpoint may be written to ``path`` (absent, or a checkpoint
    and ``force``); never overwrites a folder that is not a resq-jax checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    if not force:
        raise CheckpointError(f"{path} already exists; pass force=True (--force) to overwrite it")
    if not path.is_dir() or (any(path.iterdir()) and not (path / "meta.json").is_file()):
        raise CheckpointError(f"{path} exists and is not a resq-jax checkpoint; refusing to overwrite it even "
                              "with --force: choose another folder")


def _save_staged(path: str | os.PathLike, write, tokenizer, force: bool) -> Path:
    """``write(staging) -> meta`` writes arrays/ (orbax) into a staging folder; then tokenizer/ and meta.json
    (last) are written and the folder is renamed to ``path``. Any failure removes the staging folder."""
    path = Path(path).absolute()
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}-"))
    try:
        meta = write(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=json_default))
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _replace_dir(staging: Path, path: Path):
    """Move the complete staging folder to ``path``; an old checkpoint is removed only after."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass a folder written by "
                              "scripts/quantize.py --out")
    meta_file = path / "meta.json"
    if not meta_file.is_file() or not (path / "arrays").is_dir():
        raise CheckpointError(f"{path} is not a complete resq-jax checkpoint (meta.json or arrays/ missing); {RERUN}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); {RERUN}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is not a resq-jax checkpoint description; {RERUN}")
    return meta


def _check_format(path: Path, meta: dict, fmt: str, versions: tuple[int, ...]):
    got_fmt, got_version = meta.get("format"), meta.get("version")
    if got_fmt == fmt and got_version in versions:
        return
    readable = " or ".join(filter(None, (", ".join(map(str, versions[:-1])), str(versions[-1]))))
    if got_fmt == fmt and isinstance(got_version, int) and got_version > max(versions):
        raise CheckpointError(f"{path} has {fmt} version {got_version}, written by a newer resq-jax; this one reads "
                              f"version {readable}: upgrade resq-jax or {RERUN}")
    raise CheckpointError(f"{path} has format {got_fmt!r} version {got_version!r}; this reads {fmt!r} version "
                          f"{readable}: {RERUN}")


def _checkpointer():
    """An orbax PyTree checkpointer of this process alone: in a multi-process job process 0 writes the
    checkpoint and any process reads it, with no barrier across processes (orbax's default syncs them all)."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False, use_compression=True,
                                          multiprocessing_options=options)  # PyTreeCheckpointer's defaults
    return ocp.Checkpointer(handler, multiprocessing_options=options)


def _save_tree(folder: Path, tree: dict):
    folder.parent.mkdir(parents=True, exist_ok=True)
    _checkpointer().save(folder.absolute(), tree)


def _restore(path: Path, part: str = "") -> dict:
    """The orbax tree in ``path``/arrays (/``part``)."""
    folder = path / "arrays" / part if part else path / "arrays"
    try:
        return _checkpointer().restore(folder.absolute())
    except Exception as e:  # orbax/tensorstore raise many types for truncated/corrupt files
        raise CheckpointError(f"cannot read the arrays of checkpoint {path} ({type(e).__name__}: "
                              f"{str(e)[:300]}); the checkpoint is damaged: {RERUN}") from None


def _tokenizer(path: Path):
    if not (path / "tokenizer").is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as e:
        raise CheckpointError(f"the tokenizer files of {path} cannot be read ({type(e).__name__}: {e}); "
                              f"{RERUN}") from None


def _config(path: Path, meta: dict):
    try:
        return ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the model config in meta.json is invalid ({e}); {RERUN}") from None


# ----------------------------------------------------------------------------------------------
# the packed format
# ----------------------------------------------------------------------------------------------
def _save_blocks(folder: Path, name: str, table, block: int) -> dict:
    """Write the vocabulary table ``name`` (an array or a models.views.SpilledTable, read one block at a
    time) as orbax trees ``folder/{k}`` of ``block`` entries each; returns its manifest entry (a CRC-32 per
    block)."""
    n = table.shape[VOCAB_AXIS[name]]
    crcs = []
    for k, start in enumerate(range(0, n, block)):
        part = np.ascontiguousarray(index_vocab(name, table, slice(start, min(start + block, n))))
        _save_tree(folder / str(k), {"block": part})
        crcs.append(_crc(part))
        del part
    return {"shape": list(table.shape), "dtype": str(np.dtype(table.dtype)), "block": block, "crc32": crcs}


def _read_blocks(path: Path, name: str, m: Mapping) -> np.ndarray:
    """The vocabulary table ``name`` written by ``_save_blocks``, each block checked against its manifest
    entry ``m`` (shape, dtype, CRC) as it is read; one block in memory besides the table."""
    try:
        shape, dtype, block, crcs = tuple(m["shape"]), _dtype(m["dtype"]), int(m["block"]), list(m["crc32"])
        n = shape[VOCAB_AXIS[name]]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: meta.json's entry for {name!r} is invalid ({type(e).__name__}: {e}); "
                              f"{RERUN}") from None
    starts = range(0, n, block) if block > 0 else range(0)
    if block <= 0 or len(crcs) != len(starts):
        raise CheckpointError(f"{path}: meta.json lists {len(crcs)} blocks of {block} entries for {name!r}, which "
                              f"has {n} entries; {RERUN}")
    out = np.empty(shape, dtype)
    for k, start in enumerate(starts):
        index = _vocab_index(name, start, min(start + block, n))
        part = _flatten(_restore(path, f"vocab/{name}/{k}")).get("block")
        if part is None or part.shape != out[index].shape or part.dtype != dtype:
            got = "nothing" if part is None else f"{part.dtype}{list(part.shape)}"
            raise CheckpointError(f"{path}: block {k} of {name!r} is {got} on disk but should be "
                                  f"{dtype}{list(out[index].shape)}: the checkpoint is damaged: {RERUN}")
        if _crc(part) != crcs[k]:
            raise CheckpointError(f"{path}: block {k} of {name!r} fails its checksum (a truncated or modified "
                                  f"file); {RERUN}")
        out[index] = part
    return out


def save_packed(path: str | os.PathLike, pm, *, tokenizer=None, source: str = "", force: bool = False,
                vocab_block: int = VOCAB_SLICE) -> Path:
    """Write a resq_jax.runtime.pack.PackedModel (and the tokenizer's files) to the folder ``path``, one
    layer at a time (``arrays/layers/{i}``), the 16-bit float vocabulary tables one block of ``vocab_block``
    entries at a time (``arrays/vocab/{name}/{k}``), then the rest (``arrays/common``): a PackedModel that
    packs its layers on access (runtime.pack.PackedArrays) and keeps its tables on disk
    (models.views.SpilledTable) is never whole in memory."""
    transforms = {k: np.asarray(v) for k, v in pm.transforms.items()}
    tables = [k for k in VOCAB_AXIS if k in pm.arrays]  # float tables (quantized ones are named embed.q, ...)

    def write(staging: Path) -> dict:
        manifest = {}
        for i in range(pm.config.num_layers):
            arrays = {k: np.asarray(v) for k, v in pm.layer_arrays(i).items()}
            _save_tree(staging / "arrays" / "layers" / str(i), _nest(arrays))
            manifest.update(_manifest(arrays))
            del arrays
        for name in tables:
            manifest[name] = _save_blocks(staging / "arrays" / "vocab" / name, name, pm.arrays[name], vocab_block)
        shared = {k: np.asarray(v) for k, v in pm.shared_arrays().items() if k not in tables}
        _save_tree(staging / "arrays" / "common", {"arrays": _nest(shared), "transforms": transforms})
        manifest.update(_manifest(shared))
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "source": source,
            "config": pm.config.to_dict(), "qconfig": pm.qconfig,
            "activation_spec": dataclasses.asdict(pm.spec),
            "layouts": {k: lay.to_dict() for k, lay in pm.layouts.items()},
            "down_hadamard": pm.down_hadamard, "embedding": pm.embedding, "weight_bits": pm.weight_bits,
            "arrays": dict(sorted(manifest.items())), "transforms": _manifest(transforms),
        }

    return _save_staged(path, write, tokenizer, force)


def _embedding_shapes(config, embedding: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    """Arrays of the embeddings (runtime.pack.embedding_arrays): float tables (any 16/32-bit float
    dtype, reported as 'float'), or codes and scales, and what a derived head needs."""
    d, v = config.hidden_size, config.vocab_size
    bits = int(embedding["bits"])
    if bits >= 16:
        out = {"embed": ((v, d), "float")}
        if not config.tie_word_embeddings:
            out["lm_head"] = ((d, v), "float")
        return out
    group, head = int(embedding["group"]), embedding["head"]
    if group <= 0 or d % group or head not in ("table", "derived", "tied"):
        raise ValueError(f"embedding description {dict(embedding)} does not fit hidden size {d}")
    tables = ("embed", "lm_head") if head == "table" else ("embed",)
    out = {}
    for name in tables:
        out[f"{name}.q"] = ((v, d // 2 if bits <= 4 else d), "int8")
        out[f"{name}.scale"] = ((v, d // group), "float16")
    if head == "derived":
        out["head_gain"] = ((d,), "float32")
    return out


def expected_packed_shapes(config, layouts: Mapping, embedding: Mapping | None = None
                           ) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (shape, dtype)} that a packed model of ``config`` with ``layouts`` and
    ``embedding`` (PackedModel.embedding; None: float tables) must have."""
    d = config.hidden_size
    out = {"norm": ((d,), "float32"), **_embedding_shapes(config, embedding or {"bits": 16})}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = out[p + "mlp_norm"] = ((d,), "float32")
        for name in LINEARS:
            lay = layouts[name]
            for b in ("low", "high"):
                if lay.rows(b):
                    out[f"{p}{name}.w_{b}"] = (lay.stored_shape(b), "int8")
                    out[f"{p}{name}.scale_{b}"] = ((lay.d_out,), "float32")
            if lay.rank:
                k = lay.rank
                for b in ("low", "high"):
                    if lay.rows(b):
                        out[f"{p}{name}.lr_a_{b}"] = ((lay.groups, lay.rows(b), k), "int8")
                out[f"{p}{name}.lr_a_scale"] = ((k,), "float32")
                out[f"{p}{name}.lr_b"] = ((1, k, lay.d_out), "int8")
                out[f"{p}{name}.lr_b_scale"] = ((lay.d_out,), "float32")
            if config.attention_bias and name in ("q", "k", "v"):
                out[f"{p}{name}.bias"] = ((lay.d_out,), "float32")
    return out


def optional_packed_shapes(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Arrays a packed model may have: the online key rotation of each layer (ResQ, QuaRot) and
    the residual basis of a derived head (a rotated tied model with quantized embeddings)."""
    hd, d = config.head_dim, config.hidden_size
    out = {f"layers.{i}.key_rotation": ((hd, hd), "float32") for i in range(config.num_layers)}
    out["head_basis"] = ((d, d), "float32")
    return out


def _check_layouts(path: Path, config, layouts: Mapping):
    d, ffn = config.hidden_size, config.intermediate_size
    dims = {"q": (d, config.q_size), "k": (d, config.kv_size), "v": (d, config.kv_size), "o": (config.q_size, d),
            "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d)}
    for name in LINEARS:
        if name not in layouts:
            raise CheckpointError(f"{path}: meta.json has no layout for linear {name!r}; {RERUN}")
        lay = layouts[name]
        if (lay.d_in, lay.d_out) != dims[name] or lay.groups * (lay.low_rows + lay.high_rows) != lay.d_in:
            raise CheckpointError(f"{path}: the {name} layout is [{lay.d_in}, {lay.d_out}] in {lay.groups} group(s) "
                                  f"of {lay.low_rows}+{lay.high_rows} rows, but the model config needs "
                                  f"{list(dims[name])}: meta.json does not match its config; {RERUN}")


def _check_names(path: Path, manifest: Mapping, required: Mapping, optional: Mapping):
    """meta.json's array names against those the model config requires / allows {name: (shape, dtype)}."""
    for k in sorted(set(required) - set(manifest)):
        raise CheckpointError(f"{path}: array {k!r} is missing; the checkpoint is incomplete: {RERUN}")
    for k in sorted(set(manifest) - set(required) - set(optional)):
        raise CheckpointError(f"{path}: unexpected array {k!r} for this model config; {RERUN}")


def _check_arrays(path: Path, arrays: Mapping[str, np.ndarray], manifest: Mapping, expected: Mapping | None,
                  what: str, optional: Mapping | None = None):
    """Arrays against (their part of) meta.json's manifest (names, shapes, dtypes, CRC) and, with
    ``expected`` (required) and ``optional`` {name: (shape, dtype)}, against the model config (the
    names: ``_check_names`` on the whole manifest first)."""
    optional = optional or {}
    missing = sorted(set(manifest) - set(arrays))
    extra = sorted(set(arrays) - set(manifest))
    if missing or extra:
        raise CheckpointError(f"{path}: the {what} on disk do not match meta.json (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); the arrays/ folder belongs to another checkpoint or is "
                              f"damaged: {RERUN}")
    if expected is not None:
        expected = {**optional, **expected}
    for k, a in arrays.items():
        m = manifest[k]
        if list(a.shape) != list(m["shape"]) or str(a.dtype) != m["dtype"]:
            raise CheckpointError(f"{path}: array {k!r} is {a.dtype}{list(a.shape)} on disk but meta.json says "
                                  f"{m['dtype']}{m['shape']}: the checkpoint is damaged: {RERUN}")
        if expected is not None:
            shape, dtype = expected[k]
            dtype_ok = a.dtype.kind == "f" if dtype == "float" else str(a.dtype) == dtype
            if tuple(a.shape) != tuple(shape) or not dtype_ok:
                raise CheckpointError(f"{path}: array {k!r} has shape {tuple(a.shape)} ({a.dtype}), the model config "
                                      f"needs {tuple(shape)} ({dtype}): the arrays do not match the config; {RERUN}")
        if "block" not in m and _crc(a) != m["crc32"]:  # a blocked table's blocks were checked as read
            raise CheckpointError(f"{path}: array {k!r} fails its checksum (a truncated or modified file); {RERUN}")


UNTIED_BY_QUANTIZATION = ("tie_word_embeddings",)  # transforms folded into the head untie it from the embedding


def _check_same_model(path: Path, config, expect_config):
    """A checkpoint's config against the source model's: equal except what quantization itself changes."""
    if expect_config is None:
        return
    a, b = config.to_dict(), expect_config.to_dict()
    diff = ", ".join(f"{k} {a[k]!r} vs {b.get(k)!r}" for k in a if a[k] != b.get(k) and k not in UNTIED_BY_QUANTIZATION)
    if not diff:
        return
    raise CheckpointError(f"{path} was quantized from a different model (checkpoint vs requested: {diff}); "
                          f"drop --model to use the checkpoint's own model, or re-quantize this model")


def load_packed(path: str | os.PathLike, *, expect_config=None) -> LoadedPacked:
    """Read a packed checkpoint (checked: see the module docstring). ``expect_config``: the
    ModelConfig the caller intends to run (a mismatch is an error naming the differing fields)."""

    path = Path(path)
    meta = _read_meta(path)
    if meta.get("format") == FAKE_QUANT_FORMAT:
        raise CheckpointError(f"{path} is an older fake-quant checkpoint ({FAKE_QUANT_FORMAT}); read it with "
                              f"load_checkpoint / load_fake_quant, or {RERUN} for the packed format")
    _check_format(path, meta, FORMAT, READABLE_VERSIONS)
    config = _config(path, meta)
    _check_same_model(path, config, expect_config)
    try:
        layouts = {k: LinearLayout.from_dict(v) for k, v in meta["layouts"].items()}
        spec = ActivationSpec(**meta["activation_spec"])
        manifest, t_manifest = meta["arrays"], meta["transforms"]
        down_hadamard = int(meta["down_hadamard"])
        embedding = dict(meta["embedding"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: meta.json lacks or has an invalid field ({type(e).__name__}: {e}); "
                              f"{RERUN}") from None
    _check_layouts(path, config, layouts)
    try:
        expected = expected_packed_shapes(config, layouts, embedding)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: meta.json's embedding description is invalid ({e}); {RERUN}") from None
    optional = optional_packed_shapes(config)
    _check_names(path, manifest, expected, optional)
    if meta["version"] == 2:
        tree = _restore(path)
        arrays = _flatten(tree.get("arrays", {}))
        _check_arrays(path, arrays, manifest, expected, "arrays", optional)
    else:
        tree = _restore(path, "common")
        shared = _flatten(tree.get("arrays", {}))
        for name, m in manifest.items():
            if isinstance(m, Mapping) and "block" in m:
                if name not in VOCAB_AXIS:
                    raise CheckpointError(f"{path}: meta.json stores {name!r} in blocks, which only the "
                                          f"vocabulary tables are; {RERUN}")
                shared[name] = _read_blocks(path, name, m)
        _check_arrays(path, shared, {k: m for k, m in manifest.items() if not k.startswith("layers.")}, expected,
                      "arrays", optional)

        def read_layer(i: int) -> dict[str, np.ndarray]:
            prefix = f"layers.{i}."
            arrays = _flatten(_restore(path, f"layers/{i}"))
            _check_arrays(path, arrays, {k: m for k, m in manifest.items() if k.startswith(prefix)}, expected,
                          f"arrays of layer {i}", optional)
            return arrays

        for i in range(config.num_layers):  # every layer checked now (one in memory at a time), read again on use
            read_layer(i)
        arrays = PackedArrays(shared, config.num_layers, read_layer)
    transforms = {k: np.asarray(v) for k, v in tree.get("transforms", {}).items()}
    _check_arrays(path, transforms, t_manifest, None, "transforms")
    pm = PackedModel(config=config, arrays=arrays, layouts=layouts, spec=spec, down_hadamard=down_hadamard,
                     qconfig=meta.get("qconfig", {}), transforms=transforms, embedding=embedding,
                     weight_bits=meta.get("weight_bits"))
    return LoadedPacked(model=pm, tokenizer=_tokenizer(path), source=meta.get("source", ""))


def checkpoint_format(path: str | os.PathLike) -> str:
    """The format name in a checkpoint's meta.json (CheckpointError if it is not a checkpoint)."""
    return str(_read_meta(Path(path)).get("format"))


def load_checkpoint(path: str | os.PathLike, *, expect_config=None) -> LoadedPacked | LoadedCheckpoint:
    """A packed checkpoint, or an older fake-quant one (format decided by meta.json)."""
    if checkpoint_format(path) == FAKE_QUANT_FORMAT:
        ckpt = load_fake_quant(path)
        _check_same_model(Path(path), ckpt.config, expect_config)
        return ckpt
    return load_packed(path, expect_config=expect_config)


@dataclasses.dataclass
class Runnable:
    """A loaded checkpoint of either format as the evaluators run it: ``weights`` a mapping for
    models.decoder.from_weights / LayerStreamer (the packed view for a packed checkpoint), ``hooks`` its own
    quantizers, ``spec`` its ActivationSpec, ``new_cache`` (rows, positions) -> an empty generation cache (the
    packed runtime's quantized one; None: the float cache)."""

    config: Any
    weights: Any
    hooks: Any
    spec: ActivationSpec
    qconfig: dict
    tokenizer: Any
    source: str
    packed: bool
    new_cache: Any = None
    weight_bits: float | None = None  # bits per decoder-linear weight, as the quantize run reported it

    @property
    def method(self) -> str:
        return self.qconfig["method"]


def runnable(ckpt: LoadedPacked | LoadedCheckpoint) -> Runnable:
    """What running ``ckpt`` (load_checkpoint's result) needs, whichever its format."""
    if isinstance(ckpt, LoadedPacked):
        from resq_jax.runtime.kv_cache import init_packed_cache
        from resq_jax.runtime.pack import packed_weights

        pm = ckpt.model
        return Runnable(pm.config, packed_weights(pm), pm.hooks, pm.spec, pm.qconfig, ckpt.tokenizer, ckpt.source,
                        packed=True, new_cache=functools.partial(init_packed_cache, pm.config, pm.spec),
                        weight_bits=pm.weight_bits)
    return Runnable(ckpt.config, ckpt.weights, ckpt.hooks, ckpt.hooks.spec, ckpt.qconfig, ckpt.tokenizer,
                    ckpt.source, packed=False, weight_bits=ckpt.weight_bits)


# ----------------------------------------------------------------------------------------------
# the older fake-quant format (dequantized float32 weights): still readable
# ----------------------------------------------------------------------------------------------
def save_fake_quant(path: str | os.PathLike, qm, loaded, *, force: bool = False) -> Path:
    """Write a QuantizedModel (resq_jax.pipeline.quantize) as dequantized float32 weights (the older format)."""
    arrays = {k: v for k, v in qm.weights.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}
    statics = {k: v for k, v in qm.weights.items() if k not in arrays}
    transforms = {k: np.asarray(v) for k, v in dataclasses.asdict(qm.transforms).items()
                  if isinstance(v, np.ndarray)}
    meta = {
        "format": FAKE_QUANT_FORMAT, "version": FAKE_QUANT_VERSION, "source": loaded.source,
        "config": qm.config.to_dict(), "qconfig": qm.qconfig.to_dict(),
        "activation_spec": dataclasses.asdict(qm.hooks.spec), "statics": statics,
        "down_hadamard": qm.transforms.down_hadamard, "weight_bits": qm.details.get("weight_bits"),
    }

    def write(staging: Path) -> dict:
        _save_tree(staging / "arrays", {"weights": _nest(arrays), "transforms": transforms})
        return meta

    return _save_staged(path, write, loaded.tokenizer, force)


def load_fake_quant(path: str | os.PathLike) -> LoadedCheckpoint:

    path = Path(path)
    meta = _read_meta(path)
    _check_format(path, meta, FAKE_QUANT_FORMAT, (FAKE_QUANT_VERSION,))
    config = _config(path, meta)
    tree = _restore(path)
    weights = _flatten(tree["weights"])
    weights.update(meta.get("statics", {}))
    _check_fake_quant_shapes(config, weights, path)
    return LoadedCheckpoint(config=config, weights=weights,
                            hooks=FakeQuantHooks(ActivationSpec(**meta["activation_spec"])),
                            qconfig=meta["qconfig"], transforms=dict(tree.get("transforms", {})),
                            tokenizer=_tokenizer(path), source=meta["source"], weight_bits=meta.get("weight_bits"))


def _check_fake_quant_shapes(config, weights: dict, path: Path):
    for k, shape in expected_shapes(config).items():
        if k not in weights:
            raise CheckpointError(f"checkpoint {path} lacks array {k!r}; it is incomplete: {RERUN}")
        if tuple(np.shape(weights[k])) != tuple(shape):
            raise CheckpointError(f"checkpoint {path}: {k} has shape {np.shape(weights[k])}, the config needs "
                                  f"{tuple(shape)}: the checkpoint does not match its model config")
