"""Train a Keras CNN with ``model.fit`` on JPEG digits from pyshmfeed's tf.data adapter, beside plain tf.data.

The data: scikit-learn's bundled digits, upscaled and kept in memory as JPEG
bytes (see digits_data.py); each training sample is decoded, randomly cropped
to 32x32 and randomly flipped. The same model (same initial weights) is
trained by ``model.fit`` over each of:

  (a) ``pyshmfeed.adapters.tfdata.dataset(feed)``: a ``tf.data.Dataset`` over a
      ``Feed`` whose producers (Ray actors) decode with Pillow straight into
      shared-memory slots; each iteration of the dataset is the feed's next
      epoch (one copy per batch, into the tensor);
  (b) ``tf.data.Dataset.from_tensor_slices(...).shuffle().map(decode).batch()``:
      TensorFlow's own JPEG decoder and random ops, ``num_parallel_calls=2``.

For each it prints the time to the first batch (from building the pipeline,
measured outside ``model.fit``), the mean time per epoch after the first (the
first includes Keras's tracing) and the test accuracy. Ray is started once,
and that time is printed on its own. The dataset is tiny: this shows how to
plug a feed into ``model.fit``, not which is faster (``pyshmfeed bench`` is the
comparison).

Run it (CPU only, well under a minute on 2 cores)::

    .venv/bin/python examples/keras_tfdata.py          # 3 epochs of the full data
    .venv/bin/python examples/keras_tfdata.py --tiny   # 1 epoch of 3 batches (the test runs this)
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: fewer start-up log lines

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import pyshmfeed as sf  # noqa: E402
from pyshmfeed.adapters.tfdata import dataset  # noqa: E402

import digits_data  # noqa: E402  (examples/digits_data.py: the producers import it too)

SEED = 0
BATCH = 64
WORKERS = 2
SIZE, STORED = digits_data.SIZE, digits_data.STORED
keras = tf.keras


def make_model():
    keras.utils.set_random_seed(SEED)  # the same initial weights for both pipelines
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(digits_data.CLASSES),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class EpochTimes(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t0)


def fit(train_ds, epochs: int, test: tuple[np.ndarray, np.ndarray]) -> dict:
    model = make_model()
    times = EpochTimes()
    model.fit(train_ds, epochs=epochs, callbacks=[times], shuffle=False, verbose=0)  # the pipeline shuffles
    _, accuracy = model.evaluate(*test, batch_size=256, verbose=0)
    return {"epoch_s": times.seconds, "accuracy": accuracy}


def run_pyshmfeed(data: digits_data.Digits, epochs: int, test) -> dict:
    """(a) A Feed whose producers decode into the slots, as a tf.data.Dataset for ``model.fit``."""
    spec = sf.BatchSpec(x=((BATCH, SIZE, SIZE, 1), "float32"), y=((BATCH,), "int64"))  # channels last
    fill = functools.partial(digits_data.fill_batch, jpegs=data.train_jpegs, labels=data.train_labels,
                             batch_size=BATCH)
    length = digits_data.batches_per_epoch(len(data.train_jpegs), BATCH)
    with sf.Feed(spec, fill=fill, length=length, workers=WORKERS, seed=SEED) as feed:
        # keys: elements are (x, y) tuples, as model.fit wants; each pass over ds is the feed's next epoch.
        result = fit(dataset(feed, keys=("x", "y"), prefetch=2), epochs, test)
        result["first_batch_s"] = feed.stats()["time_to_first_batch_s"]  # from Feed(...) to its first batch
    return result


def tf_decode(jpeg, label):
    """TensorFlow's version of digits_data.decode with augmentation: decode, random crop, random flip."""
    image = tf.io.decode_jpeg(jpeg, channels=1)
    image = tf.image.random_crop(image, (SIZE, SIZE, 1))
    image = tf.image.random_flip_left_right(image)
    return tf.cast(image, tf.float32) / 255.0, label


def run_tfdata(data: digits_data.Digits, epochs: int, test) -> dict:
    """(b) The plain tf.data pipeline: decode and augment in ``map``, on tf.data's threads."""
    def build():
        ds = tf.data.Dataset.from_tensor_slices((data.train_jpegs, data.train_labels))
        ds = ds.shuffle(len(data.train_jpegs), seed=SEED).map(tf_decode, num_parallel_calls=WORKERS)
        return ds.batch(BATCH).prefetch(2)

    t0 = time.perf_counter()
    next(iter(build()))  # the time to a first batch, on a pipeline of its own (fit builds its iterators)
    first = time.perf_counter() - t0
    result = fit(build(), epochs, test)
    result["first_batch_s"] = first
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="1 epoch of 3 batches: a smoke test")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    data = digits_data.load(seed=SEED)
    epochs = args.epochs
    if args.tiny:
        epochs = 1
        data = digits_data.tiny(data, train=3 * BATCH, test=BATCH)
    print(f"digits: {len(data.train_jpegs)} training JPEGs ({STORED}x{STORED}, random {SIZE}x{SIZE} crop + flip), "
          f"{len(data.test_jpegs)} test; batch {BATCH}, {epochs} epoch(s), {WORKERS} workers")
    # The test set: centre crops, decoded once here, channels last.
    test = digits_data.decode_all(data.test_jpegs).transpose(0, 2, 3, 1), data.test_labels

    ray_s = digits_data.start_ray()
    print(f"Ray started in {ray_s:.1f} s (once; not in the first-batch time)")
    try:
        results = {"a": run_pyshmfeed(data, epochs, test), "b": run_tfdata(data, epochs, test)}
    finally:
        digits_data.stop_ray()

    names = {"a": "pyshmfeed tfdata.dataset(feed)", "b": "tf.data from_tensor_slices.map"}
    print(f"{'':34} {'first batch':>11} {'s/epoch':>8} {'test acc':>8}")
    for key in "ab":
        r = results[key]
        later = r["epoch_s"][1:] or r["epoch_s"]
        print(f"({key}) {names[key]:<30} {r['first_batch_s']:>9.2f} s {np.mean(later):>6.2f} s "
              f"{100 * r['accuracy']:>7.1f}%")


if __name__ == "__main__":
    main()
