"""The ``proper`` command (console script and ``python -m proper``): demo, train, eval, generate, bench, export."""
from .app import build_parser, main

__all__ = ["main", "build_parser"]
