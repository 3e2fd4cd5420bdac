"""Aspect-ratio buckets and batch order: every image goes to the (width, height) bucket closest to its aspect ratio,
is resized and center-cropped to it, and BucketSampler hands out batches that each come from one bucket, in an order
that is a pure function of (seed, epoch), so a resumed run goes on with the very next batch.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageOps

from sd_lora.training.data import ImageRecord, load_image

Key = tuple[int, bool]  # (record index, flipped): one training example


# ---------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def bucket_step(resolution: int) -> int:
    """Bucket sides are multiples of 64, as for SD1.5-size training; below 256 px (small models such as the tiny
    one, 64 px) a 64-px step would leave a single bucket, so use the latent grid's 8."""
    return 64 if resolution >= 256 else 8


def make_buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets with area <= resolution², sides multiples of bucket_step, and each side between
    half and twice the resolution (so at most 4:1 for SD1.5 at 512). Sorted by aspect ratio, square included when
    the resolution is a multiple of the step."""
    step = bucket_step(resolution)
    low = max(step, (resolution // 2) // step * step)
    high = resolution * 2 // step * step
    buckets = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are equally far from
    square); ties go to the larger bucket."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def assign_buckets(records: Sequence[ImageRecord], resolution: int) -> list[ImageRecord]:
    buckets = make_buckets(resolution)
    return [replace(r, bucket=nearest_bucket(r.size, buckets)) for r in records]


def bucket_counts(records: Sequence[ImageRecord]) -> dict[tuple[int, int], int]:
    """{bucket: number of images}, for the start-of-run summary."""
    return dict(sorted(Counter(r.bucket for r in records).items()))


def bucket_info(records: Sequence[ImageRecord]) -> dict:
    """kohya's ss_bucket_info, which A1111 shows as the adapter's "Resolutions": {"buckets": {"0": {"resolution":
    [width, height], "count": n}, ...}, "mean_img_ar_error": mean |bucket aspect ratio - image aspect ratio|}."""
    buckets = {str(i): {"resolution": list(bucket), "count": n}
               for i, (bucket, n) in enumerate(bucket_counts(records).items())}
    errors = [abs(r.bucket[0] / r.bucket[1] - r.size[0] / r.size[1]) for r in records]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize so the image covers the bucket, then center-crop to it."""
    return ImageOps.fit(image, bucket, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def pixels(record: ImageRecord, flip: bool = False) -> torch.Tensor:
    """The record's training crop as a float32 tensor [3, H, W] in [-1, 1], mirrored left-right when `flip`."""
    if record.bucket is None:
        raise ValueError(f"{record.path}: no bucket; call assign_buckets first")
    image = fit_to_bucket(load_image(record.path), record.bucket)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return tensor.flip(-1) if flip else tensor


# ---------------------------------------------------------------------------------------------------------------
# Batches


class BucketSampler:
    """Batches of keys (index, flipped), every batch from one bucket. Epoch e's order is a pure function of
    (seed, e), independent of torch's global RNG, so a resumed run can jump to any batch with iterate(start).

    With several processes, process `rank` of `world_size` takes global batches rank, rank + world_size, ...
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int = 0, flip: bool = True,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size, self.seed, self.flip, self.shuffle = batch_size, seed, flip, shuffle
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Global batches per epoch (all processes together)."""
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())

    def epoch(self, number: int) -> list[list[Key]]:
        rng = random.Random(f"sd-lora:{self.seed}:{number}")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batches.append([(i, self.flip and rng.random() < 0.5) for i in chunk])
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def iterate(self, start: int = 0) -> Iterator[list[Key]]:
        """This process's batches forever, after the first `start` global batches (a resumed run passes the number
        of batches all processes have trained on, so it goes on with the next one whatever the process count)."""
        per_epoch, cached = len(self), (None, None)
        position = start + self.rank
        while True:
            epoch, offset = divmod(position, per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.epoch(epoch))
            yield cached[1][offset]
            position += self.world_size
