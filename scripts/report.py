#!/usr/bin/env python
"""Thin wrapper of ``resq_jax.cli.report``; ``--help`` documents it."""
import sys

from resq_jax.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
