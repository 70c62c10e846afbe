"""Train a small PyTorch CNN on JPEG digits, fed three ways, and compare them side by side.

The data: scikit-learn's bundled digits (1797 8x8 images), upscaled and kept
in memory as JPEG bytes (see digits_data.py). Every training sample is
decoded with Pillow, randomly cropped to 32x32 and randomly flipped, *in the
producer processes*, never in the training loop. The same model (same
initial weights) is trained with each of:

  (a) pyshmfeed's native API: ``Feed(spec, fill=...)``; the fill function
      decodes a batch's samples straight into the slot's arrays in shared
      memory, and the loop reads them as tensors without a copy;
  (b) ``pyshmfeed.torch.DataLoader``: the drop-in for torch's, over the same
      map-style ``Dataset``, its producers being Ray actors;
  (c) ``torch.utils.data.DataLoader(num_workers=2)``, the baseline.

For each it prints the time to the first batch (from building the loader),
the mean time per epoch after the first (the first includes start-up) and
the test accuracy. Ray is started once, before (a) and (b), and that time is
printed on its own. The dataset is tiny, so the model's work dominates and the
three should be close: this shows how to use each, not which is faster
(``pyshmfeed bench`` is the comparison).

Run it (CPU only, well under a minute on 2 cores)::

    .venv/bin/python examples/torch_digits.py          # 3 epochs of the full data
    .venv/bin/python examples/torch_digits.py --tiny   # 1 epoch of 3 batches (the test runs this)
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np
import torch
from torch import nn

import pyshmfeed as sf
from pyshmfeed.adapters.torch import TorchBatches
from pyshmfeed.torch import DataLoader as ShmDataLoader

import digits_data  # examples/digits_data.py: the producers import it too (Ray puts this directory on their path)

SEED = 0
BATCH = 64
WORKERS = 2


class JpegDigits(torch.utils.data.Dataset):
    """Map-style dataset: sample ``i`` decoded and augmented in ``__getitem__`` (in the loader's workers).

    The crop and flip come from torch's random generator, which both loaders
    seed in each worker (numpy's global one would repeat across workers).
    """

    def __init__(self, jpegs: list[bytes], labels: np.ndarray) -> None:
        self.jpegs = jpegs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        return digits_data.decode(self.jpegs[i], rng), self.labels[i]


def make_model() -> nn.Module:
    torch.manual_seed(SEED)  # the same initial weights for every loader
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 8
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, digits_data.CLASSES),
    )


def train(make_loader, epochs_of, epochs: int, test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Train a fresh model; ``make_loader()`` builds the loader, ``epochs_of(loader, e)`` iterates epoch ``e``.

    Returns the time to the first batch (from building the loader), each
    epoch's time and the test accuracy.
    """
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    loader = make_loader()
    first = None
    epoch_s = []
    try:
        for e in range(epochs):
            t0 = time.perf_counter()
            model.train()
            for x, y in epochs_of(loader, e):
                if first is None:
                    first = time.perf_counter() - start
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            epoch_s.append(time.perf_counter() - t0)
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    return {"first_batch_s": first, "epoch_s": epoch_s, "accuracy": accuracy}


def run_native(data: digits_data.Digits, epochs: int, test) -> dict:
    """(a) ``Feed(fill=...)``: producers decode into the slots; ``TorchBatches`` views them as tensors (no copy)."""
    spec = sf.BatchSpec(x=((BATCH, 1, digits_data.SIZE, digits_data.SIZE), "float32"), y=((BATCH,), "int64"))
    fill = functools.partial(digits_data.fill_batch, jpegs=data.train_jpegs, labels=data.train_labels,
                             batch_size=BATCH)
    length = digits_data.batches_per_epoch(len(data.train_jpegs), BATCH)

    def make_loader():
        return sf.Feed(spec, fill=fill, length=length, workers=WORKERS, seed=SEED)

    def epochs_of(feed, e):
        # Tensors viewing the slot: valid until the next batch, which is all a training step needs.
        for batch in TorchBatches(feed).epoch(e):
            yield batch["x"], batch["y"]

    return train(make_loader, epochs_of, epochs, test)


def run_loader(loader_class, data: digits_data.Digits, epochs: int, test, **options) -> dict:
    """(b) and (c): a DataLoader over ``JpegDigits``, shuffled with a seeded generator."""
    dataset = JpegDigits(data.train_jpegs, data.train_labels)

    def make_loader():
        generator = torch.Generator().manual_seed(SEED)
        return loader_class(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, generator=generator,
                            **options)

    def epochs_of(loader, e):
        return iter(loader)

    return train(make_loader, epochs_of, epochs, test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="1 epoch of 3 batches: a smoke test")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    # Leave the producers their cores: a training process spinning on every core slows the loaders it waits for.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - WORKERS))
    data = digits_data.load(seed=SEED)
    epochs = args.epochs
    if args.tiny:
        epochs = 1
        data = digits_data.tiny(data, train=3 * BATCH, test=BATCH)
    print(f"digits: {len(data.train_jpegs)} training JPEGs ({digits_data.STORED}x{digits_data.STORED}, "
          f"random {digits_data.SIZE}x{digits_data.SIZE} crop + flip), {len(data.test_jpegs)} test; "
          f"batch {BATCH}, {epochs} epoch(s), {WORKERS} workers, torch threads {torch.get_num_threads()}")

    # The test set: centre crops, decoded once here.
    test = torch.from_numpy(digits_data.decode_all(data.test_jpegs)), torch.from_numpy(data.test_labels)
    results = {}
    # torch's loader first: it forks its workers, which is best done before this process starts Ray's threads.
    results["c"] = run_loader(torch.utils.data.DataLoader, data, epochs, test)
    ray_s = digits_data.start_ray()
    print(f"Ray started in {ray_s:.1f} s (once, for (a) and (b); not in their first-batch times)")
    try:
        results["a"] = run_native(data, epochs, test)
        results["b"] = run_loader(ShmDataLoader, data, epochs, test)
    finally:
        digits_data.stop_ray()

    names = {"a": "pyshmfeed.Feed(fill=...)", "b": "pyshmfeed.torch.DataLoader", "c": "torch DataLoader"}
    print(f"{'':34} {'first batch':>11} {'s/epoch':>8} {'test acc':>8}")
    for key in "abc":
        r = results[key]
        later = r["epoch_s"][1:] or r["epoch_s"]
        print(f"({key}) {names[key]:<30} {r['first_batch_s']:>9.2f} s {np.mean(later):>6.2f} s "
              f"{100 * r['accuracy']:>7.1f}%")


if __name__ == "__main__":
    main()
