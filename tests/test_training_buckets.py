"""sd_lora.training.buckets: the bucket and crop each image trains at, and a batch order a resumed run can rejoin."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sd_lora.training.buckets import (
    BucketSampler,
    assign_buckets,
    bucket_counts,
    make_buckets,
    nearest_bucket,
    pixels,
)
from sd_lora.training.data import scan_images

PROMPT = "an image in the style of mozart"


@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (256, 64), (64, 8), (128, 8)])
def test_buckets_respect_area_step_and_hold_the_square(resolution, step):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert all(w * h <= resolution**2 and w % step == 0 and h % step == 0 for w, h in buckets)
    assert set(buckets) == {(h, w) for w, h in buckets}
    assert nearest_bucket((1000, 1000), buckets) == (resolution, resolution)


def test_images_land_in_the_bucket_of_their_aspect_ratio_resized_and_center_cropped(tmp_path):
    wide = Image.new("RGB", (500, 200), (255, 0, 0))  # 2.5:1 -> the 96x40 bucket (2.4:1), 10 px cut each side
    wide.paste((0, 255, 0), (0, 0, 8, 200))  # so a green strip at the left edge is cropped away
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (60, 132), (0, 0, 255)).save(tmp_path / "tall.png")
    records = assign_buckets(scan_images(tmp_path, caption=PROMPT, warn=None), 64)
    by_name = {r.path.name: r for r in records}
    assert by_name["wide.png"].bucket == (96, 40) and by_name["tall.png"].bucket == (40, 88)
    assert nearest_bucket((400, 200), make_buckets(512)) == (704, 320)  # 2.2:1, the closest to 2:1
    crop = pixels(by_name["wide.png"])
    assert crop.shape == (3, 40, 96) and crop.dtype == torch.float32
    assert crop.min() >= -1 and crop.max() <= 1
    assert torch.allclose(crop[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None])  # red, no green strip
    assert torch.equal(pixels(by_name["wide.png"], flip=True), crop.flip(-1))
    assert bucket_counts(records) == {(40, 88): 1, (96, 40): 1}


def test_sampler_batches_come_from_one_bucket_and_are_reproducible():
    buckets = [(64, 64)] * 5 + [(88, 40)] * 3 + [(40, 88)]
    sampler = BucketSampler(buckets, batch_size=2, seed=7)
    assert len(sampler) == 3 + 2 + 1
    epoch = sampler.epoch(0)
    assert sorted(i for batch in epoch for i, _ in batch) == list(range(9))
    assert all(len({buckets[i] for i, _ in batch}) == 1 for batch in epoch)
    assert epoch == BucketSampler(buckets, batch_size=2, seed=7).epoch(0)
    assert epoch != sampler.epoch(1) and epoch != BucketSampler(buckets, batch_size=2, seed=8).epoch(0)
    flips = [f for e in range(4) for batch in sampler.epoch(e) for _, f in batch]
    assert 0 < sum(flips) < len(flips)
    assert not any(f for batch in BucketSampler(buckets, 2, flip=False).epoch(0) for _, f in batch)

    stream = sampler.iterate()
    first = [next(stream) for _ in range(20)]
    resumed = sampler.iterate(start=13)
    assert [next(resumed) for _ in range(7)] == first[13:]
    shards = [BucketSampler(buckets, 2, seed=7, rank=r, world_size=2).iterate() for r in range(2)]
    interleaved = [next(shards[k % 2]) for k in range(20)]
    assert interleaved == first
    # a resume counts global batches: three processes go on after the 7 that two trained on, none twice
    shards = [BucketSampler(buckets, 2, seed=7, rank=r, world_size=3).iterate(start=7) for r in range(3)]
    assert [next(shards[k % 3]) for k in range(12)] == first[7:19]
