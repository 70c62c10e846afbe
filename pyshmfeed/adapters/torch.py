"""PyTorch front end: batches of tensors from a ``Feed``; a drop-in ``DataLoader`` over a map-style dataset.

``TorchBatches(feed, device=...)`` iterates a feed epoch after epoch and
yields ``Batch`` objects of torch tensors, staged by ``pyshmfeed.stage``.
Copies made on the consumer side, per batch:

- ``device="cpu"`` (default): none. ``torch.from_numpy`` views over the
  slot, valid until the loop asks for the next batch (``copy=True``: one
  copy into owned tensors; ``pin=True`` with CUDA: the ring is page-locked so
  ``x.cuda(non_blocking=True)`` is a DMA straight from the slot).
- ``device="cuda"``: no host copy. The ring is page-locked once and each
  array goes slot → GPU by DMA on a side stream; if page-locking fails, one
  host copy into a small pool of pinned buffers (``feed.stats()["staging"]``
  says which). The CUDA tensors belong to the loop.

``DataLoader`` mirrors ``torch.utils.data.DataLoader`` for map-style datasets:
the sampler's order is drawn in the training process exactly as torch draws
it, each epoch's table of sample indices is shipped to the producers (Ray
actors, ``num_workers`` of them), and each producer writes every sample
straight into its row of the slot's arrays (the one copy torch's collate
makes too, but into shared memory the GPU can read, with no stacking
temporary). A custom ``collate_fn`` runs in the producer and its result is
copied into the slot: one more copy. On the training side the batches are,
by default, owned tensors (one copy: they stay valid like torch's);
``zero_copy=True`` hands out views valid until the next batch (no copy);
``device="cuda"`` hands out CUDA tensors (no host copy).
"""

from __future__ import annotations

import random
import sys
import uuid
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import errors
from ..spec import Batch, BatchSpec
from ..stage import Stage, cuda_target, torch_cpu_target

# ---- batches of tensors from any feed ----------------------------------------------


class TorchBatches:
    """An iterable over ``feed``: each ``iter()`` is the next epoch, yielding ``Batch`` objects of tensors.

    ``device``: "cpu" (tensors viewing the slot, valid until the next batch;
    ``copy=True`` for owned tensors, ``pin=True`` to page-lock) or a CUDA
    device (tensors copied from the ring by DMA, owned by the loop).
    ``prefetch``: batches staged ahead (default: the feed's).
    ``epoch(e)`` iterates one given epoch.
    """

    def __init__(self, feed: Any, device: Any = "cpu", *, prefetch: int | None = None, copy: bool = False,
                 pin: bool = False, start_epoch: int = 0) -> None:
        self.feed = feed
        self.device = device
        self.prefetch = prefetch
        self.copy = copy
        self.pin = pin
        self.next_epoch = start_epoch
        self._target = _target_for(feed, device, copy=copy, pin=pin)

    def epoch(self, epoch: int) -> Stage:
        """A ``Stage`` (an iterator, also a context manager) over ``epoch``."""
        return Stage(self.feed, epoch, self._target, prefetch=self.prefetch)

    def __iter__(self) -> Stage:
        e = self.next_epoch
        self.next_epoch += 1
        return self.epoch(e)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __len__(self) -> int:
        if self.feed.length is None:
            raise TypeError("a shards feed has no length")
        return self.feed.length

    def stats(self) -> dict[str, Any]:
        return self.feed.stats()


def _target_for(feed: Any, device: Any, *, copy: bool, pin: bool):
    if device is None or str(device) == "cpu":
        return torch_cpu_target(feed, copy=copy, pin=pin)
    return cuda_target(feed, device)


# ---- samples: their structure, and how to write one into a slot row ---------------------


