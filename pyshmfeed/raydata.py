"""Ray Data as a source: a ``ray.data.Dataset``'s batches written into ring slots as batches of a spec.

Built on the ``shards`` source kind: each producer iterates its part of the
dataset with ``iter_batches(batch_format="numpy")`` and every batch is
checked against the spec (``SpecMismatch``: wrong dtype, rank, a shape over
the maximum, a missing column) and copied into a slot: one copy, in the
producer, after which the training loop gets the usual zero-copy views and
staging.

A source, below the feed: ``Feed.from_ray_dataset`` calls ``dataset_source``
for the feed's arguments; nothing here knows the ``Feed`` class.

Order: ``ordered=True`` (the default) uses one producer, which iterates the
whole dataset with Ray Data's ``preserve_order`` set, so batches arrive in
dataset order and a restarted producer can skip exactly what was already
delivered. ``ordered=False`` with ``workers=n`` splits the dataset with
``streaming_split(n)``: faster when the dataset's own pipeline is not the
bottleneck, batches first ready first served. A ``streaming_split`` iterator
cannot restart mid-epoch, so that mode does not survive a producer death
(the feed reports the producer lost); use the ordered mode where that matters.

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import errors
from .spec import BatchSpec

if TYPE_CHECKING:
    import ray.data

    from .source import SourceContext


class DatasetShards:
    """A picklable ``shards`` source over a Ray Dataset (or its ``streaming_split`` iterators).

    Producer ``worker`` reads the whole dataset (one producer, in order) or
    split ``worker`` (several producers), and yields batches in spec order.
    """

    def __init__(self, source: Any, spec: BatchSpec, columns: Sequence[str], batch_size: int, *,
                 split: bool, preserve_order: bool, drop_last: bool = False,
                 iter_options: Mapping[str, Any] | None = None) -> None:
        self.source = source  # a Dataset, or a list of DataIterators when split
        self.names = spec.names
        self.positional = spec.positional
        self.columns = tuple(columns)
        self.batch_size = batch_size
        self.split = split
        self.preserve_order = preserve_order
        self.drop_last = drop_last
        self.iter_options = dict(iter_options or {})

    def __call__(self, worker: int, num_workers: int, ctx: SourceContext) -> Any:
        if self.split:
            iterable = self.source[worker]
        else:
            iterable = self.source
            if self.preserve_order:
                # This is the producer's own unpickled copy of the dataset: the caller's is untouched.
                iterable.context.execution_options.preserve_order = True
        for batch in iterable.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                           drop_last=self.drop_last, **self.iter_options):
            yield self.select(batch)

    def select(self, batch: Mapping[str, Any]) -> Any:
        """The spec's arrays out of a Ray Data batch (a dict of column -> ndarray)."""
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise errors.SpecMismatch(f"the dataset's batches lack columns {missing}; they have "
                                      f"{sorted(batch)} (map spec arrays to columns with columns=)")
        values = [batch[c] for c in self.columns]
        return tuple(values) if self.positional else dict(zip(self.names, values))


def _columns(spec: BatchSpec, columns: Any) -> tuple[str, ...]:
    """Which dataset column feeds each spec array, in spec order."""
    if columns is None:
        if spec.positional:
            raise errors.InvalidArgument("a positional BatchSpec needs columns=[...] naming the dataset "
                                         "column of each array, in order")
        return spec.names
    if isinstance(columns, Mapping):
        unknown = set(columns) - set(spec.names)
        if unknown:
            raise errors.InvalidArgument(f"columns= maps arrays {sorted(unknown)} that the spec does not "
                                         f"have; the spec has {list(spec.names)}")
        return tuple(str(columns.get(n, n)) for n in spec.names)
    if isinstance(columns, (list, tuple)) and len(columns) == len(spec.arrays):
        return tuple(str(c) for c in columns)
    raise errors.InvalidArgument(f"columns={columns!r}: give a mapping spec name -> column, or a list of "
                                 f"{len(spec.arrays)} column names in spec order")


