"""The baseline: one generator in the training process, each batch made when the loop asks for it."""

from __future__ import annotations

from contextlib import contextmanager

from ..workload import Workload, make_batch
from . import RunContext


@contextmanager
def open_sequential(w: Workload, length: int, run: RunContext):
    yield (make_batch(index, w) for index in range(length))
