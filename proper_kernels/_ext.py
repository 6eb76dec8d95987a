"""Lazy, cached loader of the compiled extension ``proper_kernels._C``.

Nothing compiled is imported at package import: the first backend that needs the extension calls
:func:`load`, and a failed import is remembered (with its error) so the reason can be reported later.
"""
from __future__ import annotations

import functools
import importlib
import os


@functools.lru_cache(maxsize=None)
def _try_load():
    if os.environ.get("PROPER_DISABLE_EXT", "0") == "1":
        return None, "disabled by PROPER_DISABLE_EXT=1"
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        return importlib.import_module("proper_kernels._C"), None
    except ImportError as e:  # not built (PROPER_BUILD_EXT=0, no compiler) or built for another torch
        return None, f"the compiled extension proper_kernels._C could not be imported ({e}); " \
                     "reinstall with PROPER_BUILD_EXT=1 to build it"


def load():
    """The extension module, or None if it cannot be imported."""
    return _try_load()[0]


def load_error() -> str | None:
    """Why the extension is unavailable (None if it loaded)."""
    return _try_load()[1]


def has(symbol: str) -> bool:
    mod = load()
    return mod is not None and hasattr(mod, symbol)
