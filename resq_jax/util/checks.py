"""Argument checks shared by every stage.
"""
from __future__ import annotations

import numbers


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
