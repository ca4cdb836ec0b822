"""Two-view SimCLR augmentation throughput: DALI against torchvision, through the library's
training loader (`fastcluster_cl.data.make_train_loader`, CIFAR-10 preset, 32x32 images).

Each round is one epoch of `BATCHES` batches (views a, b and the clean view) delivered on the
benchmark device; `extra_info["images_per_s"]` counts source images. On CPU both backends use
one worker (DALI: one CPU thread; torchvision: in-process); on CUDA DALI runs on the GPU.
"""

import numpy as np
import pytest
import torch
from conftest import DEVICE

from fastcluster_cl.data import ImageDataset, make_train_loader
from fastcluster_cl.data.dali import dali_unavailable_reason

BATCHES = 4
BATCH = {"cpu": {"small": 32, "large": 128}, "cuda": {"small": 256, "large": 1024}}[DEVICE.type]


@pytest.mark.parametrize("tier", list(BATCH))
@pytest.mark.parametrize("augment", ["torchvision", "dali"])
def test_augment(benchmark, augment, tier):
    if augment == "dali" and dali_unavailable_reason() is not None:
        pytest.skip(dali_unavailable_reason())
    batch = BATCH[tier]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(BATCHES * batch, 32, 32, 3), dtype=np.uint8)
    dataset = ImageDataset(
        images=images, labels=rng.integers(0, 10, size=len(images)), num_classes=10, name="cifar10"
    )
    loader = make_train_loader(dataset, batch, augment=augment, device=DEVICE, seed=0)
    assert loader.backend == augment

    def epoch():
        batches = list(loader.epoch(0))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return batches

    first = epoch()  # builds the DALI pipeline
    assert len(first) == BATCHES and first[0]["a"].shape == (batch, 3, 32, 32)
    benchmark.extra_info.update(augment=augment, batch=batch, device=str(DEVICE))
    benchmark.pedantic(epoch, rounds=3 if DEVICE.type == "cpu" else 10, warmup_rounds=0)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = BATCHES * batch / benchmark.stats.stats.median
