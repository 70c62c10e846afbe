"""``from pyshmfeed.torch import DataLoader``: the PyTorch front end under a short name.

Re-exports ``pyshmfeed.adapters.torch``; torch itself is imported when a
loader is built or iterated, not by this import.
"""

from __future__ import annotations

from .adapters.torch import DataLoader, TorchBatches

__all__ = ["DataLoader", "TorchBatches"]
