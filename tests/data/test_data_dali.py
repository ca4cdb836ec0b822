"""The DALI two-view pipeline in CPU mode (device_id=None): shapes, exact identities, parity
with the torchvision backend for the same parameters, and the loader's reproducibility."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastcluster_cl.data import (  # noqa: E402
    AugmentSpec,
    ImageDataset,
    augment_preset,
    make_train_loader,
    sample_view_params,
)
from fastcluster_cl.data.augment import torchvision_view  # noqa: E402
from fastcluster_cl.data.dali import DaliTwoViewPipeline, dali_unavailable_reason  # noqa: E402

RAW = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # mean/std that leave pixels in 0..255


def _smooth_images(n=4, size=24, seed=0):
    """Smooth colour images (random low-frequency waves) so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3))
    for i in range(n):
        for c in range(3):
            fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6)
            out[i, :, :, c] = 127.5 + 100 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    return np.rint(out).astype(np.uint8)


def _identity(n, size, spec):
    """Parameters of the identity view (whole image, no flip, no colour change, no blur)."""
    p = sample_view_params(
        np.random.default_rng(0),
        n,
        size,
        size,
        dataclasses.replace(
            spec,
            crop_scale=(1.0, 1.0),
            crop_ratio=(1, 1),
            flip_p=0.0,
            jitter_p=0.0,
            gray_p=0.0,
            blur_p=0.0,
        ),
    )
    return p


def _both(images, params, size, spec):
    """(DALI, torchvision) outputs of one view, float pixels 0..255, (B, C, S, S)."""
    pipe = DaliTwoViewPipeline(len(images), size, spec, *RAW)
    dali, _, _ = pipe.run(images, params, params)
    tv = torchvision_view(torch.from_numpy(images).permute(0, 3, 1, 2), params, size, spec)
    return dali, tv.float()


def test_available_here():
    assert dali_unavailable_reason() is None