def _batch_size(spec: BatchSpec, batch_size: int | None) -> int:
    leading = {a.name: a.shape[0] for a in spec.arrays}
    if batch_size is None:
        sizes = set(leading.values())
        if len(sizes) != 1:
            raise errors.InvalidArgument(f"the spec's arrays have different leading dimensions {leading}: "
                                         "pass batch_size=")
        batch_size = sizes.pop()
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise errors.InvalidArgument(f"batch_size must be a positive int, got {batch_size!r}")
    small = {n: d for n, d in leading.items() if d < batch_size}
    if small:
        raise errors.SpecMismatch(f"batch_size={batch_size} rows do not fit arrays {small} (their maximum "
                                  "leading dimension); make the spec's first dimension the batch size")
    return batch_size


def _check_against_spec(ds: ray.data.Dataset, spec: BatchSpec, shards: DatasetShards) -> None:
    """Read the dataset's first batch here, in the caller, and check it against the spec.

    A mismatch then raises ``SpecMismatch`` from the constructor rather than a
    ``ProducerError`` from the first batch. Costs executing the dataset up to
    that batch.
    """
    first = ds.take_batch(shards.batch_size, batch_format="numpy")
    values = spec.items_of(shards.select(first))
    for i, v in enumerate(values):
        spec.check_array(i, v)


def dataset_source(ds: ray.data.Dataset, spec: BatchSpec, *, batch_size: int | None = None,
                   columns: Mapping[str, str] | Sequence[str] | None = None, ordered: bool = True,
                   workers: int = 1, drop_last: bool = False, validate: bool = True,
                   iter_options: Mapping[str, Any] | None = None, **feed_options: Any) -> dict[str, Any]:
    """``Feed``'s keyword arguments for batches of ``ds``, ``batch_size`` rows each (``Feed.from_ray_dataset``).

    ``columns`` maps spec arrays to dataset columns (default: the same names;
    a list in spec order for positional specs). ``batch_size`` defaults to the
    spec's leading dimension; a last partial batch arrives with fewer rows
    unless ``drop_last``. ``ordered=True`` needs ``workers=1`` (see the module
    docstring); ``validate`` checks the first batch against the spec before
    any producer starts. ``iter_options`` go to ``iter_batches`` (e.g.
    ``prefetch_batches``, ``local_shuffle_buffer_size``); other keywords go
    to ``Feed`` (``slots``, ``prefetch``, ``placement``, ``state``...) unchanged.
    """
    if not isinstance(spec, BatchSpec):
        raise errors.InvalidArgument(f"spec must be a BatchSpec, got {type(spec).__name__}")
    if not hasattr(ds, "iter_batches") or not hasattr(ds, "streaming_split"):
        raise errors.InvalidArgument(f"ds must be a ray.data.Dataset, got {type(ds).__name__}")
    if not isinstance(workers, int) or workers <= 0:
        raise errors.InvalidArgument(f"workers must be a positive int, got {workers!r}")
    if ordered and workers != 1:
        raise errors.InvalidArgument(f"ordered=True reads the dataset with one producer (workers=1, got "
                                     f"{workers}); pass ordered=False to split it across {workers} producers")
    for key in ("fill", "make", "shards", "length", "ordered", "shuffle"):
        if key in feed_options:
            raise errors.InvalidArgument(f"{key}= is decided by the dataset; do not pass it to "
                                         "from_ray_dataset")
    size = _batch_size(spec, batch_size)
    cols = _columns(spec, columns)
    schema_columns = ds.columns(fetch_if_missing=False)
    if schema_columns is not None:
        missing = [c for c in cols if c not in schema_columns]
        if missing:
            raise errors.SpecMismatch(f"the dataset has no columns {missing}; it has {schema_columns} "
                                      "(map spec arrays to columns with columns=)")
    shards = DatasetShards(ds, spec, cols, size, split=False, preserve_order=ordered, drop_last=drop_last,
                           iter_options=iter_options)
    if validate:
        _check_against_spec(ds, spec, shards)
    if workers > 1:
        shards = DatasetShards(ds.streaming_split(workers, equal=False), spec, cols, size, split=True,
                               preserve_order=False, drop_last=drop_last, iter_options=iter_options)
    return {**feed_options, "shards": shards, "workers": workers}
