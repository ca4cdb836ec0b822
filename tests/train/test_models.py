"""Models: backbone shapes and stems, heads, and the method -> loss-input wiring."""

import numpy as np
import pytest
import torch

from fastcluster_cl import ClusterContrastiveLoss
from fastcluster_cl.models import (
    CenterHead,
    ResNetBackbone,
    SmallCNN,
    TCCHead,
    build_backbone,
    build_model,
    method_loss_inputs,
)


def test_small_cnn_handles_tiny_images():
    net = SmallCNN(in_channels=1, width=8)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 32) == (3, net.feature_dim)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_resnet_cifar_stem_keeps_resolution():
    plain = ResNetBackbone("resnet18", in_channels=3)
    cifar = ResNetBackbone("resnet18", in_channels=3, cifar_stem=True)
    assert plain.net.conv1.kernel_size == (7, 7) and plain.net.conv1.stride == (2, 2)
    assert cifar.net.conv1.kernel_size == (3, 3) and cifar.net.conv1.stride == (1, 1)
    assert isinstance(cifar.net.maxpool, torch.nn.Identity)
    cifar.eval(), plain.eval()
    x = torch.randn(1, 3, 16, 16)
    assert cifar(x).shape == plain(x).shape == (1, 512)
    # The CIFAR stem keeps 16x16 into layer1; the ImageNet stem shrinks it to 4x4.
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.shape

        return hook

    cifar.net.layer1.register_forward_hook(record("cifar"))
    plain.net.layer1.register_forward_hook(record("plain"))
    cifar(x), plain(x)
    assert seen["cifar"][-1] == 16 and seen["plain"][-1] == 4


def test_resnet_variants_and_grey_input():
    assert ResNetBackbone("resnet34").feature_dim == 512
    assert ResNetBackbone("resnet50").feature_dim == 2048
    grey = ResNetBackbone("resnet18", in_channels=1)
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_backbone_errors():
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("vgg", 3)
    with pytest.raises(ValueError, match="cifar_stem applies to ResNet"):
        build_backbone("small_cnn", 1, cifar_stem=True)
    with pytest.raises(ValueError, match="method must be one of"):
        build_model("simclr", "small_cnn", 10, 1)
    with pytest.raises(ValueError, match="num_clusters must be >= 2"):
        build_model("cc", "small_cnn", 1, 1)


def test_center_head_kmeans_init_and_student_t():
    rng = np.random.default_rng(0)
    means = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    feats = np.concatenate([m + 0.1 * rng.standard_normal((20, 2)) for m in means])
    head = CenterHead(2, 3)
    assert not bool(head.initialised)
    head.init_centers(feats, seed=0)
    assert bool(head.initialised)
    centers = head.centers.detach().numpy()
    # each true mean has a center within 0.1 of it
    assert np.abs(centers[:, None, :] - means[None]).sum(-1).min(0).max() < 0.1
    h = torch.randn(5, 2, dtype=torch.float64)
    q = head(h.float())["q"].double()
    mu = head.centers.detach().double()
    kernel = 1.0 / (1.0 + ((h[:, None] - mu[None]) ** 2).sum(-1))  # alpha = 1: exponent -1
    torch.testing.assert_close(q, kernel / kernel.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 3 feature rows"):
        head.init_centers(feats[:2])


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
def test_every_method_trains_through_the_backbone(method):
    torch.manual_seed(0)
    model = build_model(method, "small_cnn", 4, 1, hidden_dim=32, projection_dim=16)
    if method == "anchor":
        model.cluster_head.init_centers(torch.randn(8, model.backbone.feature_dim))
    x = torch.randn(3 * 6, 1, 8, 8)
    out = model(x)
    split = model([x[i * 6 : (i + 1) * 6] for i in range(3)])  # per-view forward
    views = split if method == "anchor" else split[:2]
    inputs = method_loss_inputs(model, method, *views)
    loss = ClusterContrastiveLoss(method, backend="torch")(split[0]["z"], split[1]["z"], **inputs)
    assert torch.isfinite(loss.total) and set(loss.parts) >= {"instance", "cluster"}
    loss.total.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    probs = model.probabilities(out)
    torch.testing.assert_close(probs.sum(1), torch.ones(18))
    assert model.predict(x).shape == (18,)


def test_anchor_needs_the_clean_view():
    model = build_model("anchor", "small_cnn", 3, 1, hidden_dim=16, projection_dim=8)
    out = model(torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match="clean view"):
        method_loss_inputs(model, "anchor", out, out)


@pytest.mark.parametrize("head", [CenterHead(4, 3), TCCHead(4, 3)])
def test_state_dicts_of_version_0_1_0_load(head):
    """Version 0.1.0 spelled the parameter `centres`: its state dicts (checkpoints) still load."""
    old = {("centres" if k == "centers" else k): v for k, v in head.state_dict().items()}
    old["centres"] = torch.randn(3, 4)
    fresh = type(head)(4, 3)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.centers, old["centres"])
