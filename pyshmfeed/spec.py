"""Batches in slots: what a batch looks like (``BatchSpec``) and where it lives in a slot.

A slot holds a small header, then each array at an aligned offset:

    ┌──────────────┬─────────┬──────────────┬─────────┬──────────────┐
    │ slot header  │ pad     │ array 0      │ pad     │ array 1 ...  │
    └──────────────┴─────────┴──────────────┴─────────┴──────────────┘
    header: magic, array count, batch index, epoch, ring sequence, worker,
            metadata length, then the *actual* shape of each array (a last
            partial batch may be smaller than the maximum), then up to
            ``META_BYTES`` of user metadata.

Arrays start on a 64-byte boundary, and on a 4096-byte (page) boundary when
they are at least a page long, which is what DMA engines like. An array's
elements are stored C-contiguous in its *actual* shape, so a consumer view is
one ``np.ndarray`` over slot memory: no copy on either side.

The consumer never trusts the header: the array count, every dimension and
the metadata length are checked against this spec before a view is built.

Debug mode (``PYSHMFEED_DEBUG_VIEWS=1`` or ``SlotLayout(..., debug_views=True)``,
see ``views.py``): the views ``SlotLayout.read`` returns raise ``StaleView`` when
read once the slot no longer holds their batch. The batch's identity in the
slot header (its ring sequence: one per acquire) is the generation each read
compares; a released slot is poisoned by a debug ring, and a reused one holds
another sequence.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import views as debug
from .errors import CorruptSegment, InvalidArgument, SpecMismatch, StaleView

MAX_DIMS = 8
META_BYTES = 256
SLOT_MAGIC = 0x53464231  # "SFB1"
# magic, array count, batch index, epoch, ring sequence, worker, metadata length: 40 bytes.
# The struct is the fast path; the equal numpy dtype gives tools and tests named fields.
_HEADER = struct.Struct("<IIqqQiI")
_FIXED_HEADER = np.dtype([
    ("magic", "<u4"), ("narrays", "<u4"), ("index", "<i8"), ("epoch", "<i8"), ("seq", "<u8"),
    ("worker", "<i4"), ("meta_len", "<u4"),
])
assert _FIXED_HEADER.itemsize == _HEADER.size


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class ArraySpec:
    """One array of a batch: its name, maximum shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class BatchSpec:
    """The arrays of a batch, each with a dtype and a maximum shape.

    Named arrays (batches are mappings)::

        BatchSpec(x=((4, 1_000_000, 3), "float32"), y=((4, 1), "float32"))

    or positional arrays (batches are tuples, as classic generators yield)::

        BatchSpec([((4, 1_000_000, 3), "float32"), ((4, 1), "float32")])

    ``slot_bytes`` is the slot size a ring needs for one batch.
    """

    def __init__(self, arrays: Any = None, /, **named: Any) -> None:
        if arrays is not None and named:
            raise InvalidArgument("give arrays either positionally (a list or dict) or as keywords, not both")
        if arrays is None:
            arrays = named
        if isinstance(arrays, Mapping):
            items = list(arrays.items())
            for name, _ in items:
                # A name is how a batch finds its array: 1 and "1" would be one array under two keys.
                if not isinstance(name, str):
                    raise InvalidArgument(f"array name {name!r} ({type(name).__name__}) is not a string: "
                                          f"name arrays with strings (use {str(name)!r})")
            self.positional = False
        elif isinstance(arrays, (list, tuple)):
            items = [(str(i), a) for i, a in enumerate(arrays)]
            self.positional = True
        else:
            raise InvalidArgument(f"BatchSpec takes named arrays or a list of (shape, dtype), got {arrays!r}")
        if not items:
            raise InvalidArgument("a BatchSpec needs at least one array")
        specs = []
        for name, desc in items:
            specs.append(_array_spec(name, desc))
        self.arrays: tuple[ArraySpec, ...] = tuple(specs)
        self.names: tuple[str, ...] = tuple(a.name for a in specs)
        self._by_name = {a.name: i for i, a in enumerate(specs)}
        # Layout: header, then each array aligned.
        self.header_bytes = _align(_HEADER.size + len(specs) * MAX_DIMS * 8 + META_BYTES, 64)
        self._shapes_offset = _HEADER.size
        self._meta_offset = self._shapes_offset + len(specs) * MAX_DIMS * 8
        offsets = []
        pos = self.header_bytes
        for a in specs:
            pos = _align(pos, 4096 if a.nbytes >= 4096 else 64)
            offsets.append(pos)
            pos += a.nbytes
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.slot_bytes: int = max(pos, 1)

    @property
    def batch_bytes(self) -> int:
        """Bytes of array data in a full batch (what a copy of one batch moves)."""
        return sum(a.nbytes for a in self.arrays)

    def index_of(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpecMismatch(f"batch has no array named {name!r}; the spec has {list(self.names)}") from None

    def __repr__(self) -> str:
        inner = ", ".join(f"{a.name}=({a.shape}, {a.dtype})" for a in self.arrays)
        return f"BatchSpec({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchSpec) and self.arrays == other.arrays and self.positional == other.positional

    def __hash__(self) -> int:
        return hash((self.arrays, self.positional))

    # ---- producer side ------------------------------------------------------

    def check_array(self, i: int, value: Any) -> np.ndarray:
        """``value`` as an ndarray that fits array ``i``, or ``SpecMismatch`` saying why not."""
        a = self.arrays[i]
        arr = np.asarray(value)
        if arr.dtype != a.dtype:
            raise SpecMismatch(f"array {a.name!r}: dtype {arr.dtype}, the spec says {a.dtype} "
                               f"(convert in the source, e.g. .astype({str(a.dtype)!r}))")
        if arr.ndim != len(a.shape):
            raise SpecMismatch(f"array {a.name!r}: shape {arr.shape} has rank {arr.ndim}, the spec's maximum "
                               f"shape {a.shape} has rank {len(a.shape)}")
        if any(d > m for d, m in zip(arr.shape, a.shape)):
            raise SpecMismatch(f"array {a.name!r}: shape {arr.shape} is larger than the spec's maximum {a.shape}")
        return arr

    def items_of(self, batch: Any) -> list[Any]:
        """The arrays of a user batch in spec order (mapping by name, or sequence by position)."""
        if isinstance(batch, Mapping):
            extra = set(batch) - set(self.names)
            if extra:
                raise SpecMismatch(f"batch has arrays {sorted(extra)} that the spec does not name; "
                                   f"the spec has {list(self.names)}")
            missing = [n for n in self.names if n not in batch]
            if missing:
                raise SpecMismatch(f"batch lacks arrays {missing}")
            return [batch[n] for n in self.names]
        if isinstance(batch, (tuple, list)):
            if len(batch) != len(self.arrays):
                raise SpecMismatch(f"batch has {len(batch)} arrays, the spec has {len(self.arrays)}")
            return list(batch)
        if len(self.arrays) == 1:
            return [batch]
        raise SpecMismatch(f"a batch must be a mapping or a tuple of {len(self.arrays)} arrays, "
                           f"got {type(batch).__name__}")


def _array_spec(name: str, desc: Any) -> ArraySpec:
    if isinstance(desc, ArraySpec):
        return ArraySpec(name, desc.shape, desc.dtype)
    try:
        shape, dtype = desc
        dims = shape if isinstance(shape, (tuple, list)) else (shape,)
        dtype = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"array {name!r}: expected (shape, dtype), got {desc!r}") from exc
    shape = tuple(_dimension(name, d) for d in dims)
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"array {name!r}: rank {len(shape)} is over the maximum of {MAX_DIMS}")
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"array {name!r}: every maximum dimension must be positive, got {shape}")
    if dtype.hasobject:
        raise InvalidArgument(f"array {name!r}: dtype {dtype} holds Python objects, which cannot live in "
                              "shared memory")
    return ArraySpec(name, shape, dtype)


