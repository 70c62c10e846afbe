"""The data shared by the examples: scikit-learn's digits as JPEG bytes, decoded and augmented on demand.

``load()`` encodes every image once, in the training process: 8x8 grayscale
digits upscaled to ``STORED x STORED`` and kept as JPEG bytes in memory, as a
real image dataset would be kept on disk. ``decode()`` turns one back into a
``(1, SIZE, SIZE)`` float32 array, with a random ``SIZE x SIZE`` crop and a
random horizontal flip when given a random generator (training), or the
centre crop (testing). The producers run ``decode``: this module is imported
there, so what they call lives here, at module level.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

STORED = 36   # pixels per side of the stored JPEG
SIZE = 32     # pixels per side of what the model sees (random crop of STORED)
CLASSES = 10


@dataclass(frozen=True)
class Digits:
    train_jpegs: list[bytes]
    train_labels: np.ndarray  # int64
    test_jpegs: list[bytes]
    test_labels: np.ndarray


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)  # digits are 0..16
    big = Image.fromarray(pixels, mode="L").resize((STORED, STORED), Image.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def load(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """The 1797 digits as JPEG bytes, split into train and test with a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_test = int(len(order) * test_fraction)
    jpegs = [_jpeg(digits.images[i]) for i in order]
    labels = digits.target[order].astype(np.int64)
    return Digits(jpegs[n_test:], labels[n_test:], jpegs[:n_test], labels[:n_test])


def decode(jpeg: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
    """One image as ``(1, SIZE, SIZE)`` float32 in [0, 1]: random crop + flip with ``rng``, centre crop without."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float32)
    if rng is None:
        top = left = (STORED - SIZE) // 2
        flip = False
    else:
        top, left = rng.integers(0, STORED - SIZE + 1, size=2)
        flip = bool(rng.integers(2))
    crop = pixels[top:top + SIZE, left:left + SIZE]
    if flip:
        crop = crop[:, ::-1]
    return (crop * (1.0 / 255.0))[None]


def decode_all(jpegs: list[bytes]) -> np.ndarray:
    """Every image, centre-cropped, as one ``(n, 1, SIZE, SIZE)`` array (the test set)."""
    return np.stack([decode(j) for j in jpegs])


def fill_batch(index: int, out, ctx, *, jpegs: list[bytes], labels: np.ndarray, batch_size: int) -> None:
    """A pyshmfeed ``fill`` source: batch ``index`` of the epoch, decoded and augmented into the slot.

    The samples are shuffled per epoch (the same permutation in every producer,
    from the seed and the epoch); each batch draws its crops and flips from
    ``ctx.rng(index)``, so a seed gives the same batches whichever producer
    makes them. The last batch may be partial: ``out.resize`` says how many rows.
    Bind the data with ``functools.partial(fill_batch, jpegs=..., labels=..., batch_size=...)``.
    """
    order = np.random.default_rng([ctx.seed, ctx.epoch]).permutation(len(jpegs))
    ids = order[index * batch_size:(index + 1) * batch_size]
    image_shape = out["x"].shape[1:]  # (1, SIZE, SIZE) for torch, (SIZE, SIZE, 1) for Keras: the same bytes
    x = out.resize("x", (len(ids), *image_shape))
    y = out.resize("y", (len(ids),))
    rng = ctx.rng(index)
    for row, i in enumerate(ids):
        x[row] = decode(jpegs[i], rng).reshape(image_shape)  # each image written into its row of the slot
        y[row] = labels[i]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def tiny(data: Digits, train: int, test: int) -> Digits:
    """The first ``train`` training and ``test`` test samples (the examples' ``--tiny`` runs)."""
    return Digits(data.train_jpegs[:train], data.train_labels[:train], data.test_jpegs[:test], data.test_labels[:test])


def start_ray() -> float:
    """Start a local Ray for the examples' feeds; returns the seconds it took.

    A ``Feed`` starts one itself when none is running, and stops it when it
    closes; started here, it is shared by every feed of the run, and its
    start-up is kept out of their first-batch times. Ray puts the script's
    directory on its workers' path, so producers import this module.
    """
    import os
    import time

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # what pyshmfeed sets for a Ray it starts itself
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="warning")
    return time.perf_counter() - t0


def stop_ray() -> None:
    import ray

    ray.shutdown()
