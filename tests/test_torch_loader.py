"""The DataLoader drop-in, item by item of issue 12: what torch's own DataLoader tests ask of a loader.

Every behaviour is checked against ``torch.utils.data.DataLoader`` itself,
run in this process with the same arguments. Datasets live at module level:
producers import this module by name (tests/ is on their PYTHONPATH). No
test here asserts a time: waits are on conditions, speed is in bench/.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import pickle
import random
import signal
import threading
import time
import typing
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import Dataset, IterableDataset, get_worker_info  # noqa: E402

from pyshmfeed.errors import RingClosed  # noqa: E402
from pyshmfeed.torch import DataLoader  # noqa: E402

pytestmark = pytest.mark.timeout(180)



class Augmented(Dataset):
    """Random augmentation from all three generators a dataset typically uses."""

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (torch.rand(3) + i, torch.tensor(random.random()), torch.from_numpy(np.random.rand(2)),
                torch.tensor(torch.initial_seed()))


class Counting(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i


class NeverInTheTrainingProcess(Dataset):
    """Its samples need the attribute worker_init_fn sets; in the training process it hangs, then fails."""

    def __init__(self) -> None:
        self.training_pid = os.getpid()  # made in the training process; producers get a pickled copy

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        if os.getpid() == self.training_pid:
            time.sleep(3600)
            raise AssertionError("dataset[i] ran in the training process")
        return torch.full((2,), float(i)) * self.scale  # AttributeError unless worker_init_fn ran


def set_scale(worker_id: int) -> None:
    get_worker_info().dataset.scale = 10.0


class FailsAt(Dataset):
    """``dataset[bad]`` raises ``error_type``."""

    def __init__(self, n: int, bad: tuple[int, ...], error_type: type = ValueError) -> None:
        self.n = n
        self.bad = bad
        self.error_type = error_type

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise self.error_type(f"sample {i} is broken")
        return torch.tensor([i])


class Crashes(Dataset):
    """``dataset[i]`` ends its process: a segfault (``"segv"``), or SIGKILL (``"kill"``, which no handler sees)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.training_pid = os.getpid()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if os.getpid() == self.training_pid:
            raise AssertionError("dataset[i] ran in the training process")
        if self.how == "segv":
            return ctypes.string_at(0)
        os.kill(os.getpid(), signal.SIGKILL)
        return i


class ShardedStream(IterableDataset):
    """The sharding idiom of torch's documentation: each worker takes its share of range(start, end)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            lo, hi = self.start, self.end
        else:
            per = -(-(self.end - self.start) // info.num_workers)
            lo = self.start + info.id * per
            hi = min(lo + per, self.end)
        for i in range(lo, hi):
            yield torch.tensor([i, info.id if info else -1, (info.seed if info else 0) % 1000])


class UnevenStream(IterableDataset):
    """Worker w yields sizes[w] items: workers run out at different times."""

    def __init__(self, sizes: list[int], reported: int | None = None) -> None:
        self.sizes = sizes
        self.reported = reported  # what __len__ says (default: the truth)

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        return iter([wid * 100 + k for k in range(self.sizes[wid])])

    def __len__(self) -> int:
        return sum(self.sizes) if self.reported is None else self.reported


class WorkerInfoProbe(Dataset):
    """Each sample reports what get_worker_info() says in the process that made it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        info = get_worker_info()
        return {"id": info.id, "num_workers": info.num_workers, "seed_matches": info.seed == torch.initial_seed(),
                "own_dataset": info.dataset is self,  # the producer's copy is the one serving samples
                "pid": os.getpid()}


Point = collections.namedtuple("Point", "xy meta")
Meta = collections.namedtuple("Meta", "name weight")


class Nested(Dataset):
    """Dicts, lists, tuples and namedtuples to some depth; strings, numpy scalars, zero-size arrays."""

    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int):
        return {
            "point": Point(torch.tensor([i, -i], dtype=torch.int32), Meta(f"p{i}", np.float32(i / 4))),
            "tags": [f"t{i}", ("a", np.int16(i))],
            "deep": {"x": [{"y": (np.full((2, 2), i, np.float64), i % 2 == 0)}]},
            "empty": torch.zeros(0, 3),
            "none_rows": np.zeros((i % 3, 0), np.uint8)[:0],
            "bytes": b"raw",
            "half": torch.tensor(i, dtype=torch.float16),
            "bf16": torch.full((2,), i, dtype=torch.bfloat16),
        }


