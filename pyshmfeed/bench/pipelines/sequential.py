"""The baseline: one generator in the training process, each batch made when the loop asks for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..workload import Workload, make_batch
from . import RunContext


@contextmanager
def open_sequential(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    yield (make_batch(index, w) for index in range(length))
