"""Imported first by :mod:`xentkit.torch`: without PyTorch, one line that names the extra."""

from .._extras import require

require("torch", "torch", "xentkit.torch")
