"""Debug views: slot memory that refuses to be read once its slot was given back.

A consumer's arrays are numpy views over ring memory, valid until their slot is
released (``ConsumerSlot.release``; in a feed, when the loop asks for the next
batch). Kept past that, they silently show whatever the slot holds next: another
batch's bytes. Debug mode turns that into an error at the first read:

- on release the ring fills the slot with ``POISON`` bytes before giving it back
  (so even a view this module cannot see, a memoryview or a torch tensor made
  from one, reads an obvious pattern, not a plausible batch);
- consumer views are ``GuardedArray``: indexing, ufuncs (arithmetic, ``sum``...),
  numpy functions, conversions, and making a view or a copy first call the
  view's guard, which raises ``StaleView`` unless the acquire the view came
  from is still the current one.

Turn it on with ``PYSHMFEED_DEBUG_VIEWS=1`` in the environment (read when a
ring or slot layout is made, so it reaches a ``Feed`` and its producers too) or
with ``debug_views=True`` on ``Ring.create`` / ``Ring.attach`` (poison, guarded
``ConsumerSlot.array``) and on ``SlotLayout`` (guarded batch views). Off, the
default, none of this runs: views are plain ndarrays and release does not touch
the bytes. Not guarded (escapes): ``np.asarray(view)``, ``memoryview(view)``,
``view.data``, and tensors made from a view; the poison still shows there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Callable, Literal

import numpy as np

DEBUG_ENV = "PYSHMFEED_DEBUG_VIEWS"
POISON = 0xDB  # what a released slot reads in debug mode


def debug_views_enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else whether ``PYSHMFEED_DEBUG_VIEWS`` is set to something other than ``0``."""
    if flag is None:
        return os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return bool(flag)


def guarded(view: np.ndarray, guard: Callable[[], None]) -> "GuardedArray":
    """``view`` (same memory) as a ``GuardedArray`` whose reads first call ``guard``."""
    out = view.view(GuardedArray)
    out._guard = guard
    return out


def _plain(x: Any) -> Any:
    """Guarded arrays (checked first) as plain ndarrays, inside tuples and lists too."""
    if isinstance(x, GuardedArray):
        x._fresh()
        return x.view(np.ndarray)
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(i) for i in x)
    return x


class GuardedArray(np.ndarray):
    """A numpy view over slot memory that raises ``StaleView`` when read after its slot was released."""

    _guard: Callable[[], None] | None = None

    def __array_finalize__(self, obj: Any) -> None:
        guard = getattr(obj, "_guard", None)
        if guard is not None:
            guard()  # a view or a copy of a stale view reads it
        # A copy (it owns its memory) outlives the slot; a view of the same memory does not.
        self._guard = guard if self.base is not None else None

    def _fresh(self) -> None:
        if self._guard is not None:
            self._guard()

    def __getitem__(self, key: Any) -> Any:
        self._fresh()
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._fresh()
        super().__setitem__(key, _plain(value))

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return getattr(ufunc, method)(*_plain(inputs), **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})

    def __iter__(self) -> Iterator[Any]:
        self._fresh()
        return iter(self.view(np.ndarray))

    def __repr__(self) -> str:
        self._fresh()
        return repr(self.view(np.ndarray))

    def __str__(self) -> str:
        self._fresh()
        return str(self.view(np.ndarray))

    def __bool__(self) -> bool:
        self._fresh()
        return bool(self.view(np.ndarray))

    def __float__(self) -> float:
        self._fresh()
        return float(self.view(np.ndarray))

    def __int__(self) -> int:
        self._fresh()
        return int(self.view(np.ndarray))

    def __index__(self) -> int:
        self._fresh()
        return self.view(np.ndarray).__index__()

    def item(self, *args: Any) -> Any:
        self._fresh()
        return self.view(np.ndarray).item(*args)

    def tolist(self) -> Any:
        self._fresh()
        return self.view(np.ndarray).tolist()

    def tobytes(self, order: Literal["K", "A", "C", "F"] | None = "C") -> bytes:
        self._fresh()
        return self.view(np.ndarray).tobytes(order)

    def __reduce__(self) -> Any:  # pickling reads the data
        self._fresh()
        return self.view(np.ndarray).__reduce__()
