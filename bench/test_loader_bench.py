"""The DataLoader drop-in against torch's own DataLoader, dropped in: same dataset, same arguments, same run.

Workload (the adapter benchmark's): a map-style dataset of float32 images,
32 x 64x64x3 per batch (1.5 MiB), ``num_workers=2``, every other argument at
its default - so pyshmfeed's batches are owned tensors (one copy out of the
slot), like torch's. Each round opens a new epoch on the same loader, takes
its first batch untimed (start-up is not the steady state) and times batches
2..N; the loop does nothing but check each batch, so the figure is what the
loader itself costs.

torch's rows run first, before anything starts Ray in this process: torch's
workers fork this process, and forking a Ray driver is unsafe. The last test
prints the ratio (pyshmfeed time / torch time, lower is faster) and stores
it in ``extra_info``.

Two more workloads, the issue's other speed targets, with default arguments
on both sides:

- *augmentation*: JPEG decode + random crop + random flip of small RGB
  images (Pillow; the JPEG bytes live in the dataset, as files would on
  disk), batch 64, ``num_workers=2``; timed like the above (batches 2..N).
- *first batch*: a new loader, ``iter`` and its first batch, with Ray already
  running. Each round is a fresh loader; closing it is not timed.

Run: ``.venv/bin/pytest bench/test_loader_bench.py`` (``--benchmark-json``
keeps the figures). A benchmark, not a timed test: it asserts what it
received, never a time.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BATCH = (32, 64, 64, 3)
BATCHES = 96
WORKERS = 2
ROUNDS = 5
_FIGURES: dict[str, float] = {}


class Images:
    """A map-style dataset of float32 images and int64 labels, the usual input of a DataLoader."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.full(BATCH[1:], i % 251, np.float32), np.int64(i)


JPEG_SIDE, CROP = 72, 64          # stored image side, crop side (RGB)
AUG_BATCH, AUG_BATCHES, AUG_IMAGES = 64, 48, 512
FIRST_ROUNDS = 5


