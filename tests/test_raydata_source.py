"""Ray Data as a source: ``Feed.from_ray_dataset`` delivers the dataset's contents, in order when ordered."""

from __future__ import annotations

import numpy as np
import pytest

import pyshmfeed as sf

pytest.importorskip("ray.data")

ROWS, BATCH = 50, 8  # 6 full batches and a last one of 2 rows


def dataset():
    import ray.data

    def columns(batch):
        ids = batch["id"].astype(np.int64)
        return {"image": np.stack([np.full((2, 3), i, dtype=np.float32) + np.arange(3, dtype=np.float32)
                                   for i in ids]),
                "label": ids * 7, "extra": ids}
    return ray.data.range(ROWS).map_batches(columns)


SPEC = sf.BatchSpec(image=((BATCH, 2, 3), "float32"), label=((BATCH,), "int64"))


def expected_rows():
    ids = np.arange(ROWS)
    image = np.stack([np.full((2, 3), i, dtype=np.float32) + np.arange(3, dtype=np.float32) for i in ids])
    return image, ids * 7


def collect(feed, epoch):
    batches = [b.copy() for b in feed.epoch(epoch)]
    images = np.concatenate([b["image"] for b in batches])
    return batches, images, np.concatenate([b["label"] for b in batches])


def test_an_ordered_dataset_arrives_batch_by_batch_in_order_with_its_contents(ray_session):
    image, label = expected_rows()
    with sf.Feed.from_ray_dataset(dataset(), SPEC) as feed:
        for epoch in range(2):  # each epoch reads the dataset again
            batches, got_image, got_label = collect(feed, epoch)
            assert [b["label"].shape[0] for b in batches] == [8, 8, 8, 8, 8, 8, 2]  # a partial last batch
            assert np.array_equal(got_image, image)
            assert np.array_equal(got_label, label)
            assert [b.index for b in batches] == list(range(7))
        assert feed.stats()["source"] == "shards"


def test_an_unordered_dataset_split_across_producers_delivers_every_row_once(ray_session):
    image, label = expected_rows()
    with sf.Feed.from_ray_dataset(dataset(), SPEC, ordered=False, workers=2) as feed:
        _, got_image, got_label = collect(feed, 0)
    order = np.argsort(got_label)
    assert np.array_equal(got_label[order], label)
    assert np.array_equal(got_image[order], image)  # each row's arrays stay together


def test_columns_map_spec_arrays_to_dataset_columns_and_drop_last_drops_the_partial_batch(ray_session):
    spec = sf.BatchSpec([((BATCH,), "int64"), ((BATCH,), "int64")])  # positional: batches are tuples
    with sf.Feed.from_ray_dataset(dataset(), spec, columns=["extra", "label"], drop_last=True) as feed:
        batches = [b.copy() for b in feed.epoch(0)]
    assert len(batches) == ROWS // BATCH
    ids, labels = (np.concatenate([b[k] for b in batches]) for k in (0, 1))
    assert np.array_equal(ids, np.arange(48)) and np.array_equal(labels, ids * 7)


def test_a_dataset_that_does_not_match_the_spec_is_refused_before_producers_start(ray_session):
    wrong_dtype = sf.BatchSpec(image=((BATCH, 2, 3), "float64"), label=((BATCH,), "int64"))
    with pytest.raises(sf.SpecMismatch, match="image.*float32.*float64"):
        sf.Feed.from_ray_dataset(dataset(), wrong_dtype)
    wrong_shape = sf.BatchSpec(image=((BATCH, 3, 2), "float32"), label=((BATCH,), "int64"))
    with pytest.raises(sf.SpecMismatch, match="larger than the spec"):
        sf.Feed.from_ray_dataset(dataset(), wrong_shape)
    missing = sf.BatchSpec(pixels=((BATCH, 2, 3), "float32"))
    with pytest.raises(sf.SpecMismatch, match="pixels"):
        sf.Feed.from_ray_dataset(dataset(), missing)
    with pytest.raises(sf.SpecMismatch, match="batch_size=16"):
        sf.Feed.from_ray_dataset(dataset(), SPEC, batch_size=16)


def test_without_validation_a_mismatch_surfaces_from_the_producer(ray_session):
    wrong_dtype = sf.BatchSpec(image=((BATCH, 2, 3), "float64"), label=((BATCH,), "int64"))
    with sf.Feed.from_ray_dataset(dataset(), wrong_dtype, validate=False) as feed:
        with pytest.raises(sf.ProducerError, match="SpecMismatch"):
            list(feed.epoch(0))


def test_ordered_reading_with_several_producers_is_refused(ray_session):
    with pytest.raises(sf.InvalidArgument, match="ordered"):
        sf.Feed.from_ray_dataset(dataset(), SPEC, workers=2)
