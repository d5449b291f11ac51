"""How saelab enters numba's parallel loops (`compiled_*.py`): on torch's thread count, one caller at a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import torch

_ENTERED = threading.Lock()  # numba's fallback threading layer (workqueue) must not be entered twice at once


@contextmanager
def numba_threads() -> Iterator[None]:
    """Run the body's compiled loops on as many threads as torch uses (`torch.set_num_threads`), so that
    the two never ask for more cores than the user gave, and serialise callers from several threads."""
    with _ENTERED:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        yield
