"""Save and restore quantized models with orbax-checkpoint, atomically.

A checkpoint folder holds
  meta.json     format version, model config, quantization config, activation spec, source
  arrays/       orbax PyTree checkpoint: weights (as the runtime uses them), transforms
  tokenizer/    the tokenizer's files (when the model has a tokenizer)

Writes go to a hidden staging folder next to the target, which is renamed into place only
when complete: a crash leaves the old checkpoint (or none), never a half-written one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "resq-jax-fake-quant"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message says what is wrong and what to do."""


@dataclasses.dataclass
class LoadedCheckpoint:
    config: Any
    weights: dict[str, np.ndarray]
    hooks: Any
    qconfig: dict
    transforms: dict[str, np.ndarray]
    tokenizer: Any
    source: str


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.asarray(value)
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = np.asarray(v)
    return out


def save_fake_quant(path: str | os.PathLike, qm, loaded, *, force: bool = False) -> Path:
    """Write a QuantizedModel (resq_jax.methods) and the source model's tokenizer to ``path``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not force:
        raise CheckpointError(f"{path} already exists; pass force=True (--force) to overwrite it")
    arrays = {k: v for k, v in qm.weights.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}
    statics = {k: v for k, v in qm.weights.items() if k not in arrays}
    transforms = {k: np.asarray(v) for k, v in dataclasses.asdict(qm.transforms).items()
                  if isinstance(v, np.ndarray)}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "source": loaded.source,
        "config": qm.config.to_dict(), "qconfig": qm.qconfig.to_dict(),
        "activation_spec": dataclasses.asdict(qm.hooks.spec), "statics": statics,
        "down_hadamard": qm.transforms.down_hadamard,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        ckptr = ocp.PyTreeCheckpointer()
        ckptr.save(staging / "arrays", {"weights": _nest(arrays), "transforms": transforms})
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
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


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)


def load_fake_quant(path: str | os.PathLike) -> LoadedCheckpoint:
    import orbax.checkpoint as ocp

    from models.config import ModelConfig
    from resq_jax.fake_quant import ActivationSpec, FakeQuantHooks

    path = Path(path)
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass a folder written by "
                              "scripts/quantize.py --out")
    if not meta_file.is_file() or not (path / "arrays").is_dir():
        raise CheckpointError(f"{path} is not a complete resq-jax checkpoint (meta.json or arrays/ missing); "
                              "re-run scripts/quantize.py --out")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); re-run scripts/quantize.py --out") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}; this "
                              f"resq-jax reads {FORMAT!r} version {FORMAT_VERSION}: re-run scripts/quantize.py --out")
    try:
        tree = ocp.PyTreeCheckpointer().restore((path / "arrays").absolute())
    except Exception as e:  # orbax raises many types for truncated/corrupt files
        raise CheckpointError(f"cannot read the arrays of checkpoint {path} ({type(e).__name__}: {e}); "
                              "the checkpoint is damaged: re-run scripts/quantize.py --out") from None
    config = ModelConfig.from_dict(meta["config"])
    weights = _flatten(tree["weights"])
    weights.update(meta.get("statics", {}))
    _check_shapes(config, weights, path)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return LoadedCheckpoint(config=config, weights=weights,
                            hooks=FakeQuantHooks(ActivationSpec(**meta["activation_spec"])),
                            qconfig=meta["qconfig"], transforms=dict(tree.get("transforms", {})),
                            tokenizer=tokenizer, source=meta["source"])


def _check_shapes(config, weights: dict, path: Path):
    d, ffn = config.hidden_size, config.intermediate_size
    expect = {"embed": (config.vocab_size, d), "norm": (d,)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        expect.update({p + "q": (d, config.q_size), p + "k": (d, config.kv_size), p + "v": (d, config.kv_size),
                       p + "o": (config.q_size, d), p + "gate": (d, ffn), p + "up": (d, ffn), p + "down": (ffn, d)})
    for k, shape in expect.items():
        if k not in weights:
            raise CheckpointError(f"checkpoint {path} lacks array {k!r}; it is incomplete: re-run quantize.py --out")
        if tuple(np.shape(weights[k])) != shape:
            raise CheckpointError(f"checkpoint {path}: {k} has shape {np.shape(weights[k])}, the config needs "
                                  f"{shape}: the checkpoint does not match its model config")
