"""lightly's SimCLR example with fastcluster_cl's NT-Xent: the only change is the loss line.

python examples/simclr_lightly.py            # CIFAR-10 (downloads it), ResNet-18
python examples/simclr_lightly.py --tiny     # a few random images, seconds on a CPU
"""

import argparse

import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import nn

import fastcluster_cl as fc


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, features: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(features, 512, 128)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


def main(tiny: bool) -> None:
    resnet = torchvision.models.resnet18()
    model = SimCLR(nn.Sequential(*list(resnet.children())[:-1]), 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    transform = SimCLRTransform(input_size=32, gaussian_blur=0.0)
    if tiny:
        dataset = torchvision.datasets.FakeData(16, (3, 32, 32), transform=transform)
    else:
        dataset = torchvision.datasets.CIFAR10(
            "datasets/cifar10", download=True, transform=transform
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=8 if tiny else 256,
        shuffle=True,
        drop_last=True,
        num_workers=0 if tiny else 8,
    )

    criterion = fc.NTXentLoss()  # was: lightly.loss.NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    for epoch in range(1 if tiny else 10):
        total = 0.0
        for (x0, x1), _ in loader:
            loss = criterion(model(x0.to(device)), model(x1.to(device)))
            total += loss.item()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"epoch: {epoch:>02}, loss: {total / len(loader):.5f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run on random images")
    main(parser.parse_args().tiny)
