"""Aspect-ratio buckets: properties of the bucket list and of the assignment."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.data.factories import config
from trainer.data.buckets import assign_buckets, bucket_sizes, merge_small_buckets, nearest_bucket, training_sizes
from trainer.data.report import PrepReport
from trainer.data.sizes import fixed_training_size

resolutions = st.sampled_from([256, 384, 512, 576, 768, 1024])
image_sizes = st.tuples(st.integers(64, 6000), st.integers(64, 6000))


@settings(max_examples=60, deadline=None)
@given(resolutions)
def test_buckets_are_multiples_of_64_near_resolution_squared(resolution):
    buckets = bucket_sizes(resolution)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert height * width <= area
        assert height * width >= 0.75 * area, (height, width)
        assert 1 / 4.01 <= width / height <= 4.01
        assert (width, height) in buckets  # portrait and landscape alike


@settings(max_examples=200, deadline=None)
@given(resolutions, image_sizes)
def test_each_image_gets_the_bucket_nearest_its_aspect(resolution, size):
    buckets = bucket_sizes(resolution)
    chosen = nearest_bucket(size, buckets)
    distance = abs(math.log(chosen[1] / chosen[0]) - math.log(size[1] / size[0]))
    assert all(distance <= abs(math.log(b[1] / b[0]) - math.log(size[1] / size[0])) + 1e-9 for b in buckets)


@settings(max_examples=150, deadline=None)
@given(st.lists(image_sizes, min_size=1, max_size=30), st.integers(1, 8))
def test_merging_leaves_no_bucket_smaller_than_a_batch(sizes, batch):
    min_count = min(batch, len(sizes))
    assigned = assign_buckets(sizes, 512, min_count)
    counts = Counter(assigned)
    assert len(assigned) == len(sizes)
    assert len(counts) == 1 or min(counts.values()) >= min_count
    assert set(assigned) <= set(bucket_sizes(512))


def test_merge_moves_a_lonely_image_to_the_nearest_bucket():
    square, wide, wider = (512, 512), (448, 576), (384, 640)
    merged = merge_small_buckets([square] * 4 + [wide] * 3 + [wider], min_count=2)
    assert merged.count(wider) == 0 and merged.count(wide) == 4 and merged.count(square) == 4


def test_bucketing_config_and_fixed_sizes():
    report = PrepReport()
    sizes = [(1000, 1500), (1500, 1000), (800, 800)]
    bucketed = training_sizes(config("x", aspect_ratio_bucketing=True, resolution=512, train_batch_size=1), sizes,
                              report)
    assert bucketed[0][1] > bucketed[0][0] and bucketed[1][0] > bucketed[1][1] and bucketed[2] == (512, 512)
    fixed = training_sizes(config("x", train_img_size=[640, 384]), sizes, report)
    assert fixed == [(384, 640)] * 3
    assert training_sizes(config("x", aspect_ratio_bucketing=True, train_aspect_ratio=1.5), sizes, report) == [
        fixed_training_size(config("x", train_aspect_ratio=1.5))] * 3
    assert any("aspect_ratio_bucketing is off" in w for w in report.warnings)