def _leaf_array(leaf: Any, where: str) -> np.ndarray:
    """A sample leaf as numpy, with the dtype torch's ``default_collate`` would give it."""
    if hasattr(leaf, "detach") and hasattr(leaf, "numpy"):  # a torch tensor
        try:
            return leaf.detach().cpu().numpy()
        except TypeError as exc:  # bfloat16 and friends have no numpy dtype
            raise errors.InvalidArgument(f"{where} is a tensor of dtype {leaf.dtype}, which has no numpy "
                                         "equivalent to store in a slot; convert it in the dataset") from exc
    if isinstance(leaf, np.ndarray):
        arr = leaf
    elif isinstance(leaf, (bool, np.bool_)):
        arr = np.asarray(leaf, dtype=np.bool_)
    elif isinstance(leaf, int):
        arr = np.asarray(leaf, dtype=np.int64)       # default_collate: torch.tensor(ints) is int64
    elif isinstance(leaf, float):
        arr = np.asarray(leaf, dtype=np.float64)     # default_collate: torch.tensor(floats, dtype=float64)
    elif isinstance(leaf, np.generic):
        arr = np.asarray(leaf)
    else:
        raise errors.InvalidArgument(
            f"{where} is a {type(leaf).__name__}: only tensors, numpy arrays and numbers can be written into "
            "slots. Return arrays from the dataset, or pass collate_fn= returning arrays (and spec=)")
    if arr.dtype.hasobject or arr.dtype.kind in "USV":
        raise errors.InvalidArgument(f"{where} has dtype {arr.dtype}, which cannot live in shared memory")
    return arr


