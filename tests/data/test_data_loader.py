"""Train/eval loaders (torchvision backend), augmentation parameters, reproducibility, sharding."""

import dataclasses

import numpy as np
import pytest
import torch

from fastcluster_cl.data import (
    AugmentSpec,
    EvalLoader,
    ImageDataset,
    augment_preset,
    load_dataset,
    make_eval_loader,
    make_train_loader,
    sample_view_params,
)
from fastcluster_cl.data import loader as loader_module
from fastcluster_cl.data.augment import torchvision_view


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def rgb():
    """37 random 12x12 RGB images posing as CIFAR-10 (to get its colour preset)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 12, 12, 3), dtype=np.uint8)
    return ImageDataset(images, rng.integers(0, 10, size=37), 10, "cifar10")


def _expected_clean(ds, index):
    mean, std = (np.array(v).reshape(1, -1, 1, 1) for v in ds.mean_std)
    x = ds.images[index].transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    return (x - mean) / std


def test_train_batches_shapes_values(rgb):
    loader = make_train_loader(rgb, 8, seed=3)
    assert loader.backend == "torchvision" and len(loader) == 37 // 8
    batches = list(loader.epoch(0))
    assert len(batches) == 4
    for batch in batches:
        assert set(batch) == {"a", "b", "clean", "label", "index"}
        for key in ("a", "b", "clean"):
            assert batch[key].shape == (8, 3, 12, 12) and batch[key].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        index = batch["index"].numpy()
        np.testing.assert_array_equal(batch["label"].numpy(), rgb.labels[index])
        np.testing.assert_allclose(batch["clean"].numpy(), _expected_clean(rgb, index), atol=1e-5)
        # Each view differs from the clean image and from the other view.
        assert (batch["a"] - batch["clean"]).abs().amax(dim=(1, 2, 3)).min() > 0.1
        assert (batch["a"] - batch["b"]).abs().amax(dim=(1, 2, 3)).min() > 0.1
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert len(np.unique(seen)) == 32


def test_normalisation_statistics(digits):
    mean, std = digits.mean_std
    x = digits.images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, [x.mean()], rtol=1e-10)
    np.testing.assert_allclose(std, [x.std()], rtol=1e-10)
    clean = torch.cat([b["clean"] for b in make_eval_loader(digits, 500)])
    assert abs(clean.mean().item()) < 1e-5 and abs(clean.std().item() - 1) < 1e-3


def test_shuffled_eval_loader_visits_every_image_once_in_even_batches(digits):
    batches = list(make_eval_loader(digits, 500, shuffle_seed=3))
    index = torch.cat([b["index"] for b in batches]).numpy()
    assert sorted(index.tolist()) == list(range(len(digits)))
    assert index[:20].tolist() != list(range(20))
    assert [len(b["index"]) for b in batches] == [450, 449, 449, 449]  # 1797 in 4, not 500s
    first = batches[0]
    np.testing.assert_array_equal(first["label"].numpy(), digits.labels[first["index"].numpy()])
    np.testing.assert_allclose(
        first["clean"].numpy(),
        _expected_clean(digits, first["index"].numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="permutation"):
        EvalLoader(digits, 500, 8, torch.device("cpu"), order=np.zeros(len(digits), np.int64))


def test_digits_train_loader_resized(digits):
    loader = make_train_loader(digits, 100, image_size=16, seed=0)
    batch = next(loader.epoch(2))
    assert batch["a"].shape == (100, 1, 16, 16) and batch["clean"].shape == (100, 1, 16, 16)
    assert len(loader) == 17


def test_resume_reproduces_uninterrupted_run(rgb):
    loader = make_train_loader(rgb, 5, seed=11)
    full = list(loader.epoch(4))
    resumed = list(make_train_loader(rgb, 5, seed=11).epoch(4, start_batch=3))
    assert len(resumed) == len(full) - 3
    for x, y in zip(full[3:], resumed):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    other_epoch = next(loader.epoch(5))
    other_seed = next(make_train_loader(rgb, 5, seed=12).epoch(4))
    assert not torch.equal(other_epoch["index"], full[0]["index"])
    assert not torch.equal(other_seed["a"], full[0]["a"])
    assert list(loader.epoch(4, start_batch=len(loader))) == []


def test_workers_give_identical_batches(rgb):
    serial = list(make_train_loader(rgb, 9, seed=5).epoch(1))
    parallel = list(make_train_loader(rgb, 9, seed=5, num_workers=2).epoch(1))
    assert len(serial) == len(parallel) == 4
    for x, y in zip(serial, parallel):
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("drop_last", [True, False])
def test_sharding_is_disjoint(rgb, drop_last):
    world = 3
    per_rank = [
        np.concatenate(
            [
                b["index"].numpy()
                for b in make_train_loader(
                    rgb, 5, seed=2, rank=r, world_size=world, drop_last=drop_last
                ).epoch(7)
            ]
        )
        for r in range(world)
    ]
    expected = 10 if drop_last else 37 // world
    assert all(len(ix) == expected for ix in per_rank)
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)
    if not drop_last:  # all ranks together cover the truncated permutation once
        order = np.random.default_rng([2, 7]).permutation(37)[:36]
        assert set(union) == set(order)
    lengths = [
        len(make_train_loader(rgb, 5, rank=r, world_size=world, drop_last=drop_last))
        for r in range(world)
    ]
    assert lengths == [2 if drop_last else 3] * world


def test_eval_loader_in_order(rgb):
    loader = make_eval_loader(rgb, 10)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    index = torch.cat([b["index"] for b in batches]).numpy()
    np.testing.assert_array_equal(index, np.arange(37))
    clean = torch.cat([b["clean"] for b in batches]).numpy()
    np.testing.assert_allclose(clean, _expected_clean(rgb, index), atol=1e-5)
    np.testing.assert_array_equal(torch.cat([b["label"] for b in batches]).numpy(), rgb.labels)
    assert "a" not in batches[0]
    resized = next(iter(make_eval_loader(rgb, 10, image_size=20)))
    assert resized["clean"].shape == (10, 3, 20, 20)


def test_crop_parameters_follow_spec():
    spec = AugmentSpec(crop_scale=(0.2, 0.5), crop_ratio=(0.5, 2.0), flip_p=0.3)
    p = sample_view_params(np.random.default_rng(0), 4000, 40, 30, spec)
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= 40).all() and (p.left + p.width <= 30).all()
    area = p.height * p.width / 1200
    assert area.min() > 0.17 and area.max() < 0.55  # rounding of h and w widens the range a bit
    ratio = p.width / p.height
    assert ratio.min() > 0.4 and ratio.max() < 2.4
    assert abs(p.flip.mean() - 0.3) < 0.03
    jitter_on = p.brightness != 1.0
    assert abs(jitter_on.mean() - 0.8) < 0.03 and abs(p.gray.mean() - 0.2) < 0.03
    assert (p.hue[~jitter_on] == 0).all() and (p.saturation[~jitter_on] == 1).all()
    assert (np.abs(p.hue) <= 0.1).all() and p.brightness.min() >= 0.6 and (p.sigma == 0).all()
    assert all(sorted(o) == [0, 1, 2, 3] for o in p.order[:50])


def test_crop_fallback_is_centered():
    """No box of ratio >= 3 fits a 10x10 image: torchvision's rule takes a centered crop."""
    spec = AugmentSpec(crop_scale=(0.9, 1.0), crop_ratio=(3.0, 4.0))
    p = sample_view_params(np.random.default_rng(1), 20, 10, 10, spec)
    np.testing.assert_array_equal(p.width, 10)
    np.testing.assert_array_equal(p.height, 3)
    np.testing.assert_array_equal(p.top, 3)


