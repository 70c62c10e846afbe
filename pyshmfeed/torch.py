"""``from pyshmfeed.torch import DataLoader``: the PyTorch front end under a short name.

Re-exports ``pyshmfeed.adapters.torch``; torch itself is imported when
``DataLoader`` is first used (it subclasses torch's), not by this import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .adapters.torch import TorchBatches

if TYPE_CHECKING:  # at run time DataLoader comes from __getattr__ below
    from .adapters.torch_loader import DataLoader


def __getattr__(name: str) -> Any:
    if name == "DataLoader":
        from .adapters.torch_loader import DataLoader

        return DataLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataLoader", "TorchBatches"]