@dataclass(frozen=True)
class _Structure:
    """How a sample (or a collated batch) nests its leaves, and how the loop gets them back."""

    kind: str                       # "single", "tuple", "list", "namedtuple", "dict"
    keys: tuple = ()                # dict keys
    n: int = 1
    cls: Any = None                 # namedtuple type, or mapping type
    collated: bool = False          # True: rebuild exactly (custom collate); False: as default_collate does

    @classmethod
    def of(cls, obj: Any, *, collated: bool = False) -> "_Structure":
        if isinstance(obj, Mapping):
            return cls("dict", tuple(obj.keys()), len(obj), type(obj), collated)
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return cls("namedtuple", (), len(obj), type(obj), collated)
        if isinstance(obj, tuple):
            return cls("tuple", (), len(obj), None, collated)
        if isinstance(obj, list):
            return cls("list", (), len(obj), None, collated)
        return cls("single", (), 1, None, collated)

    def flatten(self, obj: Any, where: str) -> list[Any]:
        if self.kind == "dict":
            if not isinstance(obj, Mapping) or tuple(obj.keys()) != self.keys:
                got = tuple(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
                raise errors.SpecMismatch(f"{where} has keys {got}; the first sample had {self.keys}")
            return [obj[k] for k in self.keys]
        if self.kind in ("tuple", "list", "namedtuple"):
            if not isinstance(obj, (tuple, list)) or len(obj) != self.n:
                raise errors.SpecMismatch(f"{where} is a {type(obj).__name__} of "
                                          f"{len(obj) if isinstance(obj, (tuple, list)) else '?'} items; the "
                                          f"first sample had {self.n}")
            return list(obj)
        return [obj]

    def build(self, leaves: list[Any]) -> Any:
        if self.kind == "single":
            return leaves[0]
        if self.kind == "dict":
            d = dict(zip(self.keys, leaves))
            if self.cls is not dict:
                try:
                    return self.cls(d)
                except TypeError:
                    return d
            return d
        if self.kind == "namedtuple":
            return self.cls(*leaves)
        if self.kind == "tuple" and self.collated:
            return tuple(leaves)
        return list(leaves)  # default_collate turns a tuple of fields into a list of batched fields

    def spec(self, arrays: list[np.ndarray], batch: int | None) -> BatchSpec:
        """The slot spec: each leaf with a leading batch dimension (``batch``; None: arrays are batches)."""
        descs = [((batch, *a.shape) if batch is not None else a.shape, a.dtype) for a in arrays]
        if self.kind == "dict" and all(isinstance(k, str) for k in self.keys):
            return BatchSpec(dict(zip(self.keys, descs)))
        return BatchSpec(descs)


class _IndexTables:
    """A Ray actor holding each epoch's table of sample indices (the control plane: a few KB per epoch)."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple] = {}

    def put(self, epoch: int, flat: np.ndarray, offsets: np.ndarray, base_seed: int) -> None:
        self._tables[epoch] = (flat, offsets, base_seed)
        for old in sorted(self._tables)[:-3]:
            del self._tables[old]

    def get(self, epoch: int) -> tuple:
        return self._tables[epoch]


_INDEX_TABLES = None


def _index_tables_class():
    """The Ray actor class, made once per process (each ``ray.remote`` exports the class again)."""
    global _INDEX_TABLES
    if _INDEX_TABLES is None:
        import ray

        _INDEX_TABLES = ray.remote(num_cpus=0)(_IndexTables)
    return _INDEX_TABLES


class _SampleSource:
    """The ``fill`` source of a ``DataLoader``'s feed, run in the producers.

    Batch ``index`` of epoch ``e`` is row ``index`` of epoch ``e``'s table:
    each sample ``dataset[i]`` is written straight into its row of the slot's
    arrays (default collate), or ``collate_fn`` of the samples is copied in.
    Producers are seeded like torch's workers (``random``, ``torch``, numpy,
    from the epoch's base seed and the producer number), then
    ``worker_init_fn(worker)`` runs: once (persistent workers) or each epoch.
    """

    def __init__(self, dataset: Any, structure: _Structure, spec: BatchSpec, tables: str,
                 collate_fn: Callable | None, worker_init_fn: Callable | None, persistent: bool) -> None:
        self.dataset = dataset
        self.structure = structure
        self.spec = spec
        self.tables_name = tables
        self.collate_fn = collate_fn
        self.worker_init_fn = worker_init_fn
        self.persistent = persistent
        self._cache: dict[int, tuple] = {}
        self._initialised_epoch: int | None = None

    def _table(self, epoch: int) -> tuple:
        table = self._cache.get(epoch)
        if table is None:
            import ray

            table = ray.get(ray.get_actor(self.tables_name).get.remote(epoch))
            self._cache = {e: t for e, t in self._cache.items() if e > epoch - 2}
            self._cache[epoch] = table
        return table

    def _init_worker(self, epoch: int, worker: int, base_seed: int) -> None:
        if self._initialised_epoch is not None and (self.persistent or self._initialised_epoch == epoch):
            return
        self._initialised_epoch = epoch
        seed = (base_seed + worker) & (2**63 - 1)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if "torch" in sys.modules:
            sys.modules["torch"].manual_seed(seed)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker)

    def __call__(self, index: int, out: Any, ctx: Any) -> None:
        flat, offsets, base_seed = self._table(ctx.epoch)
        self._init_worker(ctx.epoch, ctx.worker, base_seed)
        idxs = flat[offsets[index]: offsets[index + 1]]
        if self.collate_fn is not None:
            batch = self.collate_fn([self.dataset[int(i)] for i in idxs])
            leaves = self.structure.flatten(batch, f"collate_fn's batch {index}")
            for k, leaf in enumerate(leaves):
                arr = self.spec.check_array(k, _leaf_array(leaf, f"collate_fn's batch {index}, field {k}"))
                np.copyto(out.resize(k, arr.shape), arr, casting="no")  # the one extra copy
            return
        n = len(idxs)
        rows = [out.resize(k, (n, *a.shape[1:])) if n != a.shape[0] else out[k]
                for k, a in enumerate(self.spec.arrays)]
        for j, i in enumerate(idxs):
            where = f"dataset[{int(i)}]"
            leaves = self.structure.flatten(self.dataset[int(i)], where)
            for k, (row, leaf) in enumerate(zip(rows, leaves)):
                arr = _leaf_array(leaf, f"{where}, field {k}")
                if arr.shape != row.shape[1:]:
                    raise errors.SpecMismatch(
                        f"{where}, field {k} has shape {arr.shape}; dataset[0]'s is {row.shape[1:]}. "
                        "Samples of different shapes need a collate_fn (padding, say) and spec= with the "
                        "maximum shapes")
                np.copyto(row[j, ...], arr, casting="same_kind")  # the sample, straight into its row


# ---- the drop-in --------------------------------------------------------------------------


class DataLoader:
    """A drop-in for ``torch.utils.data.DataLoader`` over a map-style dataset, fed through the ring.

    Same arguments, same batches in the same order for the same sampler
    order and generator: ``batch_size``, ``shuffle``, ``sampler``,
    ``batch_sampler``, ``num_workers`` (producers: Ray actors; 0 means one),
    ``collate_fn``, ``pin_memory``, ``drop_last``, ``worker_init_fn``,
    ``generator``, ``prefetch_factor``, ``persistent_workers``, ``in_order``.
    ``timeout``, ``multiprocessing_context`` and ``pin_memory_device`` are
    accepted and ignored.

    Differences, all deliberate:

    - producers start once, at the first ``iter()``, and persist (start-up
      is paid once); ``persistent_workers=False`` still re-seeds them and
      re-runs ``worker_init_fn`` at every epoch, as torch's fresh workers
      would be, but state a producer keeps in the dataset is not reset;
    - samples must be tensors, numpy arrays or numbers, of the shapes of
      ``dataset[0]`` (that is what can be written in place); anything else
      needs a ``collate_fn`` returning arrays, whose first batch (or
      ``spec=``) gives the maximum shapes;
    - the dataset (and ``collate_fn``) are pickled to the producers.

    pyshmfeed's own options: ``device`` (e.g. "cuda": batches arrive as CUDA
    tensors copied straight from the ring, no host copy), ``zero_copy``
    (CPU tensors viewing the slot, valid until the next batch: no copy;
    default False: owned tensors, one copy, pinned with ``pin_memory``),
    ``seed`` (an int instead of ``generator``), ``spec`` (a ``BatchSpec``
    overriding the inferred one), ``prefetch`` (batches staged ahead),
    ``feed_options`` (passed to ``Feed``: ``num_cpus``, ``lease``...).
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: Any = None, batch_sampler: Any = None, num_workers: int = 0,
                 collate_fn: Callable | None = None, pin_memory: bool = False, drop_last: bool = False,
                 timeout: float = 0, worker_init_fn: Callable | None = None,
                 multiprocessing_context: Any = None, generator: Any = None, *,
                 prefetch_factor: int | None = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True, device: Any = None,
                 zero_copy: bool = False,
                 seed: int | None = None, spec: BatchSpec | None = None, prefetch: int = 2,
                 feed_options: dict | None = None) -> None:
        import torch
        from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, SequentialSampler

        if isinstance(dataset, IterableDataset):
            raise errors.InvalidArgument("pyshmfeed's DataLoader takes a map-style dataset (__getitem__ and "
                                         "__len__); for an iterable one use Feed(shards=...)")
        if num_workers < 0:
            raise ValueError("num_workers option should be non-negative")
        if timeout < 0:
            raise ValueError("timeout option should be non-negative")
        if num_workers == 0 and prefetch_factor is not None:
            raise ValueError("prefetch_factor option could only be specified in multiprocessing; let "
                             "num_workers > 0, or set prefetch_factor to None")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers option needs num_workers > 0")
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError("batch_sampler option is mutually exclusive with batch_size, shuffle, "
                                 "sampler, and drop_last")
            batch_size = None
            drop_last = False
        elif batch_size is None:
            raise errors.InvalidArgument("batch_size=None (no automatic batching) is not supported: a slot "
                                         "holds a batch; give batch_size, or batch the dataset yourself and "
                                         "use Feed(make=...)")
        if seed is not None:
            if generator is not None:
                raise errors.InvalidArgument("give seed= or generator=, not both")
            generator = torch.Generator().manual_seed(int(seed))
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        if batch_sampler is None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = sampler
        self.batch_sampler = batch_sampler
        self.generator = generator
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.in_order = in_order
        self.device = device
        self.zero_copy = zero_copy
        self.prefetch = prefetch
        self._spec_override = spec
        self._feed_options = dict(feed_options or {})
        self._feed = None
        self._tables = None
        self._tables_name = ""
        self._structure: _Structure | None = None
        self._spec: BatchSpec | None = None
        self._epoch = 0
        self._base_seed = 0
        self._iterator: weakref.ref | None = None
        self._closed = False

    # ---- the feed, built at the first iter() -------------------------------------------------

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _draw_epoch(self) -> tuple[list[list[int]], int]:
        """The epoch's batches of sample indices and base seed, drawn exactly as torch's iterator does."""
        import torch

        base_seed = None
        if self._epoch == 0 or not self.persistent_workers:
            # torch draws the workers' base seed from the loader's generator when it makes an iterator
            # (once, with persistent workers), before the sampler's first draw.
            base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        table = [[int(i) for i in b] for b in self.batch_sampler]
        if base_seed is None:
            base_seed = self._base_seed  # persistent workers keep the first iterator's seed
        self._base_seed = base_seed
        return table, base_seed

    def _infer(self, table: list[list[int]]) -> tuple[_Structure, BatchSpec]:
        if self.collate_fn is None:
            if len(self.dataset) == 0:
                raise errors.InvalidArgument("the dataset is empty")
            sample = self.dataset[0]
            structure = _Structure.of(sample)
            arrays = [_leaf_array(x, f"dataset[0], field {k}") for k, x in
                      enumerate(structure.flatten(sample, "dataset[0]"))]
            width = self.batch_size if self.batch_size is not None else max(
                (len(b) for b in table), default=1)
            spec = self._spec_override or structure.spec(arrays, width)
            return structure, spec
        if not table:
            raise errors.InvalidArgument("the sampler yields no batch")
        batch = self.collate_fn([self.dataset[i] for i in table[0]])
        structure = _Structure.of(batch, collated=True)
        if self._spec_override is not None:
            return structure, self._spec_override
        arrays = [_leaf_array(x, f"collate_fn's first batch, field {k}") for k, x in
                  enumerate(structure.flatten(batch, "collate_fn's first batch"))]
        return structure, structure.spec(arrays, None)

    def _start(self, table: list[list[int]]) -> None:
        from ..feed import Feed

        if self._structure is None:
            self._structure, self._spec = self._infer(table)
        workers = max(1, self.num_workers)
        slots = max(self.prefetch + 2, workers * (self.prefetch_factor or 2))
        self._tables_name = f"pyshmfeed-index-tables-{uuid.uuid4().hex}"
        source = _SampleSource(self.dataset, self._structure, self._spec, self._tables_name, self.collate_fn,
                               self.worker_init_fn, self.persistent_workers)
        options = {"workers": workers, "slots": slots, "prefetch": self.prefetch, "ordered": self.in_order}
        options.update(self._feed_options)
        self._feed = Feed(self._spec, fill=source, length=len(table), **options)
        try:
            self._tables = _index_tables_class().options(name=self._tables_name).remote()
        except BaseException:
            self._feed.close()
            self._feed = None
            raise

    def __iter__(self) -> "_LoaderIterator":
        if self._closed:
            raise errors.InvalidArgument("this DataLoader is closed")
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()  # like torch, a new iterator ends the previous one
        table, base_seed = self._draw_epoch()
        if not table:  # a sampler with nothing to give this epoch (torch yields nothing too)
            self._epoch += 1
            return _LoaderIterator(None, None, 0)
        if self._feed is not None and (len(table) != self._feed.length or
                                       (self.collate_fn is None and
                                        max(len(b) for b in table) > self._spec.arrays[0].shape[0])):
            self._stop_feed()  # a sampler whose epochs differ in shape: a feed of the new shape
        if self._feed is None:
            self._start(table)
        epoch = self._epoch
        self._epoch += 1
        flat = np.fromiter((i for b in table for i in b), dtype=np.int64)
        offsets = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in table], out=offsets[1:])
        import ray

        ray.get(self._tables.put.remote(epoch, flat, offsets, base_seed))
        stage = Stage(self._feed, epoch, self._target(), prefetch=self.prefetch)
        it = _LoaderIterator(stage, self._structure, len(table))
        self._iterator = weakref.ref(it)
        return it

    def _target(self):
        if self.device is not None and str(self.device) != "cpu":
            return cuda_target(self._feed, self.device)
        return torch_cpu_target(self._feed, copy=not self.zero_copy, pin=self.pin_memory)

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def feed(self):
        """The underlying ``Feed`` (None before the first ``iter()``)."""
        return self._feed

    def stats(self) -> dict[str, Any]:
        return self._feed.stats() if self._feed is not None else {}

    def _stop_feed(self) -> None:
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()
        tables, self._tables = self._tables, None
        if tables is not None:
            try:
                import ray

                ray.kill(tables, no_restart=True)
            except Exception:
                pass  # Ray already shut down: the actor went with it
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()

    def close(self) -> None:
        """Stop the producers and free the ring. Idempotent; also at garbage collection."""
        if self._closed:
            return
        self._closed = True
        self._stop_feed()

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _LoaderIterator(Iterator[Any]):
    """One epoch of a ``DataLoader``: batches rebuilt in the dataset's structure (torch's collate layout)."""

    def __init__(self, stage: Stage | None, structure: _Structure | None, length: int) -> None:
        self._stage = stage
        self._structure = structure
        self._length = length

    def __next__(self) -> Any:
        if self._stage is None:
            raise StopIteration
        batch: Batch = next(self._stage)
        return self._structure.build(batch.values())

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        if self._stage is not None:
            self._stage.close()


__all__ = ["TorchBatches", "DataLoader"]