def _identity_params(n, h, w):
    spec = AugmentSpec(
        crop_scale=(1.0, 1.0), crop_ratio=(w / h, w / h), flip_p=0.0, jitter_p=0.0, gray_p=0.0
    )
    return sample_view_params(np.random.default_rng(0), n, h, w, spec), spec


def test_torchvision_view_applies_parameters(rgb):
    images = torch.from_numpy(rgb.images[:4]).permute(0, 3, 1, 2)
    params, spec = _identity_params(4, 12, 12)
    assert torch.equal(torchvision_view(images, params, 12, spec), images)
    params.flip[:] = [True, False, True, False]
    out = torchvision_view(images, params, 12, spec)
    assert torch.equal(out[0], images[0].flip(-1)) and torch.equal(out[1], images[1])
    params.flip[:] = False
    params.top[:], params.left[:], params.height[:], params.width[:] = 2, 5, 6, 6
    out = torchvision_view(images, params, 6, spec)
    assert torch.equal(out, images[:, :, 2:8, 5:11])
    params.gray[:] = True
    out = torchvision_view(images, params, 6, spec).float()
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    params.gray[:], params.brightness[:] = False, 0.5
    out = torchvision_view(images, params, 6, spec).float()
    expected = images[:, :, 2:8, 5:11].float() * 0.5
    assert (out - expected).abs().max() <= 1.0  # uint8 rounding


