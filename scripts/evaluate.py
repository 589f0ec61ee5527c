#!/usr/bin/env python
"""Thin wrapper of ``resq_jax.cli.evaluate`` (installed as the ``resq-evaluate`` command); ``--help`` documents it."""
import sys

from resq_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