def _dimension(name: str, d: Any) -> int:
    """A maximum dimension as an int: 2.5 (or 2.0) and True are refused, not rounded or counted as 1."""
    if isinstance(d, (bool, np.bool_)):
        raise InvalidArgument(f"array {name!r}: dimension {d!r} is a bool, not a size")
    try:
        return operator.index(d)  # ints and numpy integers; never a float
    except TypeError:
        raise InvalidArgument(f"array {name!r}: dimension {d!r} ({type(d).__name__}) is not an int") from None


class SlotLayout:
    """The views of one spec over one slot's bytes, built once and reused.

    A producer writes through ``writer_arrays`` (writable, maximum shape) and
    records the actual shapes with ``write_header``; a consumer reads the
    header with ``read`` and gets views in the actual shapes. Header fields go
    through ``struct`` on a memoryview: per batch this is the consumer's whole
    Python cost, so it is kept to a few microseconds.
    """

    def __init__(self, spec: BatchSpec, buffer: Any, slot_bytes: int, *, debug_views: bool | None = None) -> None:
        if spec.slot_bytes > slot_bytes:
            raise InvalidArgument(f"{spec} needs {spec.slot_bytes} bytes per slot, the ring's slots have "
                                  f"{slot_bytes}")
        self.spec = spec
        self.raw = np.frombuffer(buffer, dtype=np.uint8, count=slot_bytes)
        self.mem = self.raw.data  # memoryview(self.raw); typed as one for numpy stubs before Python 3.12
        n = len(spec.arrays)
        self._shapes_struct = struct.Struct(f"<{n * MAX_DIMS}q")
        self._max_shapes = [a.shape for a in spec.arrays]
        self._max_row = tuple(d for a in spec.arrays for d in a.shape + (0,) * (MAX_DIMS - len(a.shape)))
        self.full = [self.raw[off: off + a.nbytes].view(a.dtype).reshape(a.shape)
                     for a, off in zip(spec.arrays, spec.offsets)]
        self._full_readonly = [v.view() for v in self.full]
        for v in self._full_readonly:
            v.flags.writeable = False
        self._full_end = spec.offsets[-1] + spec.arrays[-1].nbytes
        # Named views of the header, for tools and tests (the hot path uses struct).
        self.header = self.raw[: _HEADER.size].view(_FIXED_HEADER)[0:1]
        self.shapes = self.raw[spec._shapes_offset: spec._shapes_offset + n * MAX_DIMS * 8].view("<i8") \
            .reshape(n, MAX_DIMS)
        if debug.debug_views_enabled(debug_views):
            self.read = self._read_guarded  # type: ignore[method-assign]  # chosen once: the plain read pays nothing for debug mode

    # ---- producer -----------------------------------------------------------

    def writer_arrays(self) -> list[np.ndarray]:
        """Writable views of every array at its maximum shape."""
        return self.full

    def shaped(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        """A writable view of array ``i`` stored contiguously in ``shape``."""
        a = self.spec.arrays[i]
        off = self.spec.offsets[i]
        n = math.prod(shape) * a.dtype.itemsize
        return self.raw[off: off + n].view(a.dtype).reshape(shape)

    def write_header(self, *, index: int, epoch: int, seq: int, worker: int,
                     shapes: list[tuple[int, ...]], meta: bytes = b"") -> int:
        """Record the batch's identity and actual shapes; returns the payload length to commit."""
        spec = self.spec
        if len(meta) > META_BYTES:
            raise SpecMismatch(f"batch metadata is {len(meta)} bytes; at most {META_BYTES} fit in a slot")
        _HEADER.pack_into(self.mem, 0, SLOT_MAGIC, len(shapes), index, epoch, seq, worker, len(meta))
        shapes = [tuple(s) for s in shapes]
        if shapes == self._max_shapes:
            self._shapes_struct.pack_into(self.mem, spec._shapes_offset, *self._max_row)
            end = self._full_end
        else:
            row: list[int] = []
            for shape in shapes:
                row.extend(shape)
                row.extend((0,) * (MAX_DIMS - len(shape)))
            self._shapes_struct.pack_into(self.mem, spec._shapes_offset, *row)
            last = len(spec.arrays) - 1
            end = spec.offsets[last] + math.prod(shapes[last]) * spec.arrays[last].dtype.itemsize
        if meta:
            self.mem[spec._meta_offset: spec._meta_offset + len(meta)] = meta
        return end

    # ---- consumer -----------------------------------------------------------

    def read(self, nbytes: int) -> tuple[dict[str, int], list[np.ndarray], bytes]:
        """Identity, read-only array views in their actual shapes, and metadata.

        Validates everything against the spec: a header written by a buggy or
        hostile producer raises ``CorruptSegment``, never a bad view. Fields are
        unpacked once, so the checks and the views use the same numbers.
        """
        spec = self.spec
        magic, narrays, index, epoch, seq, worker, meta_len = _HEADER.unpack_from(self.mem, 0)
        if magic != SLOT_MAGIC or narrays != len(spec.arrays):
            raise CorruptSegment(f"slot header: magic {magic:#x}, {narrays} arrays; expected {SLOT_MAGIC:#x} "
                                 f"and {len(spec.arrays)} (producer and consumer disagree on the spec, or the "
                                 "slot was overwritten)")
        if meta_len > META_BYTES:
            raise CorruptSegment(f"slot header: metadata length {meta_len} > {META_BYTES}")
        row = self._shapes_struct.unpack_from(self.mem, spec._shapes_offset)
        if row == self._max_row and nbytes >= self._full_end:  # the common case: full batch
            views = [v.view() for v in self._full_readonly]
        else:
            views = []
            for i, a in enumerate(spec.arrays):
                shape = row[i * MAX_DIMS: i * MAX_DIMS + len(a.shape)]
                if any(d < 0 or d > m for d, m in zip(shape, a.shape)):
                    raise CorruptSegment(f"slot header: array {a.name!r} has shape {shape}, outside the "
                                         f"spec's maximum {a.shape}")
                end = spec.offsets[i] + math.prod(shape) * a.dtype.itemsize
                if end > nbytes:
                    raise CorruptSegment(f"slot header: array {a.name!r} ends at byte {end}, past the "
                                         f"{nbytes}-byte payload")
                v = self.shaped(i, shape)
                v.flags.writeable = False
                views.append(v)
        ident = {"index": index, "epoch": epoch, "seq": seq, "worker": worker}
        meta = bytes(self.mem[spec._meta_offset: spec._meta_offset + meta_len]) if meta_len else b""
        return ident, views, meta

    def _read_guarded(self, nbytes: int) -> tuple[dict[str, int], list[np.ndarray], bytes]:
        """``read`` in debug mode: views that raise ``StaleView`` once the slot holds something else."""
        header = bytes(self.mem[: _HEADER.size])  # identity and ring sequence: one per acquire
        ident, views, meta = SlotLayout.read(self, nbytes)
        mem = self.mem

        def check_fresh() -> None:
            if mem[: _HEADER.size] != header:
                raise StaleView(f"batch index {ident['index']} (epoch {ident['epoch']}, ring seq {ident['seq']}) "
                                "was read after its slot was released: the slot now holds another batch or "
                                "the release poison (copy what you keep: batch.copy())")

        return ident, [debug.guarded(v, check_fresh) for v in views], meta


class Batch(Mapping):
    """One batch as the training loop sees it: arrays by name (or position), plus identity.

    The arrays are read-only numpy views over ring memory: **valid until the
    loop asks for the next batch**, when the slot goes back to the producers.
    ``batch.copy()`` returns a ``Batch`` that owns copies and stays valid.

    Named specs behave like a dict (``batch["x"]``); positional specs also
    unpack like a tuple (``x, y = batch``) and index by position.
    """

    __slots__ = ("_names", "_arrays", "positional", "index", "epoch", "worker", "meta", "seq")

    def __init__(self, names: tuple[str, ...], arrays: list[Any], *, positional: bool = False,
                 index: int = -1, epoch: int = 0, worker: int = -1, meta: bytes = b"", seq: int = -1) -> None:
        self._names = names
        self._arrays = arrays
        self.positional = positional
        self.index = index
        self.epoch = epoch
        self.worker = worker
        self.meta = meta
        self.seq = seq

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self._arrays[key]
        try:
            return self._arrays[self._names.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._arrays) if self.positional else iter(self._names)

    def __len__(self) -> int:
        return len(self._arrays)

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(self._names)

    def values(self) -> list[Any]:  # type: ignore[override]
        return list(self._arrays)

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(zip(self._names, self._arrays))

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self._arrays)

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self._names, self._arrays))

    def map(self, fn: Callable[[Any], Any]) -> "Batch":
        """A new Batch with ``fn`` applied to each array (used by the device adapters)."""
        return Batch(self._names, [fn(a) for a in self._arrays], positional=self.positional, index=self.index,
                     epoch=self.epoch, worker=self.worker, meta=self.meta, seq=self.seq)

    def copy(self) -> "Batch":
        """A Batch that owns its arrays (one copy) and outlives the slot."""
        return self.map(lambda a: a.copy() if hasattr(a, "copy") else a.clone())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={getattr(a, 'shape', '?')}" for n, a in zip(self._names, self._arrays))
        return f"<Batch index={self.index} epoch={self.epoch} {shapes}>"
