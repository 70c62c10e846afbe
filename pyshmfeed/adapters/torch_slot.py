"""How one batch of the DataLoader drop-in lives in a ring slot: tensor bytes at aligned offsets, the rest pickled.

A slot of a loader's feed holds one array, ``uint8[capacity]``: the *arena*::

    ┌────────┬──────────┬─────┬──────────┬─────┬───────────────────┐
    │ header │ tensor 0 │ pad │ tensor 1 │ ... │ skeleton (pickle) │
    └────────┴──────────┴─────┴──────────┴─────┴───────────────────┘
    header (64 bytes): kind, skeleton offset, skeleton length

The producer stacks each dense CPU tensor of the batch straight into the
arena (the default collate, ``collate_into``), or copies it there (any other
collate_fn's output, numpy arrays, numbers made tensors by default_collate),
at a 64-byte-aligned offset. Everything else - the batch's structure (dicts,
namedtuples, lists, custom classes), strings, Python numbers - is pickled,
with each array replaced by a reference to its bytes (``persistent_id``, the
mechanism ``torch.save`` uses). The arena is then resized to the bytes used,
so a batch costs what it holds, whatever its shapes. The loop unpickles the
skeleton and turns each reference into a tensor or array: an owned copy
(default, one copy) or a view of the slot (valid until the next batch).

Kinds (the header's first word): ``BATCH``; ``ERROR`` (the skeleton is
torch's ``ExceptionWrapper``: the loop re-raises the original exception type
at that batch); ``EXHAUSTED`` (an iterable dataset's worker ran out);
``PAST_END`` (a task after the epoch's last batch); ``STASHED`` (the batch
did not fit in the slot: it went through the loader's plan actor, and the
skeleton says under which key).

Torch is imported by the functions of this module: it runs in producers and
in the training process only when a loader is used.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import numpy as np

HEADER_BYTES = 64
ALIGN = 64
BATCH, ERROR, EXHAUSTED, PAST_END, STASHED = 1, 2, 3, 4, 5
KIND_NAMES = {BATCH: "batch", ERROR: "error", EXHAUSTED: "exhausted", PAST_END: "past-end", STASHED: "stashed"}
_HEADER = struct.Struct("<IIQQ")  # kind, reserved, skeleton offset, skeleton length
_PROTOCOL = pickle.HIGHEST_PROTOCOL

_DTYPES: dict[str, Any] = {}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def torch_dtype(name: str):
    """``"torch.float32"`` -> ``torch.float32`` (cached)."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        import torch

        dtype = getattr(torch, name.rpartition(".")[2])
        _DTYPES[name] = dtype
    return dtype


class ArenaFull(Exception):
    """The batch does not fit in the slot (the producer then stashes it; see ``STASHED``)."""

    def __init__(self, needed: int, capacity: int) -> None:
        super().__init__(f"needs at least {needed} bytes, the slot holds {capacity}")
        self.needed = needed
        self.capacity = capacity


class Arena:
    """Bump allocation of aligned tensors in one slot's bytes (producer side).

    ``buf`` is the slot's whole ``uint8`` array, writable; ``None`` makes a
    measuring arena that only counts (the layout probe). Nothing here frees:
    an arena lives for one batch.
    """

    def __init__(self, buf: np.ndarray | None, capacity: int | None = None) -> None:
        self.buf = buf
        self.capacity = len(buf) if buf is not None else (capacity if capacity is not None else 1 << 62)
        self.pos = HEADER_BYTES
        self._tbuf = None
        self._base = 0

    @property
    def measuring(self) -> bool:
        return self.buf is None

    def _torch_buf(self):
        if self._tbuf is None:
            import torch

            self._tbuf = torch.from_numpy(self.buf)
            self._base = self._tbuf.data_ptr()
        return self._tbuf

    def alloc(self, nbytes: int) -> int:
        off = _align(self.pos)
        end = off + nbytes
        if end > self.capacity:
            raise ArenaFull(end, self.capacity)
        self.pos = end
        return off

    def tensor(self, shape: tuple[int, ...], dtype) -> Any:
        """An uninitialised tensor of ``shape`` and ``dtype`` in the arena (``ArenaFull`` if it does not fit)."""
        import math

        nbytes = math.prod(shape) * dtype.itemsize
        off = self.alloc(nbytes)
        return self._torch_buf()[off: off + nbytes].view(dtype).view(shape)

    def offset_of(self, t: Any) -> int | None:
        """Where contiguous tensor ``t`` lives in the arena, or None if it lives elsewhere."""
        if self._tbuf is None or not t.is_contiguous():
            return None
        if t.untyped_storage().data_ptr() != self._tbuf.untyped_storage().data_ptr():
            return None
        return t.data_ptr() - self._base

    def copy_tensor(self, t: Any) -> int:
        """Copy tensor ``t`` into the arena; returns its offset."""
        nbytes = t.numel() * t.element_size()
        off = self.alloc(nbytes)
        if not self.measuring and nbytes:
            self._torch_buf()[off: off + nbytes].view(t.dtype).view(t.shape).copy_(t)
        return off

    def copy_array(self, a: np.ndarray) -> int:
        off = self.alloc(a.nbytes)
        if not self.measuring and a.nbytes:
            np.copyto(self.buf[off: off + a.nbytes].view(a.dtype).reshape(a.shape), a, casting="no")
        return off

    def finish(self, kind: int, skeleton: bytes | memoryview = b"") -> int:
        """Write the skeleton and the header; returns the bytes used (what the slot commits)."""
        n = len(skeleton)
        off = self.alloc(n) if n else self.pos
        if not self.measuring:
            if n:
                self.buf[off: off + n] = np.frombuffer(skeleton, dtype=np.uint8)
            _HEADER.pack_into(self.buf, 0, kind, 0, off, n)
        return off + n


