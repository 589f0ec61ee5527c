"""resq-jax: post-training quantization of LLMs (ResQ, LQER, baselines) in JAX/XLA.

The pipeline's stages are sub-packages; imports only point down this list (docs/architecture.md):

    util        precision, argument checks, progress bars, atomic files, pytree helpers
    transforms  Hadamard constructions and the fast transform, random rotations, PCA bases
    formats     quantizer arithmetic: integer, MXINT, int4 packing, bit widths
    kernels     custom calls: the Hadamard FFI, the mixed-precision GEMM (reference and Triton)
    models      the Flax decoder, its streaming by layer and the loaders (the checkout's models/ folder)
    data        built-in texts and token windows
    calibration activation statistics
    rotation    a recipe's orthogonal transforms and their fusion into the weights
    quant       layouts, fake quantization, RTN, GPTQ, LQER / L2QER, embeddings
    runtime     the packed integer model, its KV cache and checkpoints
    eval        perplexity and generation
    pipeline    recipes and the quantize orchestration
    cli         the command-line programs (resq-quantize, resq-evaluate, resq-benchmark)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _checkout_models() -> None:
    """In a source checkout the model code lives in the top-level ``models/`` folder (the design card's
    layout); the wheel installs it as ``resq_jax/models``. Register it under that name when it is not
    installed there, so a checkout runs without installing."""
    here = Path(__file__).resolve().parent
    if (here / "models" / "__init__.py").is_file() or "resq_jax.models" in sys.modules:
        return
    init = here.parent / "models" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location("resq_jax.models", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["resq_jax.models"] = module
    spec.loader.exec_module(module)


_checkout_models()
