"""Shared test set-up. The suite mirrors the package's layers: kernels/ (the op and every backend vs the
reference), model/ (the model layer on tiny HF models and SmolLM2), training/ (data readers, the trainer, DDP),
cli/ (the command line and the benchmark runner). Helpers shared across them live beside this file: cases.py
(op cases and tolerances), triton_grid.py (the Triton interpreter grid), proper_fixtures.py (models)."""
import os

# nothing may come from a hub, in any test (set before transformers is imported anywhere)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
