"""The torchvision shim makes the registry's CUDA torchvision usable with a CPU torch, and the
NVIDIA apex probe never mistakes another package for it."""

import torch

import fastcluster_cl  # noqa: F401  (applies the shim)
from fastcluster_cl import _compat


def test_torchvision_models_and_transforms_work():
    import torchvision
    from torchvision.transforms import v2

    model = torchvision.models.resnet18(num_classes=10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert v2.RandomHorizontalFlip(p=1.0)(image).equal(image.flip(-1))


def test_shim_is_idempotent():
    _compat.ensure_torchvision_importable()
    _compat.ensure_torchvision_importable()
    assert _compat._has_op("nms") and _compat._has_op("qnms")


def test_apex_probe_requires_apex_optimizers(monkeypatch):
    monkeypatch.setattr(_compat, "module_available", lambda name: name == "apex")
    assert _compat.apex_available() is False  # an unrelated 'apex' has no apex.optimizers
