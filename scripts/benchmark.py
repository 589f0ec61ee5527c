#!/usr/bin/env python
"""Thin wrapper of ``resq_jax.cli.benchmark`` (installed as the ``resq-benchmark`` command); ``--help`` documents it."""
import sys

from resq_jax.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
