"""``from pyshmfeed.torch import DataLoader``: the PyTorch front end under a short name.

Re-exports ``pyshmfeed.adapters.torch``; torch itself is imported when
``DataLoader`` is first used (it subclasses torch's), not by this import.
"""

from __future__ import annotations

from .adapters.torch import TorchBatches


def __getattr__(name: str):
    if name == "DataLoader":
        from .adapters.torch_loader import DataLoader

        return DataLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataLoader", "TorchBatches"]