class Unpicklable(Dataset):
    """Holds a lock: cannot travel to another process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: list[int] = []

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        self.pids.append(os.getpid())
        return torch.tensor([i])


class Sleepy(Dataset):
    """Sample 0 takes ``seconds``; the rest are instant."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        if i == 0:
            time.sleep(self.seconds)
        return i


class Sized(Dataset):
    """Sample i is i * 1000 float32 values: batches grow past the first batch's size."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.full((1 + i * 1000,), float(i))


def pad_collate(samples):
    longest = max(len(s) for s in samples)
    out = torch.zeros(len(samples), longest)
    for j, s in enumerate(samples):
        out[j, : len(s)] = s
    return out


class EpochAware(Dataset):
    """Returns the value of an attribute the training process changes between epochs."""

    def __init__(self) -> None:
        self.value = 0

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.value


class CustomBatch:
    """A collate_fn result that is not a container torch knows."""

    def __init__(self, samples) -> None:
        self.x = torch.stack([s[0] for s in samples])
        self.names = [f"n{int(s[1])}" for s in samples]


def custom_collate(samples):
    return CustomBatch(samples)


class Pairs(Dataset):
    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int):
        return torch.full((3,), float(i)), i


# ---- helpers ---------------------------------------------------------------------------------------


def assert_same(a, b, where="batch") -> None:
    """Same types, structure, dtypes and values, recursively (torch's batches as the reference)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} != " \
                                                          f"{b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def torch_loader(dataset, **kwargs):
    """torch's own DataLoader. Its workers come from a forkserver: forking this process, which runs a Ray
    driver, would hand the children Ray's connections mid-flight (docs/adapters.md)."""
    if kwargs.get("num_workers", 0) > 0:
        kwargs.setdefault("multiprocessing_context", "forkserver")
    return torch.utils.data.DataLoader(dataset, **kwargs)


def both(dataset, epochs: int = 1, **kwargs):
    """Every epoch's batches from torch's loader and from ours, same arguments and generator seed."""
    seed = kwargs.pop("seed", None)
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    theirs_loader = torch_loader(dataset, generator=gen(), **kwargs)
    theirs = [list(theirs_loader) for _ in range(epochs)]
    stop_torch_workers(theirs_loader)
    with DataLoader(dataset, generator=gen(), **kwargs) as ours_loader:
        ours = [list(ours_loader) for _ in range(epochs)]
    return theirs, ours


def stop_torch_workers(loader) -> None:
    """Stop a torch loader's persistent workers now. torch stops them when the loader is collected,
    and a reference cycle can put that past the suite's check for leftover child processes."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()


def assert_like_torch(dataset, epochs: int = 1, **kwargs) -> list:
    theirs, ours = both(dataset, epochs, **kwargs)
    assert_same(ours, theirs, "epochs")
    return ours


# ---- 1. an iterator keeps what it needs alive ---------------------------------------------------------


def test_the_first_batch_of_a_loader_nobody_holds_arrives(ray_session):
    x = next(iter(DataLoader(Counting(10), batch_size=4, num_workers=1)))
    assert_same(x, torch.tensor([0, 1, 2, 3]))
    it = iter(DataLoader(Counting(10), batch_size=4, num_workers=2))
    gc.collect()  # the loader is unreachable but for the iterator: it must survive a collection
    assert [t.tolist() for t in it] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---- 2. loaders created and rebound in a loop ---------------------------------------------------------


def test_twenty_loaders_created_and_rebound_in_a_loop_each_yield_their_batches(ray_session):
    for n in range(20):
        loader = DataLoader(Counting(5 + n), batch_size=4, num_workers=1 + n % 2)
        got = [int(i) for batch in loader for i in batch]
        assert got == list(range(5 + n)), f"loader {n}"
    del loader


# ---- 3. random augmentation, reproducibly, as torch ---------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True])
def test_random_augmentation_gives_torch_s_batches_run_after_run(ray_session, persistent):
    kwargs = dict(batch_size=4, shuffle=True, num_workers=3, persistent_workers=persistent, seed=11)
    theirs, ours = both(Augmented(), epochs=2, **kwargs)
    assert_same(ours, theirs, "epochs")  # torch.rand, random, np.random and torch.initial_seed()
    _, again = both(Augmented(), epochs=2, **kwargs)
    assert_same(again, ours, "second run")
    _, other = both(Augmented(), epochs=1, **dict(kwargs, seed=12))
    assert not torch.equal(other[0][0][0], ours[0][0][0])
    seeds = {int(s) for epoch in ours for batch in epoch for s in batch[3]}
    assert len(seeds) == (3 if persistent else 6)  # one per worker, fresh workers each epoch


def test_worker_seeds_come_from_the_loader_s_generator_as_torch_s(ray_session):
    # torch: worker w gets torch.initial_seed() == base_seed + w, base_seed drawn from the generator.
    theirs, ours = both(Augmented(8), batch_size=1, num_workers=2, seed=3)
    assert [int(b[3]) for b in ours[0]] == [int(b[3]) for b in theirs[0]]
    assert int(ours[0][1][3]) == int(ours[0][0][3]) + 1


# ---- 4. nothing of the dataset runs in the training process -------------------------------------------


def test_iter_runs_no_dataset_code_and_worker_init_fn_runs_before_the_first_sample(ray_session):
    loader = DataLoader(NeverInTheTrainingProcess(), batch_size=5, num_workers=2, worker_init_fn=set_scale)
    with loader:
        it = iter(loader)  # would hang (then fail) if it evaluated dataset[0] here
        first = next(it)
        assert_same(first, torch.arange(5.0).repeat_interleave(2).reshape(5, 2) * 10)
        assert_same(next(it), torch.arange(5.0, 10.0).repeat_interleave(2).reshape(5, 2) * 10)


def test_a_first_sample_that_fails_raises_at_the_first_next_as_torch_s_does(ray_session):
    dataset = FailsAt(8, bad=(0,), error_type=KeyError)
    theirs_it = iter(torch_loader(dataset, batch_size=4, num_workers=1))
    with pytest.raises(KeyError) as theirs:
        next(theirs_it)
    theirs_it._shutdown_workers()  # the traceback kept in `theirs` holds the iterator, and so its worker
    with DataLoader(dataset, batch_size=4, num_workers=1) as loader:
        it = iter(loader)
        with pytest.raises(KeyError) as ours:
            next(it)
        assert_same(next(it), torch.tensor([[4], [5], [6], [7]]))
    assert str(ours.value).splitlines()[0] == str(theirs.value).splitlines()[0]
    assert "sample 0 is broken" in str(ours.value) and "Traceback" in str(ours.value)


# ---- 5. an exception is raised by the next() of its batch, with its type ------------------------------


@pytest.mark.parametrize("persistent", [False, True])
def test_exceptions_are_raised_at_their_batch_with_their_type_and_the_epoch_goes_on(ray_session, persistent):
    dataset = FailsAt(20, bad=(5, 13), error_type=IndexError)
    outcomes = []
    for cls in (torch_loader, DataLoader):
        loader = cls(dataset, batch_size=4, num_workers=2, persistent_workers=persistent)
        for _ in range(2):
            seen, it = [], iter(loader)
            while True:
                try:
                    seen.append(next(it).flatten().tolist())
                except StopIteration:
                    break
                except Exception as exc:
                    seen.append((type(exc).__name__, str(exc).splitlines()[0]))
            outcomes.append(seen)
        if cls is DataLoader:
            loader.close()
        else:
            stop_torch_workers(loader)
    theirs, ours = outcomes[:2], outcomes[2:]
    assert ours == theirs
    assert ours[0][1] == ("IndexError", "Caught IndexError in DataLoader worker process 1.")


def test_an_exception_in_worker_init_fn_is_the_first_batch_s_like_torch(ray_session):
    def init(worker_id):
        raise RuntimeError(f"init of {worker_id} failed")

    with DataLoader(Counting(8), batch_size=2, num_workers=2, worker_init_fn=init) as loader:
        with pytest.raises(RuntimeError, match="init of 0 failed"):
            list(loader)


def test_a_worker_killed_by_a_signal_raises_torch_s_runtime_error_with_its_pid_and_signal(ray_session):
    message = r"DataLoader worker \(pid \d+\) is killed by signal: Segmentation fault\. "
    with DataLoader(Crashes("segv"), batch_size=2, num_workers=2) as loader, \
            pytest.raises(RuntimeError, match=message) as caught:
        next(iter(loader))
    lost = caught.value.__cause__
    assert lost.signal == signal.SIGSEGV and lost.pid not in (None, os.getpid())
    assert f"(pid {lost.pid})" in str(caught.value)


def test_a_worker_killed_without_a_trace_raises_torch_s_exited_unexpectedly(ray_session):
    with DataLoader(Crashes("kill"), batch_size=2, num_workers=2) as loader, \
            pytest.raises(RuntimeError, match=r"DataLoader worker \(pid\(s\) \d+\) exited unexpectedly"):
        next(iter(loader))


# ---- iterable datasets and get_worker_info ----------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 3])
def test_an_iterable_dataset_sharded_with_get_worker_info_gives_torch_s_batches_in_torch_s_order(
        ray_session, batch_size):
    ours = assert_like_torch(ShardedStream(0, 17), epochs=2, batch_size=batch_size, num_workers=3, seed=4)
    assert len(ours[0]) == (17 if batch_size is None else 6)  # shares of 6, 6 and 5 samples


@pytest.mark.parametrize("drop_last", [False, True])
def test_workers_that_run_out_at_different_times_interleave_as_torch_s(ray_session, drop_last):
    assert_like_torch(UnevenStream([0, 4, 20, 9]), epochs=2, batch_size=3, num_workers=4, drop_last=drop_last,
                      persistent_workers=True)


def test_len_of_an_iterable_loader_is_torch_s_and_going_past_it_warns_like_torch(ray_session):
    for kwargs in (dict(batch_size=None), dict(batch_size=3), dict(batch_size=3, drop_last=True)):
        ours = DataLoader(UnevenStream([10, 10]), num_workers=2, **kwargs)
        assert len(ours) == len(torch.utils.data.DataLoader(UnevenStream([10, 10]), **kwargs))
    with DataLoader(UnevenStream([10, 10]), batch_size=4, num_workers=2) as loader:
        assert len(loader) == 5
        assert len(list(loader)) == 6  # each worker's last batch is partial: 3 + 3 batches
    with DataLoader(UnevenStream([3, 3], reported=4), batch_size=None, num_workers=2) as loader:
        assert len(loader) == 4  # before iter(), as in torch: the iterator compares against it
        it = iter(loader)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning up to the reported length
            assert [next(it) for _ in range(4)] == [0, 100, 1, 101]
        with pytest.warns(UserWarning, match=r"but 5 samples have been fetched\. For multiprocessing"):
            assert next(it) == 2


def test_get_worker_info_in_a_producer_is_a_worker_info_of_its_own_dataset_copy(ray_session):
    with DataLoader(WorkerInfoProbe(), batch_size=None, num_workers=2) as loader:
        infos = list(loader)
    assert [i["id"] for i in infos] == [0, 1] * 4
    assert all(i["num_workers"] == 2 and i["seed_matches"] and i["own_dataset"] for i in infos)
    # Batch 0 is the layout probe's (a Ray task playing worker 0, served while the producers start);
    # the rest come from the two producers. None is made in the training process.
    assert len({i["pid"] for i in infos[1:]}) == 2 and os.getpid() not in {i["pid"] for i in infos}
    assert torch.utils.data.get_worker_info() is None


def test_an_iterdatapipe_is_shuffled_and_sharded_as_torch_does_it(ray_session):
    from torch.utils.data.datapipes.iter import IterableWrapper

    pipe = IterableWrapper(range(40)).shuffle(buffer_size=8).sharding_filter()
    for persistent in (False, True):
        ours = assert_like_torch(pipe, epochs=2, batch_size=4, shuffle=True, num_workers=2, seed=5,
                                 persistent_workers=persistent)
        assert sorted(int(i) for b in ours[0] for i in b) == list(range(40))


# ---- batch_size=None, arguments ------------------------------------------------------------------


def test_batch_size_none_gives_samples_converted_as_torch_converts_them(ray_session):
    ours = assert_like_torch(Nested(), batch_size=None, num_workers=2, shuffle=True, seed=2)
    weight = ours[0][0]["point"].meta.weight  # default_convert makes numpy scalars 0-d tensors, keeps str
    assert isinstance(ours[0][0]["tags"][0], str) and weight.dtype == torch.float32 and weight.dim() == 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(batch_size=None, drop_last=True), "batch_size=None option disables auto-batching and is mutually "
                                            "exclusive with drop_last"),
    (dict(batch_sampler=[[0]], batch_size=2), "batch_sampler option is mutually exclusive with batch_size"),
    (dict(batch_sampler=[[0]], shuffle=True), "batch_sampler option is mutually exclusive"),
    (dict(sampler=[0], shuffle=True), "sampler option is mutually exclusive with shuffle"),
    (dict(timeout=-1), "timeout option should be non-negative"),
    (dict(num_workers=0, prefetch_factor=2), "prefetch_factor option could only be specified in multiprocessing"),
    (dict(num_workers=0, multiprocessing_context="spawn"), r"multi-process loading \(num_workers > 0\)"),
])
def test_invalid_argument_combinations_raise_torch_s_errors(kwargs, needle):
    with pytest.raises(ValueError) as theirs:
        torch.utils.data.DataLoader(Counting(4), **kwargs)
    with pytest.raises(ValueError, match=needle) as ours:
        DataLoader(Counting(4), **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_iterable_datasets_refuse_samplers_with_torch_s_errors():
    for kwargs in (dict(shuffle=True), dict(sampler=[0]), dict(batch_sampler=[[0]])):
        with pytest.raises(ValueError) as theirs:
            torch.utils.data.DataLoader(UnevenStream([1]), **kwargs)
        with pytest.raises(ValueError) as ours:
            DataLoader(UnevenStream([1]), **kwargs)
        assert str(ours.value) == str(theirs.value)


def test_assigning_loader_settings_after_construction_raises_like_torch():
    loader = DataLoader(Counting(4), batch_size=2)
    for attr in ("batch_size", "sampler", "batch_sampler", "drop_last", "dataset", "persistent_workers"):
        with pytest.raises(ValueError, match=f"{attr} attribute should not be set"):
            setattr(loader, attr, None)
    loader.num_workers = 1  # torch allows this one
    assert loader.num_workers == 1


def test_the_loader_is_subscriptable_and_is_a_torch_dataloader():
    alias = DataLoader[typing.List[torch.Tensor]]
    assert typing.get_origin(alias) is DataLoader
    assert isinstance(DataLoader(Counting(3)), torch.utils.data.DataLoader)


def test_more_workers_than_cpus_warns_like_torch():
    with pytest.warns(UserWarning, match="excessive worker creation might get DataLoader running slow"):
        DataLoader(Counting(4), num_workers=(os.cpu_count() or 1) * 50)


# ---- nested samples ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_nested_samples_strings_numpy_scalars_and_zero_size_dims_collate_as_default_collate(
        ray_session, num_workers):
    ours = assert_like_torch(Nested(), batch_size=4, num_workers=num_workers)
    first = ours[0][0]
    assert isinstance(first["point"], Point) and isinstance(first["point"].meta, Meta)
    assert first["tags"][0] == ("t0", "t1", "t2", "t3") and first["bytes"] == [b"raw"] * 4
    assert first["empty"].shape == (4, 0, 3) and first["point"].meta.weight.dtype == torch.float32


def test_a_collate_fn_returning_any_object_reaches_the_loop_as_that_object(ray_session):
    with DataLoader(Pairs(), batch_size=4, num_workers=2, collate_fn=custom_collate) as loader:
        batches = list(loader)
    assert [type(b) for b in batches] == [CustomBatch] * 3
    assert batches[2].names == ["n8"] and torch.equal(batches[0].x[:, 0], torch.arange(4.0))


def test_batches_larger_than_the_slot_still_arrive_intact(ray_session):
    ours = assert_like_torch(Sized(), batch_size=3, num_workers=2, collate_fn=pad_collate, epochs=2)
    assert ours[0][-1].shape == (3, 11001)
    with DataLoader(Sized(), batch_size=3, num_workers=2, collate_fn=pad_collate) as loader:
        list(loader)
        assert loader.stats()["stashed_batches"] > 0  # the first batch sized the slots; later ones outgrew them


# ---- timeout ---------------------------------------------------------------------------------------


def test_a_batch_slower_than_timeout_raises_torch_s_runtime_error(ray_session):
    with DataLoader(Sleepy(600), batch_size=2, num_workers=2, timeout=1) as loader:
        it = iter(loader)
        with pytest.raises(RuntimeError, match=r"DataLoader timed out after 1 seconds"):
            next(it)
    # torch's test_timeout: the first sample takes 3 s, longer than timeout, but not for ever
    with DataLoader(Sleepy(3), batch_size=2, num_workers=2, timeout=1) as loader:
        it = iter(loader)
        with pytest.raises(RuntimeError, match=r"DataLoader timed out after 1 seconds"):
            next(it)
    with DataLoader(Sleepy(0.2), batch_size=2, num_workers=2, timeout=60) as loader:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


# ---- num_workers=0 ---------------------------------------------------------------------------------


def test_no_workers_loads_in_this_process_without_pickling_or_ray():
    dataset = Unpicklable()
    with pytest.raises(TypeError):
        pickle.dumps(dataset)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, seed=0)
    ours = list(loader)
    theirs = list(torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                              generator=torch.Generator().manual_seed(0)))
    assert_same(ours, theirs)
    assert set(dataset.pids) == {os.getpid()} and loader.feed is None


def test_an_unpicklable_dataset_with_workers_says_why_it_must_pickle(ray_session):
    with DataLoader(Unpicklable(), batch_size=2, num_workers=1) as loader:
        with pytest.raises(TypeError, match="lock") as info:
            iter(loader)
    assert any("pickling them" in note for note in getattr(info.value, "__notes__", []))


# ---- iterators, epochs and the dataset's state -------------------------------------------------------


def test_two_live_iterators_of_one_loader_each_give_the_whole_epoch(ray_session):
    with DataLoader(Counting(10), batch_size=3, num_workers=2) as loader:
        a, b = iter(loader), iter(loader)
        first_a, first_b = next(a), next(b)
        rest_a, rest_b = list(a), list(b)
    expected = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [t.tolist() for t in [first_a, *rest_a]] == expected == [t.tolist() for t in [first_b, *rest_b]]


def test_fresh_workers_see_the_dataset_as_it_is_at_iter_and_persistent_ones_keep_their_copy(ray_session):
    for persistent in (False, True):
        dataset = EpochAware()
        seen: dict = {}
        for cls in (torch_loader, DataLoader):
            loader = cls(dataset, batch_size=2, num_workers=2, persistent_workers=persistent)
            seen[cls] = []
            for value in (1, 2, 3):
                dataset.value = value
                seen[cls].append([int(i) for b in loader for i in b])
            if cls is DataLoader:
                loader.close()
            else:
                stop_torch_workers(loader)
        assert seen[DataLoader] == seen[torch_loader], f"persistent_workers={persistent}"


def test_an_epoch_left_early_does_not_disturb_the_next(ray_session):
    with DataLoader(Counting(40), batch_size=4, num_workers=2, persistent_workers=True) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
        assert [int(t[0]) for t in loader] == list(range(0, 40, 4))
        it = iter(loader)
        next(it)
        assert [int(t[0]) for t in iter(loader)] == list(range(0, 40, 4))


def test_closing_the_loader_stops_its_producers_and_a_closed_loader_refuses_iter(ray_session):
    loader = DataLoader(Counting(8), batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    feed = loader.feed
    loader.close()
    with pytest.raises(RingClosed):
        feed.ring  # noqa: B018 (the property refuses a closed feed)
    with pytest.raises(RingClosed):
        list(it)
    with pytest.raises(ValueError, match="closed"):
        iter(loader)
