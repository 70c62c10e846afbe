"""The PyTorch front end: the DataLoader drop-in against torch's own, TorchBatches, lazy imports.

The issue-by-issue behaviour of the drop-in is pinned down in test_torch_loader.py.

The reference for every batch is ``torch.utils.data.DataLoader`` itself, run
in this process with the same arguments and an identically seeded
generator: same tensors, dtypes, structure and order, epoch after epoch.
Datasets live at module level so producer actors can import them.
"""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import Dataset, IterableDataset, SubsetRandomSampler  # noqa: E402

from pyshmfeed import BatchSpec, Feed  # noqa: E402
from pyshmfeed.adapters.torch import TorchBatches  # noqa: E402
from pyshmfeed.errors import InvalidArgument  # noqa: E402
from pyshmfeed.torch import DataLoader  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class Points(Dataset):
    """(tensor of shape (3, 2), int label): the common (x, y) sample."""

    def __init__(self, n: int = 37, bad_at: int | None = None) -> None:
        self.n = n
        self.bad_at = bad_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.bad_at:
            raise KeyError(f"sample {i} is missing")
        return torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * i, i


Pair = collections.namedtuple("Pair", "image label")


class Records(Dataset):
    """Dict samples of numpy arrays and Python floats; and namedtuple samples."""

    def __init__(self, n: int = 23, named: bool = False) -> None:
        self.n = n
        self.named = named

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = np.full((4,), i, dtype=np.uint8)
        if self.named:
            return Pair(image, np.float32(i / 2))
        return {"image": image, "weight": i / 3, "flag": i % 2 == 0}


class Ragged(Dataset):
    """Samples whose second dimension varies: stacking needs a padding collate_fn."""

    def __len__(self) -> int:
        return 19

    def __getitem__(self, i: int):
        return np.full((i % 4 + 1,), i, dtype=np.int32)


def pad_collate(samples):
    x = np.zeros((len(samples), 4), dtype=np.int32)
    for j, s in enumerate(samples):
        x[j, : len(s)] = s
    return torch.from_numpy(x), torch.tensor([len(s) for s in samples])