def _jpegs(n: int) -> list[bytes]:
    """``n`` distinct RGB images (gradients + noise) as JPEG bytes, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:JPEG_SIDE, 0:JPEG_SIDE]
    out = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class JpegImages:
    """JPEG bytes in memory; a sample is decoded, randomly cropped to CROP x CROP, randomly flipped (torch's RNG,
    as torchvision's transforms draw), and returned as a float32 CHW tensor in [0, 1] with its label."""

    def __init__(self, jpegs: list[bytes], epoch_len: int) -> None:
        self.jpegs = jpegs
        self.epoch_len = epoch_len

    def __len__(self) -> int:
        return self.epoch_len

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.open(io.BytesIO(self.jpegs[i % len(self.jpegs)])).convert("RGB")
        top, left = (int(v) for v in torch.randint(0, JPEG_SIDE - CROP + 1, (2,)))
        image = image.crop((left, top, left + CROP, top + CROP))
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        return x, i % 10


@pytest.fixture(scope="module")
def ray_for_loader_bench():
    """A local Ray whose workers can import this module (the dataset class lives here); shut down after."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        here = os.path.dirname(os.path.abspath(__file__))
        pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    if started:
        ray.shutdown()


def _loader(impl: str):
    dataset = Images(BATCHES * BATCH[0])
    if impl == "torch":
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH[0], num_workers=WORKERS)
    from pyshmfeed.torch import DataLoader

    options = {"zero_copy": True} if impl == "pyshmfeed zero_copy" else {}
    return DataLoader(dataset, batch_size=BATCH[0], num_workers=WORKERS, **options)


def _pedantic_then_close(benchmark, rest, setup, loader) -> None:
    """ROUNDS timed rounds of ``rest`` (after an untimed ``setup``), then close the loader if it can be."""
    try:
        benchmark.pedantic(rest, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()


def _check(i: int, batch) -> bool:
    x, y = batch
    return (x.shape == BATCH and int(y[0]) == i * BATCH[0] and float(x[-1, 0, 0, 0]) == float(y[-1] % 251)
            and x.dtype == torch.float32 and y.dtype == torch.int64)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", ["torch", "pyshmfeed", "pyshmfeed zero_copy"])
def test_loader_batches_2_to_n(benchmark, request, impl):
    """Batches 2..N of an epoch, owned tensors (default) on both sides; zero_copy as an extra row."""
    if impl != "torch":
        request.getfixturevalue("ray_for_loader_bench")  # only now: torch's rows fork before Ray exists
    loader = _loader(impl)
    state: dict = {}
    ok: list[bool] = []

    def setup():
        state["it"] = it = iter(loader)
        ok.append(_check(0, next(it)))  # start-up and the first batch: not timed

    def rest():
        it = state.pop("it")
        for i, batch in enumerate(it, start=1):
            ok.append(_check(i, batch))
            del batch

    benchmark.group = f"DataLoader dropped in: batches 2-{BATCHES} of {BATCH} float32, num_workers={WORKERS}"
    benchmark.extra_info.update(batch_bytes=int(np.prod(BATCH)) * 4 + 8 * BATCH[0], impl=impl, cpus=os.cpu_count(),
                                load_average=os.getloadavg()[0])
    _pedantic_then_close(benchmark, rest, setup, loader)
    assert len(ok) == ROUNDS * BATCHES and all(ok)
    if benchmark.stats is not None:
        _FIGURES[impl] = benchmark.stats.stats.median
        benchmark.extra_info["batches_per_s"] = (BATCHES - 1) / benchmark.stats.stats.median


def test_ratio_to_torch(capsys):
    """pyshmfeed's median over torch's (same run): below 1.0 is faster than torch's loader."""
    if "torch" not in _FIGURES or "pyshmfeed" not in _FIGURES:
        pytest.skip("needs the timed rows above (not under --benchmark-disable)")
    with capsys.disabled():
        for impl in ("pyshmfeed", "pyshmfeed zero_copy"):
            if impl in _FIGURES:
                print(f"\n{impl}: {_FIGURES[impl] * 1e3:.1f} ms vs torch {_FIGURES['torch'] * 1e3:.1f} ms for "
                      f"batches 2-{BATCHES}: ratio {_FIGURES[impl] / _FIGURES['torch']:.2f} "
                      f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


def _aug_loader(impl: str):
    dataset = JpegImages(_jpegs(AUG_IMAGES), AUG_BATCHES * AUG_BATCH)
    if impl == "torch":
        return torch.utils.data.DataLoader(dataset, batch_size=AUG_BATCH, num_workers=WORKERS)
    from pyshmfeed.torch import DataLoader

    return DataLoader(dataset, batch_size=AUG_BATCH, num_workers=WORKERS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("impl", ["torch", "pyshmfeed"])
def test_augmentation_batches_2_to_n(benchmark, request, impl):
    """JPEG decode + random crop/flip, batch 64, defaults: batches 2..N of an epoch."""
    if impl != "torch":
        request.getfixturevalue("ray_for_loader_bench")
    loader = _aug_loader(impl)
    state: dict = {}
    ok: list[bool] = []

    def good(i: int, batch) -> bool:
        x, y = batch
        return x.shape == (AUG_BATCH, 3, CROP, CROP) and x.dtype == torch.float32 and \
            int(y[0]) == (i * AUG_BATCH) % 10 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0

    def setup():
        state["it"] = it = iter(loader)
        ok.append(good(0, next(it)))

    def rest():
        it = state.pop("it")
        for i, batch in enumerate(it, start=1):
            ok.append(good(i, batch))
            del batch

    benchmark.group = f"DataLoader dropped in: JPEG decode + random crop/flip, batch {AUG_BATCH}, " \
                      f"num_workers={WORKERS}, batches 2-{AUG_BATCHES}"
    benchmark.extra_info.update(impl=impl, cpus=os.cpu_count(), load_average=os.getloadavg()[0])
    _pedantic_then_close(benchmark, rest, setup, loader)
    assert len(ok) == ROUNDS * AUG_BATCHES and all(ok)
    if benchmark.stats is not None:
        _FIGURES[f"augmentation {impl}"] = benchmark.stats.stats.median


@pytest.mark.timeout(900)
@pytest.mark.parametrize("impl", ["torch", "pyshmfeed"])
def test_time_to_first_batch(benchmark, request, impl):
    """A new loader (the augmentation workload), iter() and its first batch; Ray already running for ours."""
    if impl != "torch":
        request.getfixturevalue("ray_for_loader_bench")
    dataset = JpegImages(_jpegs(AUG_IMAGES), AUG_BATCHES * AUG_BATCH)
    made: list = []

    def first():
        if impl == "torch":
            loader = torch.utils.data.DataLoader(dataset, batch_size=AUG_BATCH, num_workers=WORKERS)
        else:
            from pyshmfeed.torch import DataLoader

            loader = DataLoader(dataset, batch_size=AUG_BATCH, num_workers=WORKERS)
        it = iter(loader)
        made.append((loader, it, next(it)))

    def close_previous():
        while made:
            loader, it, _ = made.pop()
            del it
            close = getattr(loader, "close", None)
            if close is not None:
                close()

    benchmark.group = f"DataLoader dropped in: time to the first batch (new loader, batch {AUG_BATCH}, " \
                      f"num_workers={WORKERS})"
    benchmark.extra_info.update(impl=impl, cpus=os.cpu_count(), load_average=os.getloadavg()[0])
    try:
        benchmark.pedantic(first, setup=close_previous, rounds=FIRST_ROUNDS, iterations=1)
        assert made and made[-1][2][0].shape == (AUG_BATCH, 3, CROP, CROP)
    finally:
        close_previous()
    if benchmark.stats is not None:
        _FIGURES[f"first batch {impl}"] = benchmark.stats.stats.median


def test_augmentation_and_first_batch_figures(capsys):
    """The augmentation ratio (pyshmfeed / torch, below 1.0 is faster) and the first-batch difference."""
    if "augmentation torch" not in _FIGURES or "augmentation pyshmfeed" not in _FIGURES:
        pytest.skip("needs the timed rows above (not under --benchmark-disable)")
    with capsys.disabled():
        a, b = _FIGURES["augmentation pyshmfeed"], _FIGURES["augmentation torch"]
        print(f"\naugmentation: pyshmfeed {a * 1e3:.1f} ms vs torch {b * 1e3:.1f} ms for batches 2-{AUG_BATCHES}: "
              f"ratio {a / b:.2f} (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
        if "first batch torch" in _FIGURES and "first batch pyshmfeed" in _FIGURES:
            f, g = _FIGURES["first batch pyshmfeed"], _FIGURES["first batch torch"]
            print(f"first batch: pyshmfeed {f:.3f} s vs torch {g:.3f} s (medians of {FIRST_ROUNDS}): "
                  f"{f - g:+.3f} s (target: at most +0.3 s)")
