#!/usr/bin/env python
"""Thin wrapper of ``resq_jax.cli.cost_model``; ``--help`` documents it."""
import sys

from resq_jax.cli.cost_model import main

if __name__ == "__main__":
    sys.exit(main())
