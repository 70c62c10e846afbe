"""User sources and how each kind writes one batch into a claimed slot.

Three kinds, all run inside producer processes:

``fill(index, out, ctx)``   writes batch ``index`` in place into ``out`` (numpy
                           views of the slot, maximum shape). **Zero copy:
                           the fast path.** Return ``None`` for full shapes,
                           or a mapping/tuple of actual shapes for a partial
                           batch (data must then be C-contiguous in that
                           shape: use ``out.resize(name, shape)``).
``make(index, ctx)``        returns the batch (mapping or tuple of arrays);
                           pyshmfeed copies it into the slot: one copy, in
                           the producer.
``shards(worker, num_workers, ctx)``
                           returns an iterator of batches, like a classic
                           generator pipeline; each yielded batch is copied
                           into a slot (one copy). Must be deterministic if
                           exactly-once delivery across a producer restart
                           matters: a restarted shard skips what was
                           already delivered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union


import numpy as np

from .errors import InvalidArgument, SpecMismatch
from .spec import BatchSpec, SlotLayout

# What a source hands back as one batch: a mapping by name or a tuple/list of arrays (see BatchSpec.items_of).
BatchLike = Union[Mapping[str, Any], Sequence[Any]]
# What a fill source returns: None (full shapes), or the actual shapes by name or by position.
FillResult = Union[None, Mapping[str, Sequence[int]], Sequence[Sequence[int]]]


class FillSource(Protocol):
    """``fill(index, out, ctx)``: writes batch ``index`` in place into ``out``; None or the actual shapes."""

    def __call__(self, index: int, out: "SlotArrays", ctx: "SourceContext", /) -> FillResult: ...


class MakeSource(Protocol):
    """``make(index, ctx)``: returns batch ``index`` (a mapping or tuple of arrays), copied into the slot."""

    def __call__(self, index: int, ctx: "SourceContext", /) -> BatchLike: ...


class ShardsSource(Protocol):
    """``shards(worker, num_workers, ctx)``: an iterator of this worker's batches for ``ctx.epoch``."""

    def __call__(self, worker: int, num_workers: int, ctx: "SourceContext", /) -> Iterator[BatchLike]: ...


@dataclass(frozen=True)
class SourceContext:
    """What a source function knows about where it runs.

    ``rng(index)`` is a numpy Generator seeded from ``(seed, epoch, index)``: the
    same batch gets the same random numbers whichever worker makes it, so an
    ordered feed is deterministic for any number of workers.
    """

    worker: int
    num_workers: int
    epoch: int
    seed: int

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed & (2**63 - 1), self.epoch, index]))


class SlotArrays(Mapping[str | int, np.ndarray]):
    """The ``out`` argument of a ``fill`` source: writable views of one slot.

    Index by name (or position for positional specs). ``resize(name, shape)``
    returns a view for a smaller, contiguous shape and records it as the
    array's actual shape.
    """

    def __init__(self, layout: SlotLayout) -> None:
        self._layout = layout
        self._spec = layout.spec
        self.shapes: list[tuple[int, ...]] = [a.shape for a in self._spec.arrays]

    def __getitem__(self, key: str | int) -> np.ndarray:
        i = key if isinstance(key, int) else self._spec.index_of(key)
        shape = self.shapes[i]
        if shape == self._spec.arrays[i].shape:
            return self._layout.full[i]
        return self._layout.shaped(i, shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._spec.names)

    def __len__(self) -> int:
        return len(self._spec.arrays)

    def resize(self, key: str | int, shape: tuple[int, ...]) -> np.ndarray:
        i = key if isinstance(key, int) else self._spec.index_of(key)
        a = self._spec.arrays[i]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(a.shape) or any(d < 0 or d > m for d, m in zip(shape, a.shape)):
            raise SpecMismatch(f"array {a.name!r}: cannot resize to {shape}; the spec's maximum is {a.shape}")
        self.shapes[i] = shape
        return self[i]


def _shapes_from_fill_result(spec: BatchSpec, out: SlotArrays, result: Any) -> list[tuple[int, ...]]:
    if result is None:
        return out.shapes
    if isinstance(result, Mapping):
        for name, shape in result.items():
            out.resize(name, shape)
        return out.shapes
    if isinstance(result, (tuple, list)) and len(result) == len(spec.arrays):
        for i, shape in enumerate(result):
            out.resize(i, shape)
        return out.shapes
    raise SpecMismatch("a fill source returns None, or the actual shapes of its arrays (a mapping by name "
                       f"or a tuple of {len(spec.arrays)} shapes); got {type(result).__name__}")


def copy_batch_into(layout: SlotLayout, batch: Any) -> list[tuple[int, ...]]:
    """Check a user batch against the spec and copy it into the slot (the one copy)."""
    spec = layout.spec
    values = spec.items_of(batch)
    arrays = [spec.check_array(i, v) for i, v in enumerate(values)]
    shapes = []
    for i, arr in enumerate(arrays):
        dst = layout.full[i] if arr.shape == spec.arrays[i].shape else layout.shaped(i, arr.shape)
        np.copyto(dst, arr, casting="no")
        shapes.append(arr.shape)
    return shapes


def write_indexed_batch(kind: str, fn: Callable[..., Any], layout: SlotLayout, index: int,
                        ctx: SourceContext) -> list[tuple[int, ...]]:
    """Run a ``fill`` or ``make`` source for ``index`` into the slot; returns the actual shapes."""
    if kind == "fill":
        out = SlotArrays(layout)
        return _shapes_from_fill_result(layout.spec, out, fn(index, out, ctx))
    if kind == "make":
        return copy_batch_into(layout, fn(index, ctx))
    raise InvalidArgument(f"source kind {kind!r} is not indexed")

