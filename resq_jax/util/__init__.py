"""Helpers every stage uses: the matmul precision policy (precision), argument checks (checks), progress bars
(progress), atomic files, the cache folder and wheels from PyPI (files), pytree dataclasses (trees).
"""