def test_presets():
    digits = augment_preset("digits")
    assert digits.flip_p == 0 and not digits.uses_colour and digits.blur_p == 0
    # the 8 px digits: the strong digit set without the stroke dilation / erosion
    mnist = augment_preset("mnist5k")
    assert mnist.morph_p > 0 and digits.morph_p == 0
    assert dataclasses.replace(mnist, morph_p=0.0) == digits
    assert augment_preset("cifar10").uses_colour and augment_preset("cifar10").blur_p == 0
    imagenet = augment_preset("imagenet_dogs")
    assert imagenet.blur_p == 0.5 and imagenet.blur_kernel(224) == 23
    assert imagenet.jitter_p == 0.8 and imagenet.gray_p == 0.2
    with pytest.raises(ValueError, match="unknown dataset"):
        augment_preset("mnist")


def test_bad_arguments(rgb, digits, monkeypatch):
    with pytest.raises(ValueError, match="batch_size"):
        make_train_loader(rgb, 0)
    with pytest.raises(ValueError, match="exceeds"):
        make_train_loader(rgb, 64)
    with pytest.raises(ValueError, match="rank"):
        make_train_loader(rgb, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="augment must be one of"):
        make_train_loader(rgb, 4, augment="kornia")
    with pytest.raises(ValueError, match="seed"):
        make_train_loader(rgb, 4, seed=-1)
    with pytest.raises(ValueError, match="channel"):
        make_train_loader(digits, 4, spec=AugmentSpec())
    with pytest.raises(TypeError, match="ImageDataset"):
        make_train_loader(rgb.images, 4)
    with pytest.raises(ValueError, match="start_batch"):
        make_train_loader(rgb, 4).epoch(0, start_batch=99)  # raised before iterating
    with pytest.raises(ValueError, match="epoch"):
        make_train_loader(rgb, 4).epoch(-1)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentSpec(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="preset"):
        make_train_loader(ImageDataset(rgb.images, rgb.labels, 10, "mine"), 4)
    monkeypatch.setattr(
        "fastcluster_cl.data.dali.dali_unavailable_reason", lambda: "nvidia.dali is not installed"
    )
    with pytest.raises(ImportError, match="nvidia.dali is not installed"):
        make_train_loader(rgb, 4, augment="dali")
    cuda = torch.device("cuda")
    assert loader_module.choose_backend("auto", cuda) == (
        "torchvision",
        "nvidia.dali is not installed",
    )


def test_separable_blur_equals_torchvision_2d_blur():
    from torchvision.transforms.v2 import functional as F

    spec = AugmentSpec(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        blur_p=1.0,
    )
    images = torch.randint(
        0, 256, (3, 3, 41, 41), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    p = sample_view_params(np.random.default_rng(0), 3, 41, 41, spec)
    out = torchvision_view(images, p, 41, spec)
    kernel = spec.blur_kernel(41)
    assert kernel == 5
    for i in range(3):
        ref = F.gaussian_blur(images[i], [kernel, kernel], [float(p.sigma[i])] * 2)
        assert (out[i].int() - ref.int()).abs().max() <= 1
    assert (out != images).float().mean() > 0.9


def test_backend_choice(monkeypatch):
    import fastcluster_cl.data.dali as dali_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)

    def not_probed():
        raise AssertionError("auto on CPU must not import DALI")

    monkeypatch.setattr(dali_module, "dali_unavailable_reason", not_probed)
    assert loader_module.choose_backend("auto", cpu)[0] == "torchvision"
    assert loader_module.choose_backend("torchvision", cuda) == ("torchvision", "requested")
    monkeypatch.setattr(dali_module, "dali_unavailable_reason", lambda: None)
    assert loader_module.choose_backend("auto", cuda)[0] == "dali"
    assert loader_module.choose_backend("dali", cpu) == ("dali", "requested")