class Line(Dataset):
    """y = x @ w + b, for the training test."""

    W = torch.tensor([[1.0], [-2.0], [0.5], [3.0], [0.0]])

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 5, generator=g)
        self.y = self.x @ self.W + 0.25

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def assert_same(a, b) -> None:
    """Same structure, types, dtypes and values, recursively."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)


def compare_with_torch(dataset, epochs: int = 2, **kwargs) -> None:
    seed = kwargs.pop("seed", None)
    make_gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    sampler_of = kwargs.pop("sampler_of", None)
    ref_kwargs = dict(kwargs, generator=make_gen())
    if kwargs.get("num_workers", 0) > 0:
        # torch's workers from a forkserver: forking this process, a Ray driver, would hand the children
        # Ray's connections mid-flight (docs/adapters.md)
        ref_kwargs["multiprocessing_context"] = "forkserver"
    our_kwargs = dict(kwargs, generator=make_gen())
    if sampler_of is not None:
        ref_kwargs["sampler"] = sampler_of(ref_kwargs["generator"])
        our_kwargs["sampler"] = sampler_of(our_kwargs["generator"])
    reference = torch.utils.data.DataLoader(dataset, **ref_kwargs)
    with DataLoader(dataset, **our_kwargs) as ours:
        assert len(ours) == len(reference)
        for _ in range(epochs):
            theirs, mine = list(reference), list(ours)
            assert len(mine) == len(theirs)
            for t, m in zip(theirs, mine):
                assert_same(t, m)


# ---- the drop-in gives torch's batches -------------------------------------------------


@pytest.mark.parametrize("shuffle, persistent", [(False, False), (True, False), (True, True)])
def test_same_batches_in_the_same_order_as_torch(ray_session, shuffle, persistent):
    compare_with_torch(Points(), batch_size=8, shuffle=shuffle, num_workers=2, persistent_workers=persistent,
                       seed=3)


def test_same_batches_with_a_sampler_drop_last_and_dict_samples(ray_session):
    compare_with_torch(Records(), batch_size=5, drop_last=True, num_workers=1, seed=7,
                       sampler_of=lambda g: SubsetRandomSampler(list(range(0, 23, 2)), generator=g))


def test_same_batches_for_namedtuple_samples_without_workers(ray_session):
    compare_with_torch(Records(named=True), batch_size=6, shuffle=True, seed=1, epochs=1)


def test_a_custom_collate_fn_runs_in_the_producers(ray_session):
    compare_with_torch(Ragged(), batch_size=4, collate_fn=pad_collate, num_workers=2, epochs=1)


def test_zero_copy_batches_view_the_ring_and_default_batches_own_their_memory(ray_session):
    reference = list(torch.utils.data.DataLoader(Points(), batch_size=8))
    for zero_copy in (True, False):
        with DataLoader(Points(), batch_size=8, num_workers=2, zero_copy=zero_copy) as loader:
            for (x, y), (rx, ry) in zip(loader, reference):
                ring = loader.feed.ring
                start, end = ring.data_address, ring.data_address + ring.data_nbytes
                inside = [start <= t.data_ptr() < end for t in (x, y)]
                assert inside == [zero_copy, zero_copy]
                assert torch.equal(x, rx) and torch.equal(y, ry)
            assert loader.stats()["staging_host_copies"] == (0 if zero_copy else 1)


def test_a_small_model_trains_through_the_loader_on_cpu(ray_session):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    with DataLoader(Line(), batch_size=32, shuffle=True, num_workers=2, seed=0,
                    persistent_workers=True) as loader:
        x, y = next(iter(loader))  # the idiom: that iterator is dropped at once, its epoch abandoned
        assert x.shape == (32, 5) and torch.allclose(y, x @ Line.W + 0.25)  # owned: intact after the drop
        for _epoch in range(4):
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        assert loader.stats()["batches"] >= 4 * len(loader)
    assert len(losses) == 4 * 8
    assert np.mean(losses[-4:]) < 0.25 * np.mean(losses[:4])


# ---- errors ---------------------------------------------------------------------------------------


def test_a_failing_sample_raises_its_own_exception_type_at_its_batch_like_torch(ray_session):
    with DataLoader(Points(bad_at=13), batch_size=4, num_workers=1) as loader:
        it = iter(loader)
        delivered = [next(it) for _ in range(3)]
        with pytest.raises(KeyError, match="Caught KeyError in DataLoader worker process 0") as info:
            next(it)
        assert "sample 13 is missing" in str(info.value)
        rest = list(it)  # the epoch goes on after the failed batch, as torch's does
    assert [int(y[0]) for _, y in delivered + rest] == [0, 4, 8, 16, 20, 24, 28, 32, 36]


def test_samples_of_different_shapes_fail_as_torch_s_collate_fails(ray_session):
    with DataLoader(Ragged(), batch_size=4, num_workers=1) as loader:
        with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
            list(loader)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(sampler=[0, 1], shuffle=True), "sampler option is mutually exclusive with shuffle"),
    (dict(batch_size=None, drop_last=True), "batch_size=None option disables auto-batching"),
    (dict(num_workers=-1), "num_workers option should be non-negative"),
    (dict(persistent_workers=True), "persistent_workers option needs num_workers > 0"),
    (dict(seed=1, generator=torch.Generator()), "seed= or generator="),
])
def test_bad_arguments_are_refused_like_torch_refuses_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DataLoader(Points(), **kwargs)


def test_an_iterable_dataset_refuses_shuffle_like_torch():
    with pytest.raises(ValueError, match="expected unspecified shuffle option"):
        DataLoader(Stream(), shuffle=True)


# ---- TorchBatches over any feed ------------------------------------------------------------------

SPEC = BatchSpec(x=((4, 3), "float32"), y=((4,), "int64"))


def fill(index, out, ctx):
    out["x"][...] = index + ctx.epoch * 100
    out["y"][...] = np.arange(4) + index


def test_torch_batches_yield_cpu_tensors_epoch_after_epoch(ray_session):
    with Feed(SPEC, fill=fill, length=6, workers=1, slots=4, prefetch=1) as feed:
        batches = TorchBatches(feed)
        for epoch in range(2):
            got = [(float(b["x"][0, 0]), b["y"].tolist()) for b in batches]
            assert got == [(i + epoch * 100.0, [i, i + 1, i + 2, i + 3]) for i in range(6)]
        kept = list(TorchBatches(feed, copy=True, start_epoch=5))
        assert [float(b["x"][0, 0]) for b in kept] == [i + 500.0 for i in range(6)]
        assert all(isinstance(b["x"], torch.Tensor) for b in kept)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_a_cuda_device_without_cuda_is_refused_at_construction():
    with pytest.raises(InvalidArgument, match="CUDA is not available"):
        Feed(SPEC, fill=fill, length=6, device="cuda")


# ---- lazy imports ----------------------------------------------------------------------------------


def test_importing_pyshmfeed_imports_no_framework():
    code = ("import sys, pyshmfeed, pyshmfeed.stage, pyshmfeed.adapters, pyshmfeed.torch, "
            "pyshmfeed.adapters.tfdata, pyshmfeed.adapters.jax\n"
            "loaded = [m for m in ('torch', 'tensorflow', 'jax', 'keras') if m in sys.modules]\n"
            "print(loaded)\nsys.exit(1 if loaded else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"frameworks imported at import time: {result.stdout} {result.stderr}"