class _Packer(pickle.Pickler):
    """Pickles a batch with every dense CPU tensor and numpy array moved into the arena."""

    def __init__(self, file: io.BytesIO, arena: Arena) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.arena = arena
        self._seen: dict[int, tuple] = {}  # id -> pid: one object twice in a batch stays one object
        self._keep: list[Any] = []         # keeps ids valid while pickling

    def persistent_id(self, obj: Any):
        kind = type(obj)
        if kind is np.ndarray:
            if obj.dtype.hasobject:
                return None
            pid = self._seen.get(id(obj))
            if pid is None:
                pid = ("n", self.arena.copy_array(obj), obj.dtype, obj.shape)
                self._seen[id(obj)] = pid
                self._keep.append(obj)
            return pid
        if kind.__name__ != "Tensor" or kind.__module__ != "torch":
            return None
        t = obj
        if t.is_nested or t.layout is not _strided() or t.device.type != "cpu" or t.is_quantized or \
                (t.requires_grad and t.grad_fn is not None):
            return None  # pickled whole, as torch pickles it (or refuses to)
        pid = self._seen.get(id(t))
        if pid is None:
            off = self.arena.offset_of(t)
            if off is None:
                off = self.arena.copy_tensor(t)
            pid = ("t", off, str(t.dtype), tuple(t.shape), bool(t.requires_grad))
            self._seen[id(t)] = pid
            self._keep.append(t)
        return pid


def _strided():
    import torch

    return torch.strided


def write_batch(arena: Arena, data: Any) -> int:
    """Put ``data`` (a collated batch) in the arena; returns the bytes used. ``ArenaFull`` if it does not fit."""
    f = io.BytesIO()
    _Packer(f, arena).dump(data)
    return arena.finish(BATCH, f.getbuffer())


def write_value(arena: Arena, kind: int, value: Any) -> int:
    """A marker, an error or a stash key: ``value`` pickled plainly (no arrays moved)."""
    return arena.finish(kind, pickle.dumps(value, protocol=_PROTOCOL) if value is not None else b"")


def read_header(arena: np.ndarray) -> tuple[int, int, int]:
    """(kind, skeleton offset, skeleton length) of a committed arena (the loop's side)."""
    if len(arena) < HEADER_BYTES:
        raise ValueError(f"a loader slot holds {len(arena)} bytes, less than its {HEADER_BYTES}-byte header")
    kind, _, off, n = _HEADER.unpack_from(arena, 0)
    if kind not in KIND_NAMES or off + n > len(arena):
        raise ValueError(f"a loader slot's header says kind {kind}, skeleton at {off}+{n} of {len(arena)} bytes")
    return kind, off, n


def read_value(arena: np.ndarray) -> Any:
    kind, off, n = read_header(arena)
    return pickle.loads(arena[off: off + n].tobytes()) if n else None


class _Unpacker(pickle.Unpickler):
    """Rebuilds a batch: each arena reference becomes an owned copy (``mode="copy"``) or a view (``"view"``)."""

    def __init__(self, file: io.BytesIO, arena: np.ndarray, tarena: Any, mode: str, pin: bool) -> None:
        super().__init__(file)
        self.arena = arena
        self.tarena = tarena
        self.mode = mode
        self.pin = pin
        self._made: dict[tuple, Any] = {}

    def persistent_load(self, pid: tuple) -> Any:
        made = self._made.get(pid)
        if made is not None:
            return made
        if pid[0] == "t":
            _, off, dtype_name, shape, requires_grad = pid
            dtype = torch_dtype(dtype_name)
            n = _numel(shape) * dtype.itemsize
            src = self.tarena[off: off + n].view(dtype).view(shape)
            if self.mode == "view":
                out = src
            else:
                import torch

                out = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
                _copy(out, src)
            if requires_grad:
                out.requires_grad_(True)
        elif pid[0] == "n":
            _, off, dtype, shape = pid
            view = self.arena[off: off + _numel(shape) * dtype.itemsize].view(dtype).reshape(shape)
            out = view if self.mode == "view" else view.copy()
        else:
            raise pickle.UnpicklingError(f"unknown arena reference {pid!r}")
        self._made[pid] = out
        return out


def _copy(out: Any, src: Any) -> None:
    """``out.copy_(src)`` on this thread alone, through numpy when the dtype allows.

    torch splits a copy of more than 32 Ki elements over its intra-op
    threads; on a machine whose cores are busy (the producers run there too)
    the copy then waits for a descheduled helper thread: measured 6.7 ms
    median for 1.5 MiB on 2 loaded cores, against 0.04 ms on one thread.
    """
    try:
        np.copyto(out.numpy(), src.numpy(), casting="no")
    except (TypeError, RuntimeError):  # no numpy dtype (bfloat16...): torch's own copy
        out.copy_(src)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_batch(arena: np.ndarray, *, mode: str = "copy", pin: bool = False) -> Any:
    """The batch in a committed ``BATCH`` arena (a writable ``uint8`` view of the slot's used bytes)."""
    import torch

    _, off, n = read_header(arena)
    return _Unpacker(io.BytesIO(arena[off: off + n].tobytes()), arena, torch.from_numpy(arena), mode, pin).load()


def measure(data: Any) -> int:
    """Bytes a slot needs for ``data`` (the layout probe)."""
    arena = Arena(None)
    f = io.BytesIO()
    _Packer(f, arena).dump(data)
    return arena.finish(BATCH, f.getbuffer())
