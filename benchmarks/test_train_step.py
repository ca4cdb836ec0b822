"""One training step of a CC-style clustering model, per loss backend.

ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), a 512-512-128 projection and a
512-512-K softmax cluster head; two views of 32x32 images; loss `ClusterContrastiveLoss("cc")`
(NT-Xent + cluster contrast) on the backend under test; Adam. On CUDA the forward runs under
bf16 autocast, as in training. The step time shows how much of a real step the loss is.
"""

import pytest
import torch
import torchvision
from conftest import DEVICE
from torch import nn

from fastcluster_cl import ClusterContrastiveLoss
from fastcluster_cl.bench import runner as bench

K = 10
# Images per view by tier (the batch holds 2N images).
BATCH = {"cpu": {"small": 4, "large": 64}, "cuda": {"small": 256, "large": 1024}}[DEVICE.type]


class ClusterModel(nn.Module):
    """ResNet-18 (CIFAR stem) with an instance projection and a cluster head."""

    def __init__(self, k: int = K, dim: int = 128):
        super().__init__()
        self.backbone = torchvision.models.resnet18(num_classes=1)
        self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.backbone.maxpool = nn.Identity()
        self.backbone.fc = nn.Identity()
        self.projection = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, dim))
        self.cluster = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, k))

    def forward(self, x):
        h = self.backbone(x)
        return self.projection(h), self.cluster(h)


@pytest.mark.parametrize("tier", list(BATCH))
@pytest.mark.parametrize("backend", bench.BACKENDS)
def test_train_step(benchmark, tier, backend):
    try:
        bench.resolve_impl(backend, "nt_xent", DEVICE)
        bench.resolve_impl(backend, "cc_cluster_loss", DEVICE)
    except bench.Skip as why:
        pytest.skip(str(why))
    n = BATCH[tier]
    torch.manual_seed(0)
    model = ClusterModel().to(DEVICE)
    criterion = ClusterContrastiveLoss("cc", backend=backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    views = torch.rand(2 * n, 3, 32, 32, device=DEVICE)  # [view a; view b]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
            z, c = model(views)
        loss = criterion(z[:n], z[n:], logits_a=c[:n], logits_b=c[n:]).total
        loss.backward()
        optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return loss

    with bench.value_checks(False):
        assert torch.isfinite(step())
        peak = bench.peak_memory(step, DEVICE)
        benchmark.extra_info.update(
            backend=backend, images=2 * n, device=str(DEVICE), peak_bytes=int(peak)
        )
        benchmark.pedantic(step, rounds=3 if DEVICE.type == "cpu" else 20, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = 2 * n / benchmark.stats.stats.median
