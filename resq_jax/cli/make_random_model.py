"""Write a random model with the exact shapes of a real one (config.json, bfloat16 safetensors shards of at most
5 GB with model.safetensors.index.json, the real model's tokenizer) to test memory and time at full scale.

Examples:
  python scripts/make_random_model.py --shape qwen2.5-7b --out /data/qwen7b-random      # about 15 GB
  python scripts/make_random_model.py --shape qwen2.5-7b --layers 2 --out /tmp/qwen7b-2l  # two layers
  python scripts/make_random_model.py --shape llama-3-8b --out /data/llama3-8b-random

The weights are random (scale in resq_jax/models/synthetic.py): perplexities measure nothing but the pipeline.
"""
from __future__ import annotations

import argparse
import sys
import time

from resq_jax.models.synthetic import SHAPES, SyntheticModelError, write_random_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="real model whose shapes to copy")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the real model's)")
    p.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true", help="do not save the real model's tokenizer")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = write_random_model(args.out, args.shape, layers=args.layers, seed=args.seed,
                                 with_tokenizer=not args.no_tokenizer)
    except SyntheticModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 1e9:.2f} GB of bfloat16 weights in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
