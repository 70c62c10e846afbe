"""Batches in slots, without Ray or a ring: BatchSpec layout, the slot header, partial
batches, Batch.copy, and the errors a bad batch or a bad header gets.

A slot here is a plain ``bytearray`` of ``spec.slot_bytes``: ``SlotLayout`` only
needs a writable buffer, so every test is a pure, fast unit test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyshmfeed import Batch, BatchSpec, SlotArrays, SourceContext
from pyshmfeed.errors import CorruptSegment, InvalidArgument, SpecMismatch
from pyshmfeed.source import copy_batch_into, write_indexed_batch
from pyshmfeed.spec import _FIXED_HEADER, MAX_DIMS, META_BYTES, SLOT_MAGIC, SlotLayout


def layout_of(spec: BatchSpec, extra: int = 0) -> tuple[bytearray, SlotLayout]:
    buf = bytearray(spec.slot_bytes + extra)
    return buf, SlotLayout(spec, buf, len(buf))


def spans(spec: BatchSpec) -> list[tuple[int, int]]:
    return [(off, off + a.nbytes) for a, off in zip(spec.arrays, spec.offsets)]


# ---- BatchSpec: layout and alignment -----------------------------------------------

MIXED = BatchSpec(
    x=((4, 1000, 3), "float32"),  # 48000 bytes: page-aligned
    y=((4, 1), "float32"),        # 16 bytes: 64-aligned
    mask=((7,), "bool"),          # odd size, after which alignment must still hold
    ids=((5, 3), "int64"),
    img=((2, 32, 32), "uint8"),   # exactly 2048 bytes: below a page
)


def test_every_array_starts_64_byte_aligned_after_the_header():
    assert MIXED.header_bytes % 64 == 0
    assert MIXED.header_bytes >= _FIXED_HEADER.itemsize + len(MIXED.arrays) * MAX_DIMS * 8 + META_BYTES
    for a, off in zip(MIXED.arrays, MIXED.offsets):
        assert off % 64 == 0, (a.name, off)
        assert off >= MIXED.header_bytes


def test_arrays_of_a_page_or_more_start_on_a_page():
    for a, off in zip(MIXED.arrays, MIXED.offsets):
        if a.nbytes >= 4096:
            assert off % 4096 == 0, (a.name, off)
    assert MIXED.offsets[0] % 4096 == 0


def test_arrays_do_not_overlap_and_fit_in_the_slot():
    s = sorted(spans(MIXED))
    for (_, end), (start, _) in zip(s, s[1:]):
        assert end <= start
    assert s[-1][1] <= MIXED.slot_bytes


def test_slot_bytes_is_the_end_of_the_last_array():
    off, end = spans(MIXED)[-1]
    assert MIXED.slot_bytes == end


def test_batch_bytes_is_the_array_data_only():
    assert MIXED.batch_bytes == 4 * 1000 * 3 * 4 + 4 * 4 + 7 + 5 * 3 * 8 + 2 * 32 * 32
    assert MIXED.batch_bytes < MIXED.slot_bytes


def test_named_and_positional_specs():
    named = BatchSpec(x=((2, 3), "float32"), y=((2,), "int64"))
    assert named.names == ("x", "y") and not named.positional
    assert named.arrays[0].shape == (2, 3) and named.arrays[0].dtype == np.float32
    positional = BatchSpec([((2, 3), "float32"), ((2,), "int64")])
    assert positional.positional and positional.names == ("0", "1")
    assert positional.slot_bytes == named.slot_bytes
    assert named != positional
    assert named == BatchSpec({"x": ((2, 3), "float32"), "y": ((2,), "int64")})
    assert hash(named) == hash(BatchSpec(x=((2, 3), "float32"), y=((2,), "int64")))
    assert BatchSpec(x=(5, "uint8")).arrays[0].shape == (5,)  # a bare int is a 1-d shape


@pytest.mark.parametrize("args, kwargs, needle", [
    ((), {}, "at least one array"),
    (({"x": ((2,), "f4")},), {"y": ((2,), "f4")}, "not both"),
    (("nonsense",), {}, "named arrays or a list"),
    ((), {"x": ((2, 0), "float32")}, "positive"),
    ((), {"x": ((2, -1), "float32")}, "positive"),
    ((), {"x": ((1,) * (MAX_DIMS + 1), "float32")}, "rank"),
    ((), {"x": ((2,), object)}, "Python objects"),
    ((), {"x": ((2,), "not-a-dtype")}, "(shape, dtype)"),
    ((), {"x": "float32"}, "(shape, dtype)"),
])
def test_bad_specs_are_rejected_with_the_reason(args, kwargs, needle):
    with pytest.raises(InvalidArgument) as info:
        BatchSpec(*args, **kwargs)
    assert needle in str(info.value)
    if "x" in kwargs:
        assert "'x'" in str(info.value)  # the message names the array


@pytest.mark.parametrize("arrays, needle", [
    ({"x": ((2.5, 3), "float32")}, "dimension 2.5 (float) is not an int"),  # would silently be 2
    ({"x": ((2.0,), "float32")}, "dimension 2.0 (float) is not an int"),
    ({"x": (2.5, "float32")}, "dimension 2.5 (float) is not an int"),  # a bare 1-d shape too
    ({"x": ((True, 3), "float32")}, "dimension True is a bool"),  # would silently be 1
    ({"x": ((np.bool_(True),), "float32")}, "True_ is a bool"),
    ({"x": (("4",), "float32")}, "dimension '4' (str) is not an int"),
    ({1: ((2,), "float32"), "1": ((2,), "float32")}, "array name 1 (int) is not a string"),  # one name, twice
    ({1: ((2,), "float32")}, "array name 1 (int) is not a string"),
])
def test_dimensions_and_names_that_are_not_what_they_seem_are_refused(arrays, needle):
    with pytest.raises(InvalidArgument) as info:
        BatchSpec(arrays)
    assert needle in str(info.value)


def test_numpy_integers_are_dimensions():
    assert BatchSpec(x=((np.int64(4), np.uint8(3)), "float32")).arrays[0].shape == (4, 3)


def test_slot_layout_refuses_a_slot_smaller_than_the_spec():
    buf = bytearray(MIXED.slot_bytes - 1)
    with pytest.raises(InvalidArgument, match=str(MIXED.slot_bytes)):
        SlotLayout(MIXED, buf, len(buf))


# ---- the slot header round trip --------------------------------------------------------

SMALL = BatchSpec(x=((4, 8), "float32"), y=((4,), "int64"), z=((3, 2, 2), "uint16"))


def fill_full(layout: SlotLayout, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    written = []
    for a, dst in zip(layout.spec.arrays, layout.writer_arrays()):
        src = (rng.random(a.shape) * 1000).astype(a.dtype)
        dst[...] = src
        written.append(src)
    return written


def test_header_round_trip_gives_identity_shapes_data_and_metadata():
    buf, layout = layout_of(SMALL)
    written = fill_full(layout, 1)
    nbytes = layout.write_header(index=1234567, epoch=3, seq=2**40 + 5, worker=2,
                                 shapes=[a.shape for a in SMALL.arrays], meta=b"hello")
    assert nbytes == SMALL.slot_bytes  # a full batch ends where the last array ends
    ident, views, meta = layout.read(nbytes)
    assert ident == {"index": 1234567, "epoch": 3, "seq": 2**40 + 5, "worker": 2}
    assert meta == b"hello"
    for a, v, w in zip(SMALL.arrays, views, written):
        assert v.shape == a.shape and v.dtype == a.dtype
        np.testing.assert_array_equal(v, w)


def test_consumer_views_are_zero_copy_and_read_only():
    buf, layout = layout_of(SMALL)
    fill_full(layout, 2)
    nbytes = layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=[a.shape for a in SMALL.arrays])
    _, views, meta = layout.read(nbytes)
    assert meta == b""
    raw = np.frombuffer(buf, dtype=np.uint8)
    for v, off in zip(views, SMALL.offsets):
        assert np.shares_memory(v, raw)
        assert v.__array_interface__["data"][0] == raw.__array_interface__["data"][0] + off
        assert not v.flags.writeable
        with pytest.raises(ValueError):
            v[...] = 0
    # a later write through the producer side shows through the same view: no copy was made
    layout.writer_arrays()[1][...] = 77
    assert (views[1] == 77).all()


def test_header_is_rewritten_cleanly_for_the_next_batch():
    buf, layout = layout_of(SMALL)
    fill_full(layout, 3)
    layout.write_header(index=1, epoch=0, seq=1, worker=1, shapes=[a.shape for a in SMALL.arrays],
                        meta=b"x" * META_BYTES)
    shapes = [(1, 8), (1,), (1, 1, 2)]
    nbytes = layout.write_header(index=2, epoch=1, seq=2, worker=0, shapes=shapes)
    ident, views, meta = layout.read(nbytes)
    assert ident["index"] == 2 and ident["epoch"] == 1 and meta == b""
    assert [v.shape for v in views] == shapes


def test_metadata_longer_than_the_slot_area_is_a_spec_mismatch():
    _, layout = layout_of(SMALL)
    layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=[a.shape for a in SMALL.arrays],
                        meta=b"m" * META_BYTES)
    with pytest.raises(SpecMismatch, match=str(META_BYTES)):
        layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=[a.shape for a in SMALL.arrays],
                            meta=b"m" * (META_BYTES + 1))


# ---- partial batches: actual shapes smaller than the maximum ----------------------


def test_fill_source_resizes_to_a_partial_batch():
    spec = BatchSpec(x=((4, 8), "float32"), y=((4,), "int64"))
    buf, layout = layout_of(spec)
    layout.writer_arrays()[0][...] = -1  # stale data of an earlier, full batch

    def fill(index, out, ctx):
        x = out.resize("x", (3, 8))
        x[...] = np.arange(24, dtype=np.float32).reshape(3, 8)
        y = out.resize("y", (3,))
        y[...] = [index, index + 1, index + 2]

    ctx = SourceContext(0, 1, 0, 0)
    shapes = write_indexed_batch("fill", fill, layout, 10, ctx)
    assert shapes == [(3, 8), (3,)]
    nbytes = layout.write_header(index=10, epoch=0, seq=0, worker=0, shapes=shapes)
    assert nbytes == spec.offsets[1] + 3 * 8  # the payload ends with the actual data
    _, (x, y), _ = layout.read(nbytes)
    assert x.shape == (3, 8) and y.shape == (3,)
    np.testing.assert_array_equal(x, np.arange(24, dtype=np.float32).reshape(3, 8))
    np.testing.assert_array_equal(y, [10, 11, 12])
    assert x.flags.c_contiguous


@pytest.mark.parametrize("result", [{"x": (2, 5), "y": (2,)}, ((2, 5), (2,))])
def test_fill_source_may_return_its_actual_shapes(result):
    spec = BatchSpec(x=((4, 8), "float32"), y=((4,), "int64"))
    _, layout = layout_of(spec)

    def fill(index, out, ctx):
        out.resize("x", (2, 5))[...] = 1.5
        out.resize("y", (2,))[...] = 9
        return result

    shapes = write_indexed_batch("fill", fill, layout, 0, SourceContext(0, 1, 0, 0))
    assert shapes == [(2, 5), (2,)]
    _, (x, y), _ = layout.read(layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=shapes))
    assert (x == 1.5).all() and x.shape == (2, 5) and (y == 9).all()


def test_fill_source_returning_something_else_is_a_spec_mismatch():
    _, layout = layout_of(SMALL)
    with pytest.raises(SpecMismatch, match="got str"):
        write_indexed_batch("fill", lambda i, out, ctx: "oops", layout, 0, SourceContext(0, 1, 0, 0))


def test_fill_cannot_resize_past_the_maximum():
    _, layout = layout_of(SMALL)
    out = SlotArrays(layout)
    with pytest.raises(SpecMismatch) as info:
        out.resize("x", (5, 8))
    assert "'x'" in str(info.value) and "(5, 8)" in str(info.value) and "(4, 8)" in str(info.value)
    with pytest.raises(SpecMismatch, match="'y'"):
        out.resize("y", (2, 2))  # wrong rank
    with pytest.raises(SpecMismatch, match="no array named 'w'"):
        out.resize("w", (1,))


def test_make_batch_with_smaller_shapes_is_copied_and_read_back():
    _, layout = layout_of(SMALL)
    batch = {"x": np.full((2, 3), 4.0, np.float32), "y": np.array([7], np.int64),
             "z": np.arange(12, dtype=np.uint16).reshape(3, 2, 2)}
    shapes = copy_batch_into(layout, batch)
    assert shapes == [(2, 3), (1,), (3, 2, 2)]
    _, views, _ = layout.read(layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=shapes))
    for v, name in zip(views, SMALL.names):
        np.testing.assert_array_equal(v, batch[name])
        assert v.shape == batch[name].shape


def test_zero_sized_partial_arrays_are_allowed():
    _, layout = layout_of(SMALL)
    shapes = copy_batch_into(layout, {"x": np.zeros((0, 8), np.float32), "y": np.zeros(0, np.int64),
                                      "z": np.zeros((0, 2, 2), np.uint16)})
    _, views, _ = layout.read(layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=shapes))
    assert [v.shape for v in views] == [(0, 8), (0,), (0, 2, 2)]


def test_positional_batch_copies_from_a_tuple():
    spec = BatchSpec([((2, 2), "float64"), ((2,), "int32")])
    _, layout = layout_of(spec)
    x, y = np.eye(2), np.array([3, 4], np.int32)
    shapes = copy_batch_into(layout, (x, y))
    ident, views, _ = layout.read(layout.write_header(index=5, epoch=0, seq=0, worker=0, shapes=shapes))
    batch = Batch(spec.names, views, positional=True, index=ident["index"])
    bx, by = batch  # positional batches unpack like a tuple
    np.testing.assert_array_equal(bx, x)
    np.testing.assert_array_equal(by, y)
    assert batch[1] is by


# ---- Batch.copy ------------------------------------------------------------------------


def test_batch_copy_owns_its_data_and_outlives_the_slot():
    buf, layout = layout_of(SMALL)
    written = fill_full(layout, 4)
    nbytes = layout.write_header(index=9, epoch=2, seq=11, worker=1, shapes=[a.shape for a in SMALL.arrays],
                                 meta=b"m")
    ident, views, meta = layout.read(nbytes)
    batch = Batch(SMALL.names, views, index=ident["index"], epoch=ident["epoch"], worker=ident["worker"],
                  meta=meta, seq=ident["seq"])
    kept = batch.copy()
    assert (kept.index, kept.epoch, kept.worker, kept.seq, kept.meta) == (9, 2, 1, 11, b"m")
    assert kept.keys() == list(SMALL.names)
    raw = np.frombuffer(buf, dtype=np.uint8)
    for name in SMALL.names:
        assert not np.shares_memory(kept[name], raw)
        assert kept[name].flags.writeable
    buf[:] = b"\xff" * len(buf)  # the producer reuses the slot for another batch
    for name, w in zip(SMALL.names, written):
        np.testing.assert_array_equal(kept[name], w)
        assert not np.array_equal(batch[name], w)  # the view did change: it was not a copy
    kept["y"][...] = 0  # and changing the copy does not touch the slot
    assert (np.frombuffer(buf, dtype=np.uint8) == 0xFF).all()


def test_batch_mapping_interface():
    b = Batch(("x", "y"), [np.zeros(2), np.ones(3)], index=4)
    assert set(b) == {"x", "y"} and len(b) == 2
    assert b["y"].shape == (3,) and b[0].shape == (2,)
    with pytest.raises(KeyError):
        b["nope"]
    assert list(b.as_dict()) == ["x", "y"] and len(b.as_tuple()) == 2
    assert "index=4" in repr(b)


# ---- a batch that does not match the spec ------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (np.zeros((4, 8), np.float64), ["'x'", "float64", "float32"]),
    (np.zeros((4, 8, 1), np.float32), ["'x'", "(4, 8, 1)", "rank 3", "(4, 8)", "rank 2"]),
    (np.zeros((32,), np.float32), ["'x'", "(32,)", "(4, 8)"]),
    (np.zeros((5, 8), np.float32), ["'x'", "(5, 8)", "larger", "(4, 8)"]),
    (np.zeros((4, 9), np.float32), ["'x'", "(4, 9)", "(4, 8)"]),
])
def test_spec_mismatch_names_the_array_the_expected_and_the_actual(value, expected):
    _, layout = layout_of(SMALL)
    batch = {"x": value, "y": np.zeros(4, np.int64), "z": np.zeros((3, 2, 2), np.uint16)}
    with pytest.raises(SpecMismatch) as info:
        copy_batch_into(layout, batch)
    for needle in expected:
        assert needle in str(info.value)


def test_spec_mismatch_on_the_second_array_names_that_array():
    with pytest.raises(SpecMismatch, match="'y'.*int32.*int64"):
        SMALL.check_array(1, np.zeros(4, np.int32))


def test_spec_mismatch_does_not_cast_silently():
    _, layout = layout_of(BatchSpec(x=((2,), "int64")))
    with pytest.raises(SpecMismatch, match="int32"):
        copy_batch_into(layout, {"x": np.zeros(2, np.int32)})
    with pytest.raises(SpecMismatch, match="float64"):
        copy_batch_into(layout, {"x": [1.5, 2.5]})  # lists are arrays too, with numpy's dtype


@pytest.mark.parametrize("batch, needle", [
    ({"x": np.zeros((4, 8), np.float32), "y": np.zeros(4, np.int64)}, "lacks arrays ['z']"),
    ({"x": 0, "y": 0, "z": 0, "w": 0}, "['w']"),
    ((np.zeros((4, 8), np.float32),), "1 arrays, the spec has 3"),
    (42, "mapping or a tuple of 3"),
])
def test_batches_with_the_wrong_arrays_say_which(batch, needle):
    _, layout = layout_of(SMALL)
    with pytest.raises(SpecMismatch) as info:
        copy_batch_into(layout, batch)
    assert needle in str(info.value)


def test_a_single_array_spec_takes_a_bare_array():
    spec = BatchSpec(x=((3,), "int16"))
    _, layout = layout_of(spec)
    shapes = copy_batch_into(layout, np.array([1, 2, 3], np.int16))
    _, (x,), _ = layout.read(layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=shapes))
    np.testing.assert_array_equal(x, [1, 2, 3])


# ---- a corrupt slot header is a CorruptSegment, never a bad view -------------------------


def valid_slot(spec: BatchSpec = SMALL) -> tuple[bytearray, SlotLayout, int]:
    buf, layout = layout_of(spec)
    fill_full(layout, 5)
    nbytes = layout.write_header(index=1, epoch=0, seq=1, worker=0, shapes=[a.shape for a in spec.arrays])
    return buf, layout, nbytes


def set_header(layout: SlotLayout, field: str, value: int) -> None:
    layout.header[field] = value


def test_bad_magic_is_corrupt():
    _, layout, nbytes = valid_slot()
    set_header(layout, "magic", SLOT_MAGIC ^ 1)
    with pytest.raises(CorruptSegment, match="magic"):
        layout.read(nbytes)


def test_wrong_array_count_is_corrupt():
    _, layout, nbytes = valid_slot()
    set_header(layout, "narrays", 2)
    with pytest.raises(CorruptSegment, match="2 arrays"):
        layout.read(nbytes)


def test_metadata_length_past_its_area_is_corrupt():
    _, layout, nbytes = valid_slot()
    set_header(layout, "meta_len", META_BYTES + 1)
    with pytest.raises(CorruptSegment, match="metadata length"):
        layout.read(nbytes)


@pytest.mark.parametrize("array, dim, value",
                         [(0, 0, 5), (0, 1, 9), (1, 0, -1), (2, 2, 2**40), (2, 0, -2**62)])
def test_a_dimension_outside_the_maximum_is_corrupt_and_names_the_array(array, dim, value):
    _, layout, nbytes = valid_slot()
    layout.shapes[array, dim] = value
    with pytest.raises(CorruptSegment, match=repr(SMALL.names[array])):
        layout.read(nbytes)


def test_an_array_past_the_committed_payload_is_corrupt():
    _, layout, nbytes = valid_slot()
    with pytest.raises(CorruptSegment, match="past the"):
        layout.read(nbytes - 1)
    with pytest.raises(CorruptSegment, match="'x'"):
        layout.read(SMALL.header_bytes)  # a payload that holds the header only


def test_a_stale_header_from_another_spec_is_corrupt():
    other = BatchSpec(a=((4,), "uint8"))
    buf, layout = layout_of(SMALL)
    foreign = SlotLayout(other, buf, len(buf))
    nbytes = foreign.write_header(index=0, epoch=0, seq=0, worker=0, shapes=[(4,)])
    with pytest.raises(CorruptSegment, match="disagree on the spec"):
        layout.read(max(nbytes, SMALL.slot_bytes))


@settings(max_examples=300, deadline=None)
@given(header=st.binary(min_size=SMALL.header_bytes, max_size=SMALL.header_bytes),
       keep_valid_prefix=st.booleans(), nbytes=st.integers(0, SMALL.slot_bytes))
def test_any_header_bytes_give_valid_views_or_corrupt_segment(header, keep_valid_prefix, nbytes):
    buf, layout, _ = valid_slot()
    if keep_valid_prefix:  # keep magic and count so that the shape checks are reached
        header = bytes(buf[:8]) + header[8:]
    buf[: SMALL.header_bytes] = header
    try:
        ident, views, meta = layout.read(nbytes)
    except CorruptSegment:
        return
    assert len(meta) <= META_BYTES
    for a, off, v in zip(SMALL.arrays, SMALL.offsets, views):
        assert v.ndim == len(a.shape) and all(0 <= d <= m for d, m in zip(v.shape, a.shape))
        assert off + v.nbytes <= nbytes
        assert v.dtype == a.dtype and not v.flags.writeable


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_round_trip_of_random_partial_shapes(data):
    buf, layout = layout_of(SMALL)
    batch = {}
    for a in SMALL.arrays:
        shape = tuple(data.draw(st.integers(0, m)) for m in a.shape)
        batch[a.name] = (np.arange(math.prod(shape)) % 251).astype(a.dtype).reshape(shape)
    index = data.draw(st.integers(0, 2**62))
    shapes = copy_batch_into(layout, batch)
    ident, views, _ = layout.read(layout.write_header(index=index, epoch=1, seq=0, worker=0, shapes=shapes))
    assert ident["index"] == index
    for v, name in zip(views, SMALL.names):
        np.testing.assert_array_equal(v, batch[name])
        assert v.shape == batch[name].shape


# ---- the per-batch RNG -----------------------------------------------------------------


def test_source_context_rng_depends_on_seed_epoch_and_index_only():
    a = SourceContext(worker=0, num_workers=1, epoch=2, seed=7).rng(5).random(4)
    b = SourceContext(worker=3, num_workers=4, epoch=2, seed=7).rng(5).random(4)
    np.testing.assert_array_equal(a, b)  # whichever worker makes the batch
    assert not np.array_equal(a, SourceContext(0, 1, 3, 7).rng(5).random(4))
    assert not np.array_equal(a, SourceContext(0, 1, 2, 8).rng(5).random(4))
    assert not np.array_equal(a, SourceContext(0, 1, 2, 7).rng(6).random(4))
    np.testing.assert_array_equal(SourceContext(0, 1, 0, -1).rng(0).random(2),
                                  SourceContext(0, 1, 0, -1).rng(0).random(2))  # negative seeds work