def test_shapes_and_view_differences():
    images = _smooth_images(5, 20)
    spec = augment_preset("imagenet10")
    rng = np.random.default_rng(1)
    pa, pb = (sample_view_params(rng, 5, 20, 20, spec) for _ in range(2))
    pipe = DaliTwoViewPipeline(8, 16, spec, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    a, b, clean = pipe.run(images, pa, pb)
    for t in (a, b, clean):
        assert t.shape == (5, 3, 16, 16) and t.dtype == torch.float32 and t.device.type == "cpu"
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 0.1
    assert (a - clean).abs().amax(dim=(1, 2, 3)).min() > 0.1
    # The clean view is the normalised, resized image.
    from torchvision.transforms.v2 import functional as F

    ref = F.resize(torch.from_numpy(images).permute(0, 3, 1, 2), [16, 16], antialias=True)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert (clean - (ref.float() / 255 - mean) / std).abs().max() < 2.5 / 255 / 0.2


def test_identity_parameters_are_exact():
    """Whole-image crop, colour identity and the 'blur off' sigma give the input back."""
    images = _smooth_images(3, 12)
    spec = augment_preset("imagenet_dogs")  # has colour and blur operators
    dali, tv = _both(images, _identity(3, 12, spec), 12, spec)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    assert torch.equal(dali, expected) and torch.equal(tv, expected)


def test_crop_and_flip_are_exact():
    images = _smooth_images(4, 12)
    spec = augment_preset("cifar10")
    p = _identity(4, 12, spec)
    p.top[:], p.left[:], p.height[:], p.width[:] = [0, 3, 6, 2], [1, 0, 6, 4], 6, 6
    p.flip[:] = [True, False, True, False]
    dali, tv = _both(images, p, 6, spec)
    src = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    for i in range(4):
        crop = src[i, :, p.top[i] : p.top[i] + 6, p.left[i] : p.left[i] + 6]
        expected = crop.flip(-1) if p.flip[i] else crop
        assert torch.equal(dali[i], expected) and torch.equal(tv[i], expected)


def _with(p, **changes):
    for key, value in changes.items():
        getattr(p, key)[:] = value
    return p


@pytest.mark.parametrize(
    "change,tolerance",
    [
        ({"top": 3, "left": 2, "height": 15, "width": 11}, 1.0),  # resized crop (upsampling)
        ({"height": 24, "width": 24}, 1.0),  # whole image, downsampled below
        ({"gray": True}, 2.0),
        ({"brightness": 0.6}, 1.0),
        ({"saturation": 1.4}, 1.0),
        ({"saturation": 0.5}, 1.0),
        ({"sigma": 1.5}, 1.0),
    ],
)
def test_parity_with_torchvision(change, tolerance):
    """The same parameters give the same pixels in both backends, up to resampling/rounding
    (0..255 scale; compared inside a 2-pixel margin, where the blur borders could differ)."""
    images = _smooth_images(4, 24, seed=2)
    spec = AugmentSpec(blur_p=0.5)
    size = 12 if "height" in change and change["height"] == 24 else 24
    dali, tv = _both(images, _with(_identity(4, 24, spec), **change), size, spec)
    diff = (dali - tv)[..., 2:-2, 2:-2].abs().max().item()
    assert diff <= tolerance + 1e-4, diff
    # ... and the operation did something (identity parameters give the input back).
    if size == 24:
        assert (dali - torch.from_numpy(images).permute(0, 3, 1, 2)).abs().max() > 5


def test_hue_is_a_yiq_rotation_in_degrees():
    """DALI rotates hue in YIQ (luma kept), torchvision shifts HSV hue: both turn red to green
    at a third of the circle, and DALI's full turn (360 degrees) is the identity."""
    images = _smooth_images(2, 8, seed=4)
    images[0] = (200, 50, 50)
    images[1] = 96 + images[1] // 4  # weak colours: the rotation does not clip
    spec = AugmentSpec()
    dali, tv = _both(images, _with(_identity(2, 8, spec), hue=1 / 3), 8, spec)
    assert dali[0, :, 0, 0].argmax() == 1 and tv[0, :, 0, 0].argmax() == 1
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    src = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    inside = (dali > 0) & (dali < 255)  # clipped pixels lose luma
    assert inside.all(dim=1)[1].all()
    mask = inside.all(dim=1, keepdim=True)
    assert (((dali - src) * luma).sum(1, keepdim=True) * mask)[1].abs().max() <= 1.5
    full_turn = _with(_identity(2, 8, spec), hue=1.0)  # beyond torchvision's [-0.5, 0.5]
    dali, _, _ = DaliTwoViewPipeline(2, 8, spec, *RAW).run(images, full_turn, full_turn)
    assert (dali - src).abs().max() <= 1.0


def test_contrast_pivots_differ_but_factor_one_is_identity():
    images = _smooth_images(2, 16, seed=3)
    spec = AugmentSpec()
    dali, tv = _both(images, _with(_identity(2, 16, spec), contrast=0.5), 16, spec)
    src = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    # DALI pivots on mid-grey (128), torchvision on the image's mean grey level.
    assert (dali - ((src - 128) * 0.5 + 128)).abs().max() <= 1.0
    gray_mean = (0.299 * src[:, 0] + 0.587 * src[:, 1] + 0.114 * src[:, 2]).mean((1, 2))
    expected = (src - gray_mean.view(-1, 1, 1, 1)) * 0.5 + gray_mean.view(-1, 1, 1, 1)
    assert (tv - expected).abs().max() <= 1.5  # torchvision rounds the grey image first


def test_grayscale_input_without_colour_ops():
    images = _smooth_images(3, 10)[..., :1]
    spec = augment_preset("digits")
    p = sample_view_params(np.random.default_rng(4), 3, 10, 10, spec)
    pipe = DaliTwoViewPipeline(3, 10, spec, (0.5,), (0.25,))
    a, b, clean = pipe.run(images, p, p)
    assert a.shape == (3, 1, 10, 10) and torch.equal(a, b)
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(clean, expected, atol=1e-5)


def test_dali_loader_resume_and_sharding():
    rng = np.random.default_rng(5)
    ds = ImageDataset(_smooth_images(23, 16, seed=6), rng.integers(0, 10, 23), 10, "stl10")
    loader = make_train_loader(ds, 4, augment="dali", seed=9, drop_last=False)
    assert loader.backend == "dali" and len(loader) == 6
    full = list(loader.epoch(1))
    assert full[-1]["a"].shape == (3, 3, 16, 16)  # the partial last batch
    resumed = list(
        make_train_loader(ds, 4, augment="dali", seed=9, drop_last=False).epoch(1, start_batch=4)
    )
    for x, y in zip(full[4:], resumed):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    # Same order and labels as the torchvision backend; views agree up to the backends'
    # documented differences (jitter order, contrast pivot, resampling).
    tv = list(make_train_loader(ds, 4, augment="torchvision", seed=9, drop_last=False).epoch(1))
    for x, y in zip(full, tv):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        assert torch.allclose(x["clean"], y["clean"], atol=1e-5)
    shards = [
        torch.cat(
            [
                b["index"]
                for b in make_train_loader(
                    ds, 4, augment="dali", seed=9, rank=r, world_size=2
                ).epoch(0)
            ]
        )
        for r in range(2)
    ]
    assert len(set(shards[0].tolist()) | set(shards[1].tolist())) == 16


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu_and_resumes():
    images = _smooth_images(6, 20, seed=7)
    spec = augment_preset("imagenet10")
    rng = np.random.default_rng(8)
    pa, pb = (sample_view_params(rng, 6, 20, 20, spec) for _ in range(2))
    cpu = DaliTwoViewPipeline(8, 16, spec, *RAW).run(images, pa, pb)
    gpu = DaliTwoViewPipeline(8, 16, spec, *RAW, device_id=0).run(images, pa, pb)
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda" and g.shape == c.shape
        assert (g.cpu() - c).abs().max() <= 2.0  # 0..255 scale: GPU/CPU resampling rounding
    ds = ImageDataset(_smooth_images(20, 16, seed=9), np.arange(20) % 10, 10, "cifar10")
    loader = make_train_loader(ds, 4, device="cuda", seed=1)
    assert loader.backend == "dali"
    full = list(loader.epoch(0))
    resumed = list(make_train_loader(ds, 4, device="cuda", seed=1).epoch(0, start_batch=2))
    for x, y in zip(full[2:], resumed):
        assert all(torch.equal(x[k], y[k]) and x[k].device.type == "cuda" for k in x)