def test_backend_is_logged(rgb, caplog):
    with caplog.at_level("INFO", logger="fastcluster_cl.data.loader"):
        make_train_loader(rgb, 4)
    assert "augmentation backend: torchvision (device is cpu" in caplog.text


@pytest.mark.parametrize("augment,workers", [("torchvision", 0), ("torchvision", 1), ("dali", 0)])
def test_global_rng_untouched(rgb, augment, workers):
    """The model's own sampling (e.g. Gumbel noise) uses torch's global RNG: iterating the
    loader must not advance it, or resumed runs would diverge."""
    if augment == "dali":
        pytest.importorskip("nvidia.dali")
    loader = make_train_loader(rgb, 8, augment=augment, num_workers=workers)
    before = torch.get_rng_state()
    assert len(list(loader.epoch(0, start_batch=1))) == 3
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("preset", ["digits", "mnist5k"])
def test_digit_augmentation_is_exact_on_resume_and_over_ranks(digits, preset):
    """The digit presets (mnist5k's with the stroke dilation / erosion): batch k of an epoch is
    a function of (seed, epoch, k), whether resumed mid-epoch or split over ranks (the noise
    seeds travel with each image's row)."""
    spec = augment_preset(preset)
    assert spec.uses_digit_ops and spec.crop_scale == (1.0, 1.0)
    full = list(make_train_loader(digits, 64, seed=3, spec=spec).epoch(2))
    resumed = list(make_train_loader(digits, 64, seed=3, spec=spec).epoch(2, start_batch=5))
    for x, y in zip(full[5:], resumed):
        assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])
    halves = [
        next(make_train_loader(digits, 32, seed=3, rank=r, world_size=2, spec=spec).epoch(2))
        for r in range(2)
    ]
    for r, half in enumerate(halves):
        assert torch.equal(half["a"], full[0]["a"][r::2])
    # the views differ from the clean images and from each other
    assert not torch.equal(full[0]["a"], full[0]["clean"])
    assert not torch.equal(full[0]["a"], full[0]["b"])


def test_digit_view_operations():
    from fastcluster_cl.data.augment import digit_view

    rng = np.random.default_rng(0)
    x = torch.zeros(6, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0  # a bar
    identity = AugmentSpec(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        scale=(1.0, 1.0001),
    )
    p = sample_view_params(rng, 6, 28, 28, identity)
    torch.testing.assert_close(digit_view(x, p, identity), x, atol=1e-3, rtol=0)
    strong = augment_preset("mnist5k")
    p = sample_view_params(rng, 6, 28, 28, strong)
    out = digit_view(x, p, strong)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    # erasing only: the erased box is zero, the rest unchanged
    erase = AugmentSpec(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        erase_p=1.0,
        scale=(1.0, 1.0001),
    )
    p = sample_view_params(rng, 6, 28, 28, erase)
    ones = torch.ones(6, 1, 28, 28)
    out = digit_view(ones, p, erase)
    area = (out < 0.5).float().mean((1, 2, 3)).numpy()
    assert (area > 0).all() and (area < 0.35).all()


@pytest.mark.parametrize("preset", ["digits", "mnist5k"])
def test_dali_path_digit_ops_match_the_torchvision_path(digits, preset):
    """The DALI path applies `digit_view` to DALI's normalised output (its crop is the identity
    for the digit presets): emulated here on the clean batch, it equals the torchvision path's
    view to the torchvision path's uint8 rounding."""
    loader = make_train_loader(
        digits, 64, seed=4, augment="torchvision", spec=augment_preset(preset)
    )
    source = loader_module._EpochBatches(loader, 1)
    batch = next(loader.epoch(1))
    params_a, _ = source.params(0)
    emulated = loader.digit_ops_normalised(batch["clean"], params_a)
    std = float(loader.std[0])
    torch.testing.assert_close(emulated, batch["a"], atol=0.51 / 255 / std + 1e-5, rtol=0)
