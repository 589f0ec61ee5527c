"""Progress bars on stderr (tqdm), so stdout keeps only the results."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str = "step"):
    """A tqdm bar of ``total`` ``unit``s that disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
